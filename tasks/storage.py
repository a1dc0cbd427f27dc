"""Atomic file commits and output-folder layout.

Every file the pipeline publishes is written under a hidden staging name in its final
folder and renamed into place only when complete, so readers of ``DIR/ensemble/`` (which
skip names starting with ``.`` or ``_``, as pyarrow datasets do) never see a partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from loaders.errors import OutputError, ScoringError

__all__ = [
    "ENSEMBLE_DIR",
    "MEMBERS_DIR",
    "QUARANTINE_DIR",
    "OutputLocked",
    "check_writable",
    "member_path",
    "output_lock",
    "remove_stale_staging",
    "safe_join",
    "staged",
    "write_json_atomic",
]

ENSEMBLE_DIR = "ensemble"
MEMBERS_DIR = "members"
QUARANTINE_DIR = "quarantine"


def safe_join(root: Path, relpath: str) -> Path:
    """``root / relpath``, refusing anything that would land outside ``root``.

    Raises:
        OutputError: ``relpath`` is absolute or climbs out with ``..``.
    """
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise OutputError(f"refusing to write {relpath!r}: it would land outside {root}")
    return root.joinpath(*rel.parts)


def member_path(output_dir: Path, member: str, relpath: str) -> Path:
    return safe_join(output_dir / MEMBERS_DIR / member, relpath)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a staging path beside ``final``; rename it into place if the block succeeds.

    On any failure, including KeyboardInterrupt, the staging file is removed and ``final``
    is left as it was. A ``kill -9`` can leave a hidden ``.*.tmp`` file, never a partial
    ``final``.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create output folder {final.parent}: {err.strerror or err}; choose a "
            "writable --output"
        ) from err
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{_STAGING_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(final: Path, data: Any) -> None:
    with staged(final) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(output_dir: Path) -> None:
    """Fail before scoring, not after, when the output folder cannot be written.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"output folder {output_dir} is not writable ({err.strerror or err}); choose "
            "another --output or fix its permissions"
        ) from err


LOCK_FILE = ".lock"
_STAGING_SUFFIX = ".tmp"


class OutputLocked(ScoringError, RuntimeError):
    """Another run holds the output folder."""


_held: dict[str, int] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder for the whole run.

    Two runs writing one folder would interleave their files, so the second fails at once,
    naming the first. ``flock`` locks die with their process, ``kill -9`` included, so a
    crashed run never leaves the folder locked. Re-entrant within a process: the CLI takes
    it before loading models (to fail in a second, not after start-up) and the flow takes
    it again. (Advisory and per host: on a network file system shared by several hosts,
    give each run its own output folder.)

    Raises:
        OutputLocked: another process holds the lock.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    key = str(path.resolve())
    with _held_lock:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise OutputLocked(
                f"output folder {output_dir} is in use by another run ({holder}); wait for it "
                "to finish, or choose another --output"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}").encode(), 0)
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_stale_staging(output_dir: Path) -> int:
    """Delete staging files left by a killed run; call only while holding the lock."""
    removed = 0
    for path in output_dir.rglob(f".*{_STAGING_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
