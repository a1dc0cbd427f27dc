"""The process's one runtime set-up: what TensorFlow and Arrow read or keep process-wide.

Nothing is changed by importing a module of this project; the CLI, the flow and the tasks
(which may run in worker processes) call :func:`set_up` first, and it is idempotent.
Environment variables the user set always win.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

__all__ = ["arrow_system_pool", "limit_malloc_arenas", "set_up"]

_done = threading.Event()
_lock = threading.Lock()


_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's <malloc.h>


def limit_malloc_arenas() -> bool:
    """One glibc malloc arena for the process's threads and the processes it starts,
    unless the user chose (``MALLOC_ARENA_MAX``, or ``arena_max`` in ``GLIBC_TUNABLES``);
    returns whether this call set it. Elsewhere than glibc on Linux, nothing is done.

    Decoding allocates on a pool's threads and the scoring thread frees, so with glibc's
    default of many arenas each arena kept handing pages back and faulting fresh ones
    in: with one arena, 4 partitions of the benchmark workload took 0.3 M page faults
    instead of 0.5 M, peak RSS fell from 1.8-1.9 to 1.35 GiB, and scoring ran 1-3 %
    faster with oneDNN on and off (interleaved pairs). The one lock costs little: small
    blocks come from each thread's own cache, TensorFlow's tensors from its pooling
    allocator, and the large blocks that take the lock are a few per batch.

    glibc reads ``MALLOC_ARENA_MAX`` when a process starts, and ``mallopt`` only caps
    arenas not yet made (threads attach to one when they first allocate; the cap is
    fixed once eight exist). So this sets both: the variable, for the processes started
    from here (the run's Prefect server, process and Dask workers, ``serve``'s flow
    runs), and ``mallopt``, for this process, in full only where it runs before the
    first thread, as the CLI does; ``set_up`` calls it again, for the threads still to
    come in a process that did not.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS, Windows: their allocators are left alone
    os.environ["MALLOC_ARENA_MAX"] = "1"
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError, TypeError):
        return False


def arrow_system_pool() -> None:
    """Arrow's system memory pool (glibc's malloc) for all of Arrow's allocations, unless
    the user chose (``ARROW_DEFAULT_MEMORY_POOL``).

    ``pa.set_memory_pool`` changes only the pool that pyarrow's own calls pass down: the
    C++ code that takes the process default (a file's reads, which hold the Parquet
    reader's column chunks) kept the wheels' mimalloc, 231 MB at its peak for one 1M-row
    partition, in pages the kernel handed over as transparent huge pages zeroed 2 MB at a
    time (~1 % of the CPU during scoring). Arrow reads the variable once, when pyarrow is
    imported, so the CLI sets it before anything imports pyarrow; the processes it starts
    inherit it. With it, 4 partitions of the benchmark workload scored 2.5 % faster
    (3 interleaved pairs, oneDNN on) with a third less system time.
    """
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def set_up(*, debug: bool = False) -> None:
    """Configure TensorFlow's environment, import it, and choose Arrow's memory pool.

    - ``TF_CPP_MIN_LOG_LEVEL``: 3 (errors only), or 0 with ``debug``. TensorFlow reads it
      at import, so this runs before anything imports TensorFlow.
    - ``TF_CPU_ALLOCATOR_USE_BFC=true``: TensorFlow's pooling allocator instead of plain
      malloc. With malloc each ``Session.run`` wrote its activations (16 MB a layer for a
      16k-row batch of a 256-wide MLP) into freshly mapped pages whenever glibc had handed
      the last ones back: ~300k page faults per 4 partitions of the benchmark workload,
      6-16 % of the CPU in the kernel; with BFC the memory is kept and reused (kernel share
      4 %, the flow faster in each of 3 interleaved pairs).
    - Arrow's system memory pool (glibc) instead of the wheels' mimalloc, unless
      ``ARROW_DEFAULT_MEMORY_POOL`` is set: decoding with mimalloc faulted in many more
      fresh pages (1.14 M vs 0.77 M page faults for 16 partitions, 14 s vs 9 s of kernel
      time), and 4-partition runs were 3 % faster with the system pool (4 interleaved pairs).
      Where pyarrow was imported first, its C++ default stays as it was, and only
      pyarrow's own calls take the system pool (:func:`arrow_system_pool`).
    - One malloc arena (:func:`limit_malloc_arenas`).
    """
    with _lock:
        if _done.is_set():
            return
        limit_malloc_arenas()
        arrow_system_pool()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "3")
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
        import pyarrow as pa

        from loaders._tf import import_tensorflow

        if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
            pa.set_memory_pool(pa.system_memory_pool())
        import_tensorflow()
        _done.set()
