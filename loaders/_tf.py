"""TensorFlow, imported on first use.

Importing this package changes nothing process-wide: TensorFlow itself is imported the
first time an attribute of ``tf`` is used. The environment it reads at import (log level,
allocator) is set beforehand by the process's one explicit runtime set-up,
``tasks.runtime.set_up``, which the CLI, the flow and the tasks call; code that uses
``tf`` without it (a notebook, a test) gets TensorFlow's own defaults.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Any

__all__ = ["import_tensorflow", "tf"]

_lock = threading.Lock()
_module: ModuleType | None = None


def import_tensorflow(*, quiet: bool | None = None) -> ModuleType:
    """Import TensorFlow once; with ``quiet`` (the default when TF_CPP_MIN_LOG_LEVEL is
    2 or more), file descriptor 2 points at /dev/null meanwhile: a few lines (the CUDA
    probe) are written by absl before any log level applies."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        if quiet is None:
            quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("0", "1")
        if not quiet:
            _module = importlib.import_module("tensorflow")
            return _module
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            _module = importlib.import_module("tensorflow")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        _module.get_logger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
        return _module


class _LazyTensorFlow:
    """Stands for the ``tensorflow`` module; imports it on first attribute access."""

    def __getattr__(self, name: str) -> Any:
        return getattr(import_tensorflow(), name)


tf: Any = _LazyTensorFlow()
