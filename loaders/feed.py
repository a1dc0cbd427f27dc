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

One noisy round could still tip the choice: on the 2-core Intel Xeon, where the two
sizes ran within 10 % of each other in the probe, 2 of some 60 probes took 16k, and one
such run, in an interleaved set, had a 4 % longer flow. So the smaller feed must win by
the margin in each half of the probe (a small and a large round side by side) as well as
overall. And a run reuses the choice a previous run into the same output recorded
(``reused_feed``) when nothing it depends on has changed: the CPU (model, every flag,
cores), the TensorFlow path and version, the members' digests, the number of features,
the partitions in flight and the runner (``feed_key``), for ``REPROBE_AFTER`` at most,
so that scheduled runs keep one choice and skip the probe's ~0.7 s.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel, ValidationError

from loaders._tf import tf
from loaders.base import GraphScorer, Scorer
from loaders.cpu import cpu_path

__all__ = ["FEED_ROWS", "LARGE_FEED_MAX_EXTRA", "LARGE_FEED_MAX_MATRIX", "PAYBACK",
           "PROBE_BUDGET_SECONDS", "REPROBE_AFTER", "SMALL_FEED_MARGIN", "FeedChoice",
           "feed_bytes_per_row", "feed_key", "pick_feed", "probe_evals", "probe_feed",
           "probe_members", "probed_members", "probed_now", "reused_feed", "worth_probing"]

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
REPROBE_AFTER = datetime.timedelta(days=7)
# Row-model evaluations per second no machine reaches (1e13): a recorded rate above it is
# not a probe's.
_MAX_RATE = 1e13
# Part of every feed_key: raised when the probe's rule changes, so that no run reuses a
# choice made under an older rule.
_RULES = 2


class FeedChoice(BaseModel):
    """The rows per ``Session.run`` a run used, and why (run record)."""

    rows: int
    chosen_by: Literal["probe", "previous run", "default", "user"]
    # Row-model evaluations per second at each candidate size, as the probe measured them
    # (in a previous run, for "previous run"), overall and in each half of the probe.
    rates: dict[str, float] = {}
    half_rates: list[dict[str, float]] = []
    seconds: float = 0.0  # the probe's own time in this run, skipped measurements included
    why: str = ""
    process: str = ""  # host:pid of the process that probed
    members: list[str] = []  # the members timed
    key: str = ""  # what the choice depends on (feed_key); empty: not to be reused
    probed_at: str = ""  # when the probe ran (UTC, ISO 8601)

    @property
    def label(self) -> str:
        """One line for logs and reports."""
        text = f"at most {self.rows:,} rows per Session.run ({self.chosen_by}"
        if self.rates:
            text += ": " + ", ".join(f"{_rows_text(k)} rows {v / 1e6:.2f} M" for k, v in
                                     self.rates.items()) + " row-model evaluations/s"
        if self.why:
            text += f"; {self.why}"
        if self.chosen_by == "previous run":
            text += (f"; probed at {self.probed_at} in {self.process} on the same CPU, "
                     "TensorFlow and members, not again in this run")
        elif self.process:
            text += f"; {self.seconds:.2f} s in {self.process}"
        return text + ")"


def _rows_text(key: str) -> str:
    return f"{int(key):,}" if key.isdigit() and len(key) < 10 else repr(key[:20])


def probed_members(members: int) -> int:
    """Members the probe feeds at once: one per core, as a batch's members share them."""
    return max(1, min(members, os.cpu_count() or 1))


def probe_evals(members: int) -> int:
    """Row-model evaluations the probe spends with ``members`` loaded members, when each
    round needs no repeat (a model too fast to need them costs nothing to repeat)."""
    small, large = FEED_ROWS
    calls = (len(_ROUNDS) + 1) * large + 3 * small + 2 * _ESTIMATE_ROWS
    return calls * probed_members(members)


