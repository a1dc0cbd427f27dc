"""A private, temporary Prefect API server for one CLI run, started before TensorFlow loads.

Prefect's ephemeral mode starts the same server (uvicorn on ``create_app``) lazily, when
the first flow begins, so a run pays for TensorFlow's import and then for the server's
start, one after the other (about 4 s + 5.5 s here). Starting it as the very first step,
as a separate process and without importing Prefect's server modules into this process
(they would contend with TensorFlow's import for the GIL), overlaps the two on two cores.
The server keeps Prefect's ephemeral settings (same database under PREFECT_HOME, no UI,
services as in ephemeral mode) except block auto-registration and automations, which a
one-run server does not need (see :meth:`EarlyServer.start`), and Prefect's migrations
when the SQLite database is known to be at the installed Prefect's revision already (see
:func:`serve`). Like the CLI, it reads ahead the files it imported the last time (see
:mod:`flows.prefetch`). It is stopped when the run ends.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

__all__ = ["EarlyServer"]


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EarlyServer:
    """Start with :meth:`start`; :meth:`wait` before the first flow; :meth:`stop` at exit."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._error: str | None = None

    def start(self) -> None:
        env = {
            # Skipped unless asked for (each can be turned back on by setting the variable
            # of that name in the environment; a profile or prefect.toml does not override
            # it):
            # - Block auto-registration first imports every installed Prefect collection
            #   to hash the block registry (prefect-dask pulls in dask.distributed: ~1 s
            #   of the server's start here), though a scoring run uses no block documents.
            "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
            "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
            # - Automations (the triggers and actions services). Starting them builds a
            #   second copy of the API app in the server process, 1.5 s of CPU that held
            #   up its first answer by ~0.7 s; a server that lives for one scoring run has
            #   no automations to run. Use a long-running server (PREFECT_API_URL) for them.
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
            **os.environ,
            # As Prefect's own ephemeral server: no UI, ephemeral-mode services only.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        # Its own session, so a Ctrl-C in the terminal (SIGINT to the whole foreground
        # process group) reaches only the CLI. Sharing the group, the server shut down
        # at once, and the interrupted CLI then spent minutes retrying to record the
        # crashed run on a dead server instead of exiting. The CLI stops it on the way
        # out (:meth:`stop`), and it exits by itself if the CLI dies (:func:`_exit_with`).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.server", str(self.port), str(os.getpid())],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        atexit.register(self.stop)
        threading.Thread(target=self._poll, name="prefect-server-health", daemon=True).start()

    def _poll(self) -> None:
        proc = self.process
        assert proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                self._error = f"Prefect server exited with code {proc.returncode}: {err[-2000:]}"
                break
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    healthy = resp.status == 200
                if healthy:
                    self._warm_up()
                    self._ready.set()
                    return
            except OSError:
                pass
            time.sleep(0.05)
        else:
            self._error = f"Prefect server did not answer within {self.timeout:.0f} s"
        self._ready.set()

    def _warm_up(self) -> None:
        """Make the server build its routes now, while the CLI is still importing.

        FastAPI prepares every route's dependencies and models lazily, on the first request
        that walks the route table (0.5-0.9 s for Prefect's ~180 routes here). Left to the
        flow's first call, that time lands between the server answering and the first
        batch; asked for here, it overlaps the CLI's own imports and checks.
        """
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=30).close()

    def wait(self) -> None:
        """Block until the server answers.

        Raises:
            RuntimeError: it exited or did not answer in time.
        """
        self._ready.wait()
        if self._error:
            raise RuntimeError(self._error)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Beside the SQLite database: the schema revision the installed Prefect migrates it to,
# recorded the last time this server ran Prefect's migrations.
HEAD_MARKER = ".ensemble-scoring-prefect-head.json"


def _sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite connection URL; None for any other database."""
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or url[len(prefix):].startswith(":memory:"):
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def _revision(db: Path) -> list[str] | None:
    """The database's Alembic revision(s), read-only; None if it has none (yet)."""
    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=1)) as conn:
            return sorted(row[0] for row in conn.execute("SELECT version_num FROM alembic_version"))
    except sqlite3.Error:
        return None


