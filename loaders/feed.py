"""The rows fed to a model per ``Session.run``, chosen on the machine that runs it.

The best feed size is the CPU's, not the model's alone: on the first release's 2-core
AVX2 machine a 32-256-256-1 MLP scored 16,384-row feeds ~1.5x faster than 65,536-row
ones, and end to end 16k batches beat 64k by 6 % (0.66 vs 0.62 M row-model evals/s). On
the 2-core AVX-512 EPYC both TensorFlow paths ran the two sizes within 0-4 % of each
other in ``Session.run``, and end to end, with a batch's members overlapping the batch
before, 64k batches scored 3-4 % faster than 16k in six interleaved rounds: fewer
batches cost less outside TensorFlow (decode slicing, screening, combining, writing,
one future per member per batch).

So a run that is not given ``--batch-size`` measures both sizes before it scores: as
many members as there are cores (at most), each in its own thread as in a batch, are
fed the same 65,536 random rows
as four 16,384-row feeds or one 65,536-row feed, in alternated rounds (small, large,
large, small) after one warm-up call of each size: a shape's first ``Session.run``
builds its kernels, and took 1.5-1.9 times as long as the next on the EPYC (once 4
times, in a run whose start-up still held the cores). The smaller feed is taken when it
scores at least ``SMALL_FEED_MARGIN`` faster; otherwise the larger, whose savings
outside TensorFlow the probe does not see. Where measuring would cost more than
``PROBE_BUDGET_SECONDS`` (slow models, for which the per-call overheads the larger
batches save matter least) or a 65,536-row batch of the features would take more than
``LARGE_FEED_MAX_BYTES`` (wide rows: memory), the smaller size is kept unmeasured.
The probe costs about five 65,536-row feeds per member it uses (0.6 s for the
benchmark's MLPs on 2 cores) and saved 3-4 % of the scoring there, so ``worth_probing``
runs it only on inputs at least ``PAYBACK`` times its own work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel

from loaders.base import Scorer

__all__ = ["FEED_ROWS", "LARGE_FEED_MAX_BYTES", "PAYBACK", "PROBE_BUDGET_SECONDS",
           "SMALL_FEED_MARGIN", "FeedChoice", "pick_feed", "probe_evals", "probe_feed",
           "worth_probing"]

FEED_ROWS = (16_384, 65_536)  # the candidates, smaller first; the smaller is the fallback
# Two sizes' first windows differed by up to 5 % on the EPYC where they ran alike, and
# larger batches saved 3-4 % end to end there: a smaller feed must win by more than both.
SMALL_FEED_MARGIN = 0.10
PROBE_BUDGET_SECONDS = 2.0
LARGE_FEED_MAX_BYTES = 64 * 2**20  # one float32 feature matrix of 65,536 rows
PAYBACK = 32
_ROUNDS = ("small", "large", "large", "small")


class FeedChoice(BaseModel):
    """The rows per batch (and per ``Session.run``) a run used, and why (run record)."""

    rows: int
    chosen_by: Literal["probe", "default", "user"]
    # Row-model evaluations per second at each candidate size, as the probe measured them.
    rates: dict[str, float] = {}
    seconds: float = 0.0  # the probe's own time
    why: str = ""

    @property
    def label(self) -> str:
        """One line for logs and reports."""
        text = f"{self.rows:,} rows per batch ({self.chosen_by}"
        if self.rates:
            text += ": " + ", ".join(f"{int(k):,} rows {v / 1e6:.2f} M/s"
                                     for k, v in self.rates.items())
            text += f", probed in {self.seconds:.2f} s"
        return text + (f"; {self.why})" if self.why else ")")


def _probed(members: int) -> int:
    """Members the probe feeds at once: one per core, as a batch's members share them."""
    return max(1, min(members, os.cpu_count() or 1))


def probe_evals(members: int) -> int:
    """Row-model evaluations the probe spends with ``members`` loaded members."""
    small, large = FEED_ROWS
    return (len(_ROUNDS) + 1) * large * _probed(members) + small * _probed(members)


def worth_probing(input_rows: int, members: int) -> bool:
    """Whether scoring ``input_rows`` rows with ``members`` members is large enough for
    the probe to pay for itself (it can save a few per cent of the scoring)."""
    return input_rows * members >= PAYBACK * probe_evals(members)


def pick_feed(rates: dict[int, float]) -> int:
    """The larger feed unless the smaller scored at least ``SMALL_FEED_MARGIN`` faster."""
    small, large = FEED_ROWS
    return small if rates[small] >= rates[large] * (1 + SMALL_FEED_MARGIN) else large


def probe_feed(scorers: Sequence[Scorer], n_features: int, *,
               budget_seconds: float = PROBE_BUDGET_SECONDS) -> FeedChoice:
    """Measure the candidate feed sizes on ``scorers`` (loaded members) and pick one.

    Raises nothing a model raises: a member that fails on a probe feed (memory) leaves
    the smaller size, with the reason; scoring then reports the model's error itself.
    """
    small, large = FEED_ROWS
    if large * n_features * 4 > LARGE_FEED_MAX_BYTES:
        return FeedChoice(rows=small, chosen_by="default",
                          why=f"{n_features} features: a {large:,}-row batch would take "
                          f"over {LARGE_FEED_MAX_BYTES // 2**20} MiB")
    use = list(scorers)[:_probed(len(scorers))]
    if not use:
        return FeedChoice(rows=small, chosen_by="default", why="no member loaded")
    features = np.random.default_rng(0).standard_normal((large, n_features),
                                                        dtype=np.float32)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(use), thread_name_prefix="feed-probe") as pool:
        def feed(rows: int, calls: int) -> float:
            """Seconds for every member in ``use`` to score ``calls`` feeds of ``rows``."""
            t = time.perf_counter()
            list(pool.map(_feeder(features, rows, calls), use))
            return time.perf_counter() - t

        try:
            feed(small, 1)  # a shape's first run builds its kernels: not the model's speed
            once = feed(small, 1)
            projected = once * (large // small) * (1 + len(_ROUNDS))
            if projected > budget_seconds:
                return FeedChoice(rows=small, chosen_by="default", why=(
                    f"a {small:,}-row feed took {once:.2f} s: measuring would take "
                    f"~{projected:.0f} s"))
            feed(large, 1)
            spent = {small: 0.0, large: 0.0}
            for which in _ROUNDS:
                rows = small if which == "small" else large
                spent[rows] += feed(rows, large // rows)
        except Exception as exc:  # a model's own failure (memory): scoring reports its own
            return FeedChoice(rows=small, chosen_by="default",
                              why=f"a probe feed failed: {type(exc).__name__}")
    evals = large * len(use) * len(_ROUNDS) // 2  # per size
    rates = {rows: evals / s for rows, s in spent.items()}
    return FeedChoice(rows=pick_feed(rates), chosen_by="probe",
                      rates={str(k): round(v, 1) for k, v in rates.items()},
                      seconds=round(time.perf_counter() - start, 3))


def _feeder(features: np.ndarray, rows: int, calls: int) -> Callable[[Scorer], None]:
    def run(scorer: Scorer) -> None:
        for i in range(calls):
            scorer.predict(features[i * rows:(i + 1) * rows])
    return run
