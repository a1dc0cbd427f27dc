"""The ``Scorer`` protocol and the graph-backed scorer every format loads into.

A scorer owns exactly one ``tf.Graph`` and one ``tf.compat.v1.Session`` bound to it. The
thread's default graph is never used: the classic failure this prevents is several
checkpoints restored into one graph, whose same-named variables collide and silently
overwrite each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from loaders._tf import tf
from loaders.errors import ModelLoadError, first_error_line

__all__ = ["SESSION_THREADS", "GraphScorer", "Scorer", "SessionThreads", "new_session",
           "session_threads", "tensor_name"]


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


SessionThreads = Literal["shared", "per-session", "per-session-1"]

# How a session gets its threads (ConfigProto): "shared" is TensorFlow's default, the
# process-wide pools (0/0, sized to the cores); "per-session" gives each session pools of
# its own (use_per_session_threads, 0/0); "per-session-1" its own pools of one thread each.
SESSION_THREADS: dict[str, dict[str, Any]] = {
    "shared": {},
    "per-session": {"use_per_session_threads": True},
    "per-session-1": {"use_per_session_threads": True, "intra_op_parallelism_threads": 1,
                      "inter_op_parallelism_threads": 1},
}

_threads: contextvars.ContextVar[SessionThreads] = contextvars.ContextVar(
    "session_threads", default="shared")


@contextlib.contextmanager
def session_threads(threads: SessionThreads) -> Iterator[None]:
    """Sessions created in this block (this thread or task) use ``threads``; the benchmark
    uses it to measure every configuration in one process."""
    token = _threads.set(threads)
    try:
        yield
    finally:
        _threads.reset(token)


def new_session(graph: tf.Graph, *, frozen: bool = False) -> tf.compat.v1.Session:
    """A session bound to ``graph``; by default sharing the process-wide thread pools.
    ``frozen``: a graph whose variables are constants (``loaders.freeze``), run with
    grappler's constant folding off so that it computes exactly what the graph with its
    variables did (folding would reassociate float arithmetic around the weights).

    The product runs 4 members x 2 partitions = 8 concurrent ``Session.run`` calls on the
    benchmark's 2 cores. On both TensorFlow paths of the 2-core AVX-512 EPYC (oneDNN on
    and off), at equal feed size, the shared pools came within 3-5 % of per-session pools
    and of one-thread per-session pools in ``Session.run`` alone, and the product scored as
    fast with shared as with one-thread pools (1.00 vs 1.00 M/s, oneDNN on); see
    BENCHMARKS.md. The benchmark's ceiling takes the best of all three on every run, so a
    configuration that pays on another CPU shows up as a lower ratio.
    """
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True,
                                      **SESSION_THREADS[_threads.get()])
    if frozen:
        rewrites = config.graph_options.rewrite_options
        rewrites.constant_folding = rewrites.OFF
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
    load_seconds: float = 0.0  # for a Keras file, including export_seconds
    fused_bias_adds: int = 0  # MatMul + bias adds rewritten to BiasAdd (loaders.rewrite)
    frozen_variables: int = 0  # variables turned into constants (loaders.freeze)
    # A Keras file's one-time export to a SavedModel (loaders.keras_file): the seconds
    # this process spent on it (0 when the cached export was reused), and its folder.
    export_seconds: float = 0.0
    export_dir: str = ""
    # Larger feeds are split here, for any caller. A run slices its batches into the
    # feeds its probe chose on the machine (loaders.feed, tasks.batch), never larger
    # than this, the largest size the probe measures.
    max_batch: int = 65_536
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
        output_dtype = self.output_tensor.dtype.base_dtype
        if not (output_dtype.is_floating or output_dtype.is_integer or output_dtype.is_bool):
            raise ModelLoadError(
                f"model {self.name!r}: output {self.output_tensor.name} has dtype "
                f"{output_dtype.name}; a score must be a number. Point 'output' at the "
                "score (or probability) tensor"
            )
        probe = np.zeros((2, n_features), dtype=np.float32)
        try:
            self.predict(probe)
        except ModelLoadError:
            raise
        except (tf.errors.OpError, ValueError, TypeError) as err:
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

    def output_bytes(self, rows: int, n_features: int) -> int:
        """Bytes of every tensor one call of ``rows`` rows (zeros) produces, from
        TensorFlow's own step stats (``RunOptions`` / ``RunMetadata``, public protos): an
        upper bound on what the call holds at once, which TensorFlow's pool then keeps."""
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        metadata = tf.compat.v1.RunMetadata()
        self.session.run(self.output_tensor,
                         {self.input_tensor: np.zeros((rows, n_features), self._input_dtype)},
                         options=options, run_metadata=metadata)
        return sum(out.tensor_description.allocation_description.requested_bytes
                   for dev in metadata.step_stats.dev_stats for node in dev.node_stats
                   for out in node.output)

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
