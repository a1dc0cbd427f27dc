"""The per-batch core: a feature matrix and the members' scorers in, the table's columns
and the rows set aside out.

Each step here takes what it needs as arguments (the scorers too: nothing is taken from
a process-wide cache) and returns its result; reading and writing files is the caller's
(``tasks.scoring``, ``tasks.writer``). So the core can be read and tested alone: a batch
with a NaN feature, a member that returns inf, a policy of fail or quarantine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from loaders.base import Scorer
from loaders.errors import DataError, ModelLoadError
from loaders.feed import FEED_ROWS
from loaders.manifest import BadRowPolicy
from tasks.features import all_finite, find_bad_rows
from tasks.merge import EnsembleMethod, combine

__all__ = ["BatchResult", "ScoringContext", "StartedBatch", "finish_batch", "score_batch",
           "start_batch"]

_SHOW_IDS = 5


def ids_text(ids: pa.Array, mask: np.ndarray | None = None) -> str:
    """A few ids, for messages that name the rows concerned."""
    picked = (ids.filter(pa.array(mask)) if mask is not None else ids)[:_SHOW_IDS].to_pylist()
    return f"ids {picked}{' ...' if len(picked) == _SHOW_IDS else ''}"


@dataclass
class ScoringContext:
    """What stays the same for every batch of a partition."""

    where: str  # the partition, for messages
    names: list[str]  # members, in table order
    features: tuple[str, ...]
    scorers: Mapping[int, Scorer]  # member index -> loaded scorer (members to score)
    policy: BadRowPolicy
    method: EnsembleMethod
    weights: np.ndarray  # normalized, one per member
    pool: Executor | None = None  # runs members concurrently when given
    seconds: dict[int, float] = field(default_factory=dict)  # time in predict, per member
    min_members: int = 0  # members a row needs (finite scores); 0: all of them
    absent: tuple[int, ...] = ()  # members not loaded: their scores are missing (null)
    feed_rows: int = FEED_ROWS[0]  # most rows per Session.run (loaders.feed)

    @property
    def quorum(self) -> int:
        return self.min_members or len(self.names)


@dataclass
class BatchResult:
    """One batch's table rows (``scores`` is (members, rows)) and the rows set aside."""

    ids: pa.Array
    scores: np.ndarray
    ensemble: np.ndarray
    std: np.ndarray
    count: np.ndarray
    aside_ids: list[pa.Array] = field(default_factory=list)
    aside_reasons: list[list[str]] = field(default_factory=list)
    scores_set_aside: int = 0  # of the rows set aside, those for their scores

    @property
    def rows_set_aside(self) -> int:
        return sum(len(r) for r in self.aside_reasons)


@dataclass
class StartedBatch:
    """A batch whose members are scoring (on the pool, when the context has one), not yet
    screened and combined: :func:`finish_batch` completes it. The feature matrix it was
    started on must stay untouched until then."""

    ids: pa.Array
    scores: np.ndarray  # (members, rows): reused and absent members' rows already filled
    runs: list[Future[tuple[int, float]]]  # one per member scored on the pool
    aside_ids: list[pa.Array] = field(default_factory=list)
    aside_reasons: list[list[str]] = field(default_factory=list)


def score_batch(ctx: ScoringContext, matrix: np.ndarray, ids: pa.Array,
                reused: Callable[[pa.Array], Mapping[int, np.ndarray]] | None = None,
                source: pa.RecordBatch | None = None) -> BatchResult:
    """Screen the features, score with every member, screen the scores, combine:
    :func:`start_batch` then :func:`finish_batch`.

    Raises:
        DataError: bad features under the ``fail`` policy.
        ModelLoadError: non-finite member or ensemble scores under ``fail``.
    """
    return finish_batch(ctx, start_batch(ctx, matrix, ids, reused, source))


def start_batch(ctx: ScoringContext, matrix: np.ndarray, ids: pa.Array,
                reused: Callable[[pa.Array], Mapping[int, np.ndarray]] | None = None,
                source: pa.RecordBatch | None = None) -> StartedBatch:
    """Screen the features and set the members scoring, without waiting for them.

    Starting batch N+1 before finishing batch N keeps TensorFlow busy while this thread
    screens, combines and writes batch N; waiting for every member first left the cores
    idle for that time and while the batch's last member ran alone (see BENCHMARKS.md).
    ``reused`` gives the scores of members that are not rescored, for the ids that are
    scored (the caller checks they are the same rows); ``source``, the batch ``matrix``
    was decoded from, lets a bad row's reason quote its value.

    Raises:
        DataError: bad features under the ``fail`` policy.
    """
    aside_ids: list[pa.Array] = []
    aside_reasons: list[list[str]] = []
    bad = find_bad_rows(matrix, ctx.features, source)
    if bad is not None:
        if ctx.policy == "fail":
            cols = sorted({r.split(" is ")[0] for r in bad.reasons})
            raise DataError(
                f"partition {ctx.where}: {bad.count} row(s) with null, NaN, infinite or "
                f"out-of-range features ({ids_text(ids, bad.mask)}, column(s) {cols}: "
                f"{bad.reasons[0]}); clean the data, or set bad_rows to quarantine (--bad-rows "
                f"quarantine) to set "
                "them aside"
            )
        aside_ids.append(ids.filter(pa.array(bad.mask)))
        aside_reasons.append(bad.reasons)
        keep = ~bad.mask
        matrix, ids = np.ascontiguousarray(matrix[keep]), ids.filter(pa.array(keep))
    scores = np.empty((len(ctx.names), len(matrix)), dtype=np.float32)
    for k in ctx.absent:
        scores[k] = np.nan
    for k, values in (reused(ids) if reused is not None else {}).items():
        scores[k] = values
    return StartedBatch(ids, scores, _predict_members(ctx, matrix, scores), aside_ids,
                        aside_reasons)


