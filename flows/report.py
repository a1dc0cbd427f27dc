"""The run report: what a finished run scored, how fast, and whether its members agree.

Built from the small figures the tasks return (per-partition sums, cross-products and
samples from the merge, per-member seconds from scoring, digests and load times from
loading), so no output file is read again. The report is published as Prefect artifacts
(the UI's Artifacts tab) and rendered as plain text for the CLI, from the same lines, so
the terminal and the UI say the same thing.

Publishing is best effort: an artifact the API refuses is logged as a warning and never
fails a run whose table is already committed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

import numpy as np

from flows.records import Histogram, HistogramBin, MemberFigures, RunReport, RunSummary
from tasks.merge import HISTOGRAM_BINS, PartitionMerged
from tasks.partitions import Partition
from tasks.plan import MemberInfo
from tasks.scoring import PartitionScored
from tasks.storage import QUARANTINE_DIR, open_parquet, store_for

__all__ = [
    "ARTIFACT_KEYS",
    "DUPLICATE_CORRELATION",
    "RunProgress",
    "build_report",
    "correlation_from_sums",
    "figures_table",
    "histogram_markdown",
    "member_table",
    "publish_report",
    "publish_safely",
    "read_run_artifacts",
    "render_agreement_markdown",
    "render_histograms_markdown",
    "render_summary_markdown",
    "render_summary_text",
    "report_run",
]

# Two members whose scores correlate at least this much compute the same function: with
# different seeds, folds or bags, real members stay well below it.
DUPLICATE_CORRELATION = 0.999999
BAR_WIDTH = 40
_EIGHTHS = " ▏▎▍▌▋▊▉"

ARTIFACT_KEYS = {
    "members": "ensemble-members",
    "figures": "ensemble-figures",
    "agreement": "ensemble-agreement",
    "histograms": "ensemble-histograms",
    "summary": "ensemble-summary",
    "progress": "ensemble-progress",
}


def _none_if_nan(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def correlation_from_sums(rows: int, sums: np.ndarray, cross: np.ndarray
                          ) -> np.ndarray:
    """Pearson correlations of K members from their sums and KxK cross-products.

    NaN where a member's scores are constant (no correlation is defined) or rows is 0.
    """
    k = len(sums)
    if rows == 0:
        return np.full((k, k), np.nan)
    mean = sums / rows
    cov = cross / rows - np.outer(mean, mean)
    var = np.diag(cov).copy()
    # A variance below float64 noise of E[x²] is a constant member.
    tiny = 1e-12 * np.maximum(np.abs(np.diag(cross) / rows), 1e-300)
    ok = var > tiny
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.sqrt(np.outer(np.where(ok, var, np.nan), np.where(ok, var, np.nan)))
    return np.clip(corr, -1.0, 1.0)


def _histogram(column: str, parts: Iterable[tuple[int, list[float]]], low: float,
               high: float, bins: int = HISTOGRAM_BINS) -> Histogram:
    values: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for rows, sample in parts:
        if sample and rows:
            arr = np.asarray(sample, dtype=np.float64)
            values.append(arr)
            weights.append(np.full(len(arr), rows / len(arr)))
    if not values:
        return Histogram(column=column, bins=[], sampled_rows=0)
    v, w = np.concatenate(values), np.concatenate(weights)
    finite = np.isfinite(v)
    v, w = v[finite], w[finite]
    if not math.isfinite(low) or not math.isfinite(high) or high < low:
        low, high = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    if high <= low:  # every row has one value: one bin around it
        low, high = low - 0.5e-3, high + 0.5e-3
    counts, edges = np.histogram(np.clip(v, low, high), bins=bins, range=(low, high),
                                 weights=w)
    return Histogram(column=column, sampled_rows=len(v), bins=[
        HistogramBin(low=float(edges[i]), high=float(edges[i + 1]), rows=float(counts[i]))
        for i in range(bins)
    ])


def _footer_rows(path: str) -> int | None:

    try:
        return int(open_parquet(path).metadata.num_rows)
    except Exception:  # unreadable is exactly what made some of these fail
        return None


def build_report(
    summary: RunSummary,
    scored: Mapping[str, PartitionScored],
    merged: Mapping[str, PartitionMerged],
    partitions: Sequence[Partition] = (),
    *,
    status: str | None = None,
) -> RunReport:
    """Aggregate per-partition figures into the run report.

    Args:
        summary: the flow's RunSummary.
        scored: scoring results by partition relpath (this run).
        merged: merge results by partition relpath; the table's figures come from these.
        partitions: the planned partitions, to count the rows of failed ones.
        status: shown in the summary title; default "Completed" or "Failed".
    """
    parts = [merged[r] for r in sorted(merged)]
    rows = sum(p.rows for p in parts)
    msum, cross, figures = _member_figures(summary, scored, parts, rows)
    corr = correlation_from_sums(rows, msum, cross)
    warnings = _duplicate_warnings(summary.members, corr)
    failed_rows, failed_unreadable = _failed_rows(summary.failed, partitions)
    if summary.failed:
        warnings.append(f"{len(summary.failed)} partition(s) failed and are not in the table; "
                        "a re-run scores only what is missing.")
    if summary.repeated_ids:
        warnings.append(summary.repeated_ids)
    if summary.missing_members:
        warnings.insert(0, missing_text(summary.members))
    if summary.previous_run:
        warnings.insert(0, f"{summary.previous_run}; its committed partitions were kept and "
                        "this run scored the rest.")
    warnings += _partial_members(figures, rows, summary.missing_members)
    return RunReport(
        status=status or ("Failed" if summary.failed else "Completed"),
        output_dir=summary.output_dir,
        ensemble_dir=summary.ensemble_dir,
        quarantine_dir=store_for(summary.output_dir).uri(QUARANTINE_DIR),
        partitions=len(parts),
        rows=rows,
        quarantined_rows=summary.bad_rows,
        failed_partitions=dict(summary.failed),
        failed_rows=failed_rows,
        failed_unreadable=failed_unreadable,
        members=figures,
        reused_member_outputs=summary.skipped_member_partitions,
        seconds=summary.seconds,
        scoring_seconds=summary.scoring_seconds,
        rows_per_second=summary.rows_per_second,
        correlation=[[_none_if_nan(float(c)) for c in row] for row in corr],
        warnings=warnings,
        golden=summary.golden,
        missing_members=dict(summary.missing_members),
        drift=list(summary.drift),
        drift_baseline=summary.drift_baseline,
        **_ensemble_figures(parts, rows),
    )


def _ensemble_figures(parts: Sequence[PartitionMerged], rows: int) -> dict[str, Any]:
    """The ensemble columns' figures and histograms, from the partitions' sums and samples."""
    ssum = sum(p.score_sum for p in parts)
    ssq = sum(p.score_sumsq for p in parts)
    mean = ssum / rows if rows else math.nan
    std = math.sqrt(max(ssq / rows - mean * mean, 0.0)) if rows else math.nan
    low = min((p.score_min for p in parts if p.rows), default=math.nan)
    high = max((p.score_max for p in parts if p.rows), default=math.nan)
    std_samples = [v for p in parts for v in p.sample_std]
    std_high = max(std_samples) if std_samples else math.nan
    return {
        "ensemble_mean": _none_if_nan(mean),
        "ensemble_std": _none_if_nan(std),
        "ensemble_min": _none_if_nan(low),
        "ensemble_max": _none_if_nan(high),
        "disagreement_mean": _none_if_nan(sum(p.std_sum for p in parts) / rows if rows
                                          else math.nan),
        "score_histogram": _histogram("ensemble_score",
                                      ((p.rows, p.sample_score) for p in parts), low, high),
        "std_histogram": _histogram("ensemble_std", ((p.rows, p.sample_std) for p in parts),
                                    0.0, std_high),
    }


def _member_figures(summary: RunSummary, scored: Mapping[str, PartitionScored],
                    parts: Sequence[PartitionMerged], rows: int
                    ) -> tuple[np.ndarray, np.ndarray, list[MemberFigures]]:
    """Each member's figures, with the sums and cross-products its correlations need."""
    names = [m.name for m in summary.members]
    k = len(names)
    msum, msq, cross = np.zeros(k), np.zeros(k), np.zeros((k, k))
    for p in parts:
        if len(p.member_sum) != k:
            raise ValueError(f"partition {p.relpath} has {len(p.member_sum)} member sums, "
                             f"expected {k}")
        msum += p.member_sum
        msq += p.member_sumsq
        cross += np.asarray(p.cross, dtype=np.float64)
    seconds = dict.fromkeys(names, 0.0)
    scored_rows = dict.fromkeys(names, 0)
    reused = dict.fromkeys(names, 0)
    for s in scored.values():
        for m in s.members:
            if m.name in seconds:
                seconds[m.name] += m.seconds
                scored_rows[m.name] += m.rows
                reused[m.name] += int(m.skipped)
    # Rows with each member's score: fewer than the table's where members were missing.
    mrows = np.zeros(k)
    for p in parts:
        mrows += p.member_rows if len(p.member_rows) == k else p.rows
    figures = []
    for i, info in enumerate(summary.members):
        n = int(mrows[i])
        mean = msum[i] / n if n else math.nan
        var = max(msq[i] / n - mean * mean, 0.0) if n else math.nan
        secs = seconds[info.name]
        figures.append(MemberFigures(
            name=info.name, rows=n, mean=_none_if_nan(mean), std=_none_if_nan(math.sqrt(var)),
            seconds=secs, scored_rows=scored_rows[info.name],
            rows_per_second=scored_rows[info.name] / secs if secs > 0 else None,
            reused_partitions=reused[info.name], digest=info.digest,
            load_seconds=info.load_seconds,
        ))
    return msum, cross, figures


