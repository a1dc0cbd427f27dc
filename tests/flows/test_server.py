"""The CLI's private Prefect server: a real server process on a fresh PREFECT_HOME, and the
marker that lets later starts skip Prefect's migrations when the database is current."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import prefetch
from flows.server import (
    HEAD_MARKER,
    EarlyServer,
    _database_is_current,
    _record_head,
    _sqlite_path,
)
from tests.helpers import prefect_free_env


def _make_db(path: Path, revision: str) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num TEXT)")
        conn.execute("DELETE FROM alembic_version")
        conn.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return path


def test_sqlite_path_only_for_a_sqlite_file() -> None:
    assert _sqlite_path("sqlite+aiosqlite:////home/u/.prefect/prefect.db") == Path(
        "/home/u/.prefect/prefect.db")
    assert _sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert _sqlite_path("postgresql+asyncpg://u:p@db/prefect") is None


def test_marker_says_current_only_for_the_same_prefect_and_revision(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "prefect.db", "aaa111")
    assert not _database_is_current(db, "3.9.1")  # no marker yet: migrate
    _record_head(db, "3.9.1")
    assert json.loads((tmp_path / HEAD_MARKER).read_text()) == {
        "prefect": "3.9.1", "revision": ["aaa111"]}
    assert _database_is_current(db, "3.9.1")
    assert not _database_is_current(db, "3.10.0")  # another Prefect: its head may differ
    _make_db(db, "bbb222")  # migrated by something else since
    assert not _database_is_current(db, "3.9.1")
    (tmp_path / HEAD_MARKER).write_text("{not json")
    assert not _database_is_current(db, "3.9.1")


def test_no_marker_for_a_database_without_revision(tmp_path: Path) -> None:
    db = tmp_path / "prefect.db"
    sqlite3.connect(db).close()  # created, never migrated
    _record_head(db, "3.9.1")
    assert not (tmp_path / HEAD_MARKER).exists()
    assert not _database_is_current(tmp_path / "missing.db", "3.9.1")


def _post(url: str, body: dict[str, object]) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(resp.status)


@pytest.mark.slow
def test_second_start_skips_migrations_and_serves(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
                "PREFECT_API_DATABASE_MIGRATE_ON_START", "PREFECT_API_DATABASE_CONNECTION_URL",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    marker_path = tmp_path / HEAD_MARKER
    written: list[int] = []
    for start in (1, 2):
        server = EarlyServer()
        server.start()
        try:
            server.wait()
            # The API works on the database either way (a query that touches tables).
            assert _post(f"{server.api_url}/flows/filter", {"limit": 1}) == 200
        finally:
            server.stop()
        marker = json.loads(marker_path.read_text())
        assert marker["revision"], f"start {start}: no revision recorded"
        written.append(marker_path.stat().st_mtime_ns)
    # The first start migrated and recorded the head; the second found the database
    # current, skipped the migrations and so wrote nothing.
    assert written[0] == written[1]
    assert _database_is_current(tmp_path / "prefect.db", marker["prefect"])
    # On shutdown the server recorded what it imported, for the next start to read ahead.
    imported = prefetch.list_path("server").read_text().splitlines()
    assert any(f.endswith(("fastapi/applications.py", ".pyc")) and "fastapi" in f
               for f in imported)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_server_exits_when_its_cli_is_killed(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs in its own session (a Ctrl-C is for the CLI alone), so it must
    notice by itself when the CLI dies without stopping it, here by SIGKILL."""
    env = prefect_free_env(tmp_path, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                           XDG_CACHE_HOME=str(tmp_path / "cache"))
    script = ("import os, signal\n"
              "from flows.server import EarlyServer\n"
              "server = EarlyServer()\n"
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
