"""Atomic file commits and output-folder layout, on a local folder or on S3.

Every file the pipeline publishes is written under a hidden staging name in its final
folder and renamed into place only when complete, so readers of ``DIR/ensemble/`` (which
skip names starting with ``.`` or ``_``, as pyarrow datasets do) never see a partial file.

S3 has no rename, and an object upload that fails half-way can still be completed by
pyarrow (its output stream completes the upload when closed, even from a destructor, and
``ParquetWriter`` writes a footer when closed after an error), so an object is never
streamed to its final key. It is streamed to the same hidden staging name, then published
with a server-side copy (``CopyObject``: the final key holds the old object or the whole
new one, never a part) and the staging object deleted. Every function here takes a local
``Path`` or an ``s3://`` URI (also wrapped in ``Path()``, as the flow does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, overload

import pyarrow as pa
import pyarrow.fs as pafs

from loaders.errors import OutputError, OutputLocked
from tasks.fs import S3Path, s3_filesystem, s3_uri

__all__ = [
    "ENSEMBLE_DIR",
    "MEMBERS_DIR",
    "QUARANTINE_DIR",
    "OutputLocation",
    "check_output_apart",
    "check_writable",
    "is_staging_name",
    "member_path",
    "output_location",
    "output_lock",
    "previous_name",
    "remove_stale_staging",
    "replace",
    "safe_join",
    "staged",
    "write_json_atomic",
]

ENSEMBLE_DIR = "ensemble"
MEMBERS_DIR = "members"
QUARANTINE_DIR = "quarantine"

OutputLocation = Path | S3Path
_Loc = TypeVar("_Loc", Path, S3Path)


def output_location(location: str | os.PathLike[str] | S3Path) -> OutputLocation:
    """``location`` as an ``S3Path`` when it names S3, else as a local ``Path`` (as given,
    not resolved)."""
    if isinstance(location, S3Path):
        return location
    uri = s3_uri(location)
    if uri is not None:
        return S3Path.from_uri(uri)
    return Path(location)


def replace(src: OutputLocation, dst: OutputLocation) -> None:
    """``os.replace`` locally; on S3 a server-side copy then a delete of ``src`` (after
    which ``src`` is gone: with a crash in between, both exist and ``src`` stays)."""
    if isinstance(src, S3Path) and isinstance(dst, S3Path):
        fs = s3_filesystem()
        fs.copy_file(src.key, dst.key)
        fs.delete_file(src.key)
    elif isinstance(src, Path) and isinstance(dst, Path):
        os.replace(src, dst)
    else:
        raise TypeError(f"cannot move {src} to {dst}: not on the same storage")


@overload
def safe_join(root: Path, relpath: str) -> Path: ...
@overload
def safe_join(root: S3Path, relpath: str) -> S3Path: ...
@overload
def safe_join(root: OutputLocation, relpath: str) -> OutputLocation: ...
def safe_join(root: OutputLocation, relpath: str) -> OutputLocation:
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


# Names of the hidden files this tool writes beside a file it is about to publish (a
# staging copy) or to replace (the previous version, kept while its scores are reused).
# The marker makes them the tool's own: the clean-up after a killed run deletes only
# names of exactly this form, and only in the folders the tool writes, never a user's
# other hidden or .tmp files.
_STAGING_MARKER = "ensemble-scoring"
_STAGING_PATTERN = re.compile(
    rf"^\..+\.{_STAGING_MARKER}-(staging|previous)-[0-9a-f]{{32}}\.tmp$")


def _staging_name(final: _Loc, kind: str = "staging") -> _Loc:
    return final.with_name(f".{final.name}.{_STAGING_MARKER}-{kind}-{uuid.uuid4().hex}.tmp")


@overload
def previous_name(final: Path) -> Path: ...
@overload
def previous_name(final: S3Path) -> S3Path: ...
@overload
def previous_name(final: OutputLocation) -> OutputLocation: ...
def previous_name(final: OutputLocation) -> OutputLocation:
    """Where a committed file is moved while it is replaced (see ``tasks.scoring``)."""
    if isinstance(final, S3Path):
        return _staging_name(final, "previous")
    return _staging_name(final, "previous")


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is a staging or previous-version file this tool wrote."""
    return bool(_STAGING_PATTERN.match(name))


