"""The project's exception hierarchy, used by every layer (loaders, tasks, flows).

One base class so callers (the CLI, the flow) can tell our own, explained failures from
bugs; each leaf also inherits the builtin it specialises so ``except ValueError`` keeps
working for code that does not know about us. Messages say what, where and how to fix.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "DriftExceeded",
    "GoldenMismatch",
    "ManifestError",
    "ModelFetchError",
    "ModelLoadError",
    "OutputError",
    "OutputLocked",
    "PartitionsFailed",
    "ScoringError",
    "first_error_line",
]


class ScoringError(Exception):
    """Base class for every failure this project explains to its user."""


class ManifestError(ScoringError, ValueError):
    """The models manifest is malformed or refers to things that do not exist."""


class ModelLoadError(ScoringError, RuntimeError):
    """A checkpoint or SavedModel cannot be loaded, or does not fit the manifest."""


class ModelFetchError(ScoringError, OSError):
    """A member's files could not be downloaded whole from object storage (a lost
    connection, a short read). The only explained error worth another try: nothing
    incomplete was kept, so the retry starts clean."""


class DataError(ScoringError, ValueError):
    """Input data does not match the manifest (missing column, wrong type, bad rows)."""


class OutputError(ScoringError, RuntimeError):
    """The output location cannot be written."""


class OutputLocked(ScoringError, RuntimeError):
    """Another run holds the output folder."""


class GoldenMismatch(ScoringError, RuntimeError):
    """A member no longer gives its blessed scores on the golden rows: nothing is scored."""


class DriftExceeded(ScoringError, RuntimeError):
    """With ``drift: fail``, inputs or scores drifted beyond ``max_psi`` from the baseline;
    the table is committed, the run is marked failed."""


class PartitionAbandoned(ScoringError, RuntimeError):
    """A partition left uncommitted because its run stopped and its grace was over."""


class PartitionsFailed(ScoringError, RuntimeError):
    """Some partitions failed; the others are committed and a re-run finishes the rest."""


# Lines TensorFlow puts around a kernel's error in graph mode: the wrapper, where the
# node was defined (Python frames), the node's name, and the failing node in brackets.
_WRAPPER_LINES = ("Graph execution error", "Detected at node", "File \"", "Node: ", "[[",
                  "Detected unsupported operations")


def first_error_line(err: BaseException) -> str:
    """The first line of an error's own text, for messages that quote the cause.

    TensorFlow wraps a kernel's error as "Graph execution error:" followed by the cause
    several lines down; ``OpError.message`` holds the text, and the wrapper line is
    skipped so the user sees the cause (for example "Must provide as many biases as the
    channel size: [1] vs. 64") without --debug.
    """
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    nodes = [i for i, line in enumerate(lines) if line.startswith("Node: ")]
    if nodes and nodes[0] + 1 < len(lines):  # the cause follows the failing node's name
        lines = lines[nodes[0] + 1:]
    causes = [line for line in lines if not line.startswith(_WRAPPER_LINES)] or lines
    first = causes[0] if causes else type(err).__name__
    return first.rstrip(":") or type(err).__name__
