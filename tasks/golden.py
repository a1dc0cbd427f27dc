"""The golden-set gate: a few blessed rows every run scores first, before any partition.

Scores can go wrong without an error: a checkpoint re-trained under the same name, two
members' paths swapped, a manifest's ``features`` reordered by hand, a TensorFlow upgrade
that changes the numerics. ``bless`` scores a small, evenly spaced sample of real rows
with every member and keeps the rows (the id and the features, by name) with each
member's scores in a Parquet file; each run reads those rows back by name in the
manifest's order, exactly as partitions are read, scores them with every member and
refuses to go on when a member no longer gives its blessed scores. A few hundred
microseconds of TensorFlow per member on 1,000 rows: the gate costs well under a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from loaders.base import Scorer
from loaders.errors import (
    DataError,
    GoldenMismatch,
    ManifestError,
    ModelLoadError,
    OutputError,
)
from loaders.manifest import Manifest
from tasks.batch import ids_text
from tasks.features import find_bad_rows, to_matrix
from tasks.partitions import check_partition, discover_partitions, is_numeric
from tasks.storage import open_parquet, store_for

__all__ = ["DEFAULT_ROWS", "GOLDEN_KEY", "GoldenCheck", "bless", "check_golden",
           "sample_rows"]

GOLDEN_KEY = b"ensemble_scoring_golden"
DEFAULT_ROWS = 1000
# A golden file is a handful of rows; one far larger is not one ``bless`` wrote, and
# scoring it would make the gate the run's slowest step.
MAX_ROWS = 100_000


class GoldenCheck(BaseModel):
    """What the gate found: each checked member's largest deviation from its blessing."""

    path: str
    rows: int
    tolerance: float
    deviations: dict[str, float]
    unchecked: list[str]  # members not loaded (see min_members), so not scored
    seconds: float

    def text(self) -> str:
        worst = max(self.deviations.items(), key=lambda kv: kv[1], default=("-", 0.0))
        skipped = (f"; not checked (not loaded): {', '.join(self.unchecked)}"
                   if self.unchecked else "")
        return (f"passed: {len(self.deviations)} member(s) on {self.rows:,} blessed row(s), "
                f"largest deviation {worst[1]:.2g} ({worst[0]}) within {self.tolerance:g}, "
                f"{self.seconds:.2f} s{skipped}")


