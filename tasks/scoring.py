"""Scoring one partition with every member, in one streaming pass: the pipeline's hot loop.

Each record batch is decoded once and fed to every member in turn; the ensemble columns
are computed from the scores still in memory and the partition's slice of the table is
written batch by batch and committed atomically. Decoding the batch once per partition,
not once per member, and merging in the same pass, not by re-reading per-member files,
each saved a sizeable share of the CPU on the benchmark workload (see BENCHMARKS.md).

The committed file remembers what produced it (partition fingerprint, member digests,
method, bad-row policy) in its footer, so a re-run skips an unchanged partition without
reading it, and when one checkpoint is replaced, scores only that member and takes the
others' scores from the previous file.

Input and output may be on S3 (``tasks.fs``): only where files are opened, hidden and
committed differs (``tasks.storage``); the loop over batches is the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from loaders.cache import MODEL_CACHE
from loaders.errors import DataError, ModelLoadError
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import BadRowPolicy, Manifest
from tasks.features import all_finite, find_bad_rows, to_matrix
from tasks.merge import (
    EnsembleMethod,
    EnsembleStats,
    PartitionMerged,
    RowStream,
    batches_by_row_group,
    combine,
    read_ahead,
)
from tasks.partitions import Partition
from tasks.storage import ENSEMBLE_DIR, QUARANTINE_DIR, Store, open_parquet, store_for

__all__ = [
    "METADATA_KEY",
    "MemberStats",
    "PartitionResult",
    "PartitionScored",
    "committed_metadata",
    "score_partition",
]

METADATA_KEY = b"ensemble_scoring"
_SHOW_IDS = 5


class MemberStats(BaseModel):
    """One member's figures on one partition (small: it crosses task boundaries)."""

    name: str
    digest: str
    rows: int
    seconds: float
    skipped: bool = False


class PartitionScored(BaseModel):
    relpath: str
    rows: int  # rows read from the input (0 when the partition was reused whole)
    scored_rows: int
    bad_rows: int
    seconds: float
    members: list[MemberStats]
    first_batch_at: float | None = None  # wall clock when the first batch was scored
    # Which process scored it and that process's model loads so far (digest -> count):
    # with process or Dask workers, the flow adds these up to check "once per process".
    process: str = ""
    loads: dict[str, int] = {}


class PartitionResult(BaseModel):
    scored: PartitionScored
    merged: PartitionMerged


def committed_metadata(store: Store, rel: str) -> dict[str, Any] | None:
    """The provenance stored in a committed ensemble file's footer, if readable."""
    meta = store.footer_metadata(rel)
    try:
        return json.loads(meta[METADATA_KEY]) if meta else None  # type: ignore[no-any-return]
    except (KeyError, ValueError):
        return None


def _ids_text(ids: pa.Array, mask: np.ndarray | None = None) -> str:
    picked = (ids.filter(pa.array(mask)) if mask is not None else ids)[:_SHOW_IDS].to_pylist()
    return f"ids {picked}{' ...' if len(picked) == _SHOW_IDS else ''}"


def _schema(id_field: pa.Field, names: list[str]) -> pa.Schema:
    return pa.schema(
        [id_field]
        + [pa.field(f"score_{n}", pa.float32()) for n in names]
        + [pa.field("ensemble_score", pa.float32()), pa.field("ensemble_std", pa.float32()),
           pa.field("n_members", pa.int32())]
    )


def _check_unique(partition: Partition, chunks: list[pa.Array]) -> None:
    if not chunks:
        return
    ids = pa.chunked_array(chunks)
    if ids.null_count:
        raise DataError(
            f"partition {partition.relpath}: {ids.null_count} row(s) have no id (null in "
            "the id column); every row needs an id to be told apart. Fill or drop them"
        )
    if pa.types.is_integer(ids.type):
        # Fast path for the common case (ids increasing): 1 ms instead of a hash pass.
        values = ids.to_numpy()
        if len(values) < 2 or bool(np.all(values[1:] > values[:-1])):
            return
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    raise DataError(
        f"partition {partition.relpath}: {len(dupes)} id(s) appear more than once "
        f"({dupes[:_SHOW_IDS].to_pylist()}{' ...' if len(dupes) > _SHOW_IDS else ''}); ids "
        "must be unique, so their scores cannot be told apart. De-duplicate the input"
    )


# Members of one batch run concurrently: Session.run releases the GIL, and TensorFlow's
# shared intra-op pool keeps the cores busier with several graphs in flight than with one
# at a time (measured 0.51 -> 0.68 M row-model evaluations/s on the 2-core benchmark
# machine). Shared by every task in the process, sized for a few partitions' members.
_MEMBER_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="member")


def _predict_members(scorers: dict[int, Any], matrix: np.ndarray, scores: np.ndarray,
                     seconds: dict[int, float]) -> None:
    def run(k: int) -> None:
        t0 = time.perf_counter()
        scores[k] = scorers[k].predict(matrix)
        seconds[k] += time.perf_counter() - t0

    if len(scorers) == 1:
        run(next(iter(scorers)))
        return
    for future in [_MEMBER_POOL.submit(run, k) for k in scorers]:
        future.result()