def _duplicate_warnings(members: Sequence[MemberInfo], corr: np.ndarray) -> list[str]:
    """Pairs of members that are the same model twice (same files, or same scores)."""
    warnings = []
    for i, a in enumerate(members):
        for j in range(i + 1, len(members)):
            b = members[j]
            if a.missing or b.missing:  # not loaded: no digest, no scores to compare
                continue
            same_digest = a.digest == b.digest
            c = corr[i, j]
            if same_digest or (math.isfinite(c) and c >= DUPLICATE_CORRELATION):
                shown = f"{c:.4f}" if math.isfinite(c) else "n/a"
                why = ("both load the same checkpoint files (same digest)" if same_digest
                       else "their checkpoints differ but compute the same scores")
                warnings.append(
                    f"members {a.name!r} and {b.name!r} correlate at {shown}: {why}, so the "
                    "ensemble has the same weights twice. Check their paths in the manifest."
                )
    return warnings


def missing_text(members: Sequence[MemberInfo]) -> str:
    """The summary's loud line about members left out, or ''."""
    missing = [m.name for m in members if m.missing]
    if not missing:
        return ""
    return (f"member(s) {missing} could not be loaded and are missing from this run: in the "
            "partitions it scored their score columns are null and the ensemble uses the "
            "other members (files committed earlier with their scores, for unchanged "
            "input, are kept as they were). Repair them and re-run: only their columns are "
            "scored.")