def sample_rows(input_path: str, manifest: Manifest, rows: int = DEFAULT_ROWS
                ) -> tuple[pa.Table, int]:
    """Up to ``rows`` rows spread evenly over every partition of ``input_path`` (the id
    and the features), reading only the row groups they fall in; rows whose features
    cannot be scored are left out. Returns the rows and how many were left out.

    Raises:
        DataError: no input, missing columns, or no row with scorable features.
    """
    readers = [open_parquet(check_partition(p, manifest).path)
               for p in discover_partitions(input_path)]
    counts = np.array([r.metadata.num_rows for r in readers], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise DataError(f"the sample {input_path} has no rows; give --sample data to bless")
    picks = np.unique(np.linspace(0, total - 1, min(rows, total)).round().astype(np.int64))
    columns = [manifest.id_column, *manifest.features]
    tables: list[pa.Table] = []
    for reader, start in zip(readers, np.concatenate([[0], np.cumsum(counts)[:-1]]),
                             strict=True):
        tables.extend(_picked(reader, picks - start, columns))
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else None
    if batch is None:
        raise DataError(f"the sample {input_path} has no rows; give --sample data to bless")
    bad = find_bad_rows(to_matrix(batch, manifest.features), manifest.features, batch)
    ids_null = np.asarray(batch.column(0).is_null())
    drop = ids_null if bad is None else (bad.mask | ids_null)
    kept = table.filter(pa.array(~drop))
    if kept.num_rows == 0:
        raise DataError(f"every sampled row of {input_path} has a null id or null, NaN or "
                        "infinite features; bless with clean data")
    return kept, int(drop.sum())


def _picked(reader: pq.ParquetFile, local: np.ndarray, columns: list[str]) -> list[pa.Table]:
    """The rows at ``local`` positions (those within the file), row group by row group."""
    out = []
    start = 0
    for g in range(reader.num_row_groups):
        n = reader.metadata.row_group(g).num_rows
        mine = local[(local >= start) & (local < start + n)] - start
        if len(mine):
            out.append(reader.read_row_group(g, columns=columns).take(pa.array(mine)))
        start += n
    return out


def bless(manifest: Manifest, sample: pa.Table, scorers: Mapping[str, Scorer],
          out: Path, *, provenance: Mapping[str, Any]) -> pa.Table:
    """Score ``sample`` with every member and write the golden file to ``out``, published
    whole; an existing file is replaced only if ``bless`` wrote it.

    Raises:
        OutputError: ``out`` is a link or a file ``bless`` did not write, or unwritable.
    """
    if out.is_symlink() or (out.exists() and _golden_metadata(out) is None):
        raise OutputError(f"{out} exists and is not a golden file written by bless; give "
                          "another --out, or move it away")
    batch = sample.to_batches()[0]
    matrix = to_matrix(batch, manifest.features)
    scores = {name: scorers[name].predict(matrix) for name in manifest.member_names}
    blind = [n for n, v in scores.items() if not np.isfinite(v).any()]
    if blind:
        raise ModelLoadError(
            f"member(s) {blind} return no finite score on any of the {len(matrix)} sampled "
            "rows; a golden file cannot tell whether they still work. Check them (or their "
            "paths) before blessing")
    columns = {name: pa.array(values, pa.float32()) for name, values in scores.items()}
    table = sample
    for name, values in columns.items():
        table = table.append_column(f"score_{name}", values)
    meta = dict(provenance) | {
        "id_column": manifest.id_column, "features": list(manifest.features),
        "members": {name: scorers[name].digest for name in manifest.member_names},
        "rows": table.num_rows,
        "blessed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    table = table.replace_schema_metadata({GOLDEN_KEY: json.dumps(meta)})
    store = store_for(out.parent.resolve())
    with store.staged(out.name) as sink:
        pq.write_table(table, sink)
    return table


def _golden_metadata(path: Path) -> dict[str, Any] | None:
    """What ``bless`` recorded in the file's footer; None when the file is not one it
    wrote (no record, or a record of another shape: the file is the user's, not trusted)."""
    try:
        meta = json.loads((pq.read_schema(path).metadata or {})[GOLDEN_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
    if not (isinstance(meta, dict) and isinstance(meta.get("members"), dict)
            and isinstance(meta.get("features"), list) and isinstance(meta.get("rows"), int)
            and all(isinstance(v, str) for v in meta["members"].values())):
        return None
    return meta


def _read_golden(manifest: Manifest, names: Sequence[str]
                 ) -> tuple[pa.RecordBatch, dict[str, Any]]:
    """The golden rows, with the columns the check needs, and what the blessing recorded.

    Raises:
        ManifestError: missing, unreadable, not written by bless, too large, or lacking
            a feature column.
    """
    path = Path(str(manifest.golden))
    fix = ("bless it again (python -m flows.score bless --models MANIFEST --sample DATA) "
           "or remove 'golden:' from the manifest")
    if not path.exists():
        raise ManifestError(f"golden file {path} does not exist; {fix}")
    if not path.is_file():
        raise ManifestError(f"golden file {path} is not a file; {fix}")
    meta = _golden_metadata(path)
    if meta is None:
        raise ManifestError(f"golden file {path} cannot be read or was not written by "
                            f"bless; {fix}")
    reader = pq.ParquetFile(path)
    rows = reader.metadata.num_rows
    if rows > MAX_ROWS or rows == 0 or rows != meta["rows"]:
        raise ManifestError(f"golden file {path} has {rows:,} rows where bless wrote "
                            f"{meta['rows']:,} (1 to {MAX_ROWS:,}): it was edited; {fix}")
    schema = reader.schema_arrow
    lacking = [c for c in (manifest.id_column, *manifest.features) if c not in schema.names]
    if lacking:
        raise ManifestError(f"golden file {path} lacks column(s) {lacking} that the manifest "
                            f"names (renamed since blessing?); {fix}")
    wrong = [f for f in manifest.features if not is_numeric(schema.field(f).type)]
    if wrong:
        raise ManifestError(f"golden file {path}: feature column(s) {wrong} are not numeric "
                            f"(edited by hand?); {fix}")
    have = set(schema.names)
    columns = [manifest.id_column, *manifest.features,
               *(f"score_{n}" for n in names if f"score_{n}" in have)]
    try:
        table = reader.read(columns=columns).combine_chunks()
    except (OSError, pa.ArrowException) as err:
        raise ManifestError(f"golden file {path} cannot be read ({err}); {fix}") from err
    return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist(
        [], schema=table.schema), meta


def check_golden(manifest: Manifest, scorers: Mapping[str, Scorer],
                 unchecked: Sequence[str] = ()) -> GoldenCheck:
    """Score the golden rows with every loaded member and compare with their blessing.

    ``unchecked`` are members that could not be loaded (the run goes on without them
    when ``min_members`` allows); every other member must be in the golden file.

    Raises:
        ManifestError: the golden file is unusable (see ``_read_golden``).
        GoldenMismatch: a member deviates beyond the tolerance, or was never blessed.
    """
    started = time.perf_counter()
    names = [n for n in manifest.member_names if n not in unchecked]
    batch, meta = _read_golden(manifest, names)
    matrix = to_matrix(batch, manifest.features)
    if find_bad_rows(matrix, manifest.features, batch) is not None:
        raise ManifestError(f"golden file {manifest.golden} holds rows with null, NaN or "
                            "infinite features; bless it again with clean data")
    deviations: dict[str, float] = {}
    problems: list[str] = []
    have = set(batch.schema.names)
    for name in names:
        if f"score_{name}" not in have:
            problems.append(f"member {name!r} was not blessed (it has no score_{name} column "
                            "in the golden file)")
            continue
        expected = batch.column(f"score_{name}").to_numpy(zero_copy_only=False)
        got = scorers[name].predict(matrix).astype(np.float64)
        dev = _deviation(got, expected.astype(np.float64))
        deviations[name] = float(dev.max()) if len(dev) else 0.0
        if deviations[name] > manifest.golden_tolerance:
            problems.append(_mismatch_text(name, dev, batch.column(0), scorers[name].digest,
                                           meta, manifest.golden_tolerance))
    if problems:
        raise GoldenMismatch(_refusal(manifest, problems, meta))
    return GoldenCheck(path=str(manifest.golden), rows=batch.num_rows,
                       tolerance=manifest.golden_tolerance, deviations=deviations,
                       unchecked=list(unchecked), seconds=time.perf_counter() - started)


def _deviation(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|got - expected| per row; 0 where both are the same non-finite value, inf where only
    one is finite."""
    with np.errstate(invalid="ignore"):
        dev = np.abs(got - expected)
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    dev[same] = 0.0
    dev[np.isnan(dev)] = np.inf
    return dev


def _mismatch_text(name: str, dev: np.ndarray, ids: pa.Array, digest: str,
                   meta: Mapping[str, Any], tolerance: float) -> str:
    over = dev > tolerance
    worst = np.argsort(-dev, kind="stable")[:5]
    shown = ids_text(ids.take(pa.array(worst)))
    blessed = (meta.get("members") or {}).get(name)
    if blessed is None:
        origin = "it was blessed under another name"
    elif blessed == digest:
        origin = f"its checkpoint is unchanged since blessing (digest {digest[:12]})"
    else:
        origin = (f"its checkpoint changed since blessing (digest {str(blessed)[:12]} -> "
                  f"{digest[:12]})")
    return (f"member {name!r} deviates by up to {float(dev.max()):.4g} on {int(over.sum())} "
            f"of {len(dev)} row(s) (worst: {shown}); {origin}")


def _refusal(manifest: Manifest, problems: list[str], meta: Mapping[str, Any]) -> str:
    from loaders._tf import tf

    hints = []
    blessed = [str(f) for f in meta.get("features") or []]
    if blessed != list(manifest.features):
        moved = [f"{f} (blessed at position {blessed.index(f) + 1}, now {i + 1})"
                 for i, f in enumerate(manifest.features)
                 if f in blessed and blessed.index(f) != i]
        hints.append("the manifest's features are in another order than at blessing: "
                     + ", ".join(moved[:6]) + (" ..." if len(moved) > 6 else "") if moved
                     else "the manifest's features differ from those blessed")
    if meta.get("tensorflow") and meta["tensorflow"] != tf.__version__:
        hints.append(f"TensorFlow was {meta['tensorflow']} at blessing, is {tf.__version__} "
                     "now")
    hint = f"Note: {'; '.join(hints)}.\n" if hints else ""
    listing = "\n".join(f"  - {p}" for p in problems)
    return (f"golden check failed against {manifest.golden} (tolerance "
            f"{manifest.golden_tolerance:g}); nothing was scored:\n{listing}\n{hint}"
            "If the change is intended (a re-trained model, a new TensorFlow), bless again: "
            "python -m flows.score bless --models MANIFEST --sample DATA. Otherwise check the "
            "members' paths and the manifest's features.")
