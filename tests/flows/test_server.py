"""The CLI's own Prefect server: ``prefect server start`` on a free 127.0.0.1 port, in its
own session, serving the API, stopped by its pid, and never outliving the CLI."""

from __future__ import annotations

import http.server
import json
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flows.server import _SETTLE, LocalServer, _free_port
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
    """The server's process runs Prefect from its console-script entry point, started
    with ``python -c``: the working directory it would put first on the import path is
    dropped, so a module there cannot stand in for Prefect or what it imports on its way
    to the database migration step (which puts it back itself, see ``flows.server``)."""
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


_WATCH = """
print("paused" if not gc.isenabled() else "not paused", flush=True)
sys.stdin.readline()
end = time.monotonic() + 30
while not gc.isenabled() and time.monotonic() < end:
    time.sleep(0.02)
print("enabled" if gc.isenabled() else "still paused", gc.get_freeze_count() > 0, flush=True)
"""


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _NotHttp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"NOT-HTTP garbage\r\n\r\n")


@pytest.mark.parametrize("answer", ["health", "not http", "nothing, past the timeout"])
def test_server_collector_paused_until_it_answers(answer: str) -> None:
    """The launcher's first part: the collector is off until the server's health URL
    answers, then on with what the start built frozen; also when the answer is not HTTP
    or none comes before the timeout. It is never left off."""
    port = _free_port()
    timeout = "2" if answer.startswith("nothing") else "60"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SETTLE + _WATCH, f"http://127.0.0.1:{port}/api/health",
         timeout], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    server: socketserver.TCPServer | None = None
    try:
        assert proc.stdout.readline().strip() == "paused"
        time.sleep(0.3)
        if answer == "health":
            server = http.server.HTTPServer(("127.0.0.1", port), _Health)
        elif answer == "not http":
            server = socketserver.TCPServer(("127.0.0.1", port), _NotHttp)
        if server is not None:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["enabled", "True"]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        if server is not None:
            server.shutdown()
            server.server_close()


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