def _partial_members(figures: Sequence[MemberFigures], rows: int,
                     missing: Mapping[str, str]) -> list[str]:
    """Members that loaded but gave no finite score for some rows of the table."""
    out = []
    for m in figures:
        if m.name in missing or m.rows >= rows:
            continue
        share = 1 - m.rows / rows
        out.append(f"member {m.name!r} gave no finite score for {rows - m.rows:,} of "
                   f"{rows:,} row(s) ({share:.1%}); they are null in score_{m.name} and "
                   "the ensemble used the other members there. Check the model"
                   + (": it scored no row at all." if m.rows == 0 else "."))
    return out


def _failed_rows(failed: Mapping[str, str], partitions: Sequence[Partition]
                 ) -> tuple[int, int]:
    """Rows in failed partitions whose footer reads, and how many footers do not."""
    rows = unreadable = 0
    by_rel = {p.relpath: p for p in partitions}
    for rel in failed:
        n = _footer_rows(by_rel[rel].path) if rel in by_rel else None
        if n is None:
            unreadable += 1
        else:
            rows += n
    return rows, unreadable


# ---------------------------------------------------------------------------- rendering


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _summary_lines(report: RunReport) -> list[tuple[str, str, str]]:
    """(label, plain text, markdown) for each line of the summary."""
    lines: list[tuple[str, str, str]] = []

    def add(label: str, text: str, md: str | None = None) -> None:
        lines.append((label, text, md if md is not None else text))

    add("Ensemble table", f"{report.ensemble_dir}  ({report.partitions} file(s))",
        f"`{report.ensemble_dir}` ({report.partitions} file(s))")
    add("Output", report.output_dir, f"`{report.output_dir}`")
    bad = (f", {report.quarantined_rows:,} bad row(s) set aside"
           if report.quarantined_rows else "")
    add("Rows", f"{report.rows:,} in {report.partitions} partition(s){bad}")
    add("Members", f"{len(report.members)} ({', '.join(report.member_names)})")
    if report.missing_members:
        add("MISSING", f"{len(report.missing_members)} member(s) not loaded, columns null: "
            f"{', '.join(report.missing_members)}",
            f"**{len(report.missing_members)} member(s) not loaded, columns null: "
            f"{', '.join(report.missing_members)}**")
    if report.golden:
        add("Golden check", report.golden)
    if report.quarantined_rows:
        add("Quarantined", f"{report.quarantined_rows:,} row(s) in {report.quarantine_dir}",
            f"{report.quarantined_rows:,} row(s) in `{report.quarantine_dir}`")
    if report.failed_partitions:
        rows = f"{report.failed_rows:,} row(s)"
        if report.failed_unreadable:
            rows += f" + {report.failed_unreadable} unreadable partition(s)"
        listing = ", ".join(sorted(report.failed_partitions))
        add("Failed", f"{len(report.failed_partitions)} partition(s), {rows}: {listing}")
    if report.reused_member_outputs:
        add("Reused", f"{report.reused_member_outputs} member output(s) already committed "
            "with matching inputs (use --force to re-score)")
    add("Time", f"{report.seconds:.1f} s in the flow, {report.scoring_seconds:.1f} s scoring "
        f"({_rate(report.rows_per_second)} rows/s)")
    add("Ensemble score", f"mean {_num(report.ensemble_mean)}, std {_num(report.ensemble_std)}"
        f", range {_num(report.ensemble_min)} to {_num(report.ensemble_max)}; mean member "
        f"std {_num(report.disagreement_mean)}")
    if report.drift_baseline:
        add("Drift", ("\n" + " " * 16).join(report.drift) or "nothing to compare",
            "<br>".join(report.drift) or "nothing to compare")
    return lines


