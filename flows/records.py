"""What a run leaves behind, as typed models: the summary the flow returns, the report
its artifacts and the CLI show, and the run record written to ``OUTPUT/_run.json``.

Small and JSON-serialisable, so they cross task and process boundaries and the record
can be read back by the next run, a benchmark or a user's own tooling.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from loaders.cpu import CpuPath
from loaders.feed import FeedChoice
from tasks.drift import MAJOR_PSI, MODERATE_PSI, ColumnSketch, DriftLine, render_drift_text
from tasks.plan import MemberInfo

__all__ = [
    "RUN_RECORD",
    "DriftRecord",
    "Histogram",
    "HistogramBin",
    "MemberFigures",
    "PartitionRecord",
    "RepeatedIdsRecord",
    "RunRecord",
    "RunReport",
    "RunSummary",
    "RunTiming",
    "Sketches",
]

RUN_RECORD = "_run.json"


class MemberFigures(BaseModel):
    """One member over the whole run."""

    name: str
    rows: int  # rows of the ensemble table this member scored (this run or reused)
    mean: float | None
    std: float | None  # population std of its scores over those rows
    seconds: float  # time in Session.run this run
    scored_rows: int  # rows scored this run (0 when every partition was reused)
    rows_per_second: float | None
    reused_partitions: int
    digest: str
    load_seconds: float


class HistogramBin(BaseModel):
    low: float
    high: float
    rows: float  # estimated rows of the whole table (samples weighted by partition size)


class Histogram(BaseModel):
    column: str
    bins: list[HistogramBin]
    sampled_rows: int


class RunReport(BaseModel):
    """Everything the artifacts and the CLI summary show; small and JSON-serialisable."""

    status: str
    output_dir: str
    ensemble_dir: str
    quarantine_dir: str
    partitions: int
    rows: int
    quarantined_rows: int
    failed_partitions: dict[str, str]
    failed_rows: int  # rows in failed partitions whose footer could be read
    failed_unreadable: int  # failed partitions whose row count is unknown
    members: list[MemberFigures]
    reused_member_outputs: int
    seconds: float
    scoring_seconds: float
    rows_per_second: float
    ensemble_mean: float | None
    ensemble_std: float | None  # spread of ensemble_score across rows
    ensemble_min: float | None
    ensemble_max: float | None
    disagreement_mean: float | None  # mean of ensemble_std (member disagreement per row)
    correlation: list[list[float | None]]
    warnings: list[str]
    score_histogram: Histogram
    std_histogram: Histogram
    golden: str = ""
    missing_members: dict[str, str] = {}
    drift: list[str] = []  # largest PSI first, against drift_baseline
    drift_baseline: str = ""

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]


class RunSummary(BaseModel):
    """What the flow returns: the run's figures, and its report when it could be built."""

    output_dir: str
    ensemble_dir: str
    partitions: int
    rows: int
    bad_rows: int
    members: list[MemberInfo]
    skipped_member_partitions: int
    seconds: float
    scoring_seconds: float
    failed: dict[str, str]
    repeated_ids: str = ""  # ids found in more than one partition, described
    ensemble_mean: float
    ensemble_std_mean: float
    golden: str = ""  # the golden check's outcome; '' without a golden file
    sketch_seconds: float = 0.0  # task time spent on drift sketches, all partitions
    missing_members: dict[str, str] = {}  # member -> why it could not be loaded
    drift: list[str] = []  # the largest drifts from the baseline, for people
    drift_baseline: str = ""
    previous_run: str = ""  # how the previous run into this output ended, if it did not
    report: RunReport | None = None  # the run report, as published in the artifacts

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.scoring_seconds if self.scoring_seconds > 0 else 0.0


class PartitionRecord(BaseModel):
    fingerprint: str
    rows: int | None  # None when it failed
    bad_rows: int | None
    # "committed", "failed" or, in the record of a run stopped early, "pending" (not
    # scored) or "kept" (a force re-run had not replaced the earlier run's file yet);
    # "pending" everywhere in the record of a run under way ("running").
    status: str


class RepeatedIdsRecord(BaseModel):
    count: int  # with sampled > 1, an estimate
    examples: dict[str, list[str]]  # id -> partitions it appears in
    sampled: int = 1  # k: 1/k of the ids were checked (beyond 50 million ids)


class RunTiming(BaseModel):
    """Wall-clock times (Unix seconds): the benchmark derives the flow's phase from them."""

    flow_started_at: float
    first_batch_at: float | None
    committed_at: float


class Sketches(BaseModel):
    """A run's drift sketches, merged over its partitions."""

    features: dict[str, ColumnSketch] = {}
    scores: dict[str, ColumnSketch] = {}  # score_<member> and ensemble_score


class DriftRecord(BaseModel):
    """This run against its baseline, as the run record keeps it."""

    baseline: str  # what was compared with, for people
    lines: list[DriftLine]
    max_psi: float | None
    only_baseline: list[str] = []  # columns the baseline has and this run has not
    only_current: list[str] = []

    def text(self) -> list[str]:
        """For the log and the CLI summary: what drifted, or one line saying nothing did."""
        moving = [d for d in self.lines if d.psi is not None and d.psi >= MODERATE_PSI]
        unmatched = self.unmatched()
        if moving:
            return render_drift_text(moving) + unmatched
        top = next((d for d in self.lines if d.psi is not None), None)
        if top is None:
            return ["no column to compare", *unmatched]
        return [f"nothing drifted (largest PSI {top.psi:.3f}, {top.column}; bands "
                f"{MODERATE_PSI} / {MAJOR_PSI})", *unmatched]

    def unmatched(self) -> list[str]:
        return ([f"not in this run: {', '.join(self.only_baseline)}"]
                if self.only_baseline else []) + (
            [f"new in this run: {', '.join(self.only_current)}"] if self.only_current else [])

    def unmatched_markdown(self) -> str:
        lines = self.unmatched()
        return "\n" + "\n".join(f"- {line}" for line in lines) + "\n" if lines else ""


class RunRecord(BaseModel):
    """``OUTPUT/_run.json``: the run's parameters, members, partitions and figures."""

    # running (written as the run starts; left so by a run that was killed), completed,
    # failed (some partitions or the drift check), interrupted (Ctrl-C), cancelled (from
    # the UI or the API) or stopped (SIGTERM); a run stopped early has its partitions
    # committed, kept or pending.
    status: str = "completed"
    stopped_by: str | None = None  # the exception that stopped the run early
    flow_run_id: str
    finished_at: str  # ISO 8601, UTC
    params: dict[str, Any]
    members: list[MemberInfo]
    partitions: dict[str, PartitionRecord]
    failed: dict[str, str]
    repeated_ids: RepeatedIdsRecord | None  # None: not checked
    timing: RunTiming
    model_loads: dict[str, dict[str, int]]  # process -> checkpoint digest -> loads
    versions: dict[str, str]
    # The flow process's CPU path; each member's rewrites are in "members" (made by the
    # process that loaded it, which is this one with the thread runner).
    cpu_path: CpuPath
    # The most rows per Session.run (and the batch size unless params set one), how and
    # where they were chosen (loaders.feed).
    feed: FeedChoice | None = None
    summary: dict[str, Any] = Field(description="RunSummary without its members")
    # The run's drift sketches (the next run's default baseline) and its comparison with
    # its own baseline; see flows.guards.
    sketches: Sketches = Field(default_factory=Sketches)
    drift: DriftRecord | None = None
