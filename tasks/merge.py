"""Combining member scores into the ensemble columns, and the figures the report needs.

Runs inside the scoring pass, batch by batch, on scores still in memory: a separate merge
step re-reading per-member files cost about as much as decoding the input again.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks.features import all_finite

__all__ = [
    "HISTOGRAM_BINS",
    "EnsembleMethod",
    "EnsembleStats",
    "PartitionMerged",
    "RowStream",
    "batches_by_row_group",
    "combine",
    "read_ahead",
]

EnsembleMethod = Literal["mean", "weighted", "median"]
HISTOGRAM_BINS = 20
SAMPLE_ROWS = 1000


class PartitionMerged(BaseModel):
    """One partition's slice of the table plus the sums the run report is built from.

    Sums (not means) so partitions add up exactly; ``cross`` is the members' score
    cross-product matrix, from which the report derives their pairwise correlations.
    """

    relpath: str
    rows: int
    path: str
    score_sum: float
    score_sumsq: float
    std_sum: float
    score_min: float
    score_max: float
    member_sum: list[float]
    member_sumsq: list[float]
    cross: list[list[float]]
    sample_score: list[float]  # up to SAMPLE_ROWS evenly spaced rows, for histograms
    sample_std: list[float]


def combine(
    scores: np.ndarray, method: EnsembleMethod, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble score, population std (ddof 0) and member count per row of a
    (members, rows) score matrix.

    Members are rows, not columns: every reduction then runs over whole contiguous rows,
    which measured ~6x less CPU than reducing across a (rows, members) matrix's short
    axis (89 -> 16 ms per 1M rows of 4 members). Non-finite member scores are left out of
    a row's figures (and of its count).
    """
    k = scores.shape[0]
    if all_finite(scores):
        n = np.full(scores.shape[1], k)
        mean = np.add.reduce(scores, axis=0, dtype=np.float64) / k
        deviation = scores - mean
        std = np.sqrt(np.add.reduce(deviation * deviation, axis=0) / k)
        if method == "median":
            ens = np.median(scores.astype(np.float64), axis=0)
        elif method == "weighted":
            ens = (weights / weights.sum()) @ scores.astype(np.float64)
        else:
            ens = mean
    else:
        finite = np.isfinite(scores)
        n = finite.sum(axis=0)
        masked = np.where(finite, scores, np.nan).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.nanstd(masked, axis=0)
            if method == "median":
                ens = np.nanmedian(masked, axis=0)
            elif method == "weighted":
                w = finite * weights[:, None]
                ens = np.nansum(masked * weights[:, None], axis=0) / w.sum(axis=0)
            else:
                ens = np.nanmean(masked, axis=0)
    return ens.astype(np.float32), std.astype(np.float32), n.astype(np.int32)


