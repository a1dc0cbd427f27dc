"""Scoring one partition with every member, in one streaming pass: the pipeline's hot loop.

Each record batch is decoded once (one batch ahead, on another thread) and fed to the
per-batch core (``tasks.batch``), which scores it with every member and combines the
scores still in memory; the partition's writer (``tasks.writer``) writes the table batch
by batch and commits it atomically. A batch's members start scoring before the batch
before it is screened, combined and written, so TensorFlow does not wait for those
steps. Decoding the batch once per partition, not once per member, and merging in the
same pass, not by re-reading per-member files, each saved a
sizeable share of the CPU on the benchmark workload (see BENCHMARKS.md).

The committed file remembers what produced it in its footer, so a re-run skips an
unchanged partition without reading it, and when one checkpoint is replaced, scores only
that member and takes the others' scores from the previous file (``tasks.reuse``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from loaders.cache import MODEL_CACHE
from loaders.errors import DataError, PartitionAbandoned
from loaders.feed import FEED_ROWS
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import BadRowPolicy, Manifest
from tasks.batch import ScoringContext, StartedBatch, finish_batch, start_batch
from tasks.features import to_matrix
from tasks.merge import EnsembleMethod, EnsembleStats, PartitionMerged
from tasks.partitions import Partition
from tasks.reading import RowStream, batches_by_row_group, read_ahead
from tasks.reuse import Reuse, plan_reuse
from tasks.storage import ENSEMBLE_DIR, QUARANTINE_DIR, Store, open_parquet, store_for
from tasks.writer import PartitionWriter, committed_metadata

__all__ = [
    "MemberStats",
    "PartitionResult",
    "PartitionScored",
    "committed_metadata",
    "score_partition",
]


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
    sketch_seconds: float = 0.0  # of ``seconds``, spent on drift sketches
    # Which process scored it and that process's model loads so far (digest -> count):
    # with process or Dask workers, the flow adds these up to check "once per process".
    process: str = ""
    loads: dict[str, int] = {}


class PartitionResult(BaseModel):
    scored: PartitionScored
    merged: PartitionMerged


# Output folders whose stopped run's grace is over, in this process: a partition of
# theirs still scoring stops at its next batch, uncommitted, so the run record written
# next stays true and the process does not wait out a long partition before it exits.
# By folder: one run at a time holds a folder's lock.
_ABANDONED: set[str] = set()


def abandon(output_dir: str) -> None:
    """Stop this process's partitions into ``output_dir`` at their next batch."""
    _ABANDONED.add(output_dir)


def resume(output_dir: str) -> None:
    """Undo :func:`abandon`: a new run into ``output_dir`` is starting."""
    _ABANDONED.discard(output_dir)


def _check_abandoned(job: _Job) -> None:
    if job.output_dir in _ABANDONED:
        raise PartitionAbandoned(f"partition {job.partition.relpath}: the run stopped "
                                 "before it was committed; a re-run scores it")


@dataclass
class _Job:
    """One partition's scoring: where it goes and what produced it."""

    partition: Partition
    manifest: Manifest
    store: Store
    provenance: dict[str, Any]  # what produces the file, as its footer records it
    batch_size: int
    output_dir: str
    feed_rows: int = FEED_ROWS[0]
    start: float = field(default_factory=time.perf_counter)

    @property
    def method(self) -> EnsembleMethod:
        return self.provenance["method"]  # type: ignore[no-any-return]

    @property
    def policy(self) -> BadRowPolicy:
        return self.provenance["bad_rows"]  # type: ignore[no-any-return]

    @property
    def table(self) -> str:
        return f"{ENSEMBLE_DIR}/{self.partition.relpath}"

    @property
    def quarantine(self) -> str:
        return f"{QUARANTINE_DIR}/{self.partition.relpath}"

    @property
    def names(self) -> list[str]:
        return self.manifest.member_names


