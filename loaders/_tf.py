"""Import TensorFlow once, quietly.

TensorFlow's C++ runtime reads ``TF_CPP_MIN_LOG_LEVEL`` at import time, so the level has
to be set before the first import; the CLI sets it to 0 under ``--debug``. A few lines
(the CUDA probe) are written by absl before any level applies, so unless debugging, the
import runs with file descriptor 2 pointed at /dev/null.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's own pooling (BFC) CPU allocator instead of plain malloc. With malloc each
# Session.run wrote its activations (16 MB a layer for a 16k-row batch of a 256-wide
# MLP) into freshly mapped pages whenever glibc had handed the last ones back: ~300k
# page faults per 4 partitions of the benchmark workload, 6-16 % of the CPU in the
# kernel. With BFC the memory is kept and reused: kernel share 4 %, and the flow was
# faster in each of 3 interleaved pairs (perf, see BENCHMARKS.md). An explicit
# TF_CPU_ALLOCATOR_USE_BFC=false wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
_QUIET = os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("0", "1")


def _import_quietly():  # type: ignore[no-untyped-def]
    if not _QUIET:
        import tensorflow

        return tensorflow
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


tf = _import_quietly()

if _QUIET:
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)

__all__ = ["tf"]