_MEMBER_COLUMNS = ["member", "rows", "mean", "std", "seconds", "rows/s", "digest", "load s"]


def _member_cells(m: MemberFigures) -> list[str]:
    return [m.name, f"{m.rows:,}", _num(m.mean), _num(m.std), f"{m.seconds:.2f}",
            _rate(m.rows_per_second), m.digest[:12], f"{m.load_seconds:.2f}"]


def member_table(report: RunReport) -> list[dict[str, Any]]:
    """Rows of the members table artifact, formatted as the summary formats them: the UI
    shows the cells as given, and the figures as numbers are in ``_run.json``."""
    return [
        {
            "member": m.name,
            "rows": f"{m.rows:,}",
            "mean": _num(m.mean),
            "std": _num(m.std),
            "seconds": f"{m.seconds:.2f}",
            "rows/s": _rate(m.rows_per_second),
            "reused partitions": f"{m.reused_partitions:,}",
            "digest": m.digest[:16],
            "load s": f"{m.load_seconds:.2f}",
        }
        for m in report.members
    ]


def figures_table(report: RunReport) -> list[dict[str, str]]:
    """Rows of the ensemble figures table artifact: ten, one page of the UI's table."""
    rows = [
        ("rows", f"{report.rows:,}"),
        ("partitions committed", f"{report.partitions:,}"),
        ("quarantined rows", f"{report.quarantined_rows:,}"),
        ("failed partitions", f"{len(report.failed_partitions):,} "
                              f"({report.failed_rows:,} rows)"),
        ("ensemble_score mean ± std",
         f"{_num(report.ensemble_mean)} ± {_num(report.ensemble_std)}"),
        ("ensemble_score range", f"{_num(report.ensemble_min)} to {_num(report.ensemble_max)}"),
        ("member disagreement (mean ensemble_std)", _num(report.disagreement_mean)),
        ("member outputs reused", f"{report.reused_member_outputs:,}"),
        ("time", f"{report.seconds:.1f} s in the flow, {report.scoring_seconds:.1f} s scoring"),
        ("rows/s while scoring", _rate(report.rows_per_second)),
    ]
    return [{"figure": k, "value": v} for k, v in rows]


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]],
              align: Sequence[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    fmt = [h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                             strict=True))]
    lines = ["  " + "  ".join(fmt)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def render_summary_markdown(report: RunReport) -> str:
    """The summary artifact: key figures, the members, warnings, where the table is."""
    parts = [f"# Ensemble run: {report.status}", ""]
    parts.append(f"The ensemble table is at `{report.ensemble_dir}`.")
    parts.append("")
    parts.append(_md_table(["", ""], [(f"**{label}**", md) for label, _, md in
                                      _summary_lines(report)]))
    parts += ["", "## Members", ""]
    parts.append(_md_table(_MEMBER_COLUMNS, [_member_cells(m) for m in report.members],
                           ["---"] + ["---:"] * 5 + ["---", "---:"]))
    if report.warnings:
        parts += ["", "## Warnings", ""]
        parts += [f"- **Warning:** {w}" for w in report.warnings]
    return "\n".join(parts) + "\n"


def render_summary_text(report: RunReport) -> str:
    """The same summary as the markdown artifact, for the terminal."""
    lines = [f"{label + ':':<16}{text}" for label, text, _ in _summary_lines(report)]
    lines.append("Members' figures:")
    lines.append(_text_table(_MEMBER_COLUMNS, [_member_cells(m) for m in report.members]))
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)


