"""Finding input partitions, fingerprinting them and checking their schema.

Only Parquet footers are read here, so planning a run over thousands of partitions takes
seconds and a schema mistake is reported before any model runs. Input may be local or on
S3 (``s3://bucket/prefix``, a single object or a glob): one listing gives every object's
size and last-modified time, the fingerprint a re-run compares.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from loaders.errors import DataError
from loaders.manifest import Manifest
from tasks.fs import PARQUET_SUFFIXES, S3_SCHEME, S3Path, s3_filesystem, s3_uri
from tasks.storage import open_input

__all__ = [
    "PARQUET_SUFFIXES",
    "Partition",
    "check_partition",
    "check_schema",
    "discover_partitions",
    "is_numeric",
]

_GLOB_CHARS = set("*?[")


class Partition(BaseModel):
    """One input file, identified by where it is and what it was when planned."""

    model_config = ConfigDict(frozen=True)

    path: str  # a local path, or an s3://bucket/key URI
    relpath: str  # POSIX path below the input root; mirrored under the output folders
    size: int
    mtime_ns: int
    # S3 only, filled in by check_partition: Last-Modified has one-second resolution on
    # AWS, so an object replaced by one of the same size within that second would look
    # unchanged without its ETag (which changes with the content).
    etag: str = ""
    # Local files: the inode's change time, which every write updates and which, unlike
    # the mtime, no tool can set back (rsync -t, cp -p and touch -r restore the mtime
    # only). It also changes on chmod, chown or a rename, which then costs a rescore.
    ctime_ns: int = 0
    # Local files, filled in by check_partition: a hash of the Parquet footer, which
    # holds every row group's and column chunk's sizes, offsets and statistics, so a file
    # rewritten with other content of the same size keeps its mtime (rsync -t, cp -p)
    # still changes its fingerprint. Costs one small read of the file's end.
    footer: str = ""
    # With --verify-inputs: SHA-256 of the whole file, for certainty at the cost of a read.
    content: str = ""

    @property
    def fingerprint(self) -> str:
        return ":".join(str(p) for p in (self.size, self.mtime_ns, self.ctime_ns or "",
                                         self.etag, self.footer, self.content) if p != "")


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
        ctime_ns=st.st_ctime_ns,
    )


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A key-matching regex with ``glob.glob(recursive=True)``'s meaning: ``*`` and ``?``
    stay within one path component, ``**/`` spans any number of them."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1:end]
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _discover_s3(uri: str, exclude: Path | S3Path | None) -> list[Partition]:
    fs = s3_filesystem()
    key = uri[len(S3_SCHEME):].strip("/")
    try:
        if any(c in key for c in _GLOB_CHARS):
            parts = key.split("/")
            cut = next(i for i, p in enumerate(parts) if set(p) & _GLOB_CHARS)
            root = "/".join(parts[:cut])
            if not root:
                raise DataError(f"input {uri}: the bucket name cannot be a glob")
            pattern = _glob_regex(key)
            infos = [i for i in fs.get_file_info(
                pafs.FileSelector(root, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File and pattern.match(i.path)
                and not i.base_name.startswith((".", "_"))]
        else:
            info = fs.get_file_info(key)
            if info.type == pafs.FileType.File:
                root, infos = str(PurePosixPath(key).parent), [info]
            elif info.type == pafs.FileType.Directory:
                root = key
                infos = [i for i in fs.get_file_info(pafs.FileSelector(key, recursive=True))
                         if i.type == pafs.FileType.File
                         and not i.base_name.startswith((".", "_"))
                         and i.base_name.lower().endswith(PARQUET_SUFFIXES)]
            else:
                raise DataError(f"input {uri} does not exist; check the input "
                                "(params.input, --input)")
    except OSError as err:
        raise DataError(
            f"cannot list input {uri} ({err}); check the bucket and the AWS_* environment "
            "variables (credentials, AWS_REGION, AWS_ENDPOINT_URL)"
        ) from err
    if isinstance(exclude, S3Path):
        infos = [i for i in infos if not i.path.startswith(exclude.key + "/")]
    if not infos:
        raise DataError(
            f"no Parquet files found at {uri}; the input (params.input, --input) takes a "
            f".parquet object, a prefix "
            f"of them (searched recursively for {', '.join(PARQUET_SUFFIXES)}) or a glob"
        )
    infos.sort(key=lambda i: i.path)
    return [
        Partition(path=S3_SCHEME + i.path, relpath=i.path[len(root) + 1:], size=int(i.size),
                  mtime_ns=int(i.mtime_ns or 0))
        for i in infos
    ]


def discover_partitions(input_path: str, *,
                        exclude: Path | S3Path | None = None) -> list[Partition]:
    """List the Parquet files that ``input_path`` names, in a stable order.

    ``input_path`` is one file, a folder searched recursively (hive ``key=value`` folders
    included), or a glob (``**`` allowed), locally or as an ``s3://`` URI. ``exclude``
    keeps the run's own output out when it sits below the input folder.

    Raises:
        DataError: nothing matches, with what was looked for; S3 cannot be listed.
    """
    uri = s3_uri(input_path)
    if uri is not None:
        return _discover_s3(uri, exclude)
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
            raise DataError(f"input {input_path} does not exist; check the input "
                            "(params.input, --input)")
    if isinstance(exclude, Path):
        ex = exclude.resolve()
        files = [f for f in files if ex not in f.resolve().parents]
    if not files:
        raise DataError(
            f"no Parquet files found at {input_path}; the input (params.input, --input) takes "
            f"a .parquet file, a folder of them (searched recursively for "
            f"{', '.join(PARQUET_SUFFIXES)}) or a glob"
        )
    return [_partition(f, root) for f in files]


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _footer_digest(f: pa.NativeFile) -> str:
    """SHA-256 of a Parquet file's footer (its metadata and the 8 bytes after it)."""
    size = f.size()
    if size < 12:
        raise pa.ArrowInvalid(f"only {size} bytes")
    tail = f.read_at(8, size - 8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or length > size - 12:
        raise pa.ArrowInvalid("no Parquet footer at the end of the file")
    return hashlib.sha256(f.read_at(length, size - 8 - length) + tail).hexdigest()[:32]


@functools.lru_cache(maxsize=65_536)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """Memoised on (path, size, mtime): the CLI's preflight and the flow plan the same
    run in one process, and the whole input is read once, not twice."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_footer(partition: Partition) -> tuple[pa.Schema, dict[str, str]]:
    """The partition's schema, and what its fingerprint adds to size and mtime: a hash of
    its footer and, on S3, its ETag (from the same open: no extra request)."""
    try:
        with open_input(partition.path) as f:
            extra = {"footer": _footer_digest(f)}
            etag = (f.metadata().get("ETag") or b"").decode(errors="replace").strip('"')
            if etag:
                extra["etag"] = etag
            return pq.read_schema(f), extra
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"partition {partition.relpath} is not a readable Parquet file ({err}); "
            "re-export or remove it, then re-run"
        ) from err


def check_partition(partition: Partition, manifest: Manifest, *, verify: bool = False
                    ) -> Partition:
    """``check_schema``, returning the partition with its content-aware fingerprint (S3
    ETag, or local footer hash; with ``verify``, the whole local file's SHA-256).

    Raises:
        DataError: as ``check_schema``.
    """
    schema, extra = _read_footer(partition)
    _check_columns(partition, schema, manifest)
    if verify and s3_uri(partition.path) is None:  # S3's ETag already hashes the content
        try:
            extra["content"] = _content_digest(partition.path, partition.size,
                                               partition.mtime_ns)
        except OSError as err:
            raise DataError(f"partition {partition.relpath} cannot be read ({err})") from err
    return partition.model_copy(update=extra) if extra else partition


def check_schema(partition: Partition, manifest: Manifest) -> pa.Schema:
    """Check the partition has the id column and numeric feature columns.

    Raises:
        DataError: unreadable footer, missing columns, or non-numeric features; the
            message names the partition and the columns.
    """
    schema, _ = _read_footer(partition)
    _check_columns(partition, schema, manifest)
    return schema


def _check_columns(partition: Partition, schema: pa.Schema, manifest: Manifest) -> None:
    names = set(schema.names)
    missing = [c for c in (manifest.id_column, *manifest.features) if c not in names]
    if missing:
        shown = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
        raise DataError(
            f"partition {partition.relpath} lacks column(s) {missing} named in the manifest "
            f"(it has: {shown}); fix 'features'/'id_column' or the data"
        )
    # A name that several columns carry has no one value to take (Arrow's lookups by
    # name refuse it): said here, with the partition, instead of a KeyError mid-run.
    repeated = sorted({c for c in (manifest.id_column, *manifest.features)
                       if schema.get_all_field_indices(c)[1:]})
    if repeated:
        raise DataError(
            f"partition {partition.relpath} has several columns named {repeated}; give "
            "each column of the data a name of its own"
        )
    wrong = [
        f"{c} ({schema.field(c).type})" for c in manifest.features
        if not is_numeric(schema.field(c).type)
    ]
    if wrong:
        raise DataError(
            f"partition {partition.relpath}: feature column(s) {wrong} are not numeric; "
            "features must be integer, floating-point or decimal columns"
        )
