"""The benchmark command end to end on a tiny workload: it must keep running as the product
changes, and its figures must be the ones it claims (one load per checkpoint, scores
matching numpy). Its speed figures are not asserted here: they belong to benchmarks/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import prefect_free_env


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_workload(tmp_path: Path) -> None:
    env = prefect_free_env(tmp_path / "prefect-home")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--members", "2", "--partitions", "2",
         "--rows-per-partition", "5000", "--hidden", "16,8", "--features", "8",
         "--ceiling-batches", "1024,4096", "--ceiling-seconds", "0.3", "--repeat", "2",
         "--startup-samples", "0", "--quiet-wait", "0", "--probe-interval", "0.02",
         "--workdir", str(tmp_path / "bench"),
         "--json", str(out)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "product, flow phase" in proc.stdout and "hardware yardstick" in proc.stdout
    figures = json.loads(out.read_text())
    runs = figures["product"]["runs"]
    assert len(runs) == 2 and len(figures["ceiling"]["windows"]) == 3
    # The ceiling is also measured on the graphs as the product loads them: where
    # TensorFlow does not fuse MatMul + bias itself (oneDNN off), the two hidden layers and
    # the head are rewritten; with oneDNN on they are the graphs as saved.
    path = figures["cpu_path"]
    assert path["cpu"] and "avx512f" in path["flags"] and path["label"] in proc.stdout
    assert "CPU path:" in proc.stdout and "AMX" in proc.stdout
    assert len(figures["ceiling"]["fused_windows"]) == 3
    assert figures["ceiling"]["fused_bias_adds"] == (0 if path["fuses_matmul_add"] else 3)
    assert figures["ceiling"]["frozen_variables"] == (6 if path["onednn"] else 0)
    assert "product's graphs" in proc.stdout
    # Best of every thread configuration and batch size, each measured.
    measured = figures["ceiling"]["rows_per_s"]
    assert {k.split()[0] for k in measured} == {"shared", "per-session", "per-session-1"}
    assert {int(k.split()[1]) for k in measured} == {1024, 4096}
    assert figures["ceiling"]["best_threads"] in {"shared", "per-session", "per-session-1"}
    # The winner is measured anew: the windows that chose it are not those it is compared by.
    ceiling = figures["ceiling"]
    assert ceiling["selection_rate"] == measured[f"{ceiling['best_threads']} "
                                                 f"{ceiling['best_batch']}"]
    assert ceiling["windows"][0] != ceiling["selection_rate"]
    assert "measured anew before run 1" in proc.stdout
    assert "(speed probe)" in proc.stdout
    assert "feed, run 1: at most 16,384 rows per Session.run (default" in proc.stdout
    assert "too small for the feed probe" in proc.stdout
    assert (tmp_path / "bench" / "speed-probe.txt").read_text().count("\n") > 10
    for run in runs:
        assert run["rows"] == 10_000
        assert run["feed"]["chosen_by"] == "default" and run["feed"]["rows"] == 16_384
        assert run["ratio_flow"] > 0 and run["ratio_process"] > 0
        assert run["ratio_flow_fused"] > 0
        assert 0 <= run["foreign"] <= 1
        assert run["flow"] < run["wall"]
        # The speed probe sampled the flow and the ceiling windows around it: the same
        # machine, a few seconds apart, so within a factor of a few of 1.
        assert 0.2 < run["machine_speed"] < 5
        assert run["span"][0] < run["span"][1]
    assert figures["product"]["max_loads_per_checkpoint"] == 1
    assert figures["max_abs_error"] < 1e-5
    assert figures["reference"]["gflops"] > 0
    assert len(figures["product"]["startup_samples"]) == 2
