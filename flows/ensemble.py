"""The scoring flow: plan, load members, score partitions, commit a run record.

Reads top to bottom like the data flow in the README. Partitions are fanned out with
Prefect's task runner, a bounded number in flight so memory stays flat however many
partitions there are; each partition is scored, merged and committed in one task.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from flows.guards import (
    apply_quorum,
    compare_with_baseline,
    missing_member,
    publish_drift,
    publish_golden,
    read_baseline,
    run_sketches,
)
from flows.params import ScoreParams
from flows.records import (
    RUN_RECORD,
    DriftRecord,
    PartitionRecord,
    RepeatedIdsRecord,
    RunRecord,
    RunReport,
    RunSummary,
    RunTiming,
    Sketches,
)
from flows.report import RunProgress, publish_report, report_run
from flows.stopping import Finished, StopRequest, run_guarded, within
from loaders.cache import MODEL_CACHE
from loaders.cpu import cpu_path
from loaders.errors import (
    DataError,
    DriftExceeded,
    PartitionAbandoned,
    PartitionsFailed,
    ScoringError,
)
from loaders.feed import (
    FEED_ROWS,
    FeedChoice,
    feed_key,
    probed_now,
    reused_feed,
    worth_probing,
)
from loaders.manifest import Manifest
from tasks.drift import render_drift_text
from tasks.ids import RepeatedIds
from tasks.merge import PartitionMerged
from tasks.partitions import Partition
from tasks.plan import MemberInfo, Plan, make_plan
from tasks.runtime import set_up
from tasks.scoring import PartitionResult, PartitionScored, abandon, resume
from tasks.steps import (
    check_ids,
    choose_feed,
    golden_check,
    load_member,
    score_partition_task,
)
from tasks.storage import ENSEMBLE_DIR, read_json, store_for
from tasks.writer import committed_metadata

__all__ = ["score_ensemble"]

# How long a stopped run waits for the partitions in flight to commit before it writes
# its record and ends (Prefect's process worker sends SIGKILL 30 s after SIGTERM), and
# then for those still scoring to stop at their next batch, uncommitted.
STOP_GRACE_SECONDS = 20.0
ABANDON_SECONDS = 5.0

def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ScoringError) else f"{type(exc).__name__}: {exc}"


class _Progress:
    """Logs one line per finished partition (count, rows, running throughput) and keeps the
    run's progress artifact up to date."""

    def __init__(self, total: int, logger: Any) -> None:
        self.total, self.logger, self.done, self.rows = total, logger, 0, 0
        self.start = time.perf_counter()
        self.artifact = RunProgress(total, logger)

    def partition_done(self, merged: PartitionMerged, scored: PartitionScored,
                       publish: bool = True) -> None:
        """Log the partition; ``publish`` also updates the artifact (an API call, which a
        stopping run does not wait on)."""
        self.done += 1
        self.rows += merged.rows
        elapsed = time.perf_counter() - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done)
        skipped = sum(m.skipped for m in scored.members)
        note = f", {skipped} member output(s) reused" if skipped else ""
        self.logger.info(
            f"[{self.done}/{self.total}] {merged.relpath}: {merged.rows:,} rows{note}; "
            f"{self.rows:,} rows so far at {rate:,.0f} rows/s, ETA {eta:.0f} s"
        )
        if publish:
            self.artifact.update(self.done)


