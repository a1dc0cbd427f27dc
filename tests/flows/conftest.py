"""Fixtures of the flow tests: a real dask.distributed cluster (a scheduler and two worker
processes on 127.0.0.1), shared by the runner tests and the models-on-S3 tests."""

from __future__ import annotations

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