def score_partition(
    partition: Partition,
    manifest: Manifest,
    output_dir: str,
    *,
    method: EnsembleMethod = "mean",
    batch_size: int = 16_384,
    bad_rows: BadRowPolicy = "fail",
    force: bool = False,
) -> PartitionResult:
    """Write ``OUTPUT/ensemble/<relpath>`` for ``partition``, reusing what is still valid.

    Raises:
        DataError: unreadable partition, bad rows under ``fail``, duplicate ids.
        ModelLoadError: a member cannot be loaded, returns the wrong shape, or returns
            non-finite scores under ``fail``.
    """
    start = time.perf_counter()
    store = store_for(output_dir)
    target = f"{ENSEMBLE_DIR}/{partition.relpath}"
    qtarget = f"{QUARANTINE_DIR}/{partition.relpath}"
    names = manifest.member_names
    digests = {s.name: digest_files(resolve_model(s).files) for s in manifest.models}
    weights = np.array(manifest.weights, dtype=np.float64)  # normalized, finite
    provenance = {
        "partition": partition.relpath,
        "fingerprint": partition.fingerprint,
        "id_column": manifest.id_column,
        "features": list(manifest.features),
        "bad_rows": bad_rows,
        "method": method,
        "weights": weights.tolist(),
        "members": digests,
    }
    prev = None if force else committed_metadata(store, target)
    same_input = bool(prev) and all(
        prev.get(k) == provenance[k]  # type: ignore[union-attr]
        for k in ("fingerprint", "id_column", "features", "bad_rows")
    )
    reuse = [n for n in names if same_input and prev["members"].get(n) == digests[n]]  # type: ignore[index]
    if prev and len(reuse) == len(names) and prev.get("method") == method and (
            prev.get("weights") == provenance["weights"]):
        stats = PartitionMerged.model_validate(prev["stats"] | {"path": store.uri(target)})
        members = [MemberStats(name=n, digest=digests[n], rows=0, seconds=0.0, skipped=True)
                   for n in names]
        return PartitionResult(
            scored=PartitionScored(relpath=partition.relpath, rows=0, scored_rows=0,
                                   bad_rows=int(prev.get("bad_row_count", 0)),
                                   seconds=time.perf_counter() - start, members=members),
            merged=stats,
        )

    # Whatever is committed is now stale: move it out of readers' sight first, keeping it
    # (hidden) only as the source of the members' scores that are still valid.
    previous: str | None = None
    if reuse:
        previous = store.hide(target)
    else:
        store.delete(target)  # nothing in it is still valid: no need to keep it
    try:
        return _score(partition, manifest, store, target, qtarget, names, digests, weights,
                      provenance, reuse if previous else [], previous, method, batch_size,
                      bad_rows, start)
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):
                store.delete(previous)


