"""The run report: its figures against numpy on the written table, the flag for members that
are one model loaded twice, the artifacts read back through the Prefect API, the CLI's
plain-text summary, and artifact failures that must not fail a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from flows.records import Histogram, HistogramBin, RunSummary
from flows.report import (
    ARTIFACT_KEYS,
    build_report,
    correlation_from_sums,
    histogram_markdown,
    read_run_artifacts,
    render_summary_text,
)
from flows.score import print_summary
from loaders.errors import PartitionsFailed
from tasks.merge import PartitionMerged
from tasks.plan import MemberInfo
from tests.helpers import read_dataset, write_manifest, write_table

pytestmark = pytest.mark.usefixtures("prefect_harness")

SIZES = (500, 230, 37)
NAN_ROWS = {0: [3, 17], 2: [5]}  # partition -> rows with a NaN feature


def _data(root: Path, features: list[str]) -> None:
    rng = np.random.default_rng(7)
    for p, n in enumerate(SIZES):
        x = rng.standard_normal((n, len(features))).astype(np.float32)
        for r in NAN_ROWS.get(p, []):
            x[r, p % len(features)] = np.nan
        cols: dict[str, object] = {"id": np.arange(p * 1000, p * 1000 + n)}
        cols.update({f: x[:, j] for j, f in enumerate(features)})
        write_table(root / f"p{p}.parquet", cols)


def _manifest(path: Path, checkpoints: list[Path], features: list[str], *,
              twin: bool = True) -> Path:
    models = [
        {"name": "m0", "path": str(checkpoints[0]), "input": "features", "output": "score"},
        {"name": "m1", "path": str(checkpoints[1]), "input": "features", "output": "score"},
        # The same checkpoint again under another name: the mistake the report must flag.
        {"name": "m0copy" if twin else "m2", "path": str(checkpoints[0 if twin else 2]),
         "input": "features", "output": "score"},
    ]
    return write_manifest(path, {"id_column": "id", "features": features, "models": models})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, checkpoints: list[Path],
        features: list[str], prefect_harness: None) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report")
    _data(tmp / "in", features)
    manifest = _manifest(tmp / "manifest.yaml", checkpoints, features)
    state = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp / "in"),
                                       output=str(tmp / "out"), bad_rows="quarantine"),
                           return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert isinstance(summary, RunSummary) and summary.report is not None
    return {"summary": summary, "report": summary.report, "tmp": tmp,
            "flow_run_id": state.state_details.flow_run_id,
            "table": read_dataset(tmp / "out" / "ensemble")}


def test_member_figures_match_the_table(run: dict[str, Any]) -> None:
    report, table = run["report"], run["table"]
    assert report.rows == table.num_rows == sum(SIZES) - 3
    assert report.quarantined_rows == 3 and report.partitions == 3
    assert [m.name for m in report.members] == ["m0", "m1", "m0copy"]
    for m in report.members:
        scores = table.column(f"score_{m.name}").to_numpy().astype(np.float64)
        assert m.rows == table.num_rows and m.scored_rows == table.num_rows
        assert m.mean == pytest.approx(scores.mean(), abs=1e-9)
        assert m.std == pytest.approx(scores.std(), abs=1e-9)
        assert m.seconds > 0 and m.rows_per_second and m.rows_per_second > 0
        assert len(m.digest) == 64 and m.load_seconds >= 0 and m.reused_partitions == 0
    ens = table.column("ensemble_score").to_numpy().astype(np.float64)
    assert report.ensemble_mean == pytest.approx(ens.mean(), abs=1e-7)
    assert report.ensemble_std == pytest.approx(ens.std(), abs=1e-7)
    assert report.ensemble_min == pytest.approx(ens.min()) and report.ensemble_max == \
        pytest.approx(ens.max())
    std = table.column("ensemble_std").to_numpy().astype(np.float64)
    assert report.disagreement_mean == pytest.approx(std.mean(), abs=1e-7)


def test_agreement_matrix_and_duplicate_flag(run: dict[str, Any]) -> None:
    report, table = run["report"], run["table"]
    scores = np.stack([table.column(f"score_{n}").to_numpy().astype(np.float64)
                       for n in ("m0", "m1", "m0copy")])
    assert np.allclose(np.array(report.correlation, dtype=np.float64), np.corrcoef(scores),
                       atol=1e-8)
    assert report.correlation[0][2] == pytest.approx(1.0, abs=1e-12)
    assert report.correlation[0][1] < 0.99
    flagged = [w for w in report.warnings if w.startswith("members ")]
    assert len(flagged) == 1
    assert "'m0' and 'm0copy' correlate at 1.0000" in flagged[0]
    assert "same weights twice" in flagged[0]


def test_histograms_cover_every_row(run: dict[str, Any]) -> None:
    report = run["report"]
    for hist in (report.score_histogram, report.std_histogram):
        assert len(hist.bins) == 20 and hist.sampled_rows == report.rows  # small: all sampled
        assert sum(b.rows for b in hist.bins) == pytest.approx(report.rows)
    assert report.score_histogram.bins[0].low == pytest.approx(report.ensemble_min)
    assert report.score_histogram.bins[-1].high == pytest.approx(report.ensemble_max)
    assert report.std_histogram.bins[0].low == 0.0


def test_artifacts_read_back_through_the_api(run: dict[str, Any]) -> None:
    artifacts = read_run_artifacts(run["flow_run_id"])
    assert set(ARTIFACT_KEYS.values()) <= set(artifacts)
    members = artifacts[ARTIFACT_KEYS["members"]]
    assert [r["member"] for r in members] == ["m0", "m1", "m0copy"]
    assert {"rows", "mean", "std", "seconds", "rows/s", "digest", "load s"} <= set(members[0])
    assert members[0]["digest"] == members[2]["digest"] != members[1]["digest"]
    assert members[0]["rows"] == f"{run['report'].rows:,}"
    assert members[0]["mean"] == f"{run['report'].members[0].mean:.4f}"
    figures = {r["figure"]: r["value"] for r in artifacts[ARTIFACT_KEYS["figures"]]}
    assert len(figures) <= 10  # one page of the UI's table
    assert figures["quarantined rows"] == "3" and figures["failed partitions"] == "0 (0 rows)"
    assert figures["rows"] == f"{run['report'].rows:,}"
    report = run["report"]
    assert figures["ensemble_score mean ± std"] == (
        f"{report.ensemble_mean:.4f} ± {report.ensemble_std:.4f}")
    assert artifacts[ARTIFACT_KEYS["progress"]] == pytest.approx(100.0)
    agreement = artifacts[ARTIFACT_KEYS["agreement"]]
    assert "| **m0** | 1.0000 |" in agreement and "Warning" in agreement
    hist = artifacts[ARTIFACT_KEYS["histograms"]]
    assert "ensemble_score" in hist and "ensemble_std" in hist and "█" in hist
    summary = artifacts[ARTIFACT_KEYS["summary"]]
    assert run["report"].ensemble_dir in summary and "Completed" in summary


def test_cli_prints_the_same_summary(run: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(run["summary"], 12.3)
    out = capsys.readouterr().out
    text = render_summary_text(run["report"])
    assert text in out
    assert f"Ensemble table: {run['report'].ensemble_dir}  (3 file(s))" in out
    assert "Rows:           764 in 3 partition(s), 3 bad row(s) set aside" in out
    assert "Members:        3 (m0, m1, m0copy)" in out
    assert "WARNING: members 'm0' and 'm0copy'" in out
    # Every figure of the markdown summary is on the terminal too.
    summary_md = read_run_artifacts(run["flow_run_id"])[ARTIFACT_KEYS["summary"]]
    for line in text.splitlines()[:6]:
        label, _, value = line.partition(":")
        assert f"**{label}**" in summary_md
        assert value.strip().split()[0].strip("`") in summary_md


def test_failed_partitions_are_reported(tmp_path: Path, checkpoints: list[Path],
                                        features: list[str]) -> None:
    _data(tmp_path / "in", features)
    manifest = _manifest(tmp_path / "manifest.yaml", checkpoints, features, twin=False)
    state = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "in"),
                                       output=str(tmp_path / "out"), bad_rows="fail"),
                           return_state=True)
    assert state.is_failed()
    with pytest.raises(PartitionsFailed):
        state.result()
    artifacts = read_run_artifacts(state.state_details.flow_run_id)
    figures = {r["figure"]: r["value"] for r in artifacts[ARTIFACT_KEYS["figures"]]}
    assert figures["failed partitions"] == f"2 ({SIZES[0] + SIZES[2]:,} rows)"
    assert figures["rows"] == f"{SIZES[1]:,}"
    assert "# Ensemble run: Failed" in artifacts[ARTIFACT_KEYS["summary"]]
    assert "p0.parquet, p2.parquet" in artifacts[ARTIFACT_KEYS["summary"]]
    assert artifacts[ARTIFACT_KEYS["progress"]] == pytest.approx(100 / 3)
    assert "No two members compute the same scores" in artifacts[ARTIFACT_KEYS["agreement"]]


def test_artifact_failures_do_not_fail_the_run(tmp_path: Path, checkpoints: list[Path],
                                               features: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.artifacts

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("artifact API unavailable")

    for name in ("create_table_artifact", "create_markdown_artifact",
                 "create_progress_artifact", "update_progress_artifact"):
        monkeypatch.setattr(prefect.artifacts, name, refuse)
    _data(tmp_path / "in", features)
    manifest = _manifest(tmp_path / "manifest.yaml", checkpoints, features)
    state = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "in"),
                                       output=str(tmp_path / "out"), bad_rows="quarantine"),
                           return_state=True)
    assert state.is_completed()
    assert state.result().report is not None
    assert read_run_artifacts(state.state_details.flow_run_id) == {}
    assert read_dataset(tmp_path / "out" / "ensemble").num_rows == sum(SIZES) - 3


def test_constant_member_has_no_correlation() -> None:
    x = np.array([[0.1, 0.5], [0.2, 0.5], [0.4, 0.5]])
    corr = correlation_from_sums(3, x.sum(0), x.T @ x)
    assert corr[0, 0] == pytest.approx(1.0) and math.isnan(corr[0, 1])
    assert math.isnan(corr[1, 1])
    assert np.isnan(correlation_from_sums(0, np.zeros(2), np.zeros((2, 2)))).all()


def test_report_without_rows_and_digest_flag() -> None:
    member = MemberInfo(name="a", format="checkpoint", location="/m", digest="d" * 64)
    twin = member.model_copy(update={"name": "b"})
    summary = RunSummary(output_dir="/out", ensemble_dir="/out/ensemble", partitions=0,
                         rows=0, bad_rows=0, members=[member, twin],
                         skipped_member_partitions=0, seconds=1.0, scoring_seconds=0.5,
                         failed={"x.parquet": "boom"}, ensemble_mean=0.0,
                         ensemble_std_mean=0.0)
    report = build_report(summary, {}, {})
    assert report.rows == 0 and report.members[0].mean is None
    assert report.failed_unreadable == 1 and report.status == "Failed"
    assert any("same checkpoint files" in w for w in report.warnings)
    assert "No rows." in histogram_markdown(report.score_histogram, "t")
    text = render_summary_text(report)
    assert "Failed:         1 partition(s), 0 row(s) + 1 unreadable partition(s)" in text


def test_histogram_bars_scale_to_the_peak() -> None:
    hist = Histogram(column="ensemble_score", sampled_rows=10, bins=[
        HistogramBin(low=0.0, high=0.5, rows=2.0), HistogramBin(low=0.5, high=1.0, rows=8.0)])
    md = histogram_markdown(hist, "scores")
    assert "| 0.5000 to 1.0000 | 8 | 80.0% | " + "█" * 40 + " |" in md
    assert "| 0.0000 to 0.5000 | 2 | 20.0% | " + "█" * 10 + " |" in md


def test_build_report_rejects_mismatched_members() -> None:
    member = MemberInfo(name="a", format="checkpoint", location="/m", digest="d" * 64)
    summary = RunSummary(output_dir="/o", ensemble_dir="/o/ensemble", partitions=1, rows=1,
                         bad_rows=0, members=[member], skipped_member_partitions=0,
                         seconds=1.0, scoring_seconds=1.0, failed={}, ensemble_mean=0.0,
                         ensemble_std_mean=0.0)
    merged = PartitionMerged(relpath="p", rows=1, path="/o/p", score_sum=0.5, score_sumsq=0.25,
                             std_sum=0.0, score_min=0.5, score_max=0.5,
                             member_sum=[0.5, 0.5], member_sumsq=[0.25, 0.25],
                             cross=[[0.25, 0.25], [0.25, 0.25]], sample_score=[0.5],
                             sample_std=[0.0])
    with pytest.raises(ValueError, match="2 member sums, expected 1"):
        build_report(summary, {}, {"p": merged})
