"""The output store: a local folder or an S3 prefix, chosen once from the output URI.

Everything the pipeline writes goes through one :class:`Store` (``store_for(output)``):
open a staged file, publish it, read a committed file's footer, test, delete, list,
write the run record, lock the folder. Compute code never asks which backend it has; the
two implementations differ only where the storage does:

- **Publishing.** Every file is written under a hidden staging name in its final folder
  and published whole, so readers of ``DIR/ensemble/`` (which skip names starting with
  ``.`` or ``_``, as pyarrow datasets do) never see a partial file. Locally that is a
  rename. S3 has no rename, and an upload that fails half-way can still be completed by
  pyarrow (its output stream completes the upload when closed, even from a destructor),
  so an object is never streamed to its final key: it is streamed to the staging key,
  published with a server-side copy (the final key holds the old object or the whole new
  one, never a part), and the staging object deleted.
- **Locking.** Locally an ``flock`` on ``DIR/.lock``; on S3 a best-effort lock object.

Staging and previous-version files carry a marker only this tool writes; the clean-up
after a killed run removes only those, and only where the tool writes. Credentials,
region and endpoint for S3 come from the standard AWS variables (``tasks.fs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import json
import os
import re
import socket
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from loaders.errors import OutputError, OutputLocked
from tasks.fs import PARQUET_SUFFIXES, S3Path, s3_filesystem, s3_uri

__all__ = [
    "ENSEMBLE_DIR",
    "LOCK_FILE",
    "QUARANTINE_DIR",
    "LocalStore",
    "S3Store",
    "Store",
    "check_output_apart",
    "check_writable",
    "is_staging_name",
    "open_input",
    "open_parquet",
    "output_lock",
    "read_json",
    "remove_stale_staging",
    "store_for",
    "write_json_atomic",
]

ENSEMBLE_DIR = "ensemble"
QUARANTINE_DIR = "quarantine"
LOCK_FILE = ".lock"

# Names of the hidden files this tool writes beside a file it is about to publish (a
# staging copy) or to replace (the previous version, kept while its scores are reused).
_STAGING_MARKER = "ensemble-scoring"
_STAGING_PATTERN = re.compile(
    rf"^\..+\.{_STAGING_MARKER}-(staging|previous)-[0-9a-f]{{32}}\.tmp$")


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is a staging or previous-version file this tool wrote."""
    return bool(_STAGING_PATTERN.match(name))


def _hidden_name(rel: str, kind: str) -> str:
    path = PurePosixPath(rel)
    return str(path.with_name(f".{path.name}.{_STAGING_MARKER}-{kind}-{uuid.uuid4().hex}.tmp"))


def _checked_rel(rel: str) -> str:
    """``rel`` as a clean relative POSIX path below the store's root.

    Raises:
        OutputError: ``rel`` is absolute, empty or climbs out with ``..``.
    """
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise OutputError(f"refusing to write {rel!r}: it would land outside the output folder")
    return str(path)


