"""A Prefect server of the CLI run's own, through Prefect's public command line.

Without ``PREFECT_API_URL``, Prefect's ephemeral mode would start a server when the first
flow begins, after TensorFlow's import, one after the other (about 4 s + 4 s here), and
in the terminal's process group, so a Ctrl-C stopped it too and the interrupted CLI then
retried it for minutes. Instead the CLI starts ``prefect server start`` on a free
127.0.0.1 port as its very first step, so the server's start overlaps TensorFlow's import
on a second core, in its own session (a Ctrl-C reaches only the CLI), and it points the
flow at it with ``PREFECT_API_URL``; worker processes (``--runner processes|dask``) report
to the same server. The server dies with the CLI however the CLI ends (Linux's
parent-death signal), and is stopped by its pid at exit, after Prefect has sent its
queued logs and events.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

__all__ = ["LocalServer", "unreachable"]

# Services a one-run server has no use for, turned off with Prefect's public settings and
# flags (each can be turned back on by setting the variable in the environment): the
# scheduler and late-runs services (no deployments run on it), automations, and block
# auto-registration, including its memo check, which imports every installed Prefect
# collection (prefect-dask brings dask.distributed) to hash the block registry before it
# even looks at whether registration is on: ~1 s of the server's start.
_QUIET_SERVICES = {
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
}


def unreachable(api_url: str, timeout: float = 10.0) -> str | None:
    """Why the Prefect API at ``api_url`` cannot be reached, or None if it answers.

    Any HTTP answer counts as reachable (Prefect Cloud answers ``/health`` under a
    workspace URL with an error status): what is caught here is the server that is not
    running, a wrong host or port, or a name that does not resolve, before the run
    creates anything and before Prefect's client retries it with a long traceback.
    """
    try:
        urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return (f"the Prefect server at {api_url} (PREFECT_API_URL) cannot be reached: "
                f"{reason}. Start it, or unset PREFECT_API_URL to run with a private server "
                "of the run's own")
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prefect_command() -> str:
    """The ``prefect`` console script of this environment."""
    beside = Path(sys.executable).with_name("prefect")
    return str(beside) if beside.is_file() else (shutil.which("prefect") or "prefect")


def _die_with_parent() -> None:
    """In the server's process, before exec: get SIGTERM when the CLI dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``), so no server outlives a CLI killed with ``kill -9``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


class LocalServer:
    """Start with :meth:`start`; :meth:`wait` before the first flow; it stops at exit."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ready = threading.Event()
        self._error: str | None = None

    def start(self) -> None:
        env = {**_QUIET_SERVICES, **os.environ}
        env.pop("PREFECT_API_URL", None)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "ERROR", "--no-ui", "--analytics-off"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        # Registered before Prefect registers its own exit handlers (its log and event
        # workers start with the first flow), so it runs after them: they send what is
        # still queued while the server answers.
        atexit.register(self.stop)
        threading.Thread(target=self._poll, name="prefect-server-health", daemon=True).start()

    def _poll(self) -> None:
        proc = self.process
        assert proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._error = (f"Prefect server exited with code {proc.returncode}: "
                               f"{self._log_tail()}")
                break
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._warm_up()
                        self._ready.set()
                        return
            except OSError:
                pass
            time.sleep(0.05)
        else:
            self._error = f"Prefect server did not answer within {self.timeout:.0f} s"
        self._ready.set()

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def _warm_up(self) -> None:
        """Make the server build its routes now, while the CLI is still importing.

        FastAPI prepares every route's dependencies lazily, on the first request that
        walks the route table (0.5-0.9 s for Prefect's ~180 routes here); asked for here,
        that overlaps the CLI's own imports and checks instead of delaying the first batch.
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

    def stop(self, *, wait: float = 0.0) -> None:
        """SIGINT (uvicorn's graceful shutdown) to its pid.

        At exit it is not waited for: its graceful shutdown took 1.7 s of every run's
        wall time here, and it has nothing left to do for the run (Prefect's own exit
        handlers, which run first, have sent the queued logs and events). With ``wait``,
        up to that many seconds, then SIGKILL.
        """
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            if wait:
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
