"""Finding input partitions, fingerprinting them and checking their schema.

Only Parquet footers are read here, so planning a run over thousands of partitions takes
seconds and a schema mistake is reported before any model runs.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from loaders.errors import DataError
from loaders.manifest import Manifest

__all__ = ["PARQUET_SUFFIXES", "Partition", "check_schema", "discover_partitions"]

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = set("*?[")


class Partition(BaseModel):
    """One input file, identified by where it is and what it was when planned."""

    model_config = ConfigDict(frozen=True)

    path: str
    relpath: str  # POSIX path below the input root; mirrored under the output folders
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.mtime_ns}"


def _is_data_file(path: Path) -> bool:
    # Spark, Hive and pyarrow put metadata beside data as _SUCCESS, _common_metadata, .crc
    return (
        path.is_file()
        and not path.name.startswith((".", "_"))
        and path.name.lower().endswith(PARQUET_SUFFIXES)
    )


def _partition(path: Path, root: Path) -> Partition:
    st = path.stat()
    return Partition(
        path=str(path),
        relpath=path.relative_to(root).as_posix(),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def discover_partitions(input_path: str, *, exclude: Path | None = None) -> list[Partition]:
    """List the Parquet files that ``input_path`` names, in a stable order.

    ``input_path`` is one file, a folder searched recursively (hive ``key=value`` folders
    included), or a glob (``**`` allowed). ``exclude`` keeps the run's own output out when
    it sits below the input folder.

    Raises:
        DataError: nothing matches, with what was looked for.
    """
    raw = os.path.expanduser(input_path)
    if any(c in raw for c in _GLOB_CHARS):
        parts = Path(raw).parts
        fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if set(p) & _GLOB_CHARS)]]
        root = Path(*fixed) if fixed else Path(".")
        files = [Path(p) for p in sorted(glob.glob(raw, recursive=True))]
        files = [f for f in files if f.is_file() and not f.name.startswith((".", "_"))]
    else:
        path = Path(raw)
        if path.is_file():
            root, files = path.parent, [path]
        elif path.is_dir():
            root = path
            files = sorted(p for p in path.rglob("*") if _is_data_file(p))
        else:
            raise DataError(f"input {input_path} does not exist; check --input")
    if exclude is not None:
        ex = exclude.resolve()
        files = [f for f in files if ex not in f.resolve().parents]
    if not files:
        raise DataError(
            f"no Parquet files found at {input_path}; --input takes a .parquet file, a "
            f"folder of them (searched recursively for {', '.join(PARQUET_SUFFIXES)}) or a glob"
        )
    return [_partition(f, root) for f in files]


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def check_schema(partition: Partition, manifest: Manifest) -> pa.Schema:
    """Check the partition has the id column and numeric feature columns.

    Raises:
        DataError: unreadable footer, missing columns, or non-numeric features; the
            message names the partition and the columns.
    """
    try:
        schema = pq.read_schema(partition.path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"partition {partition.relpath} is not a readable Parquet file ({err}); "
            "re-export or remove it, then re-run"
        ) from err
    names = set(schema.names)
    missing = [c for c in (manifest.id_column, *manifest.features) if c not in names]
    if missing:
        shown = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
        raise DataError(
            f"partition {partition.relpath} lacks column(s) {missing} named in the manifest "
            f"(it has: {shown}); fix 'features'/'id_column' or the data"
        )
    wrong = [
        f"{c} ({schema.field(c).type})" for c in manifest.features
        if not _numeric(schema.field(c).type)
    ]
    if wrong:
        raise DataError(
            f"partition {partition.relpath}: feature column(s) {wrong} are not numeric; "
            "features must be integer, floating-point or decimal columns"
        )
    return schema
