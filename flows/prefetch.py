"""Ask the kernel to read, in the background, the Python files a start-up is about to
import, from a list the previous run recorded.

A run imports ~4,500 modules across the CLI and its Prefect server (~80 MB of bytecode),
one small read after another, each waiting for the disk when the file is not in the page
cache. The cache does not keep them between runs: this VM's kernel pages out file data
no process has mapped once it has gone unused for about a minute (DAMON's ``pageout``
scheme), and any machine drops it under memory pressure or after a reboot. With those
files evicted, the CLI reached its first batch in 6.9 s instead of 8.2 s when the lists
were issued with ``POSIX_FADV_WILLNEED`` at the start (in a thread, ~0.1 s of syscalls;
mean of 4 interleaved pairs, faster in each). With the whole page cache dropped, when
TensorFlow's 1 GB library must be read too, it gained less (8.4 vs 8.8 s). Runs 3 s
apart, with the files cached, were no slower for it (6.9 vs 7.5 s, 4 pairs).

Both halves only ever help: a missing or stale list means the start-up reads its files
the usual way, and every error here is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from pathlib import Path

__all__ = ["list_path", "record", "start"]

# Bytecode and source only. Extension modules are mapped, and the kernel already reads
# around each page fault; asking for a whole one (libtensorflow_cc is 1 GB) would read
# far more than is used, and measured no faster.
_SUFFIXES = (".pyc", ".py")


def list_path(role: str) -> Path:
    """Where ``role``'s list lives: one per interpreter and environment, since each has its
    own files."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(f"{sys.prefix}\0{sys.version}".encode()).hexdigest()[:12]
    return base / "ensemble-scoring" / f"imports-{role}-{key}.txt"


def _imported_files() -> list[str]:
    """The file each imported module was loaded from: its bytecode if it has some on disk,
    else its source."""
    files: set[str] = set()
    for module in list(sys.modules.values()):
        for attr in ("__cached__", "__file__"):
            path = getattr(module, attr, None)
            if isinstance(path, str) and path.endswith(_SUFFIXES) and os.path.isfile(path):
                files.add(path)
                break
    return sorted(files)


def record(role: str) -> None:
    """Record the files this process imported, for the next start-up to prefetch; rewrites
    the list only when it changed."""
    path = list_path(role)
    text = "\n".join(_imported_files()) + "\n"
    with contextlib.suppress(OSError, UnicodeError):
        if path.is_file() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _advise(files: list[str]) -> None:
    for name in files:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def start(role: str) -> threading.Thread | None:
    """Start prefetching ``role``'s recorded list in a daemon thread; returns it (None when
    there is no list, or the platform has no ``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        files = list_path(role).read_text().splitlines()
    except (OSError, UnicodeError):
        return None
    thread = threading.Thread(target=_advise, args=(files,), name=f"prefetch-{role}",
                              daemon=True)
    thread.start()
    return thread