class Store(ABC):
    """One output folder: local or S3, with the same operations. Paths are relative to it."""

    root: Path | S3Path  # the folder, as the user's tools name it

    def __init__(self, fs: pafs.FileSystem, base: str) -> None:
        self.fs = fs
        self._base = base.rstrip("/")  # the root as a path of ``fs``
        # Set by taking the lock: who held it last without releasing it (a killed run).
        self.stale_holder: str | None = None

    # ------------------------------------------------------------------ paths
    def _path(self, rel: str = "") -> str:
        return f"{self._base}/{_checked_rel(rel)}" if rel else self._base

    def _target(self, rel: str = "") -> str:
        """``_path`` for something this store is about to write, move or delete."""
        return self._path(rel)

    @abstractmethod
    def uri(self, rel: str = "") -> str:
        """Where ``rel`` is, as the user names it: an absolute path or an s3:// URI."""

    # ------------------------------------------------------------------ reading
    def exists(self, rel: str) -> bool:
        return bool(self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound)

    def modified(self, rel: str) -> float | None:
        """When ``rel`` was last written (Unix seconds); None if it is not there."""
        info = self.fs.get_file_info(self._path(rel))
        return None if info.mtime is None else info.mtime.timestamp()

    def open_input(self, rel: str) -> pa.NativeFile:
        """A random-access file, for ``pq.ParquetFile`` (the caller closes it)."""
        return self.fs.open_input_file(self._path(rel))

    def footer_metadata(self, rel: str) -> dict[bytes, bytes] | None:
        """The key-value metadata of a committed Parquet file's footer; None if the file
        is missing or unreadable."""
        try:
            with self.open_input(rel) as f:
                return pq.read_metadata(f).metadata or {}
        except (OSError, pa.ArrowException):
            return None

    def _files(self, rel: str, *, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._path(rel), recursive=recursive,
                                     allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    # ------------------------------------------------------------------ writing
    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._target(rel))

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Replace ``dst`` with ``src`` (which is gone afterwards)."""

    def hide(self, rel: str) -> str | None:
        """Move the committed ``rel`` out of readers' sight, under a previous-version name
        (returned; None when there was nothing to hide)."""
        if not self.exists(rel):
            return None
        hidden = _hidden_name(rel, "previous")
        self.move(rel, hidden)
        return hidden

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[pa.NativeFile]:
        """An output stream for ``rel``'s new content, published whole if the block
        succeeds; on any failure (KeyboardInterrupt included) the staging file is removed
        and ``rel`` is left as it was. A ``kill -9`` can leave a staging file, never a
        partial ``rel``."""
        rel = _checked_rel(rel)
        self._make_parent(rel)
        tmp = _hidden_name(rel, "staging")
        stream = self.fs.open_output_stream(self._target(tmp))
        try:
            yield stream
            stream.close()
            self.move(tmp, rel)
        except BaseException:
            with contextlib.suppress(Exception):
                stream.close()
            with contextlib.suppress(OSError):
                self.delete(tmp)
            raise

    def _make_parent(self, rel: str) -> None:
        parent = str(PurePosixPath(rel).parent)
        try:
            self.fs.create_dir(self._target(parent) if parent != "." else self._base,
                               recursive=True)
        except OSError as err:
            raise OutputError(
                f"cannot create output folder {self.uri(parent)}: {err}; choose a writable "
                "output folder (params.output, --output)"
            ) from err

    def write_json(self, rel: str, data: Any) -> None:
        """``data`` as JSON, published whole (the run record)."""
        text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
        with self.staged(rel) as out:
            out.write(text.encode())

    def check_writable(self) -> None:
        """Fail before scoring, not after, when the folder cannot be written.

        Raises:
            OutputError: it cannot be created or written.
        """
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self._base, recursive=True)
            with self.fs.open_output_stream(self._path(probe)) as out:
                out.write(b"")
            self.fs.delete_file(self._path(probe))
        except OSError as err:
            raise OutputError(self._unwritable(err)) from err

    def _unwritable(self, err: OSError) -> str:
        return (f"output folder {self.uri()} is not writable ({err.strerror or err}); choose "
                "another output folder (params.output, --output) or fix its permissions")

    def remove_stale_staging(self) -> int:
        """Delete staging files left by a killed run; call only while holding the lock.

        Only names this tool writes (``is_staging_name``), and only where it writes them:
        the output folder itself and, recursively, its ``ensemble/`` and ``quarantine/``.
        """
        infos = self._files("", recursive=False)
        for sub in (ENSEMBLE_DIR, QUARANTINE_DIR):
            infos += self._files(sub, recursive=True)
        removed = 0
        for info in infos:
            if not is_staging_name(info.base_name):
                continue
            rel = info.path[len(self._base) + 1:]
            with contextlib.suppress(OSError, OutputError):  # OutputError: through a link
                self.fs.delete_file(self._target(rel))
                removed += 1
        return removed

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[str | None]:
        """Hold the folder for this run: a second run fails at once, naming the first.
        Re-entrant within a process (the CLI takes it before loading models, the flow
        again). Yields who held it last without releasing it (a run that was killed),
        else None.

        Raises:
            OutputLocked: another run holds it.
        """
        key = self.uri()
        with _HELD_LOCK:
            reentered = key in _HELD
            _HELD[key] = _HELD.get(key, 0) + 1
        try:
            if reentered:
                yield _STALE.get(key)
            else:
                with self._lock():
                    _STALE[key] = self.stale_holder
                    yield self.stale_holder
        finally:
            with _HELD_LOCK:
                _HELD[key] -= 1
                if not _HELD[key]:
                    del _HELD[key]
                    _STALE.pop(key, None)

    @abstractmethod
    def _lock(self) -> contextlib.AbstractContextManager[None]: ...


# Locks this process holds, by store URI: lock() is re-entrant across Store objects.
_HELD: dict[str, int] = {}
_STALE: dict[str, str | None] = {}  # by store URI: the killed holder found when taken
_HELD_LOCK = threading.Lock()


def _holder_text() -> bytes:
    return (f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}").encode()


class LocalStore(Store):
    """A local folder (absolute, resolved once)."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        super().__init__(pafs.LocalFileSystem(), str(self.root))

    def uri(self, rel: str = "") -> str:
        return str(self.root / _checked_rel(rel)) if rel else str(self.root)

    def move(self, src: str, dst: str) -> None:
        os.replace(self._target(src), self._target(dst))

    def _target(self, rel: str = "") -> str:
        """Refuses a path below the root that passes through a symbolic link (a folder or
        the file itself): the tool writes, moves and deletes only in what it created, and
        a link in ``ensemble/`` could point into the input or anywhere else.

        Raises:
            OutputError: naming the link.
        """
        path = self._path(rel)
        if rel:
            node = self.root
            for part in PurePosixPath(_checked_rel(rel)).parts:
                node = node / part
                if node.is_symlink():
                    raise OutputError(
                        f"{node} is a symbolic link; the tool writes, moves and deletes only "
                        "in folders it creates. Remove the link or choose another output folder "
                        "(params.output, --output)"
                    )
        return path

    def check_writable(self) -> None:
        """As :meth:`Store.check_writable`; also refuses an ``ensemble/`` or
        ``quarantine/`` that is a symbolic link, which would put the tool's writes and
        clean-up in a folder it did not create."""
        for sub in (ENSEMBLE_DIR, QUARANTINE_DIR):
            if (self.root / sub).is_symlink():
                raise OutputError(
                    f"{self.root / sub} is a symbolic link; the tool writes and cleans up "
                    "only in folders it creates. Remove the link or choose another output folder "
                    "(params.output, --output)"
                )
        super().check_writable()
        for sub in (ENSEMBLE_DIR, QUARANTINE_DIR):  # a read-only mount below the root
            if (self.root / sub).is_dir():
                probe = self.root / sub / f".write-probe-{uuid.uuid4().hex[:8]}"
                try:
                    probe.write_bytes(b"")
                    probe.unlink()
                except OSError as err:
                    raise OutputError(
                        f"output folder {self.root / sub} is not writable "
                        f"({err.strerror or err}); choose another output folder "
                        "(params.output, --output) or fix its permissions"
                    ) from err

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """``flock`` on ``DIR/.lock``: released by the OS when the process dies, even by
        ``kill -9``. Advisory and per host: on a file system shared by several hosts,
        give each run its own output folder."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a .lock that is a symbolic link is not the tool's, and opening
            # it would truncate whatever it points to.
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                         0o644)
        except OSError as err:
            if (self.root / LOCK_FILE).is_symlink():
                raise OutputError(
                    f"{self.root / LOCK_FILE} is a symbolic link, not this tool's lock file; "
                    "remove it or choose another output folder (params.output, --output)"
                ) from err
            raise OutputError(self._unwritable(err)) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OutputError(
                    f"{self.root / LOCK_FILE} is not this tool's lock file (a "
                    f"{'hard link' if stat.S_ISREG(st.st_mode) else 'special file'}); "
                    "remove it or choose another output folder (params.output, --output)"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise OutputLocked(
                    f"output folder {self.root} is in use by another run ({holder}); wait "
                    "for it to finish, or choose another output folder (params.output, --output)"
                ) from err
            if os.stat(self.root / LOCK_FILE, follow_symlinks=False).st_ino != st.st_ino:
                # The holder finished and removed the file between our open and our lock:
                # the lock is on a file no longer there. The next attempt gets a fresh one.
                raise OutputLocked(f"output folder {self.root} was just released by another "
                                   "run; run again")
            # A run that ends removes its lock file; one left with a holder's text was
            # left by a run that was killed (kill -9, a lost machine).
            left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            self.stale_holder = left or None
            os.ftruncate(fd, 0)
            mine = _holder_text()
            os.pwrite(fd, mine, 0)
            _WRITTEN_HOLDERS[str(self.root / LOCK_FILE)] = mine
            try:
                yield
            finally:
                with contextlib.suppress(OSError):  # unlinked while held: no race
                    os.unlink(self.root / LOCK_FILE)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


    def remove_own_lock(self) -> bool:
        """Remove the lock file this process wrote and no longer holds; whether it did.

        A stop signal raised in the main thread while the lock is released (between two
        steps of the release) can leave the file with this process's text, and the next
        run would then report this one as killed. Nothing else is removed: a file whose
        text is not what this process wrote, one another run holds, or a link.
        """
        path = self.root / LOCK_FILE
        written = _WRITTEN_HOLDERS.get(str(path))
        if written is None:
            return False
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # held (by this process still, or a run started since)
            if (os.pread(fd, 4096, 0) != written
                    or os.stat(path, follow_symlinks=False).st_ino != st.st_ino):
                return False
            os.unlink(path)
            return True
        finally:
            os.close(fd)  # also releases the flock


# What this process wrote into each local lock file it took (``LocalStore.remove_own_lock``).
_WRITTEN_HOLDERS: dict[str, bytes] = {}


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


class S3Store(Store):
    """An S3 prefix, through pyarrow's S3 filesystem."""

    root: S3Path

    def __init__(self, root: S3Path) -> None:
        self.root = root
        super().__init__(s3_filesystem(), root.key)

    def uri(self, rel: str = "") -> str:
        return str(self.root / _checked_rel(rel)) if rel else str(self.root)

    def move(self, src: str, dst: str) -> None:
        """A server-side copy (``CopyObject``: the destination is whole or untouched),
        then a delete of ``src`` (with a crash in between, both exist)."""
        self.fs.copy_file(self._path(src), self._path(dst))
        self.fs.delete_file(self._path(src))

    def _make_parent(self, rel: str) -> None:
        pass  # S3 has no folders to create

    def _unwritable(self, err: OSError) -> str:
        return (f"output {self.uri()} is not writable ({err}); check the bucket and the "
                "AWS_* environment variables (credentials, AWS_REGION, AWS_ENDPOINT_URL)")

    def check_writable(self) -> None:
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(self._path(probe)) as out:
                out.write(b"")
            self.fs.delete_file(self._path(probe))
        except OSError as err:
            raise OutputError(self._unwritable(err)) from err

    def _put(self, rel: str, body: bytes) -> None:
        with self.fs.open_output_stream(self._path(rel)) as out:
            out.write(body)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        mine = f"{_S3_LOCK_PREFIX}{uuid.uuid4().hex}"
        body = _holder_text()
        try:
            self._put(mine, body)
            infos = self._files("", recursive=False)
        except OSError as err:
            raise OutputError(
                f"cannot write the lock object in {self.uri()} ({err}); check the bucket and "
                "the AWS_* environment variables"
            ) from err
        self._give_way_to_live_holders(mine, infos)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(_S3_LOCK_BEAT):
                with contextlib.suppress(OSError):
                    self._put(mine, body)

        beater = threading.Thread(target=beat, name="s3-lock-heartbeat", daemon=True)
        beater.start()
        try:
            yield
        finally:
            stop.set()
            beater.join()
            self.delete(mine)

    def _give_way_to_live_holders(self, mine: str, infos: list[pafs.FileInfo]) -> None:
        """Take over lock objects of runs that stopped beating; raise if one is alive."""
        own = next((i for i in infos if i.base_name == mine), None)
        live = []
        for info in infos:
            if info.base_name == mine or not info.base_name.startswith(_S3_LOCK_PREFIX):
                continue
            if (own is not None and own.mtime_ns is not None and info.mtime_ns is not None
                    and own.mtime_ns - info.mtime_ns > _S3_LOCK_TTL * 1e9):
                with contextlib.suppress(OSError):
                    self.fs.delete_file(info.path)  # its run stopped beating: it died
            else:
                live.append(info)
        if not live:
            return
        self.delete(mine)
        try:
            with self.fs.open_input_stream(live[0].path) as f:
                holder = f.read().decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise OutputLocked(
            f"output folder {self.uri()} is in use by another run ({holder}); wait for it to "
            f"finish, or choose another output folder (params.output, --output) (a run killed "
            f"with kill -9 leaves {live[0].base_name}, taken over after {_S3_LOCK_TTL:.0f} s)"
        )


