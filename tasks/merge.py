"""Merging member outputs of one partition into its slice of the ensemble table.

Member files are streamed in lockstep, their ids checked to match row for row, and the
ensemble columns computed with numpy; the slice is committed atomically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from loaders.errors import DataError
from loaders.manifest import Manifest
from tasks.partitions import Partition
from tasks.storage import ENSEMBLE_DIR, member_path, safe_join, staged

__all__ = ["EnsembleMethod", "PartitionMerged", "aligned_batches", "combine", "merge_partition"]

EnsembleMethod = Literal["mean", "weighted", "median"]
HISTOGRAM_BINS = 20


SAMPLE_ROWS = 1000


class PartitionMerged(BaseModel):
    """One partition's slice of the table plus the sums the run report is built from.

    Sums (not means) so partitions add up exactly; ``cross`` is the members' score
    cross-product matrix, from which the flow derives their pairwise correlations.
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


def aligned_batches(
    readers: Sequence[pq.ParquetFile], batch_size: int
) -> Iterator[list[pa.RecordBatch]]:
    """Yield equal-length slices of every file, in order, whatever their row groups are."""
    iters = [r.iter_batches(batch_size=batch_size) for r in readers]
    current: list[pa.RecordBatch | None] = [None] * len(iters)
    offsets = [0] * len(iters)
    while True:
        for k, it in enumerate(iters):
            while current[k] is None or offsets[k] >= current[k].num_rows:  # type: ignore[union-attr]
                nxt = next(it, None)
                if nxt is None:
                    return
                current[k], offsets[k] = nxt, 0
        n = min(c.num_rows - o for c, o in zip(current, offsets, strict=True))  # type: ignore[union-attr]
        yield [c.slice(o, n) for c, o in zip(current, offsets, strict=True)]  # type: ignore[union-attr]
        offsets = [o + n for o in offsets]


def combine(
    scores: np.ndarray, method: EnsembleMethod, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble score, population std (ddof 0) and member count per row of (rows, members)."""
    finite = np.isfinite(scores)
    n = finite.sum(axis=1)
    if finite.all():
        s64 = scores.astype(np.float64)
        std = s64.std(axis=1)
        if method == "median":
            ens = np.median(s64, axis=1)
        elif method == "weighted":
            ens = s64 @ (weights / weights.sum())
        else:
            ens = s64.mean(axis=1)
    else:
        masked = np.where(finite, scores, np.nan).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.nanstd(masked, axis=1)
            if method == "median":
                ens = np.nanmedian(masked, axis=1)
            elif method == "weighted":
                w = finite * weights
                ens = np.nansum(masked * weights, axis=1) / w.sum(axis=1)
            else:
                ens = np.nanmean(masked, axis=1)
    return ens.astype(np.float32), std.astype(np.float32), n.astype(np.int32)


def merge_partition(
    partition: Partition,
    manifest: Manifest,
    output_dir: str,
    *,
    method: EnsembleMethod = "mean",
    batch_size: int = 262_144,
) -> PartitionMerged:
    """Write ``DIR/ensemble/<relpath>`` from the committed member outputs.

    Raises:
        DataError: a member output is missing, or the members' ids differ.
    """
    out = Path(output_dir)
    names = manifest.member_names
    files = [member_path(out, name, partition.relpath) for name in names]
    missing = [n for n, f in zip(names, files, strict=True) if not f.is_file()]
    if missing:
        raise DataError(
            f"partition {partition.relpath}: no committed output for member(s) {missing}; "
            "re-run to score them"
        )
    readers = [pq.ParquetFile(f) for f in files]
    counts = {n: r.metadata.num_rows for n, r in zip(names, readers, strict=True)}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"partition {partition.relpath}: members scored different row counts {counts}; "
            "re-run with --force to rescore this partition"
        )
    weights = np.array([m.weight for m in manifest.models], dtype=np.float64)
    id_field = readers[0].schema_arrow.field(0)
    schema = pa.schema(
        [id_field]
        + [pa.field(f"score_{n}", pa.float32()) for n in names]
        + [
            pa.field("ensemble_score", pa.float32()),
            pa.field("ensemble_std", pa.float32()),
            pa.field("n_members", pa.int32()),
        ]
    )
    rows = 0
    ssum = ssq = stdsum = 0.0
    smin, smax = np.inf, -np.inf
    k = len(names)
    msum = np.zeros(k)
    cross = np.zeros((k, k))
    total_rows = readers[0].metadata.num_rows
    stride = max(1, total_rows // SAMPLE_ROWS)
    samples: list[np.ndarray] = []
    std_samples: list[np.ndarray] = []
    target = safe_join(out / ENSEMBLE_DIR, partition.relpath)
    with staged(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batches in aligned_batches(readers, batch_size):
            ids = batches[0].column(0)
            for name, b in zip(names[1:], batches[1:], strict=True):
                if not b.column(0).equals(ids):
                    raise DataError(
                        f"partition {partition.relpath}: ids of member {name!r} do not match "
                        f"those of {names[0]!r} near row {rows}; member outputs are from "
                        "different inputs. Re-run with --force"
                    )
            cols = [b.column(1) for b in batches]
            matrix = np.column_stack([c.to_numpy(zero_copy_only=False) for c in cols])
            ens, std, n = combine(matrix, method, weights)
            writer.write_batch(pa.record_batch(
                [ids, *cols, pa.array(ens), pa.array(std), pa.array(n)], schema=schema
            ))
            if len(ens):
                m64 = matrix.astype(np.float64)
                m64[~np.isfinite(m64)] = 0.0
                msum += m64.sum(axis=0)
                cross += m64.T @ m64
                first = (-rows) % stride
                samples.append(ens[first::stride])
                std_samples.append(std[first::stride])
            rows += len(ens)
            if len(ens):
                e64 = ens.astype(np.float64)
                ssum += float(e64.sum())
                ssq += float((e64 * e64).sum())
                stdsum += float(std.sum(dtype=np.float64))
                smin = min(smin, float(np.nanmin(ens)))
                smax = max(smax, float(np.nanmax(ens)))
    return PartitionMerged(relpath=partition.relpath, rows=rows, path=str(target),
                           score_sum=ssum, score_sumsq=ssq, std_sum=stdsum,
                           score_min=smin if rows else 0.0, score_max=smax if rows else 0.0,
                           member_sum=msum.tolist(), member_sumsq=np.diag(cross).tolist(),
                           cross=cross.tolist(),
                           sample_score=_concat(samples)[:SAMPLE_ROWS].tolist(),
                           sample_std=_concat(std_samples)[:SAMPLE_ROWS].tolist())


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
