"""Ids that appear in more than one partition of the ensemble table.

Within a partition a repeated id fails it (its scores could not be told apart). Across
partitions it is often legitimate (hive partitions by date repeat customer ids), so the
table keeps one row per partition, as the input had, and the run reports the repeats
instead of failing or merging them.

Cheap first: Parquet footer statistics give each file's id range, and a file whose range
overlaps no other file's cannot share an id, so it is not read (with disjoint ranges, the
common case, nothing is). The other files' id columns are read once, hashed into buckets
spilled to temporary Arrow files, and counted a bucket at a time, so memory stays bounded
however large the table.

Beyond ``MAX_CHECKED`` ids the check keeps a hash slice of them: only ids whose hash
falls in 1/k of the hash space. Equal ids hash alike, so an id kept in one file is kept
in every file: each repeat found is real, and k times their number estimates the total.
Time and spill stay bounded (about ``MAX_CHECKED`` ids) whatever the table's size.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from loaders.errors import DataError
from tasks.reading import batches_by_row_group
from tasks.storage import open_parquet

__all__ = ["RepeatedIds", "find_repeated_ids"]

BUCKET_ROWS = 4_000_000  # ids counted at once: ~0.2 GB of hash table for int64 ids
MAX_BUCKETS = 256  # open spill files at once
MAX_CHECKED = 50_000_000  # ids checked exactly; beyond, a hash slice of them
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class RepeatedIds:
    """``count`` distinct ids found in two or more partitions; a few with their files.
    With ``sampled`` k > 1, only 1/k of the ids (a hash slice) were checked, and
    ``count`` is the estimate: k times the repeats found."""

    count: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    sampled: int = 1


def _id_type(types: list[pa.DataType], names: list[str]) -> pa.DataType:
    """One type every file's ids cast to without changing which ids are equal."""
    types = [t.value_type if pa.types.is_dictionary(t) else t for t in types]
    if all(t == types[0] for t in types):
        return types[0]
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64() if not any(t == pa.uint64() for t in types) else pa.decimal128(20)
    if all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in types):
        return pa.large_string()
    kinds = sorted({f"{n}: {t}" for n, t in zip(names, types, strict=True)})
    raise DataError(f"the partitions' id columns have different types ({', '.join(kinds)})")


EMPTY = (None, None)


def _range(reader: pq.ParquetFile, column: str) -> tuple[Any, Any] | None:
    """The file's (min, max) id from footer statistics: EMPTY without ids, None if
    unknown (no statistics, or statistics Python cannot convert or compare)."""
    meta = reader.metadata
    try:
        index = meta.schema.to_arrow_schema().get_field_index(column)
        lo = hi = None
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            if meta.row_group(g).num_rows == 0 or (stats is not None
                                                   and stats.null_count == stats.num_values
                                                   and not stats.has_min_max):
                continue
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    except (TypeError, ValueError, pa.ArrowException):
        return None
    return EMPTY if lo is None else (lo, hi)


def _overlapping(ranges: list[tuple[Any, Any] | None]) -> list[int]:
    """Indices of the files that may share an id with another (unknown ranges included)."""
    try:
        known = sorted((r[0], r[1], i) for i, r in enumerate(ranges)
                       if r is not None and r != EMPTY)
    except TypeError:  # ranges of types that do not compare: read every file
        return [i for i, r in enumerate(ranges) if r != EMPTY]
    hit = {i for i, r in enumerate(ranges) if r is None}
    if hit and known:  # a file of unknown range may share ids with any other
        hit.update(i for _, _, i in known)
    reach: Any = None
    owner = -1
    for lo, hi, i in known:
        if reach is not None and lo <= reach:
            hit.update((owner, i))
        if reach is None or hi > reach:
            reach, owner = hi, i
    return sorted(hit) if len(hit) > 1 else []