def store_for(location: str | os.PathLike[str] | S3Path) -> Store:
    """The store of an output folder: S3 for an ``s3://`` URI (also as ``Path("s3:/..")``),
    else local. The one place that tells the backends apart."""
    if isinstance(location, S3Path):
        return S3Store(location)
    uri = s3_uri(location)
    return S3Store(S3Path.from_uri(uri)) if uri is not None else LocalStore(location)


def open_input(location: str) -> pa.NativeFile:
    """A file named by a local path or an ``s3://`` URI (a partition, a committed ensemble
    file), opened through the store of its folder: the one way data files are read, so
    tests inject read faults there (a faulty store), and S3 uses the process's configured
    filesystem (pyarrow given the URI itself would ignore AWS_ENDPOINT_URL). Local JSON
    documents are read by ``read_json`` itself, checked on the opened file."""
    uri = s3_uri(location)
    text = uri[len("s3://"):] if uri is not None else str(location)
    parent, _, name = text.rstrip("/").rpartition("/")
    store = store_for(f"s3://{parent}" if uri is not None else (parent or "/"))
    return store.open_input(name)


def open_parquet(location: str) -> pq.ParquetFile:
    """``open_input`` as a Parquet file (its footer read; the data when asked)."""
    return pq.ParquetFile(open_input(location))


