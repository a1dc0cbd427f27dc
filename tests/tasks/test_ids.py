"""Ids repeated across partitions: found exactly, by footer ranges when they cannot overlap,
and a hash bucket at a time when they can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.ids
from loaders.errors import DataError
from tasks.ids import find_repeated_ids


def _files(tmp_path: Path, ids: dict[str, list[object]], row_group_size: int = 3
           ) -> dict[str, str]:
    out = {}
    for name, values in ids.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": values, "score": np.zeros(len(values))}), path,
                       row_group_size=row_group_size)
        out[name] = str(path)
    return out


def test_disjoint_ranges_are_settled_by_the_footers(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path, {"a.parquet": [1, 2, 3, 4], "b.parquet": [10, 11, 12]})

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the id columns were read although the ranges are disjoint")

    monkeypatch.setattr(tasks.ids, "batches_by_row_group", no_reading)
    assert find_repeated_ids(files, "id").count == 0


def test_interleaved_ids_without_repeats(tmp_path: Path) -> None:
    files = _files(tmp_path, {"a.parquet": list(range(0, 40, 2)),
                              "b.parquet": list(range(1, 40, 2))})
    assert find_repeated_ids(files, "id").count == 0


@pytest.mark.parametrize("bucket_rows", [1_000_000, 7])
def test_repeats_are_counted_and_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         bucket_rows: int) -> None:
    monkeypatch.setattr(tasks.ids, "BUCKET_ROWS", bucket_rows)  # 7: many buckets
    files = _files(tmp_path, {"d=1/p.parquet": list(range(0, 20)),
                              "d=2/p.parquet": [-5, 3, 40, 7, 41],
                              "d=3/p.parquet": [7, 100, 19]})
    found = find_repeated_ids(files, "id", max_examples=10)
    assert found.count == 3  # 3, 7 and 19
    assert found.examples == {"3": ["d=1/p.parquet", "d=2/p.parquet"],
                              "7": ["d=1/p.parquet", "d=2/p.parquet", "d=3/p.parquet"],
                              "19": ["d=1/p.parquet", "d=3/p.parquet"]}


def test_string_ids_and_the_example_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(tasks.ids, "BUCKET_ROWS", 4)
    files = _files(tmp_path, {"a.parquet": ["x", "yy", "zzz", "w"],
                              "b.parquet": ["zzz", "v", "x", "yy"]})
    found = find_repeated_ids(files, "id", max_examples=2)
    assert found.count == 3
    assert len(found.examples) == 2
    assert all(where == ["a.parquet", "b.parquet"] for where in found.examples.values())


def test_one_partition_has_nothing_to_compare(tmp_path: Path) -> None:
    files = _files(tmp_path, {"a.parquet": [1, 2, 3]})
    assert find_repeated_ids(files, "id").count == 0


def _write(path: Path, ids: pa.Array, **kwargs: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids}), path, **kwargs)  # type: ignore[arg-type]
    return str(path)


def test_ids_of_other_arrow_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths that differ between partitions, dictionaries, nanosecond timestamps,
    fixed-width strings spread over many buckets, a file without statistics, an empty
    file, nulls: the repeats are still found, exactly."""
    monkeypatch.setattr(tasks.ids, "BUCKET_ROWS", 5)
    ints = {"a": _write(tmp_path / "a.parquet", pa.array([1, 2, 3, None], pa.int32())),
            "b": _write(tmp_path / "b.parquet", pa.array([3, 4, None], pa.int64()),
                        write_statistics=False),
            "e": _write(tmp_path / "e.parquet", pa.array([], pa.int64()))}
    assert find_repeated_ids(ints, "id").examples == {"3": ["a", "b"]}

    codes = [f"{i:012d}" for i in range(40)]
    strings = {"a": _write(tmp_path / "s/a.parquet", pa.array(codes[:25]).dictionary_encode()),
               "b": _write(tmp_path / "s/b.parquet", pa.array(codes[20:]))}
    found = find_repeated_ids(strings, "id", max_examples=100)
    assert found.count == 5 and sorted(found.examples) == codes[20:25]

    stamps = pa.array([1_000_000_001, 2_000_000_002, 3_000_000_003], pa.timestamp("ns"))
    times = {"a": _write(tmp_path / "t/a.parquet", stamps),
             "b": _write(tmp_path / "t/b.parquet", stamps.slice(1))}
    assert find_repeated_ids(times, "id").count == 2

    mixed = {"a": _write(tmp_path / "m/a.parquet", pa.array([1, 2])),
             "b": _write(tmp_path / "m/b.parquet", pa.array(["1", "2"]))}
    with pytest.raises(DataError, match="different types"):
        find_repeated_ids(mixed, "id")


@pytest.mark.parametrize("kind", ["int", "str"])
def test_a_hash_slice_beyond_the_limit_finds_real_repeats_and_estimates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(tasks.ids, "MAX_CHECKED", 2_000)  # 8,000 ids: a 1/4 slice
    a = list(range(0, 4000))
    b = list(range(2000, 6000))  # 2,000 ids in both
    conv = str if kind == "str" else int
    files = _files(tmp_path, {"a.parquet": [conv(i) for i in a],
                              "b.parquet": [conv(i) for i in b]})
    found = find_repeated_ids(files, "id", max_examples=50)
    assert found.sampled == 4
    assert 1_400 <= found.count <= 2_600  # the estimate: 4 x the repeats in the slice
    assert found.count % 4 == 0
    assert all(2000 <= int(v) < 4000 for v in found.examples)  # each one real