def score_partition(
    partition: Partition,
    manifest: Manifest,
    output_dir: str,
    *,
    method: EnsembleMethod = "mean",
    batch_size: int = FEED_ROWS[0],
    feed_rows: int = FEED_ROWS[0],
    bad_rows: BadRowPolicy = "fail",
    force: bool = False,
    min_members: int = 0,
    absent: tuple[str, ...] = (),
) -> PartitionResult:
    """Write ``OUTPUT/ensemble/<relpath>`` for ``partition``, reusing what is still valid.

    ``absent`` members could not be loaded: their column is null, and rows need
    ``min_members`` (0: all) members with a finite score.

    Raises:
        DataError: unreadable partition, bad rows under ``fail``, duplicate ids.
        ModelLoadError: a member cannot be loaded, returns the wrong shape, or returns
            non-finite scores under ``fail``.
    """
    digests = {s.name: digest_files(resolve_model(s).files) for s in manifest.models
               if s.name not in absent}
    job = _Job(partition, manifest, store_for(output_dir), {
        "partition": partition.relpath,
        "fingerprint": partition.fingerprint,
        "id_column": manifest.id_column,
        "features": list(manifest.features),
        "bad_rows": bad_rows,
        "method": method,
        "weights": list(manifest.weights),  # normalized, finite
        "members": digests,  # the members scored: absent ones are left out
        "min_members": min_members or len(manifest.models),
        "absent": list(absent),
    }, batch_size, output_dir, feed_rows)
    previous = None if force else committed_metadata(job.store, job.table)
    reuse = plan_reuse(previous, job.provenance, force=force)
    if reuse.whole and previous is not None:
        return _reused_whole(job, previous)
    # Whatever is committed is now stale: out of readers' sight first, kept (hidden) only
    # as the source of the members' scores that are still valid.
    hidden = job.store.hide(job.table) if reuse.members else None
    if hidden is None:
        job.store.delete(job.table)
    try:
        return _score(job, reuse if hidden else Reuse(False, ()), hidden)
    finally:
        if hidden is not None:
            with contextlib.suppress(OSError):
                job.store.delete(hidden)


def _reused_whole(job: _Job, previous: dict[str, Any]) -> PartitionResult:
    stats = PartitionMerged.model_validate(
        previous["stats"] | {"path": job.store.uri(job.table)})
    digests = previous.get("members") or {}
    members = [MemberStats(name=n, digest=job.provenance["members"].get(n, digests.get(n, "")),
                           rows=0, seconds=0.0, skipped=True) for n in job.names]
    return PartitionResult(
        scored=PartitionScored(relpath=job.partition.relpath, rows=0, scored_rows=0,
                               bad_rows=int(previous.get("bad_row_count", 0)),
                               seconds=time.perf_counter() - job.start, members=members),
        merged=stats,
    )


def _open(job: _Job) -> tuple[pq.ParquetFile, pa.Field]:
    """The partition's reader and its id field.

    Raises:
        OSError: possibly transient (a flaky disk or network mount): the retry policy
            decides.
        DataError: not Parquet, or the id column is missing.
    """
    try:
        reader = open_parquet(job.partition.path)
        return reader, reader.schema_arrow.field(job.manifest.id_column)
    except OSError:
        raise
    except (pa.ArrowException, KeyError) as err:
        raise DataError(
            f"partition {job.partition.relpath} cannot be read as Parquet ({err}); re-export "
            "or remove it, then re-run: partitions already committed are kept"
        ) from err


def _score(job: _Job, reuse: Reuse, hidden: str | None) -> PartitionResult:
    names = job.names
    absent = [k for k, n in enumerate(names) if n not in job.provenance["members"]]
    todo = [k for k, n in enumerate(names) if n not in reuse.members and k not in absent]
    reused = [k for k, n in enumerate(names) if n in reuse.members]
    reader, id_field = _open(job)
    previous = (RowStream(job.store.open_input(hidden), [job.manifest.id_column]
                          + [f"score_{names[k]}" for k in reused])
                if reused and hidden is not None else None)
    stats = EnsembleStats(len(names), reader.metadata.num_rows)
    columns = [job.manifest.id_column, *job.manifest.features]
    # One pool per partition, shut down with it: the next batch's decode and the members'
    # Session.run calls (which release the GIL, so members score concurrently).
    with ThreadPoolExecutor(max_workers=len(todo) + 1,
                            thread_name_prefix=f"score-{job.partition.relpath}") as pool, \
            PartitionWriter(job.store, job.table, job.quarantine, id_field, names) as writer:
        ctx = ScoringContext(
            where=job.partition.relpath, names=names, features=job.manifest.features,
            scorers={k: MODEL_CACHE.get(job.manifest.models[k], len(job.manifest.features))
                     for k in todo},
            policy=job.policy, method=job.method, weights=np.array(job.provenance["weights"]),
            pool=pool, min_members=job.provenance["min_members"], absent=tuple(absent),
            feed_rows=job.feed_rows)
        rows, first_batch_at, id_chunks, scores_aside = _stream(
            job, ctx, writer, stats, previous, reused,
            read_ahead(batches_by_row_group(reader, columns, job.batch_size), pool))
        _check_unique(job.partition, id_chunks)
        _check_abandoned(job)
        merged = stats.result(job.partition.relpath, job.store.uri(job.table),
                              job.manifest.features, names)
        writer.commit(job.provenance | {"bad_row_count": writer.set_aside_rows,
                                        "scores_set_aside": scores_aside,
                                        "stats": merged.model_dump(exclude={"path"})})
    members = [
        MemberStats(name=n, digest=job.provenance["members"].get(n, ""),
                    rows=0 if k in reused else merged.rows,
                    seconds=ctx.seconds.get(k, 0.0), skipped=k in reused)
        for k, n in enumerate(names)
    ]
    return PartitionResult(
        scored=PartitionScored(relpath=job.partition.relpath, rows=rows,
                               scored_rows=merged.rows, bad_rows=writer.set_aside_rows,
                               seconds=time.perf_counter() - job.start, members=members,
                               first_batch_at=first_batch_at,
                               sketch_seconds=stats.sketch_seconds,
                               process=f"{socket.gethostname()}:{os.getpid()}",
                               loads=dict(MODEL_CACHE.loads)),
        merged=merged,
    )