def _hash(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash per id from its value; equal ids always hash alike."""
    t = ids.type
    if pa.types.is_integer(t):
        values = ids.cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)
        h = np.asarray(values).view(np.uint64) * _MIX
    else:
        # Bytes of the value: its length and its first and last 8 bytes, which tell apart
        # UUIDs, zero-padded codes and most other fixed-width ids.
        if not any(f(t) for f in (pa.types.is_string, pa.types.is_large_string,
                                  pa.types.is_binary, pa.types.is_large_binary)):
            ids = ids.cast(pa.large_string())  # decimals, timestamps, ...: their text
        arr = ids.cast(pa.large_binary())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
            arr.offset:arr.offset + len(arr) + 1]
        data = np.frombuffer(arr.buffers()[2] or b"\0", dtype=np.uint8)
        starts, ends = offsets[:-1], offsets[1:]
        h = (ends - starts).astype(np.uint64) * _MIX
        top = len(data) - 1
        for k in range(8):
            first, last = starts + k, ends - 1 - k
            # Past the value's end: 0, never a neighbour's byte (batches differ).
            head = np.where(first < ends, data[np.minimum(first, top)], 0)
            tail = np.where(last >= starts, data[np.clip(last, 0, top)], 0)
            h = (h ^ head.astype(np.uint64)) * _MIX
            h = (h ^ tail.astype(np.uint64)) * _MIX
    return h  # type: ignore[no-any-return]


def _bucket(h: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of each hash (its high bits)."""
    return (h >> np.uint64(33)) % np.uint64(buckets)  # type: ignore[no-any-return]


def _kept(h: np.ndarray, every: int) -> np.ndarray:
    """The hash slice checked when only 1/``every`` of the ids are: the hash mixed once
    more (splitmix64's finalizer, so every bit depends on every input bit; the raw hash's
    low bits follow the ids' last digits), its low bits apart from the bucket's."""
    with np.errstate(over="ignore"):
        z = h ^ (h >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0xFFFFFFFF)) % np.uint64(every) == 0  # type: ignore[no-any-return]


def find_repeated_ids(paths: dict[str, str], column: str, max_examples: int = 5
                      ) -> RepeatedIds:
    """``paths`` maps each partition's relative path to its committed ensemble file.

    Raises:
        DataError: the id columns have types that cannot be compared.
    """
    names = sorted(paths)  # examples list partitions in path order, whatever the run order
    files = [paths[n] for n in names]
    if len(files) < 2:
        return RepeatedIds()
    opened = [open_parquet(f) for f in files]  # footers only; I/O errors are the caller's
    suspects = _overlapping([_range(r, column) for r in opened])
    if not suspects:
        return RepeatedIds()
    readers = {i: opened[i] for i in suspects}
    id_type = _id_type([r.schema_arrow.field(column).type for r in readers.values()],
                       [names[i] for i in suspects])
    total = sum(r.metadata.num_rows for r in readers.values())
    every = max(1, math.ceil(total / MAX_CHECKED))
    buckets = min(MAX_BUCKETS, max(1, math.ceil(total / every / BUCKET_ROWS)))
    schema = pa.schema([pa.field("id", id_type), pa.field("owner", pa.int32())])
    result = RepeatedIds(sampled=every)
    with tempfile.TemporaryDirectory(prefix="ensemble-ids-") as tmp:
        spill = [Path(tmp) / f"{b}.arrow" for b in range(buckets)]
        writers = [ipc.new_file(str(p), schema) for p in spill]
        try:
            for i, reader in readers.items():
                for batch in batches_by_row_group(reader, [column], 262_144):
                    ids = batch.column(0)
                    if pa.types.is_dictionary(ids.type):
                        ids = ids.dictionary_decode()
                    ids = ids.drop_null().cast(id_type)
                    h = _hash(ids) if buckets > 1 or every > 1 else None
                    if h is not None and every > 1:
                        keep = _kept(h, every)
                        ids, h = ids.filter(pa.array(keep)), h[keep]
                    where = (_bucket(h, buckets) if h is not None and buckets > 1
                             else np.zeros(len(ids), dtype=np.uint64))
                    order = np.argsort(where, kind="stable")
                    grouped = pa.record_batch(
                        [ids.take(pa.array(order)),
                         pa.array(np.full(len(ids), i, dtype=np.int32))], schema=schema)
                    bounds = np.searchsorted(where[order], np.arange(buckets + 1))
                    for b in range(buckets):
                        if bounds[b + 1] > bounds[b]:
                            writers[b].write_batch(
                                grouped.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])))
        finally:
            for w in writers:
                w.close()
        for path in spill:
            with pa.memory_map(str(path)) as source:
                table = ipc.open_file(source).read_all()
            _count(table, result, names, max_examples)
    result.count *= every
    return result


def _count(table: pa.Table, result: RepeatedIds, names: list[str], max_examples: int
           ) -> None:
    if table.num_rows == 0:
        return
    ids = table.column("id")
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    result.count += len(repeated)
    want = max_examples - len(result.examples)
    if want <= 0 or not len(repeated):
        return
    hits = pc.is_in(ids, value_set=repeated.slice(0, want))
    found = table.filter(hits)
    try:
        values = [str(v) for v in found.column("id").to_pylist()]
    except (ValueError, pa.ArrowException):  # e.g. nanoseconds, beyond Python's datetime
        values = found.column("id").cast(pa.large_string()).to_pylist()
    for value, owner in zip(values, found.column("owner").to_pylist(), strict=True):
        where = result.examples.setdefault(value, [])
        where.append(names[owner])
    for where in result.examples.values():
        where.sort()

