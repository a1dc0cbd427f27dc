"""Arrow record batches to the float32 matrix the models take, without pandas.

Each feature column is copied straight from Arrow's buffer into the C-contiguous (rows,
features) array TensorFlow is fed: into its column of a small or narrow matrix, through
a transposed (features, rows) block for a large one; no per-row Python runs.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FEED_ALIGNMENT", "BadRows", "aligned_matrix", "all_finite", "find_bad_rows",
           "to_matrix"]

# TensorFlow feeds a numpy array without copying it only when its data is aligned to
# Eigen's alignment (64 bytes on AVX-512 builds); otherwise every Session.run copies the
# whole feed into a fresh buffer first: 4 copies of a 2 MB batch per batch with 4
# members, ~0.5 % of the CPU of a benchmark run. numpy's own allocations are only
# 16-byte aligned.
FEED_ALIGNMENT = 64
# to_matrix goes through transposing blocks (_through_blocks) of at most _BLOCK_BYTES for
# matrices of at least _BLOCK_MIN_FEATURES features and _BLOCK_MIN_BYTES.
_BLOCK_BYTES = 2**21
_BLOCK_MIN_FEATURES = 8
_BLOCK_MIN_BYTES = 2**20


def _needs_cast(col: pa.Array) -> bool:
    """Decimals have no numpy form; integers with nulls cast to float so the nulls become
    NaN, and one finiteness check then catches null, NaN and inf alike. Decided on the
    whole column, so that every block of a batch converts its slice of a column alike."""
    return pa.types.is_decimal(col.type) or bool(
        col.null_count and not pa.types.is_floating(col.type))


def _column_values(col: pa.Array, cast: bool) -> np.ndarray:
    """The column as numpy values; where it needs a cast, float32 for integers, float64
    for decimals.

    An integer column is cast straight to float32, unchecked (``safe=False``), as numpy
    converts one without nulls: each value rounds once to the nearest float32 whether or
    not its column holds a null. Arrow's checked cast to float64 refused integers beyond
    2**53 only in a column that also held a null (reported as a corrupt file), and going
    through float64 rounded twice, one float32 step off for some values beyond 2**53.
    """
    if cast:
        target = pa.float32() if pa.types.is_integer(col.type) else pa.float64()
        col = pc.cast(col, target, safe=False)
    return col.to_numpy(zero_copy_only=False)


def aligned_matrix(rows: int, cols: int) -> np.ndarray:
    """An uninitialised C-contiguous (rows, cols) float32 array whose data starts on a
    ``FEED_ALIGNMENT`` boundary, so TensorFlow can feed it as it is."""
    nbytes = rows * cols * 4
    if nbytes == 0:  # nothing to feed (numpy leaves an empty slice's pointer where it is)
        return np.empty((rows, cols), dtype=np.float32)
    raw = np.empty(nbytes + FEED_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % FEED_ALIGNMENT
    return raw[start:start + nbytes].view(np.float32).reshape(rows, cols)


def to_matrix(batch: pa.RecordBatch, features: tuple[str, ...], out: np.ndarray | None = None
              ) -> np.ndarray:
    """The batch's feature columns, in manifest order, as a (rows, features) float32 matrix.

    ``out`` may be a preallocated buffer (``aligned_matrix``) at least ``batch.num_rows``
    rows tall; a view on its first rows is returned, so the caller must not keep it
    across batches.
    """
    rows = batch.num_rows
    if out is None or out.shape[0] < rows or out.shape[1] != len(features):
        out = aligned_matrix(rows, len(features))
    view = out[:rows]
    # By name: a missing or repeated name raises (an index of -1 would read the last column).
    columns = [batch.column(name) for name in features]
    # A finite value beyond float32's range becomes inf here; find_bad_rows names it.
    with np.errstate(over="ignore"):
        if len(features) < _BLOCK_MIN_FEATURES or view.nbytes < _BLOCK_MIN_BYTES:
            for j, column in enumerate(columns):
                view[:, j] = _column_values(column, _needs_cast(column))
        else:
            _through_blocks(view, columns)
    return view


def _through_blocks(view: np.ndarray, columns: list[pa.Array]) -> None:
    """Each column is written whole into a row of a (features, rows) block, and the block
    is transposed into the matrix in one copy.

    Writing the columns straight into the matrix's strided columns touches the whole
    matrix once per feature: once the matrix outgrows the cache, that took 2.5-3.5x as
    long on the 2-core Intel Xeon (32 float32 features: 0.15 against 0.045 s per 1M rows
    at 65,536-row batches; on the AMD EPYC a stacked copy had taken 0.036 against 0.050 s
    at 16,384 rows). Below ``_BLOCK_MIN_FEATURES`` or ``_BLOCK_MIN_BYTES`` the direct
    writes stay in the cache and were faster (1.4-5.7x at 2-8 features), so ``to_matrix``
    keeps them there. A block holds at most ``_BLOCK_BYTES``, counting a cast column's
    float64 copies of its slice, so the memory it adds stays small whatever the batch.
    """
    rows, features = view.shape
    casts = [_needs_cast(column) for column in columns]
    step = max(1, min(rows, _BLOCK_BYTES // (4 * features + 16)))
    block = np.empty((features, step), dtype=np.float32)
    for start in range(0, rows, step):
        part = block[:, :min(step, rows - start)]
        for j, column in enumerate(columns):
            part[j] = _column_values(column.slice(start, part.shape[1]), casts[j])
        np.copyto(view[start:start + part.shape[1]], part.T)


@dataclass
class BadRows:
    """Rows that cannot be scored, with a reason per row."""

    mask: np.ndarray  # True where the row is bad
    reasons: list[str]  # one per bad row, in row order

    @property
    def count(self) -> int:
        return len(self.reasons)


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, checked once per batch on features and scores.

    A sum is finite only if every term is: one pass and no mask, 3x cheaper than
    ``isfinite().all()`` on the clean batches that are the rule. A sum that overflows
    falls back to the exact check.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum()):
            return True
    return bool(np.isfinite(values).all())


def find_bad_rows(matrix: np.ndarray, features: tuple[str, ...],
                  source: pa.RecordBatch | None = None) -> BadRows | None:
    """``None`` when every value is finite (the common, fast case); otherwise which rows
    are bad and why: the first offending column, and whether it is null/NaN, infinite, or
    (looked up in ``source``, the batch the matrix came from) a finite value too large
    for float32, which the models take."""
    if all_finite(matrix):
        return None
    finite = np.isfinite(matrix)
    good = finite.all(axis=1)
    bad_idx = np.flatnonzero(~good)
    reasons = []
    for i in bad_idx:
        j = int(np.argmin(finite[i]))
        reasons.append(f"{features[j]} is {_kind(matrix[i, j], features[j], int(i), source)}")
    return BadRows(mask=~good, reasons=reasons)


def _kind(value: float, feature: str, row: int, source: pa.RecordBatch | None) -> str:
    if np.isnan(value):
        return "null or NaN"
    if source is not None and feature in source.schema.names:
        original = source.column(feature)[row].as_py()
        if isinstance(original, (int, float, decimal.Decimal)) and math.isfinite(original):
            return f"{float(original):g}, beyond float32's range (±3.4e38)"
    return "infinite"
