"""The production set-up: a Prefect server on PostgreSQL (as Prefect recommends for a
server several workers report to), a process worker running two ad-hoc runs at once, and
a run on a dask.distributed cluster whose workers report to the same server.

PostgreSQL is Debian's (``.ci/run`` installs it when missing), started by the test in a
temporary folder on a free 127.0.0.1 port and stopped by its pid.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deployments.conftest import (
    POOL,
    PREFECT_FILE,
    PrefectStack,
    free_port,
    prefect_cli,
)
from tests.helpers import assert_output_matches, reference_scores

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the package's own user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture()
def postgres(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL server of its own; yields its SQLAlchemy URL for Prefect."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing; .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # Not under pytest's temporary folder: that one is private to this user, and the
    # server runs as another.
    home = Path(tempfile.mkdtemp(prefix="ensemble-scoring-pg-"))
    home.chmod(0o755)
    data = home / "pg"
    data.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    run = _as_postgres()
    subprocess.run([*run, str(bin_dir / "initdb"), "-D", str(data), "-U", "prefect",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    log = data / "server.log"
    subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                    "-o", f"-p {port} -h 127.0.0.1 -k {data}", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*run, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "prefect", "prefect"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                        "stop"], capture_output=True)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:
            os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)


def _dask(stack: PrefectStack) -> str:
    """A scheduler and two workers reporting to the stack's server, stopped with it."""
    dask = shutil.which("dask", path=str(Path(sys.executable).parent))
    assert dask
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    stack.start("dask-scheduler", dask, "scheduler", "--host", "127.0.0.1", "--port",
                str(port), "--dashboard-address", f"127.0.0.1:{free_port()}")
    for i in range(2):
        stack.start(f"dask-worker-{i}", dask, "worker", address, "--host", "127.0.0.1",
                    "--nthreads", "2", "--no-nanny", "--dashboard-address",
                    f"127.0.0.1:{free_port()}")
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    return address


def test_server_on_postgres_with_concurrent_runs_and_dask(tmp_path: Path, postgres: str
                                                          ) -> None:
    from flows.demo import build_demo

    stack = PrefectStack(tmp_path / "stack", database_url=postgres)
    try:
        stack.start_server()
        assert stack.api("GET", "/admin/version").status_code == 200
        stack.cli("work-pool", "create", POOL, "--type", "process")
        stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE)
        stack.start("worker", prefect_cli(), "worker", "start", "--pool", POOL,
                    "--limit", "3", cwd=tmp_path)
        manifest = build_demo(tmp_path / "demo", partitions=4, rows=20_000)
        data = manifest.parent / "data"
        address = _dask(stack)
        deployment = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
        runs: dict[str, dict[str, Any]] = {}
        for name, extra in (("a", {}), ("b", {}), ("dask", {"runner": "dask",
                                                           "address": address})):
            params = {"models": str(manifest), "input": str(data),
                      "output": str(tmp_path / f"out-{name}")} | extra
            created = stack.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                                json={"parameters": {"params": params}})
            assert created.status_code == 201, created.text
            runs[name] = created.json()
        ref = reference_scores(manifest, data)
        seen_running = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = [stack.api("GET", f"/flow_runs/{r['id']}").json()["state_type"]
                      for r in runs.values()]
            seen_running = max(seen_running, states.count("RUNNING"))
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states):
                break
            time.sleep(0.5)
        for name, r in runs.items():
            final = stack.wait_for_run(r["id"])
            assert final["state_type"] == "COMPLETED", f"{name}: {final['state']}\n" \
                f"{stack.logs()}"
            assert_output_matches(tmp_path / f"out-{name}", ref)
        assert seen_running >= 2, "the worker ran the ad-hoc runs one after the other"
        # The Dask run's tasks (in its subflow on the Dask runner) reported from the
        # cluster's processes to this server.
        sub = stack.api("POST", "/flow_runs/filter", json={"flow_runs": {
            "parent_flow_run_id": {"any_": [runs["dask"]["id"]]}}}).json()
        assert [r["state_type"] for r in sub] == ["COMPLETED"]
        tasks = stack.api("POST", "/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [sub[0]["id"]]}}}).json()
        assert sum(t["name"].startswith("score ") for t in tasks) == 4
    finally:
        stack.stop_all()