@overload
def staged(final: Path) -> contextlib.AbstractContextManager[Path]: ...
@overload
def staged(final: S3Path) -> contextlib.AbstractContextManager[pa.NativeFile]: ...
def staged(final: Path | S3Path) -> contextlib.AbstractContextManager[Any]:
    """Yield somewhere to write ``final``'s content; publish it if the block succeeds.

    Locally a staging path beside ``final``, renamed into place; on S3 an open output
    stream to a hidden staging object, copied into place (see the module docstring).
    """
    if isinstance(final, S3Path):
        return _staged_s3(final)
    return _staged_local(final)


@contextlib.contextmanager
def _staged_s3(final: S3Path) -> Iterator[pa.NativeFile]:
    fs = s3_filesystem()
    tmp = _staging_name(final)
    stream = fs.open_output_stream(tmp.key)
    try:
        yield stream
        stream.close()  # completes the upload of the hidden object
        fs.copy_file(tmp.key, final.key)  # the commit: CopyObject publishes it whole
    except BaseException:
        # Close now (it would otherwise complete the upload later, from a destructor,
        # after the delete), then delete the hidden object the close may have made.
        with contextlib.suppress(Exception):
            stream.close()
        with contextlib.suppress(OSError):
            fs.delete_file(tmp.key)
        raise
    with contextlib.suppress(OSError):  # else the next run's remove_stale_staging does it
        fs.delete_file(tmp.key)


@contextlib.contextmanager
def _staged_local(final: Path) -> Iterator[Path]:
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
    tmp = _staging_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(final: Path | str, data: Any) -> None:
    """Write ``data`` as JSON to ``final`` atomically (a local path or an S3 URI)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    loc = output_location(final)
    if isinstance(loc, S3Path):
        # The whole body is in memory before the upload starts: one PUT, all or nothing.
        with s3_filesystem().open_output_stream(loc.key) as out:
            out.write(text.encode())
        return
    with staged(loc) as tmp:
        tmp.write_text(text)


def check_writable(output_dir: Path | S3Path) -> None:
    """Fail before scoring, not after, when the output folder cannot be written.

    Raises:
        OutputError: the folder cannot be created or written (on S3: no such bucket, no
            permission, or the AWS_* variables point nowhere).
    """
    if isinstance(output_dir, S3Path):
        probe_key = (output_dir / f".write-probe-{uuid.uuid4().hex[:8]}").key
        try:
            fs = s3_filesystem()
            with fs.open_output_stream(probe_key) as out:
                out.write(b"")
            fs.delete_file(probe_key)
        except OSError as err:
            raise OutputError(
                f"output {output_dir} is not writable ({err}); check the bucket and the "
                "AWS_* environment variables (credentials, AWS_REGION, AWS_ENDPOINT_URL)"
            ) from err
        return
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


_held: dict[str, int] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def output_lock(output_dir: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on the output folder for the whole run.

    Two runs writing one folder would interleave their files, so the second fails at once,
    naming the first. ``flock`` locks die with their process, ``kill -9`` included, so a
    crashed run never leaves the folder locked. Re-entrant within a process: the CLI takes
    it before loading models (to fail in a second, not after start-up) and the flow takes
    it again. (Advisory and per host: on a network file system shared by several hosts,
    give each run its own output folder.)

    On S3 the lock is a best-effort lock object (see ``_s3_output_lock``).

    Raises:
        OutputLocked: another process holds the lock.
    """
    loc = output_location(output_dir)
    key = str(loc) if isinstance(loc, S3Path) else str((loc / LOCK_FILE).resolve())
    with _held_lock:
        reentered = key in _held
        if reentered:
            _held[key] += 1
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    with _s3_output_lock(loc) if isinstance(loc, S3Path) else _local_output_lock(loc):
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                del _held[key]