def _run_partitions(plan: Plan, manifest: Manifest, params: ScoreParams, guards: _Guards,
                    logger: Any, run: _Scored, stop: StopRequest) -> None:
    """Score every partition, a bounded number in flight, filling ``run`` as each ends.

    When the run is stopped (Ctrl-C, SIGTERM, a cancel), nothing more is submitted and
    the partitions in flight get a short grace to commit; those still scoring after it
    are abandoned at their next batch, uncommitted. So what ``run`` holds is what is on
    disk when the run record is written.
    """
    score = score_partition_task.with_options(retries=params.retries)
    pending: deque[Partition] = deque(plan.partitions)
    inflight: dict[PrefectFuture[Any], Partition] = {}
    finished = Finished(stop)
    progress = _Progress(len(plan.partitions), logger)
    policy = params.policy(manifest)

    def submit_next() -> None:
        if pending:
            part = pending.popleft()
            fut = score.submit(part, manifest, plan.output_dir, method=params.ensemble,
                               batch_size=params.batch_size or guards.feed.rows,
                               feed_rows=guards.feed.rows, bad_rows=policy,
                               force=params.force, min_members=guards.quorum,
                               absent=guards.absent)
            inflight[fut] = part
            finished.watch(fut)

    def collect(fut: PrefectFuture[Any], publish: bool = True) -> None:
        part = inflight.pop(fut)
        try:
            result: PartitionResult = fut.result()
        except PartitionAbandoned:
            return  # uncommitted: pending
        except Exception as exc:
            run.failed[part.relpath] = _error_text(exc)
            logger.error(f"partition {part.relpath} failed: {run.failed[part.relpath]}")
            return
        run.scored[part.relpath] = result.scored
        run.merged[part.relpath] = result.merged
        progress.partition_done(result.merged, result.scored, publish=publish)

    # A bounded window rather than submitting everything: memory stays flat whatever the
    # number of partitions, and progress is reported in completion order.
    for _ in range(params.concurrency):
        submit_next()
    try:
        while inflight:
            fut = finished.next()
            submit_next()
            collect(fut)
    except BaseException:
        pending.clear()
        _drain(inflight, finished, collect, STOP_GRACE_SECONDS)
        if inflight:
            abandon(plan.output_dir)
            _drain(inflight, finished, collect, ABANDON_SECONDS)
        raise


