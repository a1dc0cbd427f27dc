"""The process's one runtime set-up: what TensorFlow and Arrow read or keep process-wide.

Nothing is changed by importing a module of this project; the CLI, the flow and the tasks
(which may run in worker processes) call :func:`set_up` first, and it is idempotent.
Environment variables the user set always win.
"""

from __future__ import annotations

import os
import threading

__all__ = ["set_up"]

_done = threading.Event()
_lock = threading.Lock()


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
    """
    with _lock:
        if _done.is_set():
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "3")
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
        import pyarrow as pa

        from loaders._tf import import_tensorflow

        if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
            pa.set_memory_pool(pa.system_memory_pool())
        import_tensorflow()
        _done.set()
