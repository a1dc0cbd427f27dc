"""The same flow on other engines: Prefect's process pool, and a real dask.distributed
cluster (a scheduler and two worker processes on 127.0.0.1) started by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.demo import build_demo
from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from tests.helpers import assert_output_matches, reference_scores

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture()
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` + 2 ``dask worker`` processes, everything bound to 127.0.0.1."""
    from prefect.settings import PREFECT_API_URL

    dask = shutil.which("dask", path=str(Path(sys.executable).parent))
    assert dask, "the dask CLI comes with distributed (pip install prefect-dask)"
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "dask.log", "wb")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", f"127.0.0.1:{_free_port()}"],
        env=env, stdout=log, stderr=log, cwd=tmp_path)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "2",
                 "--no-nanny", "--dashboard-address", f"127.0.0.1:{_free_port()}"],
                env=env, stdout=log, stderr=log, cwd=tmp_path))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        _stop(procs)
        log.close()


def _run_record(out: Path) -> dict[str, object]:
    return json.loads((out / "_run.json").read_text())  # type: ignore[no-any-return]


def test_dask_cluster_scores_like_the_reference(tmp_path: Path, dask_cluster: str) -> None:
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


def test_process_pool_scores_like_the_reference(tmp_path: Path) -> None:
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


def test_dask_needs_an_address() -> None:
    with pytest.raises(ValueError, match="runner 'dask' needs 'address'"):
        ScoreParams(models="m.yaml", input="in", output="out", runner="dask")
