"""The rows fed to a model per ``Session.run``, chosen on the machine that runs it.

The best feed size is the CPU's, not the model's alone: on the first release's 2-core
AVX2 machine a 32-256-256-1 MLP scored 16,384-row feeds ~1.5x faster than 65,536-row
ones, and end to end 16k batches beat 64k by 6 % (0.66 vs 0.62 M row-model evals/s). On
the 2-core AVX-512 EPYC both TensorFlow paths ran the two sizes within 0-6 % of each
other in ``Session.run``, and end to end, with a batch's members overlapping the batch
before, 64k batches scored 3-4 % faster than 16k in six interleaved rounds: fewer
batches cost less outside TensorFlow (decode slicing, screening, combining, writing,
one future per member per batch).

So a run measures both sizes before it scores (``probe_feed``): as many members as there
are cores (at most), each in its own thread as in a batch, are fed the same 65,536
random rows as four 16,384-row feeds or one 65,536-row feed, in alternated rounds
(small, large, large, small), after a warm-up call of each size: a shape's first
``Session.run`` builds its kernels, and took 1.5-1.9 times as long as the next on the
EPYC. A round is repeated (up to ``_MAX_REPEATS`` times) until it has lasted
``_MIN_ROUND`` seconds, so that a small model's rounds are not a few milliseconds of
timer noise. The smaller feed is taken when it scores at least ``SMALL_FEED_MARGIN``
faster; otherwise the larger, whose savings outside TensorFlow the probe does not see.

The smaller size is kept unmeasured where measuring would cost more than
``PROBE_BUDGET_SECONDS`` (projected from a 16,384-row call, after a 1,024-row call has
turned away models far over it: slow models, for which the per-call overheads larger
batches save matter least), for wide rows (a 65,536-row feature matrix over
``LARGE_FEED_MAX_MATRIX``), and where the larger feeds would hold more than
``LARGE_FEED_MAX_EXTRA`` of memory more: TensorFlow's pool keeps each call's tensors,
and every member has a call in flight per partition in flight. That memory is read from
TensorFlow's own step stats for every member (``feed_bytes_per_row``): a 256-wide MLP's
call held 136 MiB of tensors at 65,536 rows, as its process grew by 135 MiB. The whole
65,536-row call is counted, not its excess over a 16,384-row one: the pool keeps the
smaller calls' blocks too, and a 4096-wide layer's process grew by 265 MiB on a 16k call
and 1,056 MiB more on a 64k one, where the difference of their tensors was 770 MiB. The probe
costs about five 65,536-row feeds per member it uses (0.6-0.7 s for the benchmark's
MLPs on 2 cores) and saved 3-4 % of the scoring there, so ``worth_probing`` runs it
only on inputs of at least ``PAYBACK`` times its own work.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel

from loaders.base import GraphScorer, Scorer

__all__ = ["FEED_ROWS", "LARGE_FEED_MAX_EXTRA", "LARGE_FEED_MAX_MATRIX", "PAYBACK",
           "PROBE_BUDGET_SECONDS", "SMALL_FEED_MARGIN", "FeedChoice", "feed_bytes_per_row",
           "pick_feed", "probe_evals", "probe_feed", "probe_members", "probed_members",
           "worth_probing"]

FEED_ROWS = (16_384, 65_536)  # the candidates, smaller first; the smaller is the fallback
# Two sizes' first windows differed by up to 5 % on the EPYC where they ran alike, and
# larger batches saved 3-4 % end to end there: a smaller feed must win by more than both.
SMALL_FEED_MARGIN = 0.10
PROBE_BUDGET_SECONDS = 2.0
LARGE_FEED_MAX_EXTRA = 2 * 2**30
LARGE_FEED_MAX_MATRIX = 64 * 2**20  # one float32 feature matrix of 65,536 rows
PAYBACK = 32
_ROUNDS = ("small", "large", "large", "small")
_ESTIMATE_ROWS = 1_024
_MIN_ROUND = 0.05
_MAX_REPEATS = 64


class FeedChoice(BaseModel):
    """The rows per ``Session.run`` a run used, and why (run record)."""

    rows: int
    chosen_by: Literal["probe", "default", "user"]
    # Row-model evaluations per second at each candidate size, as the probe measured them.
    rates: dict[str, float] = {}
    seconds: float = 0.0  # the probe's own time, skipped measurements included
    why: str = ""
    process: str = ""  # host:pid of the process that probed
    members: list[str] = []  # the members timed

    @property
    def label(self) -> str:
        """One line for logs and reports."""
        text = f"at most {self.rows:,} rows per Session.run ({self.chosen_by}"
        if self.rates:
            text += ": " + ", ".join(f"{int(k):,} rows {v / 1e6:.2f} M" for k, v in
                                     self.rates.items()) + " row-model evaluations/s"
        if self.why:
            text += f"; {self.why}"
        if self.process:
            text += f"; {self.seconds:.2f} s in {self.process}"
        return text + ")"


def probed_members(members: int) -> int:
    """Members the probe feeds at once: one per core, as a batch's members share them."""
    return max(1, min(members, os.cpu_count() or 1))