def worth_probing(input_rows: int, members: int) -> bool:
    """Whether scoring ``input_rows`` rows with ``members`` members is large enough for
    the probe to pay for itself (it can save a few per cent of the scoring)."""
    return input_rows * members >= PAYBACK * probe_evals(members)


def pick_feed(rates: dict[int, float], *halves: dict[int, float]) -> int:
    """The larger feed unless the smaller scored at least ``SMALL_FEED_MARGIN`` faster,
    over the whole probe and in each of its ``halves`` (their rates alone)."""
    small, large = FEED_ROWS
    return small if all(r[small] >= r[large] * (1 + SMALL_FEED_MARGIN)
                         for r in (rates, *halves)) else large


def feed_key(members: Sequence[tuple[str, str]], n_features: int, *, in_flight: int,
             runner: str) -> str:
    """What a probe's choice depends on, as one digest: this machine's CPU (its model,
    every flag /proc/cpuinfo lists, cores, the cores this process may use and the thread
    variables TensorFlow and OpenMP read), TensorFlow's path and version, the members
    (name, digest), the number of features, the partitions in flight, the task runner,
    and the probe's rule. Any change and a run probes again."""
    path = cpu_path()
    parts = {"cpu": path.model_dump(), "flags": _all_flags(), "tensorflow": tf.__version__,
             "usable_cores": _usable_cores(),
             "threads": {v: os.environ.get(v) for v in _THREAD_VARIABLES},
             "members": sorted(members), "features": n_features, "in_flight": in_flight,
             "runner": runner, "rules": _RULES}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _all_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.partition(":")[0].strip() == "flags":
                    return " ".join(sorted(set(line.partition(":")[2].split())))
    except OSError:
        pass
    return ""


def reused_feed(previous: object, key: str, now: datetime.datetime | None = None
                ) -> FeedChoice | None:
    """The choice ``previous`` (the ``feed`` of a run record, which may be anything: the
    output folder is the user's) holds for ``key``: a probe's, made under the same key,
    of one of the sizes probed, less than ``REPROBE_AFTER`` ago. None otherwise."""
    if not key or not isinstance(previous, dict) or previous.get("key") != key:
        return None
    try:
        choice = FeedChoice.model_validate(previous)
        probed = datetime.datetime.fromisoformat(choice.probed_at)
    except (ValidationError, ValueError):
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if (choice.chosen_by not in ("probe", "previous run") or choice.rows not in FEED_ROWS
            or probed.tzinfo is None or not datetime.timedelta(0) <= now - probed
            <= REPROBE_AFTER or not _as_probed(choice)):
        return None
    return choice.model_copy(update={"chosen_by": "previous run", "seconds": 0.0})


def _as_probed(choice: FeedChoice) -> bool:
    """Whether a recorded choice's figures and texts are what a probe writes: the rates
    of both sizes, positive and at most ``_MAX_RATE`` (NaN and inf fail both), a prober,
    and short printable texts (they are logged and written into every later record)."""
    sizes = {str(rows) for rows in FEED_ROWS}
    rates = [choice.rates, *choice.half_rates]
    texts = [choice.why, choice.process, choice.probed_at, *choice.members]
    return (len(choice.half_rates) <= 2 and len(choice.members) <= 64 and bool(choice.process)
            and all(set(r) == sizes and all(0 < v <= _MAX_RATE for v in r.values())
                    for r in rates)
            and all(len(t) <= 300 and t.isprintable() for t in texts))