# Conveniences for callers that hold a location, not a store.
def output_lock(location: str | os.PathLike[str] | S3Path
                ) -> contextlib.AbstractContextManager[str | None]:
    """``store_for(location).lock()``."""
    return store_for(location).lock()


def check_writable(location: str | os.PathLike[str] | S3Path) -> None:
    store_for(location).check_writable()


def remove_stale_staging(location: str | os.PathLike[str] | S3Path) -> int:
    return store_for(location).remove_stale_staging()


# The largest JSON document read (run records, drift baselines): a record takes ~180 bytes
# per partition, so this is a run of some 350,000 partitions; parsed, a document takes
# several times its size in memory, and the file is the user's.
MAX_JSON_BYTES = 64 * 2**20


def read_json(location: str) -> Any:
    """The JSON document at ``location``: an S3 URI read through ``open_input``, a local
    path opened without blocking and required to be a regular file, so a FIFO or device
    in its place (a user's folder) cannot hang the run.

    Raises:
        FileNotFoundError: nothing there.
        OSError, ValueError: unreadable, not a regular file, over ``MAX_JSON_BYTES``, or
            not JSON.
    """
    if s3_uri(location) is None:
        text = _read_local_document(location)
    else:
        with open_input(location) as f:
            if f.size() > MAX_JSON_BYTES:
                raise ValueError(f"{location} is over {MAX_JSON_BYTES // 2**20} MiB")
            text = f.read()
    try:
        return json.loads(text)
    except RecursionError as err:  # a document nested deeper than Python's stack allows
        raise ValueError(f"{location} is nested too deeply to be read as JSON") from err


