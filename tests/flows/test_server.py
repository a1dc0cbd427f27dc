"""The CLI's own Prefect server: ``prefect server start`` on a free 127.0.0.1 port, in its
own session, serving the API, stopped by its pid, and never outliving the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.server import LocalServer
from tests.helpers import prefect_free_env, prefect_servers


def _post(url: str, body: dict[str, object]) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(resp.status)


@pytest.mark.slow
def test_server_serves_the_api_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    for key, value in prefect_free_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = LocalServer()
    server.start()
    try:
        server.wait()
        # The API works on its database (a query that touches tables).
        assert _post(f"{server.api_url}/flows/filter", {"limit": 1}) == 200
        assert prefect_servers(tmp_path)
    finally:
        server.stop(wait=10)
    assert not prefect_servers(tmp_path)


@pytest.mark.slow
def test_server_imports_nothing_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs as the ``prefect`` console script, whose import path starts at the
    script's own folder, not the working directory: a module in the folder the CLI runs
    from cannot stand in for Prefect or what it imports before its database migration
    step (which puts ``.`` on the path itself, see README, "The folder you run from")."""
    for key, value in prefect_free_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("uvicorn", "fastapi", "sqlalchemy", "prefect"):
        (cwd / f"{name}.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(cwd)
    server = LocalServer()
    server.start()
    try:
        server.wait()
        assert _post(f"{server.api_url}/flows/filter", {"limit": 1}) == 200
    finally:
        server.stop(wait=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_server_exits_when_its_cli_is_killed(tmp_path: Path) -> None:
    """The server runs in its own session (a Ctrl-C is for the CLI alone), so it must
    go when the CLI dies without stopping it, here by SIGKILL."""
    env = prefect_free_env(tmp_path)
    script = ("import os, signal\n"
              "from flows.server import LocalServer\n"
              "server = LocalServer()\n"
              "server.start()\n"
              "server.wait()\n"
              "print(server.process.pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    server_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server_pid), "the server outlived its CLI"