class EnsembleStats:
    """Accumulates a partition's report figures batch by batch."""

    def __init__(self, members: int, expected_rows: int) -> None:
        self.rows = 0
        self.ssum = self.ssq = self.stdsum = 0.0
        self.smin, self.smax = np.inf, -np.inf
        self.msum = np.zeros(members)
        self.cross = np.zeros((members, members))
        self.stride = max(1, expected_rows // SAMPLE_ROWS)
        self.samples: list[np.ndarray] = []
        self.std_samples: list[np.ndarray] = []

    def add(self, scores: np.ndarray, ens: np.ndarray, std: np.ndarray) -> None:
        """``scores``: (members, rows), as for ``combine``."""
        if len(ens):
            m64 = scores.astype(np.float64)
            if not all_finite(scores):
                m64[~np.isfinite(m64)] = 0.0
            self.msum += m64.sum(axis=1)
            self.cross += m64 @ m64.T
            first = (-self.rows) % self.stride
            self.samples.append(ens[first::self.stride])
            self.std_samples.append(std[first::self.stride])
            e64 = ens.astype(np.float64)
            self.ssum += float(e64.sum())
            self.ssq += float((e64 * e64).sum())
            self.stdsum += float(std.sum(dtype=np.float64))
            self.smin = min(self.smin, float(np.nanmin(ens)))
            self.smax = max(self.smax, float(np.nanmax(ens)))
        self.rows += len(ens)

    def result(self, relpath: str, path: str) -> PartitionMerged:
        def concat(parts: list[np.ndarray]) -> list[float]:
            if not parts:
                return []
            return np.concatenate(parts).astype(np.float64)[:SAMPLE_ROWS].tolist()  # type: ignore[no-any-return]

        return PartitionMerged(
            relpath=relpath, rows=self.rows, path=path, score_sum=self.ssum,
            score_sumsq=self.ssq, std_sum=self.stdsum,
            score_min=self.smin if self.rows else 0.0, score_max=self.smax if self.rows else 0.0,
            member_sum=self.msum.tolist(), member_sumsq=np.diag(self.cross).tolist(),
            cross=self.cross.tolist(), sample_score=concat(self.samples),
            sample_std=concat(self.std_samples),
        )


# Rows decoded per call into the Parquet reader. Decoding costs per call as well as per
# row: a 1M-row, 33-column partition took 0.37 s of CPU in 16k-row calls and 0.17 s in
# 128k-row ones (0.13 s for whole 256k-row groups). Large enough to amortise that, small
# enough (~17 MB for 33 columns) that a huge row group is never decoded at once.
DECODE_ROWS = 131_072


def batches_by_row_group(reader: pq.ParquetFile, columns: list[str], batch_size: int
                         ) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_size`` rows, decoded one row group at a time on
    the calling thread, ``DECODE_ROWS`` rows per decode call and sliced without copying.

    A single ``iter_batches`` over every row group kept each decoded row group's memory
    until the end of the file (pyarrow 26: 2 GiB of Arrow memory for a 10M-row, 32-feature
    partition); per row group it stays at one row group's worth (0.13 GiB). Single-threaded
    because TensorFlow already keeps every core busy; Arrow's decode threads only
    contended with it (measured ~3x slower decode).
    """
    decode_rows = max(batch_size, DECODE_ROWS)
    for group in range(reader.num_row_groups):
        for chunk in reader.iter_batches(batch_size=decode_rows, columns=columns,
                                         row_groups=[group], use_threads=False):
            for start in range(0, chunk.num_rows, batch_size):
                yield chunk.slice(start, batch_size)


T = TypeVar("T")

# Each partition being scored has at most one job here at a time; with more than 16 in
# flight in one process, the extra ones wait their turn (no job waits on another job).
# After Ctrl-C the pool takes no new jobs, so partitions still being scored fail at their
# next batch, uncommitted, instead of running to their end.
_READ_AHEAD_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="read-ahead")
_END = object()


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items``, with the next one always being produced on another thread while the
    caller works on the current one.

    Decoding releases the GIL, so a partition's next batch decodes while its members score
    the current one. A partition scored alone went from 0.60-0.74 to 0.80 M row-model
    evaluations/s (3 pairs); with two in flight, the default, no difference showed (6
    pairs). At most one item is produced ahead; an error producing it is raised here, in
    the caller's thread, when that item is asked for.
    """
    pending = _READ_AHEAD_POOL.submit(next, items, _END)
    while True:
        item = pending.result()
        if item is _END:
            return
        pending = _READ_AHEAD_POOL.submit(next, items, _END)
        yield item  # type: ignore[misc]


class RowStream:
    """Reads a Parquet file front to back in slices of any requested length, whatever
    its row groups, so a previous table can be walked in step with a new input pass."""

    def __init__(self, source: str | Any, columns: list[str], batch_size: int = 65_536
                 ) -> None:
        """``source``: a local path or an open file (as for ``pq.ParquetFile``)."""
        self._iter = batches_by_row_group(pq.ParquetFile(source), columns, batch_size)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0

    def take(self, n: int) -> pa.Table:
        while self._buffered < n:
            batch = next(self._iter, None)
            if batch is None:
                break
            self._buffer.append(batch)
            self._buffered += batch.num_rows
        table = pa.Table.from_batches(self._buffer) if self._buffer else None
        if table is None or table.num_rows < n:
            raise ValueError(f"previous table ended after {0 if table is None else table.num_rows}"
                             f" of {n} rows")
        head, rest = table.slice(0, n), table.slice(n)
        self._buffer = rest.to_batches()
        self._buffered = rest.num_rows
        return head.combine_chunks()