def _read_local_document(location: str) -> bytes:
    """Checked on the opened file itself (``fstat``), so nothing can be swapped in between;
    reads stay non-blocking, so a file that would block (a kernel log) fails instead."""
    fd = os.open(location, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{location} is not a regular file")
        chunks, size = [], 0
        while size <= MAX_JSON_BYTES and (chunk := os.read(fd, 2**20)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if max(size, info.st_size) > MAX_JSON_BYTES:
        raise ValueError(f"{location} is over {MAX_JSON_BYTES // 2**20} MiB")
    return b"".join(chunks)


def write_json_atomic(final: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``final`` (a local path or an S3 URI), published whole."""
    uri = s3_uri(final)
    if uri is not None:
        path = PurePosixPath(S3Path.from_uri(uri).key)
        S3Store(S3Path(str(path.parent))).write_json(path.name, data)
    else:
        LocalStore(Path(final).expanduser().resolve().parent).write_json(Path(final).name, data)


def check_output_apart(input_path: str, output_dir: str) -> None:
    """Refuse an output folder that is the input, holds it, or lies inside it.

    Holding it, the run would write among the user's data (and clean up there). Inside
    it, this run leaves its own files out, but every later run on that input, into another
    output, would take the ensemble table for input partitions.

    Raises:
        OutputError: naming both, before any lock or file is created.
    """
    inp, out = _location_parts(input_path), _location_parts(output_dir)
    where = ("is the input" if inp == out else "holds the input"
             if inp[:len(out)] == out else _holds_matches(input_path, output_dir)
             or _inside(input_path, inp, out))
    if not where and s3_uri(input_path) is None and _names_a_file(input_path):
        # A file that is a link is read from the folder it is in, not its target's.
        named = Path(input_path).expanduser().absolute()
        where = _inside(input_path, (*named.parent.resolve().parts, named.name), out)
    if where:
        raise OutputError(
            f"the output folder {output_dir} {where} ({input_path}); the ensemble table, run "
            "record and lock would be written among your data, where later runs would read "
            "them as input. Choose an output folder outside the input, for example a "
            "sibling folder (params.output, --output)"
        )


def _location_parts(location: str) -> tuple[str, ...]:
    uri = s3_uri(location)
    if uri is not None:
        return ("s3:", *[p for p in uri[len("s3://"):].split("/") if p])
    return Path(location).expanduser().resolve().parts


def _inside(input_path: str, inp: tuple[str, ...], out: tuple[str, ...]) -> str:
    """Whether the output lies where input is read: inside an input folder (discovery
    walks all below it), or, for a glob or a single file, inside a folder its files are
    read from (``data/*.parquet`` and ``data/a.parquet`` read ``data/``; a later run on
    ``data/`` would walk into the output) or where a glob reaches (``**``)."""
    single = _names_a_file(input_path)
    if not single and not any(set(p) & set("*?[") for p in inp):
        return "is inside the input" if out[:len(inp)] == inp else ""
    reader = "the input file" if single else "the input's glob"
    for i, part in enumerate(out):
        if i == len(inp) - 1:  # below a folder the input's files are read from
            return (f"is inside {_joined(out[:i])}, the folder {reader} reads from (a "
                    "later run on that folder would walk into it)")
        if inp[i] == "**":
            return "is inside the input"
        if not (part == inp[i] if single else fnmatch.fnmatchcase(part, inp[i])):
            return ""
    return (f"is the folder {reader} reads from" if len(out) == len(inp) - 1
            else f"holds the folder {reader} reads from")


def _names_a_file(input_path: str) -> bool:
    """A single file: an existing local file, or an S3 key with a Parquet suffix."""
    if s3_uri(input_path) is not None:
        return input_path.rstrip("/").endswith(PARQUET_SUFFIXES)
    return Path(input_path).expanduser().is_file()


def _joined(parts: tuple[str, ...]) -> str:
    """A location from :func:`_location_parts`'s parts, for messages."""
    if parts[:1] == ("s3:",):
        return "s3://" + "/".join(parts[1:])
    return str(Path(*parts))


def _holds_matches(input_path: str, output_dir: str) -> str:
    """For a local glob input: whether the output folder holds a file the glob matches
    (other than the tool's own output files, which discovery leaves out)."""
    pattern = os.path.expanduser(input_path)
    if s3_uri(input_path) is not None or not set(pattern) & set("*?["):
        return ""
    out = Path(output_dir).expanduser().resolve()
    own = (out / ENSEMBLE_DIR, out / QUARANTINE_DIR)
    for match in glob.iglob(pattern, recursive=True):
        path = Path(match).resolve()
        if path.is_relative_to(out) and not any(path.is_relative_to(o) for o in own):
            return f"holds input files the glob matches, such as {match}"
    return ""
