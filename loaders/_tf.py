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