def probed_now() -> str:
    """The time stamp a probe's choice is recorded with (``FeedChoice.probed_at``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def probe_members(scorers: Sequence[GraphScorer], n_features: int, *, in_flight: int,
                  previous: FeedChoice | None = None) -> FeedChoice:
    """The probe on a run's loaded members: each member's tensors per row are read first,
    for the memory bound and to time the costliest members (the ones a feed size matters
    most for), whatever their order in the manifest. With ``previous`` (``reused_feed``),
    nothing is timed: its choice is taken, unless it is the larger feed and the bounds
    refuse it here (the record it came from is the user's file)."""
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
    refused = _large_refused(n_features, sum(per_row), in_flight)
    if previous is not None and (previous.rows == FEED_ROWS[0] or refused is None):
        choice = previous.model_copy()
    elif previous is not None:
        choice = FeedChoice(rows=FEED_ROWS[0], chosen_by="default", why=str(refused))
    else:
        costliest = [scorers[i] for i in sorted(range(len(scorers)),
                                                key=lambda i: -per_row[i])]
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
    if not use:
        return FeedChoice(rows=small, chosen_by="default", why="no member loaded")
    refused = _large_refused(n_features, bytes_per_row, in_flight)
    if refused is not None:
        return FeedChoice(rows=small, chosen_by="default", why=refused)
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


def _large_refused(n_features: int, bytes_per_row: float, in_flight: int) -> str | None:
    """Why the larger feed is out of bounds here (wide rows, or the members' calls would
    hold too much memory), or None."""
    large = FEED_ROWS[1]
    extra = bytes_per_row * large * in_flight
    if large * n_features * 4 > LARGE_FEED_MAX_MATRIX:
        return (f"{n_features} features: a {large:,}-row batch would take over "
                f"{LARGE_FEED_MAX_MATRIX // 2**20} MiB")
    if extra > LARGE_FEED_MAX_EXTRA:
        return (f"{large:,}-row feeds would hold up to {extra / 2**30:.1f} GiB, the members' "
                f"calls of {in_flight} partition(s) in flight")
    return None


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
    # One round of either size, projected from the faster of two calls: a single call
    # slowed by something else on the machine (6x, once, on the Intel Xeon) turned the
    # probe away as too slow and left a 10M-row run on the smaller feed.
    round_seconds = min(feed(small), feed(small)) * (large // small)
    projected = round_seconds * (len(_ROUNDS) + 1)
    if projected > budget_seconds:
        return _too_slow(projected)
    feed(large)
    rounds: list[tuple[int, int, float]] = []  # (rows per feed, evaluations, seconds)
    for which in _ROUNDS:
        rows, lasted, evals = (small if which == "small" else large), 0.0, 0
        for _ in range(_MAX_REPEATS):  # until the round has lasted _MIN_ROUND
            lasted += feed(rows, large // rows)
            evals += large * members
            if lasted >= _MIN_ROUND:
                break
        rounds.append((rows, evals, lasted))
    half = len(rounds) // 2
    rates, halves = _rates(rounds), [_rates(rounds[:half]), _rates(rounds[half:])]
    ratios = ", ".join(f"{h[small] / h[large]:.2f}" for h in halves)
    return FeedChoice(
        rows=pick_feed(rates, *halves), chosen_by="probe", rates=_rounded(rates),
        half_rates=[_rounded(h) for h in halves],
        why=(f"{small:,} rows ran at {rates[small] / rates[large]:.2f} of {large:,}'s rate "
             f"({ratios} in the probe's halves), taken at {1 + SMALL_FEED_MARGIN:.2f} or "
             "more in both"))


def _rates(rounds: Sequence[tuple[int, int, float]]) -> dict[int, float]:
    """Evaluations per second of each feed size over ``rounds``."""
    return {rows: sum(e for r, e, _ in rounds if r == rows)
            / sum(t for r, _, t in rounds if r == rows) for rows in FEED_ROWS}


def _rounded(rates: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 1) for k, v in rates.items()}


def _too_slow(projected: float) -> FeedChoice:
    return FeedChoice(rows=FEED_ROWS[0], chosen_by="default",
                      why=f"slow members: measuring would take ~{projected:.1f} s")


def _feeder(features: np.ndarray, rows: int, calls: int) -> Callable[[Scorer], None]:
    def run(scorer: Scorer) -> None:
        for i in range(calls):
            start = i * rows % features.shape[0]
            scorer.predict(features[start:start + rows])
    return run