def render_agreement_markdown(report: RunReport) -> str:
    """Pairwise correlation of member scores, with members that are copies flagged."""
    names = report.member_names
    rows = [[f"**{n}**", *(_num(c) for c in row)] for n, row in zip(names, report.correlation,
                                                                    strict=True)]
    parts = ["# Member agreement", "",
             "Pearson correlation of member scores over every row of the table. Members of "
             "one architecture trained on different seeds, folds or bags correlate highly "
             "but not at 1.0; a pair at 1.0 is one model loaded twice.", "",
             _md_table(["", *names], rows, ["---"] + ["---:"] * len(names)), ""]
    if any(w.startswith("members ") for w in report.warnings):
        parts += [f"- **Warning:** {w}" for w in report.warnings if w.startswith("members ")]
    else:
        parts.append("No two members compute the same scores.")
    return "\n".join(parts) + "\n"


def _bar(share: float) -> str:
    eighths = round(share * BAR_WIDTH * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8].strip() if eighths % 8 else "")


def histogram_markdown(hist: Histogram, title: str) -> str:
    """A histogram as a markdown table with a bar of block characters per bin."""
    if not hist.bins:
        return f"### {title}\n\nNo rows.\n"
    total = sum(b.rows for b in hist.bins) or 1.0
    peak = max(b.rows for b in hist.bins) or 1.0
    rows = [(f"{b.low:.4f} to {b.high:.4f}", f"{b.rows:,.0f}", f"{100 * b.rows / total:.1f}%",
             _bar(b.rows / peak) or "·") for b in hist.bins]
    return (f"### {title}\n\nEstimated from {hist.sampled_rows:,} sampled rows, weighted by "
            f"partition size.\n\n"
            + _md_table([hist.column, "rows", "share", ""], rows, ["---", "---:", "---:", "---"])
            + "\n")