def _database_is_current(db: Path, prefect_version: str) -> bool:
    """Whether ``db`` is already at the revision this Prefect migrates to.

    Prefect's server runs its migrations on every start (Alembic loads every migration
    script to find the head): 0.24 s of CPU here (``create_db`` timed alone), even when
    there is nothing to do; the server answered in 5.22 s instead of 5.46 s on average
    without it (6 interleaved pairs). The head of an installed Prefect never changes, so
    it is recorded once, after a start that ran the migrations, and compared with the
    database's revision (a read-only query) on the next starts. A database another
    Prefect version migrated, a new or replaced database and any marker problem all fall
    back to migrating.
    """
    try:
        marker = json.loads((db.parent / HEAD_MARKER).read_text())
    except (OSError, ValueError):
        return False
    current = _revision(db)
    return (isinstance(marker, dict) and marker.get("prefect") == prefect_version
            and current is not None and marker.get("revision") == current)


def _record_head(db: Path, prefect_version: str) -> None:
    revision = _revision(db)
    if revision is None:
        return
    marker = db.parent / HEAD_MARKER
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({"prefect": prefect_version, "revision": revision}))
        tmp.replace(marker)


def _exit_with(parent: int, poll: float = 0.5) -> None:
    """Shut this server down (SIGTERM to itself: uvicorn stops gracefully) once the CLI
    process ``parent`` has gone, however it ended (killed, crashed), so that no server
    outlives its run. It runs in its own session and gets no signal from the terminal."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(port: int) -> None:
    """The server process: Prefect's API app (``create_app``, as ``prefect server start``
    and ephemeral mode build it) under uvicorn on 127.0.0.1:``port``.

    Python's cyclic garbage collector is off while Prefect's server modules import and the
    app is built: those allocate hundreds of thousands of long-lived objects, and every
    collection pass re-scans them all (0.6-0.9 s of a ~5 s start here). They are then
    frozen out of future passes, and collection resumes for the server's actual work.

    Migrations are skipped when the SQLite database is known to be current (see
    :func:`_database_is_current`), unless ``PREFECT_SERVER_DATABASE_MIGRATE_ON_START`` is
    set in the environment, which then decides.
    """
    from flows import prefetch

    prefetch.start("server")
    gc.disable()
    import uvicorn
    from prefect import __version__ as prefect_version
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_API_DATABASE_MIGRATE_ON_START,
        get_current_settings,
        temporary_settings,
    )

    url = get_current_settings().server.database.connection_url
    db = _sqlite_path(url.get_secret_value() if url is not None else "")
    explicit = any(k in os.environ for k in ("PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
                                             "PREFECT_API_DATABASE_MIGRATE_ON_START"))
    skip = db is not None and not explicit and _database_is_current(db, prefect_version)
    with temporary_settings(updates={PREFECT_API_DATABASE_MIGRATE_ON_START: False}
                            if skip else {}):
        app = create_app()
        after_start = None
        if db is not None and not skip and PREFECT_API_DATABASE_MIGRATE_ON_START.value():
            after_start = functools.partial(_record_head, db, prefect_version)
        _wrap_lifespan(app, after_start=after_start,
                       at_exit=functools.partial(prefetch.record, "server"))
        gc.freeze()
        gc.enable()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")


def _wrap_lifespan(app: Any, *, after_start: Callable[[], None] | None,
                   at_exit: Callable[[], None]) -> None:
    """Run ``after_start`` once the app's start-up (which runs the migrations) has
    succeeded, to record the revision it left the database at; and ``at_exit`` when the
    server shuts down, to record the modules it imported by then (some only import on
    the first requests)."""
    startup = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with startup(a) as state:
            if after_start is not None:
                after_start()
            yield state
        at_exit()

    app.router.lifespan_context = lifespan


if __name__ == "__main__":
    if len(sys.argv) > 2:
        _exit_with(int(sys.argv[2]))
    serve(int(sys.argv[1]))
