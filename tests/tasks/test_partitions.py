from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loaders.errors import DataError
from loaders.manifest import Manifest, ModelSpec
from tasks.partitions import check_partition, check_schema, discover_partitions
from tests.helpers import write_table


def _table(n: int = 3) -> dict[str, object]:
    return {"id": np.arange(n), "a": np.ones(n, np.float32), "b": np.zeros(n)}


def _manifest(features: tuple[str, ...] = ("a", "b")) -> Manifest:
    return Manifest(id_column="id", features=features,
                    models=(ModelSpec(name="m", path="x", input="i", output="o"),))


def test_folder_is_searched_recursively_and_skips_metadata(tmp_path: Path) -> None:
    write_table(tmp_path / "day=1" / "part-0.parquet", _table())
    write_table(tmp_path / "day=2" / "part-0.parquet", _table())
    write_table(tmp_path / "_common_metadata.parquet", _table())
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("")
    parts = discover_partitions(str(tmp_path))
    assert [p.relpath for p in parts] == ["day=1/part-0.parquet", "day=2/part-0.parquet"]


def test_single_file_and_glob(tmp_path: Path) -> None:
    write_table(tmp_path / "d" / "x" / "a.parquet", _table())
    write_table(tmp_path / "d" / "y" / "b.parquet", _table())
    assert [p.relpath for p in discover_partitions(str(tmp_path / "d" / "x" / "a.parquet"))] == [
        "a.parquet"]
    parts = discover_partitions(str(tmp_path / "d" / "**" / "*.parquet"))
    assert [p.relpath for p in parts] == ["x/a.parquet", "y/b.parquet"]


def test_output_below_input_is_excluded(tmp_path: Path) -> None:
    write_table(tmp_path / "a.parquet", _table())
    write_table(tmp_path / "out" / "ensemble" / "a.parquet", _table())
    parts = discover_partitions(str(tmp_path), exclude=tmp_path / "out")
    assert [p.relpath for p in parts] == ["a.parquet"]


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; check the input "
                                          r"\(params.input, --input\)"):
        discover_partitions(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no Parquet files found"):
        discover_partitions(str(tmp_path))


def test_schema_errors_name_partition_and_column(tmp_path: Path) -> None:
    write_table(tmp_path / "p.parquet", {"id": [1], "a": ["text"], "b": [1.0]})
    part = discover_partitions(str(tmp_path))[0]
    with pytest.raises(DataError, match=r"p.parquet lacks column\(s\) \['zz'\]"):
        check_schema(part, _manifest(("a", "zz")))
    with pytest.raises(DataError, match=r"p.parquet: feature column\(s\) \['a \(string\)'\]"):
        check_schema(part, _manifest())


def test_a_repeated_column_name_is_refused_with_the_partition(tmp_path: Path) -> None:
    table = pa.Table.from_arrays([pa.array([1]), pa.array([1.0]), pa.array([2.0]),
                                  pa.array([3.0])], names=["id", "a", "b", "b"])
    pq.write_table(table, tmp_path / "p.parquet")
    part = discover_partitions(str(tmp_path))[0]
    with pytest.raises(DataError, match=r"p.parquet has several columns named \['b'\]"):
        check_schema(part, _manifest(("a", "b")))
    check_schema(part, _manifest(("a",)))  # a repeated column the manifest does not use


def test_corrupt_footer(tmp_path: Path) -> None:
    path = write_table(tmp_path / "p.parquet", _table(1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    part = discover_partitions(str(tmp_path))[0]
    with pytest.raises(DataError, match="not a readable Parquet file"):
        check_schema(part, _manifest())
    assert isinstance(pa.ArrowException, type)


_ONE_FEATURE = Manifest(id_column="id", features=("f",), models=(ModelSpec(name="m", path="x"),))


def _write(path: Path, values: np.ndarray) -> None:
    """Uncompressed and plain-encoded: other values of the same count keep the size."""
    table = pa.table({"id": np.arange(len(values), dtype=np.int64), "f": values})
    pq.write_table(table, path, compression="none", use_dictionary=False)


def _fingerprint_before_and_after(path: Path, new: np.ndarray) -> tuple[Any, Any]:
    """The partition as planned, then again after ``path`` is rewritten with ``new`` (the
    same size) and its mtime restored, as ``rsync -t`` or ``cp -p`` of a re-export leave
    it."""
    before = check_partition(discover_partitions(str(path))[0], _ONE_FEATURE)
    st = path.stat()
    _write(path, new)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return before, check_partition(discover_partitions(str(path))[0], _ONE_FEATURE)


def test_footer_fingerprint_tells_same_size_same_mtime_rewrites_apart(tmp_path: Path
                                                                     ) -> None:
    path = tmp_path / "p.parquet"
    first = np.arange(100, dtype=np.float32)
    _write(path, first)
    before, after = _fingerprint_before_and_after(path, first[::-1] * 2)
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.footer != before.footer and after.fingerprint != before.fingerprint
    # --verify-inputs adds the whole file's hash.
    verified = check_partition(discover_partitions(str(path))[0], _ONE_FEATURE, verify=True)
    assert len(verified.content) == 64 and verified.content in verified.fingerprint


def test_an_in_range_edit_that_keeps_the_footer_still_changes_the_fingerprint(
        tmp_path: Path) -> None:
    """One value changed within its column's range, same size, same statistics, mtime set
    back: the footer is byte for byte the same, but the inode's change time is not."""
    path = tmp_path / "p.parquet"
    values = np.arange(100, dtype=np.float32)
    _write(path, values)
    edited = values.copy()
    edited[5] = 50.5  # between the column's min and max
    before, after = _fingerprint_before_and_after(path, edited)
    assert (after.size, after.mtime_ns, after.footer) == (before.size, before.mtime_ns,
                                                          before.footer)
    assert after.ctime_ns != before.ctime_ns and after.fingerprint != before.fingerprint
