"""A real Prefect stack for the slow deployment tests: ``prefect server start`` on a free
127.0.0.1 port with its own PREFECT_HOME and database, the deployments of
``deployments/prefect.yaml``, a process worker, and one finished ad-hoc run.

Started once for the package (a fresh server takes 7-20 s here) and shared by the API and
browser tests. Every process is started in its own session and stopped through its
process group by pid (SIGINT, then SIGKILL after a timeout), whatever the tests do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = "deployments/prefect.yaml"
POOL = "ensemble"  # the work pool named in deployments/prefect.yaml
DEMO_PARTITIONS, DEMO_ROWS = 2, 3000
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RETRY_CODES = {429, 502, 503}  # what prefect.client.base retries
RETRIES = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT to the process group, SIGKILL if it is still there after ``timeout``."""
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)  # own session: pgid == pid
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class PrefectStack:
    """One Prefect server plus the processes started against it, all stopped by pid."""

    root: Path
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    database_url: str = ""  # the server's database; default a SQLite file of its own
    url: str = field(init=False)  # the UI's, from the port
    api_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"

    @property
    def env(self) -> dict[str, str]:
        # Nothing from the caller's Prefect profile or settings leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        home = self.root / "prefect-home"
        env.update({
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_API_URL": self.api_url,  # else the UI calls the default port 4200
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                self.database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, name: str, *args: str, cwd: Path = REPO_ROOT) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(list(args), cwd=cwd, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_server(self, timeout: float = 120.0) -> None:
        (self.root / "prefect-home").mkdir(parents=True, exist_ok=True)
        server = self.start("server", prefect_cli(), "server", "start", "--host", "127.0.0.1",
                            "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.popen.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{_tail(server.log)}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{_tail(server.log)}")

    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """Run a prefect command to completion (subprocess.run kills it on timeout)."""
        proc = subprocess.run([prefect_cli(), *args], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried the way Prefect's own client retries.

        Under load the server answers 503 for retryable database errors (SQLite busy
        while a worker and a runner write to it); Prefect's client retries those, so a
        bare httpx call must too or the test fails on the server's own back-pressure.
        """
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        for attempt in range(RETRIES):
            if response.status_code not in RETRY_CODES:
                break
            time.sleep(min(2.0 ** attempt, 8.0))
            response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        return response

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{_tail(p.log)}" for p in self.procs)

    def wait_for_run(self, flow_run_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/flow_runs/{flow_run_id}").json()
            if run["state_type"] in TERMINAL:
                return dict(run)
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s\n"
                             f"{self.logs()}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):  # workers and runners before the server
            proc.stop()


def prefect_cli() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    s = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        s.start_server()
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="package")
def adhoc_run(stack: PrefectStack, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """Deploy deployments/prefect.yaml, start a worker, run the ad-hoc deployment with
    parameters through the API and wait for it to finish."""
    from flows.demo import build_demo

    data = tmp_path_factory.mktemp("adhoc")
    manifest = build_demo(data / "demo", partitions=DEMO_PARTITIONS, rows=DEMO_ROWS)
    stack.cli("work-pool", "create", POOL, "--type", "process")
    deployed = stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE)
    assert "Warning" not in deployed.stdout + deployed.stderr, deployed.stderr
    stack.start("worker", prefect_cli(), "worker", "start", "--pool", POOL,
                cwd=data)  # not the repo root: the pull step has to take it there
    deployment = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
    params = {"models": str(manifest), "input": str(data / "demo" / "data"),
              "output": str(data / "out"), "ensemble": "median", "bad_rows": "quarantine",
              "concurrency": 2}
    created = stack.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                        json={"parameters": {"params": params}})
    assert created.status_code == 201, created.text
    run = stack.wait_for_run(created.json()["id"])
    return {"run": run, "deployment": deployment, "params": params, "output": data / "out"}
