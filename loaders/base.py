"""The ``Scorer`` protocol and the graph-backed scorer every format loads into.

A scorer owns exactly one ``tf.Graph`` and one ``tf.compat.v1.Session`` bound to it. The
thread's default graph is never used: the classic failure this prevents is several
checkpoints restored into one graph, whose same-named variables collide and silently
overwrite each other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from loaders._tf import tf
from loaders.errors import ModelLoadError, first_error_line

__all__ = ["GraphScorer", "Scorer", "new_session", "tensor_name"]


@runtime_checkable
class Scorer(Protocol):
    """What the scoring tasks need from a loaded model."""

    name: str
    digest: str
    load_seconds: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Score a (rows, features) float32 matrix; returns a (rows,) float32 vector."""
        ...

    def close(self) -> None:
        """Release the session; the scorer must not be used afterwards."""
        ...


def tensor_name(name: str) -> str:
    """Accept an op name (``scores``) where a tensor name (``scores:0``) is meant."""
    return name if ":" in name else f"{name}:0"


def new_session(graph: tf.Graph) -> tf.compat.v1.Session:
    """A session bound to ``graph``, sharing the process-wide thread pools.

    The process-wide pools (the default, 0/0) measured fastest here with several sessions
    running from several threads; per-session pools gave slightly less.
    """
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    return tf.compat.v1.Session(graph=graph, config=config)


@dataclass
class GraphScorer:
    """A model living in its own graph and session; safe to call from many threads."""

    name: str
    digest: str
    source: str
    graph: tf.Graph
    session: tf.compat.v1.Session
    input_tensor: Any
    output_tensor: Any
    load_seconds: float = 0.0
    fused_bias_adds: int = 0  # MatMul + bias adds rewritten to BiasAdd (loaders.rewrite)
    # Larger feeds are split: on the 2-core AVX2 benchmark machine a 256-wide MLP ran
    # 16k-row feeds ~1.5x faster than 64k-row ones (activations stay in cache).
    max_batch: int = 16_384
    _closed: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._input_dtype = np.dtype(self.input_tensor.dtype.as_numpy_dtype)

    @property
    def n_features(self) -> int | None:
        shape = self.input_tensor.shape
        if shape.rank is None or shape.rank < 2:
            return None
        return shape[-1]

    def check(self, n_features: int) -> None:
        """Fail at load time, not mid-run, when the model cannot take our features.

        Raises:
            ModelLoadError: wrong input rank or width, missing feeds, or an output that is
                not one score per row.
        """
        shape = self.input_tensor.shape
        if shape.rank is not None and shape.rank != 2:
            raise ModelLoadError(
                f"model {self.name!r}: input {self.input_tensor.name} has shape {shape}; "
                "expected (rows, features). Point 'input' at the 2-D feature tensor"
            )
        if self.n_features is not None and self.n_features != n_features:
            raise ModelLoadError(
                f"model {self.name!r}: input {self.input_tensor.name} takes {self.n_features} "
                f"features but the manifest lists {n_features}; make 'features' match the "
                "columns the model was trained on, in order"
            )
        if not self._input_dtype.kind == "f":
            raise ModelLoadError(
                f"model {self.name!r}: input {self.input_tensor.name} has dtype "
                f"{self._input_dtype}; only floating-point inputs are supported"
            )
        probe = np.zeros((2, n_features), dtype=np.float32)
        try:
            self.predict(probe)
        except ModelLoadError:
            raise
        except tf.errors.OpError as err:
            raise ModelLoadError(
                f"model {self.name!r} ({self.source}) fails on a 2-row probe batch: "
                f"{first_error_line(err)}. Check 'input'/'output' and that the graph "
                "needs no other feeds"
            ) from err

    def predict(self, features: np.ndarray) -> np.ndarray:
        rows = features.shape[0]
        if rows <= self.max_batch:
            return self._run(features)
        out = np.empty(rows, dtype=np.float32)
        for start in range(0, rows, self.max_batch):
            stop = min(start + self.max_batch, rows)
            out[start:stop] = self._run(features[start:stop])
        return out

    def _run(self, features: np.ndarray) -> np.ndarray:
        if self._input_dtype != features.dtype:
            features = features.astype(self._input_dtype)
        out = self.session.run(self.output_tensor, {self.input_tensor: features})
        scores = np.asarray(out)
        rows = features.shape[0]
        if scores.size != rows:
            raise ModelLoadError(
                f"model {self.name!r}: output {self.output_tensor.name} gave shape "
                f"{scores.shape} for {rows} rows; expected one score per row. Point "
                "'output' at a (rows,) or (rows, 1) tensor"
            )
        return scores.reshape(rows).astype(np.float32, copy=False)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.session.close()