@contextlib.contextmanager
def _local_output_lock(output_dir: Path) -> Iterator[None]:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(
            f"output folder {output_dir} is not writable ({err.strerror or err}); choose "
            "another --output or fix its permissions"
        ) from err
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
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_stale_staging(output_dir: Path | str) -> int:
    """Delete staging files left by a killed run; call only while holding the lock.

    Only names this tool writes (``is_staging_name``), and only where it writes them:
    the output folder itself and, recursively, its ``ensemble/`` and ``quarantine/``.
    """
    loc = output_location(output_dir)
    removed = 0
    if isinstance(loc, S3Path):
        fs = s3_filesystem()
        infos = fs.get_file_info(pafs.FileSelector(loc.key, allow_not_found=True))
        for sub in (ENSEMBLE_DIR, QUARANTINE_DIR):
            infos += fs.get_file_info(pafs.FileSelector(
                (loc / sub).key, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File and is_staging_name(info.base_name):
                with contextlib.suppress(OSError):
                    fs.delete_file(info.path)
                    removed += 1
        return removed
    candidates = [p for p in loc.glob(".*.tmp")] + [
        p for sub in (ENSEMBLE_DIR, QUARANTINE_DIR) for p in (loc / sub).rglob(".*.tmp")]
    for path in candidates:
        if path.is_file() and not path.is_symlink() and is_staging_name(path.name):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def check_output_apart(input_path: str, output_dir: str) -> None:
    """Refuse an output folder that is the input, or holds it: the run would write among
    the user's data (and clean up there). An output inside the input is fine: its files
    are left out of the input.

    Raises:
        OutputError: naming both, before any lock or file is created.
    """
    def parts(location: str) -> tuple[str, ...]:
        uri = s3_uri(location)
        if uri is not None:
            return ("s3:", *[p for p in uri[len("s3://"):].split("/") if p])
        return Path(location).expanduser().resolve().parts

    inp, out = parts(input_path), parts(output_dir)
    if inp[:len(out)] == out:
        where = "is the input" if inp == out else "holds the input"
        raise OutputError(
            f"--output {output_dir} {where} ({input_path}); the ensemble table, run record "
            "and lock would be written among your data. Choose an output folder outside the "
            "input, for example a sibling folder"
        )


# S3 lock: S3 has no atomic create-if-absent that pyarrow 26 can issue (no If-None-Match
# on its PUT), so each run writes its own lock object ``.lock-<uuid>`` and then lists the
# others. With S3's strong read-after-write and list consistency at most one contender
# sees no one else (whoever lists first without seeing the other wrote first, so the
# other's list sees it); when both see each other both give way, which is safe. The holder
# rewrites its object every _S3_LOCK_BEAT seconds; an object older than _S3_LOCK_TTL by
# the server's clock (compared with the contender's own fresh object, so client clocks
# do not matter) belongs to a run that died and is taken over.
_S3_LOCK_PREFIX = f"{LOCK_FILE}-"
_S3_LOCK_BEAT = 60.0
_S3_LOCK_TTL = 300.0


def _holder_text() -> bytes:
    return (f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}").encode()


def _put(fs: pafs.S3FileSystem, key: str, body: bytes) -> None:
    with fs.open_output_stream(key) as out:
        out.write(body)


@contextlib.contextmanager
def _s3_output_lock(root: S3Path) -> Iterator[None]:
    fs = s3_filesystem()
    mine = root / f"{_S3_LOCK_PREFIX}{uuid.uuid4().hex}"
    body = _holder_text()
    try:
        _put(fs, mine.key, body)
        infos = fs.get_file_info(pafs.FileSelector(root.key, recursive=False))
    except OSError as err:
        raise OutputError(
            f"cannot write the lock object in {root} ({err}); check the bucket and the "
            "AWS_* environment variables"
        ) from err
    own = next((i for i in infos if i.path == mine.key), None)
    others = [i for i in infos if i.type == pafs.FileType.File and i.path != mine.key
              and i.base_name.startswith(_S3_LOCK_PREFIX)]
    live = []
    for info in others:
        if (own is not None and own.mtime_ns is not None and info.mtime_ns is not None
                and own.mtime_ns - info.mtime_ns > _S3_LOCK_TTL * 1e9):
            with contextlib.suppress(OSError):
                fs.delete_file(info.path)  # its run stopped beating: it died
        else:
            live.append(info)
    if live:
        with contextlib.suppress(OSError):
            fs.delete_file(mine.key)
        try:
            with fs.open_input_stream(live[0].path) as f:
                holder = f.read().decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise OutputLocked(
            f"output folder {root} is in use by another run ({holder}); wait for it to "
            f"finish, or choose another --output (a run killed with kill -9 leaves "
            f"{live[0].base_name}, taken over after {_S3_LOCK_TTL:.0f} s)"
        )
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(_S3_LOCK_BEAT):
            with contextlib.suppress(OSError):
                _put(fs, mine.key, body)

    beater = threading.Thread(target=beat, name="s3-lock-heartbeat", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        with contextlib.suppress(OSError):
            fs.delete_file(mine.key)
