"""The same flow on other engines: Prefect's process pool, and a real dask.distributed
cluster (a scheduler and two worker processes on 127.0.0.1) started by the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import loaders.feed
from flows.demo import build_demo
from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from tests.helpers import assert_output_matches, reference_scores

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _run_record(out: Path) -> dict[str, object]:
    return json.loads((out / "_run.json").read_text())  # type: ignore[no-any-return]


def _probe_where_scored(out: Path) -> None:
    """Checked after a run made with the feed probe on for any input size."""
    feed = _run_record(out)["feed"]
    assert isinstance(feed, dict) and feed["chosen_by"] == "probe"
    assert feed["process"].split(":")[1] != str(os.getpid())  # on the runner, not here


def test_dask_cluster_scores_like_the_reference(tmp_path: Path, dask_cluster: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders.feed, "PAYBACK", 0)  # the feed probe runs, on a worker
    manifest = build_demo(tmp_path / "demo", partitions=6, rows=20_000)
    out = tmp_path / "out"
    summary = score_ensemble(ScoreParams(
        models=str(manifest), input=str(manifest.parent / "data"), output=str(out),
        runner="dask", address=dask_cluster))
    assert summary.rows == 120_000 and not summary.failed
    assert_output_matches(out, reference_scores(manifest, manifest.parent / "data"))
    loads = _run_record(out)["model_loads"]
    assert isinstance(loads, dict)
    workers = {proc: n for proc, n in loads.items() if n and proc.split(":")[1] != str(
        os.getpid())}
    assert workers, "no partition was scored on a Dask worker"
    # Each worker process loaded each checkpoint at most once.
    assert all(count == 1 for per in workers.values() for count in per.values())
    _probe_where_scored(out)


def test_process_pool_scores_like_the_reference(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders.feed, "PAYBACK", 0)  # the feed probe runs, in a worker
    manifest = build_demo(tmp_path / "demo", partitions=4, rows=20_000)
    out = tmp_path / "out"
    summary = score_ensemble(ScoreParams(
        models=str(manifest), input=str(manifest.parent / "data"), output=str(out),
        runner="processes", workers=2))
    assert summary.rows == 80_000 and not summary.failed
    assert_output_matches(out, reference_scores(manifest, manifest.parent / "data"))
    loads = _run_record(out)["model_loads"]
    assert isinstance(loads, dict)
    # The test process's own cache has served every test of the session; the workers'
    # counts are the ones this run made.
    workers = {proc: per for proc, per in loads.items()
               if proc.split(":")[1] != str(os.getpid())}
    assert workers, "no partition was scored in a worker process"
    assert all(count == 1 for per in workers.values() for count in per.values())
    _probe_where_scored(out)


def test_dask_needs_an_address() -> None:
    with pytest.raises(ValueError, match="runner 'dask' needs 'address'"):
        ScoreParams(models="m.yaml", input="in", output="out", runner="dask")