def probe_evals(members: int) -> int:
    """Row-model evaluations the probe spends with ``members`` loaded members, when each
    round needs no repeat (a model too fast to need them costs nothing to repeat)."""
    small, large = FEED_ROWS
    calls = (len(_ROUNDS) + 1) * large + 2 * small + 2 * _ESTIMATE_ROWS
    return calls * probed_members(members)


def worth_probing(input_rows: int, members: int) -> bool:
    """Whether scoring ``input_rows`` rows with ``members`` members is large enough for
    the probe to pay for itself (it can save a few per cent of the scoring)."""
    return input_rows * members >= PAYBACK * probe_evals(members)


def pick_feed(rates: dict[int, float]) -> int:
    """The larger feed unless the smaller scored at least ``SMALL_FEED_MARGIN`` faster."""
    small, large = FEED_ROWS
    return small if rates[small] >= rates[large] * (1 + SMALL_FEED_MARGIN) else large


def feed_bytes_per_row(scorers: Sequence[GraphScorer], n_features: int) -> float:
    """Bytes each row of a feed adds to the tensors one call of every member in
    ``scorers`` produces (TensorFlow's own step stats: ``GraphScorer.output_bytes``),
    the part of their memory that grows with the feed size. Deterministic, unlike the
    process's memory, which TensorFlow's pool keeps at its highest."""
    return sum(_bytes_per_row(s, n_features) for s in scorers)


def _bytes_per_row(scorer: GraphScorer, n_features: int) -> float:
    rows = _ESTIMATE_ROWS
    return (scorer.output_bytes(2 * rows, n_features)
            - scorer.output_bytes(rows, n_features)) / rows