def render_histograms_markdown(report: RunReport) -> str:
    return "\n".join([
        "# Score distributions", "",
        histogram_markdown(report.score_histogram, "ensemble_score (the ensemble's score)"),
        histogram_markdown(report.std_histogram,
                           "ensemble_std (member disagreement: std of the member scores)"),
    ])


# ---------------------------------------------------------------------------- publishing


def publish_safely(logger: Any, what: str, call: Callable[[], Any]) -> Any:
    """Run one artifact call; a failure is a warning, never the run's failure."""
    try:
        return call()
    except Exception as exc:
        logger.warning(f"could not publish the {what} artifact ({type(exc).__name__}: {exc}); "
                       "the scoring run is not affected")
        return None


def publish_report(report: RunReport, logger: Any) -> None:
    """Create the report's artifacts in the current flow run (best effort)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    where = report.output_dir
    publish_safely(logger, "members table", lambda: create_table_artifact(
        member_table(report), key=ARTIFACT_KEYS["members"],
        description=f"Per-member figures, run into {where}"))
    publish_safely(logger, "ensemble figures", lambda: create_table_artifact(
        figures_table(report), key=ARTIFACT_KEYS["figures"],
        description=f"Ensemble figures, run into {where}"))
    publish_safely(logger, "member agreement", lambda: create_markdown_artifact(
        render_agreement_markdown(report), key=ARTIFACT_KEYS["agreement"],
        description="Pairwise correlation of member scores"))
    publish_safely(logger, "histograms", lambda: create_markdown_artifact(
        render_histograms_markdown(report), key=ARTIFACT_KEYS["histograms"],
        description="Histograms of ensemble_score and ensemble_std"))
    publish_safely(logger, "summary", lambda: create_markdown_artifact(
        render_summary_markdown(report), key=ARTIFACT_KEYS["summary"],
        description=f"Run summary; ensemble table at {report.ensemble_dir}"))


def report_run(
    summary: RunSummary,
    scored: Mapping[str, PartitionScored],
    merged: Mapping[str, PartitionMerged],
    partitions: Sequence[Partition],
    logger: Any,
    *,
    status: str | None = None,
    publish: bool = True,
) -> RunReport | None:
    """Build and publish the report; returns it, or None if it could not be built.
    ``status`` titles the summary of a run stopped early (default: Completed or Failed);
    ``publish=False`` builds and logs it only (the API is known not to answer).

    Never raises: the table is committed by now and a report problem must not fail it.
    """
    try:
        report = build_report(summary, scored, merged, partitions, status=status)
    except Exception as exc:
        logger.warning(f"could not build the run report ({type(exc).__name__}: {exc}); the "
                       "scoring run is not affected")
        return None
    for w in report.warnings:
        logger.warning(w)
    if publish:
        publish_report(report, logger)
    return report


class RunProgress:
    """A progress artifact in the current flow run, updated as partitions are committed.

    Best effort like the rest of the report: when the artifact cannot be created, updates
    are skipped.
    """

    def __init__(self, total: int, logger: Any) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.logger = total, logger
        self.artifact_id: UUID | None = publish_safely(
            logger, "progress", lambda: create_progress_artifact(
                100.0 if total == 0 else 0.0, key=ARTIFACT_KEYS["progress"],
                description=f"0 of {total} partition(s) committed"))

    def update(self, done: int) -> None:
        if self.artifact_id is None:
            return
        from prefect.artifacts import update_progress_artifact

        artifact_id = self.artifact_id
        pct = 100.0 * done / self.total if self.total else 100.0
        publish_safely(self.logger, "progress", lambda: update_progress_artifact(
            artifact_id, min(pct, 100.0),
            description=f"{done} of {self.total} partition(s) committed"))


def read_run_artifacts(flow_run_id: UUID | str) -> dict[str, Any]:
    """The report artifacts of one flow run, by key, read back through the Prefect API
    (tables and progress decoded from their JSON). For checks and tooling."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])))
    out: dict[str, Any] = {}
    for a in artifacts:
        data = a.data
        if a.type in ("table", "progress") and isinstance(data, str):
            data = json.loads(data)
        if a.key:
            out[a.key] = data
    return out
