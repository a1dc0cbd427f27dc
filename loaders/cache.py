"""Per-process model cache: each checkpoint is loaded once per process and shared by threads.

Keyed by the checkpoint's digest (plus how it is called), so a replaced checkpoint is a
new entry while the same files under another name are not loaded twice. Loading happens
under a per-key lock: two tasks that need the same model at once wait for one load.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

from loaders.base import GraphScorer
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import ModelSpec

__all__ = ["MODEL_CACHE", "ModelCache", "load_scorer"]


def load_scorer(spec: ModelSpec, n_features: int, *, fuse: bool | None = None,
                freeze: bool | None = None) -> GraphScorer:
    """Load a member into its own graph and session and check it takes ``n_features``.

    A Keras file is exported to a SavedModel once (cached on disk, ``loaders.keras_file``)
    and loaded as one. ``fuse=False`` keeps a checkpoint's graph exactly as saved and
    ``fuse=True`` rewrites its ``MatMul + bias`` adds whatever the CPU path; by default
    they are rewritten only where TensorFlow does not fuse them itself (see
    ``loaders.rewrite``). ``freeze=False`` keeps the variables and ``freeze=True``
    turns them into constants where ``loaders.freeze`` allows it; by default that is done
    only on oneDNN's path, where it pays (see ``loaders.freeze``).

    Raises:
        ManifestError: the files are missing or incomplete.
        ModelLoadError: the files are there but cannot be loaded or called.
    """
    from loaders.keras_file import load_keras
    from loaders.savedmodel import load_saved_model
    from loaders.tf1 import load_checkpoint

    resolved = resolve_model(spec)
    digest = digest_files(resolved.files)
    if resolved.format == "saved_model":
        scorer = load_saved_model(spec, resolved.location, digest, freeze=freeze)
    elif resolved.format == "keras":
        scorer = load_keras(spec, resolved, digest, freeze=freeze)
    else:
        scorer = load_checkpoint(spec, resolved.location, digest, fuse=fuse, freeze=freeze)
    try:
        scorer.check(n_features)
    except Exception:
        scorer.close()
        raise
    return scorer


class ModelCache:
    """An LRU of loaded scorers; evicted scorers have their sessions closed."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[object, ...], GraphScorer] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[object, ...], threading.Lock] = {}
        self.loads: Counter[str] = Counter()

    @staticmethod
    def _key(spec: ModelSpec, n_features: int) -> tuple[object, ...]:
        resolved = resolve_model(spec)
        return (
            digest_files(resolved.files),
            resolved.location,
            spec.input,
            spec.output,
            spec.signature,
            spec.tags,
            spec.allow_ops,
            spec.custom_objects,
            n_features,
        )

    def get(self, spec: ModelSpec, n_features: int) -> GraphScorer:
        """The loaded scorer for ``spec``, loading it on first use in this process."""
        key = self._key(spec, n_features)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._items.get(key)
            if hit is not None:
                return hit
            scorer = load_scorer(spec, n_features)
            with self._lock:
                self.loads[scorer.digest] += 1
                self._items[key] = scorer
                while len(self._items) > self.capacity:
                    _, evicted = self._items.popitem(last=False)
                    evicted.close()
            return scorer

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
            self._key_locks.clear()
        for scorer in items:
            scorer.close()


MODEL_CACHE = ModelCache()