def _drain(inflight: dict[PrefectFuture[Any], Partition], finished: Finished,
           collect: Callable[..., None], seconds: float) -> None:
    """Collect the partitions in flight as they finish, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while inflight and time.monotonic() < deadline:
        for fut in [f for f in inflight if f in finished.done]:
            with contextlib.suppress(Exception):
                collect(fut, publish=False)
        if inflight:
            finished.until(deadline)


def _describe_repeats(repeated: RepeatedIds) -> str:
    if not repeated.count:
        return ""
    shown = "; ".join(f"{value!r} in {', '.join(where)}"
                      for value, where in repeated.examples.items())
    count = (f"about {repeated.count:,} id(s) (estimated from the 1/{repeated.sampled} of "
             "ids a hash slice keeps)" if repeated.sampled > 1 else f"{repeated.count:,} id(s)")
    return (f"{count} appear in more than one partition (e.g. {shown}); each "
            "partition's file keeps its own row for them, nothing was merged. If ids should "
            "be unique across the input, de-duplicate it.")


def _model_loads(scored: dict[str, PartitionScored]) -> dict[str, dict[str, int]]:
    """Loads per checkpoint digest, per process that scored (this one included)."""
    per_process: dict[str, dict[str, int]] = {}
    for s in scored.values():
        if s.process:
            seen = per_process.setdefault(s.process, {})
            for digest, n in s.loads.items():
                seen[digest[:12]] = max(seen.get(digest[:12], 0), n)
    here = f"{socket.gethostname()}:{os.getpid()}"
    mine = per_process.setdefault(here, {})
    for digest, n in MODEL_CACHE.loads.items():
        mine[digest[:12]] = max(mine.get(digest[:12], 0), n)
    return per_process


def _versions() -> dict[str, str]:
    import numpy
    import prefect
    import pyarrow

    from loaders._tf import tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "prefect": prefect.__version__, "pyarrow": pyarrow.__version__,
            "numpy": numpy.__version__}


@flow(
    name="ensemble-score",
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    validate_parameters=True,
    log_prints=False,
)
def score_ensemble(params: ScoreParams) -> RunSummary:
    """Score Parquet partitions with every model in the manifest and write the ensemble table.

    Each model is loaded into its own TensorFlow graph and session, once per process.
    Partitions that fail are listed at the end; those that succeeded stay committed and a
    re-run skips them.
    """
    set_up()
    if params.runner != "threads":
        # The runner is a run-time choice (a form field in the UI), but a flow's task runner
        # is fixed when it starts: the partitions run in a subflow on the chosen runner.
        runner = make_task_runner(params)
        subflow = _score_elsewhere.with_options(  # type: ignore[call-overload]
            task_runner=runner, name=f"ensemble-score-{params.runner}")
        return subflow(params)  # type: ignore[no-any-return]
    return _run(params)


@flow(name="ensemble-score-distributed", validate_parameters=True, log_prints=False)
def _score_elsewhere(params: ScoreParams) -> RunSummary:
    """The same run, its tasks on a process pool or a Dask cluster."""
    return _run(params)


def make_task_runner(params: ScoreParams) -> Any:
    """The task runner ``params.runner`` names (threads are the flow's own default).

    Workers are fresh processes (spawn, or the cluster's own): TensorFlow is never forked.
    Each loads a checkpoint the first time one of its tasks needs it and keeps it in its
    cache; tasks carry only specs and return small summaries, so everything pickles.
    """
    if params.runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=params.workers or os.cpu_count() or 2)
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.address)
    return ThreadPoolTaskRunner(max_workers=16)


def _run(params: ScoreParams) -> RunSummary:
    """The run's work on a thread of its own (``run_guarded``), this (main) thread only
    waiting: a stop signal lands in that wait, and the work stops at its next
    checkpoint, records what the disk holds (once it holds the output's lock) and ends."""
    logger = get_run_logger()
    started = time.perf_counter()
    started_at = time.time()
    stops: list[StopRequest] = []

    def body(stop: StopRequest) -> _Outcome:
        stops.append(stop)
        return _run_body(params, logger, started, started_at, stop)

    outcome = run_guarded(body, STOP_BOUND_SECONDS)
    if stops and stops[0]:
        logger.warning(f"a stop signal ({type(stops[0].signal).__name__}) came as the run "
                       "was completing; it completed, and its record says so")
    if outcome.failed:
        raise outcome.failed
    _check_drift(outcome.manifest, outcome.drift)
    return outcome.summary


@dataclass
class _Outcome:
    """A run that ran to its end: its summary, and what fails it."""

    summary: RunSummary
    manifest: Manifest
    drift: DriftRecord | None
    failed: PartitionsFailed | None


def _run_body(params: ScoreParams, logger: Any, started: float, started_at: float,
              stop: StopRequest) -> _Outcome:
    manifest = params.load_manifest()
    quorum = manifest.quorum(params.min_members)
    plan = make_plan(manifest, params.input, params.output,
                     verify_inputs=params.verify_inputs)
    logger.info(
        f"Scoring {len(plan.partitions)} partition(s) ({plan.total_bytes / 1e6:,.1f} MB) with "
        f"{len(manifest.models)} member(s) into {plan.output_dir}"
    )
    stop.check()
    members = _load_members(params, manifest, quorum, logger)
    stop.check()
    golden = _golden_gate(params, manifest, members, logger)
    stop.check()
    feed = _feed(params, manifest, plan, members, logger)
    stop.check()
    store = store_for(plan.output_dir)
    with store.lock() as killed:
        if killed:
            logger.warning(f"the previous run into {plan.output_dir} ({killed}) did not "
                           "finish: it was killed. Its committed partitions are kept and "
                           "this run scores the rest")
        removed = store.remove_stale_staging()
        if removed:
            logger.info(f"Removed {removed} staging file(s) left by an interrupted run")
        guards = _Guards(quorum, members, golden, _baseline(params, store, logger), feed,
                         f"the previous run ({killed}) did not finish: it was killed"
                         if killed else "")
        _record_running(params, plan, guards, started_at)
        return _score(params, manifest, plan, guards, logger, started, started_at, stop)


@dataclass
class _Guards:
    """What the guards decided before scoring: the quorum, who loaded, the golden check's
    outcome and the drift baseline."""

    quorum: int
    members: list[MemberInfo]
    golden: str
    baseline: tuple[Sketches, str] | None
    feed: FeedChoice  # the most rows per Session.run (and the batch size by default)
    previous_run: str = ""  # how the previous run into this output ended, if badly

    @property
    def absent(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members if m.missing)


def _golden_gate(params: ScoreParams, manifest: Manifest, members: list[MemberInfo],
                 logger: Any) -> str:
    """Score the blessed rows first; raises GoldenMismatch before anything is written."""
    if manifest.golden is None:
        return ""
    absent = [m.name for m in members if m.missing]
    check = golden_check.with_options(retries=params.retries)(manifest, absent)
    text = check.text()
    logger.info(f"Golden check {text}")
    publish_golden(text, manifest, logger)
    return text


def _feed(params: ScoreParams, manifest: Manifest, plan: Plan, members: list[MemberInfo],
          logger: Any) -> FeedChoice:
    """The rows per ``Session.run``: what the feed probe measured on the task runner
    (where the members score), where the input is large enough to pay for it and the
    batches can hold the larger feed. The batch size is the user's, else the feed's."""
    absent = [m.name for m in members if m.missing]
    # Rows, a rough guide: every column's bytes, at the 8 of a float64 feature.
    rows = plan.total_bytes // (8 * len(manifest.features))
    (small, large), batch = FEED_ROWS, params.batch_size
    if batch is not None and batch < large:
        feed = FeedChoice(rows=batch, chosen_by="user",
                          why=f"--batch-size {batch:,}: each batch is fed whole")
    elif not worth_probing(rows, len(members) - len(absent)):
        feed = FeedChoice(rows=small, chosen_by="default", why=(
            f"an input of about {rows:,} rows is too small for the feed probe to pay"))
    else:
        in_flight = min(params.concurrency, len(plan.partitions))
        key = ("" if params.runner == "dask" else  # a cluster's workers may change
               feed_key([(m.name, m.digest) for m in members if not m.missing],
                        len(manifest.features), in_flight=in_flight, runner=params.runner))
        feed = choose_feed.with_options(retries=params.retries).submit(
            manifest, absent, in_flight, _previous_feed(plan.output_dir, key)).result()
        if feed.chosen_by == "probe":
            feed.key, feed.probed_at = key, probed_now()
    how = "--batch-size" if batch is not None else "the feed size"
    logger.info(f"Batch size: {batch or feed.rows:,} rows ({how}); feeds: {feed.label}")
    return feed


def _previous_feed(output_dir: str, key: str) -> FeedChoice | None:
    """The feed the previous run into ``output_dir`` chose under ``key``, if it still
    holds (``loaders.feed.reused_feed``); an unreadable record is only a reason to probe."""
    if not key:
        return None
    try:
        record = read_json(store_for(output_dir).uri(RUN_RECORD))
    except (OSError, ValueError):
        return None
    return reused_feed(record.get("feed") if isinstance(record, dict) else None, key)


def _baseline(params: ScoreParams, store: Any, logger: Any) -> tuple[Sketches, str] | None:
    """The drift baseline: --baseline, else the previous run's record in this output."""
    location = params.baseline or store.uri(RUN_RECORD)
    try:
        found = read_baseline(location, required=params.baseline is not None)
    except ValueError as err:
        if params.baseline:
            raise DataError(f"{err}; give --baseline a _run.json a run wrote") from err
        logger.warning(f"{err}; drift is not reported for this run")
        return None
    if found is None and params.baseline:
        logger.warning(f"the drift baseline {params.baseline} holds no sketches; drift is not "
                       "reported for this run")
    return found


@dataclass
class _Scored:
    """What the scoring phase left: per-partition results, failures, and its duration."""

    scored: dict[str, PartitionScored]
    merged: dict[str, PartitionMerged]
    failed: dict[str, str]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.merged.values())


def _score(params: ScoreParams, manifest: Manifest, plan: Plan, guards: _Guards,
           logger: Any, started: float, started_at: float, stop: StopRequest) -> _Outcome:
    """The run while it holds the output folder's lock: until the record is written, a
    stop (or any error) leaves a stopped run's record of what the disk holds."""
    for relpath, why in plan.unreadable.items():
        logger.error(f"partition {relpath} set aside: {why}")
    resume(plan.output_dir)  # an earlier run of this process into it may have abandoned it
    scoring_start = time.perf_counter()
    run = _Scored({}, {}, dict(plan.unreadable), 0.0)
    try:
        _run_partitions(plan, manifest, params, guards, logger, run, stop)
        run.seconds = time.perf_counter() - scoring_start
        repeated, repeated_text = _check_repeated_ids(params, manifest, run, logger)
        stop.check()
        summary, drift = _finish(params, manifest, plan, guards, logger, run, repeated,
                                 repeated_text, started, started_at)
    except BaseException as exc:
        run.seconds = run.seconds or time.perf_counter() - scoring_start
        _record_stopped(params, plan, guards, run, started_at, stop.signal or exc, logger)
        raise
    logger.info(
        f"Done: {run.rows:,} rows in {len(run.merged)} partition(s) in {summary.seconds:.1f} s "
        f"({summary.rows_per_second:,.0f} rows/s while scoring); table at {summary.ensemble_dir}"
    )
    failed = None
    if run.failed:
        listing = "\n".join(f"  - {rel}: {why}" for rel, why in sorted(run.failed.items()))
        failed = PartitionsFailed(
            f"{len(run.failed)} of {len(run.failed) + len(run.merged)} partition(s) failed; "
            f"the other {len(run.merged)} are committed and a re-run scores only what is "
            f"missing:\n{listing}"
        )
    return _Outcome(summary, manifest, drift, failed)


def _finish(params: ScoreParams, manifest: Manifest, plan: Plan, guards: _Guards,
            logger: Any, run: _Scored, repeated: RepeatedIds | None, repeated_text: str,
            started: float, started_at: float) -> tuple[RunSummary, DriftRecord | None]:
    """After the last partition: sketches and drift, the report, the run record (its
    status failed when partitions failed or drift breached ``max_psi``)."""
    sketches = run_sketches(run.merged)
    drift = compare_with_baseline(sketches, guards.baseline, manifest.member_names)
    summary = _summarize(plan, guards, run, repeated_text, drift,
                         time.perf_counter() - started)
    summary.report = report_run(summary, run.scored, run.merged, plan.partitions, logger)
    if drift is not None:
        publish_drift(drift, logger)
    record = _run_record(params, plan, guards, run, repeated, started_at, summary)
    record.sketches, record.drift = sketches, drift
    record.status = "failed" if run.failed or _drift_breach(manifest, drift) else "completed"
    store_for(plan.output_dir).write_json(RUN_RECORD, record.model_dump(mode="json"))
    return summary, drift


def _record_running(params: ScoreParams, plan: Plan, guards: _Guards, started_at: float
                    ) -> None:
    """Replace the previous run's record, before anything is written, with one that says
    a run is under way: a reader of ``_run.json`` never takes a re-run in progress, or
    one killed midway, for the completed run before it. The drift sketches of the
    previous run are carried over when they are this run's baseline, so that a run
    killed midway leaves the next one its baseline."""
    empty = _Scored({}, {}, {}, 0.0)
    summary = _summarize(plan, guards, empty, "", None, 0.0)
    record = _run_record(params, plan, guards, empty, None, started_at, summary)
    record.status = "running"
    for part in record.partitions.values():
        part.status = "pending"
    if guards.baseline is not None and params.baseline is None:
        record.sketches = guards.baseline[0]
    store_for(plan.output_dir).write_json(RUN_RECORD, record.model_dump(mode="json"))


def _record_stopped(params: ScoreParams, plan: Plan, guards: _Guards, run: _Scored,
                    started_at: float, stop: BaseException, logger: Any) -> None:
    """The run record of a run stopped before its end: what is committed (as the files
    on disk say) and what is pending. Best effort: the stop itself is what is raised.

    The record is written from the disk alone first; the API (was it a cancel? the
    report's artifacts) is asked after, within a bound, so that a server that is slow
    or gone never holds the record and the lock hostage.
    """
    name = type(stop).__name__
    status = ("interrupted" if isinstance(stop, KeyboardInterrupt)
              else "failed" if isinstance(stop, Exception) else "stopped")
    try:
        store = store_for(plan.output_dir)
        committed = _committed_on_disk(plan, run, started_at)
        summary = _summarize(plan, guards, run, "", None, time.time() - started_at)
        record = _stopped_record(params, plan, guards, run, started_at, summary, committed)
        record.status, record.stopped_by = status, name
        store.write_json(RUN_RECORD, record.model_dump(mode="json"))
        state = _flow_run_state(runtime.flow_run.id)
        if status == "stopped" and state in ("CANCELLING", "CANCELLED"):
            record.status = status = "cancelled"
        summary.report = report_run(summary, run.scored, run.merged, plan.partitions,
                                    logger, status=status.capitalize(), publish=False)
        if (state is not None and summary.report is not None
                and not _publish_within(summary.report, logger)):
            state = None
        record.summary = summary.model_dump(exclude={"members"})
        store.write_json(RUN_RECORD, record.model_dump(mode="json"))
        count = Counter(p.status for p in record.partitions.values())
        kept = f", {count['kept']} kept from an earlier run" if count["kept"] else ""
        logger.warning(f"run {status} ({name}): {count['committed']} partition(s) committed"
                       f"{kept}, {count['pending']} pending; the run record says which. A "
                       "re-run scores only what is pending")
        if state is None:
            logger.warning("the Prefect API did not answer in time: the report's "
                           "artifacts may be missing (the run record has the report)")
    except Exception as exc:  # the record is a report: never hide the stop itself
        logger.warning(f"could not write the run record of the stopped run: {exc!r}")


def _stopped_record(params: ScoreParams, plan: Plan, guards: _Guards, run: _Scored,
                    started_at: float, summary: RunSummary,
                    committed: dict[str, tuple[int | None, bool]]) -> RunRecord:
    """The record of a stopped run, each partition it did not see end marked as the
    disk says: committed by this run, kept from an earlier one, or pending."""
    record = _run_record(params, plan, guards, run, None, started_at, summary)
    for rel, part in record.partitions.items():
        if rel in run.merged or rel in run.failed:
            continue
        if rel in committed:
            part.rows, by_this_run = committed[rel]
            part.status = "committed" if by_this_run else "kept"
        else:
            part.status = "pending"
    return record


# How long a stopping run waits for the Prefect API: to say the flow run's state, and
# to take the report's artifacts.
API_ANSWER_SECONDS = 5.0
API_PUBLISH_SECONDS = 10.0
# How long the main thread waits, once stopped, for the run to record and end.
STOP_BOUND_SECONDS = (STOP_GRACE_SECONDS + ABANDON_SECONDS + API_ANSWER_SECONDS
                      + API_PUBLISH_SECONDS + 5.0)


def _flow_run_state(flow_run_id: Any) -> str | None:
    """The flow run's state type as the API has it (a cancel from the UI, the API or
    ``prefect flow-run cancel`` reaches the run as a SIGTERM, which alone looks like any
    other), or None when the API does not answer within ``API_ANSWER_SECONDS``. With a
    client of its own (its own ``httpx_settings``), whatever the run's client is doing."""
    from prefect.client.orchestration import get_client

    def ask() -> str:
        with get_client(sync_client=True,
                        httpx_settings={"timeout": API_ANSWER_SECONDS}) as client:
            state = client.read_flow_run(flow_run_id).state
        return state.type.value if state is not None else ""

    return within(API_ANSWER_SECONDS, ask)


def _publish_within(report: RunReport, logger: Any) -> bool:
    """Publish the report's artifacts; False if the API did not take them in time."""
    def publish() -> bool:
        publish_report(report, logger)
        return True

    return within(API_PUBLISH_SECONDS, publish) is not None


def _committed_on_disk(plan: Plan, run: _Scored, started_at: float
                       ) -> dict[str, tuple[int | None, bool]]:
    """Partitions this run did not see finish whose committed file is this input's: their
    rows, and whether this run wrote it (a task that committed after the flow stopped
    listening) or an earlier one did (a ``force`` re-run stopped before replacing it)."""
    store = store_for(plan.output_dir)
    found: dict[str, tuple[int | None, bool]] = {}
    for part in plan.partitions:
        if part.relpath in run.merged or part.relpath in run.failed:
            continue
        rel = f"{ENSEMBLE_DIR}/{part.relpath}"
        meta = committed_metadata(store, rel)
        if meta is not None and meta.get("fingerprint") == part.fingerprint:
            rows = (meta.get("stats") or {}).get("rows")
            written = store.modified(rel)
            found[part.relpath] = (rows if isinstance(rows, int) else None,
                                   written is not None and written >= started_at)
    return found


def _drift_breach(manifest: Manifest, drift: DriftRecord | None) -> bool:
    return (manifest.drift == "fail" and drift is not None and drift.max_psi is not None
            and drift.max_psi > manifest.max_psi)


def _check_drift(manifest: Manifest, drift: DriftRecord | None) -> None:
    """With ``drift: fail``, fail the run (its table committed) above ``max_psi``."""
    if drift is not None and _drift_breach(manifest, drift):
        over = [d for d in drift.lines if d.psi is not None and d.psi > manifest.max_psi]
        listing = "\n".join(f"  - {line}" for line in render_drift_text(over, top=10))
        raise DriftExceeded(
            f"{len(over)} column(s) drifted beyond max_psi={manifest.max_psi:g} from the "
            f"baseline ({drift.baseline}); the table is committed, the run is marked "
            f"failed:\n{listing}\nCheck the upstream data; if the change is expected, the "
            "next run compares with this one")


def _load_members(params: ScoreParams, manifest: Manifest, quorum: int, logger: Any
                  ) -> list[MemberInfo]:
    """One task per member, each loading it into the process's cache; logs what ran.
    Members that fail to load are left out while ``quorum`` others load."""
    loads = load_member.with_options(retries=params.retries).map(
        list(manifest.models), n_features=unmapped(len(manifest.features))
    )
    members = []
    for spec, future in zip(manifest.models, loads, strict=True):
        try:
            members.append(future.result())
        except Exception as exc:
            members.append(missing_member(spec, exc))
    apply_quorum(manifest, members, quorum, logger)
    path = cpu_path()
    fusion = ("TensorFlow fuses MatMul + bias itself" if path.fuses_matmul_add
              else "MatMul + bias adds are rewritten to BiasAdd at load")
    logger.info(f"CPU path: {path.label}; {fusion}")
    for m in members:
        if not m.missing:
            export = (f", exported from Keras in {m.export_seconds:.1f} s (once, cached)"
                      if m.export_seconds else "")
            logger.info(f"member {m.name}: {m.format} {m.location} (digest {m.digest[:12]}, "
                        f"loaded in {m.load_seconds:.2f} s{export}, {m.fused_bias_adds} bias "
                        f"add(s) rewritten, {m.frozen_variables} variable(s) frozen)")
    return members


def _check_repeated_ids(params: ScoreParams, manifest: Manifest, run: _Scored, logger: Any
                        ) -> tuple[RepeatedIds | None, str]:
    """Ids in more than one partition (None when the check could not run), described."""
    repeated: RepeatedIds | None = None
    try:
        repeated = check_ids.with_options(retries=params.retries)(
            {rel: m.path for rel, m in run.merged.items()}, manifest.id_column)
        text = _describe_repeats(repeated)
    except Exception as exc:  # a report, not the table: the committed work stands
        text = f"ids across partitions could not be checked: {_error_text(exc)}"
    return repeated, text  # logged with the report's warnings


def _summarize(plan: Plan, guards: _Guards, run: _Scored, repeated_text: str,
               drift: DriftRecord | None, seconds: float) -> RunSummary:
    rows = run.rows
    return RunSummary(
        output_dir=plan.output_dir,
        ensemble_dir=store_for(plan.output_dir).uri(ENSEMBLE_DIR),
        partitions=len(run.merged),
        rows=rows,
        bad_rows=sum(s.bad_rows for s in run.scored.values()),
        members=guards.members,
        skipped_member_partitions=sum(
            m.skipped for s in run.scored.values() for m in s.members),
        seconds=seconds,
        scoring_seconds=run.seconds,
        failed=run.failed,
        repeated_ids=repeated_text,
        ensemble_mean=sum(m.score_sum for m in run.merged.values()) / rows if rows else 0.0,
        ensemble_std_mean=sum(m.std_sum for m in run.merged.values()) / rows if rows else 0.0,
        golden=guards.golden,
        sketch_seconds=sum(s.sketch_seconds for s in run.scored.values()),
        missing_members={m.name: m.missing for m in guards.members if m.missing},
        drift=[] if drift is None else drift.text(),
        drift_baseline="" if drift is None else drift.baseline,
        previous_run=guards.previous_run,
    )


def _run_record(params: ScoreParams, plan: Plan, guards: _Guards, run: _Scored,
                repeated: RepeatedIds | None, started_at: float, summary: RunSummary
                ) -> RunRecord:
    return RunRecord(
        flow_run_id=str(runtime.flow_run.id),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        params=params.model_dump(mode="json"),
        members=guards.members,
        partitions={
            p.relpath: PartitionRecord(
                fingerprint=p.fingerprint,
                rows=run.merged[p.relpath].rows if p.relpath in run.merged else None,
                bad_rows=run.scored[p.relpath].bad_rows if p.relpath in run.scored else None,
                status="failed" if p.relpath in run.failed else "committed")
            for p in plan.partitions
        },
        failed=run.failed,
        repeated_ids=None if repeated is None else RepeatedIdsRecord(
            count=repeated.count, examples=repeated.examples, sampled=repeated.sampled),
        timing=RunTiming(
            flow_started_at=started_at,
            first_batch_at=min((s.first_batch_at for s in run.scored.values()
                                if s.first_batch_at is not None), default=None),
            committed_at=time.time()),
        model_loads=_model_loads(run.scored),
        versions=_versions(),
        cpu_path=cpu_path(),
        feed=guards.feed,
        summary=summary.model_dump(exclude={"members"}),
    )