@dataclass
class _Sink:
    """Where a partition's batches go once their members are done: the writer and the
    statistics, in input order."""

    ctx: ScoringContext
    writer: PartitionWriter
    stats: EnsembleStats
    first_batch_at: float | None = None  # wall clock when the first batch was scored
    scores_aside: int = 0  # rows set aside for their scores
    id_chunks: list[pa.Array] = field(default_factory=list)  # ids written

    def finish(self, batch: StartedBatch) -> None:
        result = finish_batch(self.ctx, batch)
        if self.first_batch_at is None:
            self.first_batch_at = time.time()
        for ids, reasons in zip(result.aside_ids, result.aside_reasons, strict=True):
            self.writer.set_aside(ids, reasons)
        self.stats.add(result.scores, result.ensemble, result.std)
        self.scores_aside += result.scores_set_aside
        self.id_chunks.append(result.ids)
        self.writer.write(result.ids, result.scores, result.ensemble, result.std,
                          result.count)


def _stream(job: _Job, ctx: ScoringContext, writer: PartitionWriter, stats: EnsembleStats,
            previous: RowStream | None, reused: list[int], batches: Any
            ) -> tuple[int, float | None, list[pa.Array], int]:
    """Every batch through the core into the writer; returns rows read, when the first
    batch was scored, the ids written (for the uniqueness check) and how many rows were
    set aside for their scores."""
    rows = 0
    sink = _Sink(ctx, writer, stats)
    # Two feature matrices, reused in turn: batch N+1 is decoded into one while batch N's
    # members still read the other.
    buffers: list[np.ndarray | None] = [None, None]
    started: StartedBatch | None = None  # the batch whose members are scoring

    def reused_scores(ids: pa.Array) -> dict[int, np.ndarray]:
        assert previous is not None
        old = previous.take(len(ids))
        if not old.column(0).combine_chunks().equals(ids):
            raise DataError(f"partition {job.partition.relpath}: the previous table's ids "
                            "differ from the input's; re-run with force (params.force, --force)")
        return {k: old.column(j + 1).to_numpy() for j, k in enumerate(reused)}

    def begin(n: int, batch: pa.RecordBatch) -> StartedBatch:
        nonlocal rows
        _check_abandoned(job)
        rows += batch.num_rows
        slot = n % 2
        matrix = to_matrix(batch, job.manifest.features, buffers[slot])
        if buffers[slot] is None or not np.may_share_memory(matrix, buffers[slot]):
            buffers[slot] = matrix  # newly allocated (aligned): the whole of it
        stats.add_features(matrix)
        return start_batch(ctx, matrix, batch.column(0),
                           reused_scores if previous is not None else None, batch)

    numbered = enumerate(batches)
    try:
        while True:
            # The next batch's members start before this one is finished: TensorFlow
            # keeps scoring while this thread screens, combines and writes.
            try:
                item = next(numbered, None)
                following = begin(*item) if item is not None else None
            except Exception as err:
                if started is not None and not isinstance(err, PartitionAbandoned):
                    sink.finish(started)  # the batch before comes first: its error, if any
                raise
            if started is not None:
                sink.finish(started)
            if following is None:
                break
            started = following
    except pa.ArrowException as err:
        if isinstance(err, OSError):
            raise  # may be transient: the task's retry policy decides
        raise DataError(
            f"partition {job.partition.relpath} is corrupt or truncated after {rows} rows "
            f"({err}); re-export or remove it, then re-run: partitions already committed "
            "are kept"
        ) from err
    return rows, sink.first_batch_at, sink.id_chunks, sink.scores_aside


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
        f"({dupes[:5].to_pylist()}{' ...' if len(dupes) > 5 else ''}); ids must be unique, "
        "so their scores cannot be told apart. De-duplicate the input"
    )