def finish_batch(ctx: ScoringContext, started: StartedBatch) -> BatchResult:
    """Wait for the members of a started batch, screen their scores and combine them.

    Raises:
        ModelLoadError: non-finite member or ensemble scores under ``fail`` (or a
            member's error while scoring).
    """
    for run in started.runs:
        k, seconds = run.result()
        ctx.seconds[k] = ctx.seconds.get(k, 0.0) + seconds
    aside_ids, aside_reasons = started.aside_ids, started.aside_reasons
    features_aside = sum(len(r) for r in aside_reasons)
    scores, ids = _screen_scores(ctx, started.scores, started.ids, aside_ids, aside_reasons)
    ensemble, std, count = combine(scores, ctx.method, ctx.weights)
    if not (all_finite(ensemble) and all_finite(std)):
        # Finite member scores and finite, normalized weights give a finite ensemble; this
        # guards what they cannot (member scores near float32's limit overflowing the
        # spread), like member scores: fail, or set the rows aside.
        broken = ~(np.isfinite(ensemble) & np.isfinite(std))
        _fail_or_set_aside(
            ctx, ids, broken, aside_ids, aside_reasons,
            f"the ensemble of partition {ctx.where} is not finite for "
            f"{int(broken.sum())} row(s) ({ids_text(ids, broken)}) although every member's "
            "score is; check the members' score ranges, or set bad_rows to quarantine "
            "(--bad-rows quarantine) to set them aside",
            lambda: ["non-finite ensemble_score or ensemble_std"] * int(broken.sum()))
        keep = ~broken
        scores, ids = scores[:, keep], ids.filter(pa.array(keep))
        ensemble, std, count = ensemble[keep], std[keep], count[keep]
    return BatchResult(ids, scores, ensemble, std, count, aside_ids, aside_reasons,
                       sum(len(r) for r in aside_reasons) - features_aside)


def _predict_members(ctx: ScoringContext, matrix: np.ndarray, scores: np.ndarray
                     ) -> list[Future[tuple[int, float]]]:
    """Fill ``scores[k]`` for each member to score: on the pool when the context has one
    (``Session.run`` releases the GIL, so members score concurrently), returning the
    runs to wait for; otherwise here, returning them done. Each run gives its member
    and its seconds in ``predict``, added up by the thread that waits for it."""
    def run(k: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        rows = matrix.shape[0]
        slices = -(-rows // ctx.feed_rows)  # equal slices: never a run of a few rows
        for i in range(slices):
            start, stop = i * rows // slices, (i + 1) * rows // slices
            scores[k, start:stop] = ctx.scorers[k].predict(matrix[start:stop])
        return k, time.perf_counter() - t0

    if ctx.pool is not None:
        return [ctx.pool.submit(run, k) for k in ctx.scorers]
    done: list[Future[tuple[int, float]]] = []
    for k in ctx.scorers:
        future: Future[tuple[int, float]] = Future()
        future.set_result(run(k))
        done.append(future)
    return done


def _screen_scores(ctx: ScoringContext, scores: np.ndarray, ids: pa.Array,
                   aside_ids: list[pa.Array], aside_reasons: list[list[str]]
                   ) -> tuple[np.ndarray, pa.Array]:
    """Rows with non-finite member scores: kept while enough members remain (the missing
    scores are written as nulls and left out of the ensemble), otherwise failed or set
    aside, naming the members."""
    if all_finite(scores):
        return scores, ids
    finite = np.isfinite(scores)
    broken: np.ndarray = finite.sum(axis=0) < ctx.quorum
    if not broken.any():
        return scores, ids
    culprits = [ctx.names[k] for k in range(len(ctx.names))
                if k not in ctx.absent and not finite[k, broken].all()]
    quorum = (f", leaving fewer than min_members={ctx.quorum} of {len(ctx.names)}"
              if ctx.quorum < len(ctx.names) else "")
    _fail_or_set_aside(
        ctx, ids, broken, aside_ids, aside_reasons,
        f"model(s) {culprits} returned non-finite scores for {int(broken.sum())} row(s) of "
        f"partition {ctx.where}{quorum} ({ids_text(ids, broken)}); check the model and these "
        "rows, lower min_members, or set bad_rows to quarantine (--bad-rows quarantine) to "
        "set them aside",
        lambda: [_reason(ctx, finite[:, i]) for i in np.flatnonzero(broken)])
    return scores[:, ~broken], ids.filter(pa.array(~broken))


def _fail_or_set_aside(ctx: ScoringContext, ids: pa.Array, broken: np.ndarray,
                       aside_ids: list[pa.Array], aside_reasons: list[list[str]],
                       error: str, reasons: Callable[[], list[str]]) -> None:
    """The bad-row policy for rows whose scores are unusable: fail the partition with
    ``error``, or set the rows aside with their ``reasons``."""
    if ctx.policy == "fail":
        raise ModelLoadError(error)
    aside_ids.append(ids.filter(pa.array(broken)))
    aside_reasons.append(reasons())


def _reason(ctx: ScoringContext, present: np.ndarray) -> str:
    """Why a row was set aside for its scores: which members gave none, and the quorum
    when one is set."""
    from_ = [ctx.names[k] for k in np.flatnonzero(~present) if k not in ctx.absent]
    parts = [f"non-finite score from {', '.join(from_)}"] if from_ else []
    if ctx.absent:
        parts.append(f"not loaded: {', '.join(ctx.names[k] for k in ctx.absent)}")
    text = "; ".join(parts)
    if ctx.absent or ctx.quorum < len(ctx.names):
        text += (f" ({int(present.sum())} of {len(ctx.names)} members present, "
                 f"min_members {ctx.quorum})")
    return text