def probe_members(scorers: Sequence[GraphScorer], n_features: int, *, in_flight: int
                  ) -> FeedChoice:
    """The probe on a run's loaded members: each member's tensors per row are read first,
    for the memory bound and to time the costliest members (the ones a feed size matters
    most for), whatever their order in the manifest."""
    start = time.perf_counter()
    per_row: list[float] = []
    for scorer in scorers:
        try:
            per_row.append(_bytes_per_row(scorer, n_features))
        except Exception as exc:  # a model's own failure: scoring reports it, with its name
            return FeedChoice(
                rows=FEED_ROWS[0], chosen_by="default",
                why=f"member {scorer.name!r}: its memory per row could not be read: "
                    f"{type(exc).__name__}: {exc}"[:300],
                seconds=round(time.perf_counter() - start, 3), process=_process())
    costliest = [scorers[i] for i in sorted(range(len(scorers)), key=lambda i: -per_row[i])]
    choice = probe_feed(costliest, n_features, bytes_per_row=sum(per_row),
                        in_flight=in_flight)
    choice.seconds = round(time.perf_counter() - start, 3)
    choice.process = choice.process or _process()  # also where it stopped before timing
    return choice


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def probe_feed(scorers: Sequence[Scorer], n_features: int, *, bytes_per_row: float,
               in_flight: int, budget_seconds: float | None = None) -> FeedChoice:
    """Measure the candidate feed sizes on ``scorers`` (loaded members; the first
    ``probed_members`` are used) and pick one. ``bytes_per_row``: what every member's
    call holds per row (``feed_bytes_per_row``); ``in_flight``: partitions scored at
    once, each with a call of every member in flight.

    Raises nothing a model raises: a member that fails on a probe feed (memory) leaves
    the smaller size, with the reason; scoring then reports the model's error itself.
    """
    small, large = FEED_ROWS
    use = list(scorers)[:probed_members(len(scorers))]
    extra = bytes_per_row * large * in_flight
    if not use:
        return FeedChoice(rows=small, chosen_by="default", why="no member loaded")
    if large * n_features * 4 > LARGE_FEED_MAX_MATRIX:
        return FeedChoice(rows=small, chosen_by="default", why=(
            f"{n_features} features: a {large:,}-row batch would take over "
            f"{LARGE_FEED_MAX_MATRIX // 2**20} MiB"))
    if extra > LARGE_FEED_MAX_EXTRA:
        return FeedChoice(rows=small, chosen_by="default", why=(
            f"{large:,}-row feeds would hold up to {extra / 2**30:.1f} GiB, the members' "
            f"calls of {in_flight} partition(s) in flight"))
    start = time.perf_counter()
    features = np.random.default_rng(0).standard_normal((large, n_features),
                                                        dtype=np.float32)
    with ThreadPoolExecutor(len(use), thread_name_prefix="feed-probe") as pool:
        def feed(rows: int, calls: int = 1) -> float:
            """Seconds for every member in ``use`` to score ``calls`` feeds of ``rows``."""
            t = time.perf_counter()
            list(pool.map(_feeder(features, rows, calls), use))
            return time.perf_counter() - t

        try:
            choice = _measure(feed, len(use), PROBE_BUDGET_SECONDS if budget_seconds is None
                              else budget_seconds)
        except Exception as exc:  # a model's own failure (memory): scoring reports its own
            choice = FeedChoice(rows=small, chosen_by="default",
                                why=f"a probe feed failed: {type(exc).__name__}: {exc}"[:300])
    choice.seconds = round(time.perf_counter() - start, 3)
    choice.process, choice.members = _process(), [s.name for s in use]
    return choice


def _measure(feed: Callable[..., float], members: int, budget_seconds: float
             ) -> FeedChoice:
    small, large = FEED_ROWS
    feed(_ESTIMATE_ROWS)  # a shape's first run builds its kernels: not the model's speed
    # Per-call costs weigh on 1,024 rows: this projection is high, so only a model far
    # over the budget is turned away on it, before any feed of the real sizes.
    rough = feed(_ESTIMATE_ROWS) * (large // _ESTIMATE_ROWS) * (len(_ROUNDS) + 1)
    if rough > 10 * budget_seconds:
        return _too_slow(rough)
    feed(small)
    round_seconds = feed(small) * (large // small)  # one round of either size, projected
    projected = round_seconds * (len(_ROUNDS) + 1)
    if projected > budget_seconds:
        return _too_slow(projected)
    feed(large)
    spent, evals = {small: 0.0, large: 0.0}, {small: 0, large: 0}
    for which in _ROUNDS:
        rows, lasted = (small if which == "small" else large), 0.0
        for _ in range(_MAX_REPEATS):  # until the round has lasted _MIN_ROUND
            lasted += feed(rows, large // rows)
            evals[rows] += large * members
            if lasted >= _MIN_ROUND:
                break
        spent[rows] += lasted
    rates = {rows: evals[rows] / spent[rows] for rows in spent}
    ratio = rates[small] / rates[large]
    return FeedChoice(rows=pick_feed(rates), chosen_by="probe",
                      rates={str(k): round(v, 1) for k, v in rates.items()}, why=(
                          f"{small:,} rows ran at {ratio:.2f} of {large:,}'s rate, taken "
                          f"at {1 + SMALL_FEED_MARGIN:.2f} or more"))


def _too_slow(projected: float) -> FeedChoice:
    return FeedChoice(rows=FEED_ROWS[0], chosen_by="default",
                      why=f"slow members: measuring would take ~{projected:.1f} s")


def _feeder(features: np.ndarray, rows: int, calls: int) -> Callable[[Scorer], None]:
    def run(scorer: Scorer) -> None:
        for i in range(calls):
            start = i * rows % features.shape[0]
            scorer.predict(features[start:start + rows])
    return run
