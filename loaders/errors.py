"""The project's exception hierarchy.

One base class so callers (the CLI, the flow) can tell our own, explained failures from
bugs; each leaf also inherits the builtin it specialises so ``except ValueError`` keeps
working for code that does not know about us. Messages say what, where and how to fix.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "ManifestError",
    "ModelLoadError",
    "OutputError",
    "ScoringError",
]


class ScoringError(Exception):
    """Base class for every failure this project explains to its user."""


class ManifestError(ScoringError, ValueError):
    """The models manifest is malformed or refers to things that do not exist."""


class ModelLoadError(ScoringError, RuntimeError):
    """A checkpoint or SavedModel cannot be loaded, or does not fit the manifest."""


class DataError(ScoringError, ValueError):
    """Input data does not match the manifest (missing column, wrong type, bad rows)."""


class OutputError(ScoringError, RuntimeError):
    """The output location cannot be written."""