def _score(partition: Partition, manifest: Manifest, store: Store, target: str,
           qtarget: str, names: list[str], digests: dict[str, str],
           weights: np.ndarray, provenance: dict[str, Any], reuse: list[str],
           previous: str | None,
           method: EnsembleMethod, batch_size: int, bad_rows: BadRowPolicy, start: float
           ) -> PartitionResult:
    n_features = len(manifest.features)
    todo = [k for k, n in enumerate(names) if n not in reuse]
    reused = [k for k, n in enumerate(names) if n in reuse]
    scorers = {k: MODEL_CACHE.get(manifest.models[k], n_features) for k in todo}
    try:
        reader = open_parquet(partition.path)
        id_field = reader.schema_arrow.field(manifest.id_column)
        expected_rows = reader.metadata.num_rows
    except OSError:
        raise  # possibly transient (a flaky disk or network mount): the retry policy decides
    except (pa.ArrowException, KeyError) as err:
        raise DataError(
            f"partition {partition.relpath} cannot be read as Parquet ({err}); re-export or "
            "remove it, then re-run: partitions already committed are kept"
        ) from err
    schema = _schema(id_field, names)
    qschema = pa.schema([id_field, pa.field("reason", pa.string())])
    # RowStream hands the open file to pq.ParquetFile; closed when the stream is dropped.
    prev_rows = (RowStream(store.open_input(previous), [manifest.id_column]
                           + [f"score_{names[k]}" for k in reused])
                 if reused and previous is not None else None)
    stats = EnsembleStats(len(names), expected_rows)
    seconds = dict.fromkeys(todo, 0.0)
    rows = scored = n_bad = 0
    first_batch_at: float | None = None
    buffer: np.ndarray | None = None
    id_chunks: list[pa.Array] = []
    dictionary = [manifest.id_column] if not (pa.types.is_integer(id_field.type)
                                              or pa.types.is_floating(id_field.type)) else False

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(store.staged(target))
        writer = stack.enter_context(pq.ParquetWriter(sink, schema, use_dictionary=dictionary))
        quarantine: pq.ParquetWriter | None = None

        def set_aside(ids: pa.Array, mask: np.ndarray, reasons: list[str]) -> None:
            nonlocal quarantine
            if quarantine is None:
                qsink = stack.enter_context(store.staged(qtarget))
                quarantine = stack.enter_context(pq.ParquetWriter(qsink, qschema))
            quarantine.write_batch(pa.record_batch(
                [ids.filter(pa.array(mask)), pa.array(reasons, pa.string())], schema=qschema))

        try:
            # Single-threaded decode, one batch ahead on a helper thread (read_ahead):
            # TensorFlow already keeps every core busy, and Arrow's own decode threads only
            # contended with it (measured ~3x slower decode).
            for batch in read_ahead(batches_by_row_group(
                    reader, [manifest.id_column, *manifest.features], batch_size)):
                rows += batch.num_rows
                matrix = to_matrix(batch, manifest.features, buffer)
                buffer = matrix.base if matrix.base is not None else matrix
                ids = batch.column(0)
                bad = find_bad_rows(matrix, manifest.features)
                if bad is not None:
                    n_bad += bad.count
                    if bad_rows == "fail":
                        cols = sorted({r.split(" is ")[0] for r in bad.reasons})
                        raise DataError(
                            f"partition {partition.relpath}: {bad.count} row(s) with null, NaN "
                            f"or infinite features ({_ids_text(ids, bad.mask)}, column(s) "
                            f"{cols}); clean the data, or pass --bad-rows quarantine to set "
                            "them aside"
                        )
                    set_aside(ids, bad.mask, bad.reasons)
                    keep = ~bad.mask
                    matrix = np.ascontiguousarray(matrix[keep])
                    ids = ids.filter(pa.array(keep))
                n = len(matrix)
                # (members, rows): each member fills a contiguous row, and the ensemble
                # columns reduce over whole rows (see combine).
                scores = np.empty((len(names), n), dtype=np.float32)
                if prev_rows is not None:
                    old = prev_rows.take(n)
                    if not old.column(0).combine_chunks().equals(ids):
                        raise DataError(
                            f"partition {partition.relpath}: the previous table's ids differ "
                            "from the input's; re-run with --force"
                        )
                    for j, k in enumerate(reused):
                        scores[k] = old.column(j + 1).to_numpy()
                _predict_members(scorers, matrix, scores, seconds)
                if first_batch_at is None:
                    first_batch_at = time.time()
                if not all_finite(scores):
                    finite = np.isfinite(scores)
                    broken: np.ndarray = ~finite.all(axis=0)  # type: ignore[assignment]
                    culprits = [names[k] for k in range(len(names)) if not finite[k].all()]
                    if bad_rows == "fail":
                        raise ModelLoadError(
                            f"model(s) {culprits} returned non-finite scores for "
                            f"{int(broken.sum())} row(s) of partition {partition.relpath} "
                            f"({_ids_text(ids, broken)}); check the model and these rows, or "
                            "pass --bad-rows quarantine to set them aside"
                        )
                    reasons = [
                        "non-finite score from " + ", ".join(
                            names[k] for k in np.flatnonzero(~finite[:, i]))
                        for i in np.flatnonzero(broken)
                    ]
                    n_bad += len(reasons)
                    set_aside(ids, broken, reasons)
                    scores = scores[:, ~broken]
                    ids = ids.filter(pa.array(~broken))
                ens, std, count = combine(scores, method, weights)
                stats.add(scores, ens, std)
                scored += len(ens)
                id_chunks.append(ids)
                writer.write_batch(pa.record_batch(
                    [ids, *(pa.array(scores[k]) for k in range(len(names))),
                     pa.array(ens), pa.array(std), pa.array(count)], schema=schema))
        except pa.ArrowException as err:
            if isinstance(err, OSError):
                raise  # may be transient: the task's retry policy decides
            raise DataError(
                f"partition {partition.relpath} is corrupt or truncated after {rows} rows "
                f"({err}); re-export or remove it, then re-run: partitions already "
                "committed are kept"
            ) from err
        _check_unique(partition, id_chunks)
        merged = stats.result(partition.relpath, store.uri(target))
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(
            provenance | {"bad_row_count": n_bad,
                          "stats": merged.model_dump(exclude={"path"})})})
        writer.close()
        if quarantine is not None:
            quarantine.close()
        else:
            store.delete(qtarget)  # from an earlier run of this partition; no longer true
    members = [
        MemberStats(name=n, digest=digests[n], rows=0 if k in reused else scored,
                    seconds=seconds.get(k, 0.0), skipped=k in reused)
        for k, n in enumerate(names)
    ]
    return PartitionResult(
        scored=PartitionScored(relpath=partition.relpath, rows=rows, scored_rows=scored,
                               bad_rows=n_bad, seconds=time.perf_counter() - start,
                               members=members, first_batch_at=first_batch_at,
                               process=f"{socket.gethostname()}:{os.getpid()}",
                               loads=dict(MODEL_CACHE.loads)),
        merged=merged,
    )
