"""Ids that appear in more than one partition of the ensemble table.

Within a partition a repeated id fails it (its scores could not be told apart). Across
partitions it is often legitimate (hive partitions by date repeat customer ids), so the
table keeps one row per partition, as the input had, and the run reports the repeats
instead of failing or merging them.

Cheap first: Parquet footer statistics give each file's id range, and when no two ranges
overlap no id can repeat, which is the common case of disjoint id ranges. Otherwise the id
columns are read and counted, integer ids a hash bucket at a time so memory stays bounded
however large the table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.fs import parquet_file
from tasks.merge import batches_by_row_group

__all__ = ["RepeatedIds", "find_repeated_ids"]

BUCKET_ROWS = 4_000_000  # ids counted at once: ~0.2 GB of hash table for int64 ids


@dataclass
class RepeatedIds:
    """``count`` distinct ids found in two or more partitions; a few with their files."""

    count: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)


def _ranges(paths: list[str], column: str) -> list[tuple[Any, Any]] | None:
    """Each file's (min, max) id from its footer statistics, or None if any lacks them."""
    out = []
    for path in paths:
        meta = parquet_file(path).metadata
        if meta.num_rows == 0:
            continue
        index = meta.schema.to_arrow_schema().get_field_index(column)
        lo = hi = None
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
        out.append((lo, hi))
    return out


def _disjoint(ranges: list[tuple[Any, Any]]) -> bool:
    ordered = sorted(ranges)
    return all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(ordered))


def _bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    """A bucket per id; equal ids always share one, which is all correctness needs."""
    if buckets == 1:
        return np.zeros(len(ids), dtype=np.int64)
    t = ids.type
    if pa.types.is_integer(t):
        values = np.asarray(ids.cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False))
        mixed = (values.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        return (mixed % np.uint64(buckets)).astype(np.int64)
    # Other types (strings, mostly): by byte length, coarse but deterministic.
    if not any(f(t) for f in (pa.types.is_string, pa.types.is_large_string,
                              pa.types.is_binary, pa.types.is_large_binary)):
        ids = ids.cast(pa.string())
    return np.asarray(pc.binary_length(ids).to_numpy(zero_copy_only=False)) % buckets


def find_repeated_ids(paths: dict[str, str], column: str, max_examples: int = 5
                      ) -> RepeatedIds:
    """``paths`` maps each partition's relative path to its committed ensemble file."""
    names = sorted(paths)  # examples list partitions in path order, whatever the run order
    files = [paths[n] for n in names]
    if len(files) < 2:
        return RepeatedIds()
    ranges = _ranges(files, column)
    if ranges is not None and _disjoint(ranges):
        return RepeatedIds()
    total = sum(parquet_file(f).metadata.num_rows for f in files)
    buckets = max(1, math.ceil(total / BUCKET_ROWS))
    result = RepeatedIds()
    for b in range(buckets):
        chunks: list[pa.Array] = []
        owners: list[np.ndarray] = []
        for i, path in enumerate(files):
            for batch in batches_by_row_group(parquet_file(path), [column], 262_144):
                ids = batch.column(0)
                mask = _bucket(ids, buckets) == b
                if mask.any():
                    chunks.append(ids.filter(pa.array(mask)))
                    owners.append(np.full(int(mask.sum()), i, dtype=np.int32))
        if not chunks:
            continue
        ids_b = pa.chunked_array(chunks)
        counts = pc.value_counts(ids_b)
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        result.count += len(repeated)
        want = max_examples - len(result.examples)
        if want > 0 and len(repeated):
            sample = repeated.slice(0, want)
            where = np.concatenate(owners)
            hits = np.asarray(pc.is_in(ids_b, value_set=sample).to_numpy(zero_copy_only=False))
            hit_ids = ids_b.filter(pa.array(hits)).to_pylist()
            for value, owner in zip(hit_ids, where[hits], strict=True):
                result.examples.setdefault(str(value), []).append(names[owner])
    return result
