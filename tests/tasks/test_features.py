"""Arrow batches to the models' matrix, and the bad-row check run on every batch."""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa
import pytest

import tasks.features as features_module
from tasks.features import FEED_ALIGNMENT, aligned_matrix, find_bad_rows, to_matrix


def test_to_matrix_follows_manifest_order_and_reuses_the_buffer() -> None:
    batch = pa.record_batch({"b": pa.array([1.5, 2.5], pa.float64()),
                             "a": pa.array([1, None], pa.int32()),
                             "c": pa.array([3.0, 4.0], pa.float32())})
    buffer = np.full((4, 3), -1.0, dtype=np.float32)
    matrix = to_matrix(batch, ("a", "b", "c"), buffer)
    assert matrix.base is buffer and matrix.flags.c_contiguous
    assert matrix.dtype == np.float32 and matrix.shape == (2, 3)
    assert matrix[0].tolist() == [1.0, 1.5, 3.0]
    assert np.isnan(matrix[1, 0]) and matrix[1, 1:].tolist() == [2.5, 4.0]  # null -> NaN


def _blocks_for_any_matrix(monkeypatch: pytest.MonkeyPatch, rows: int, features: int
                           ) -> None:
    """Make to_matrix take its block path, ``rows`` rows per block, on tiny matrices."""
    monkeypatch.setattr(features_module, "_BLOCK_MIN_FEATURES", 1)
    monkeypatch.setattr(features_module, "_BLOCK_MIN_BYTES", 0)
    monkeypatch.setattr(features_module, "_BLOCK_BYTES", rows * (4 * features + 16))


@pytest.mark.parametrize("blocks", [False, True])
def test_to_matrix_fills_every_block_of_a_batch(monkeypatch: pytest.MonkeyPatch,
                                                blocks: bool) -> None:
    """Written directly or through (features, rows) blocks (several, the last one short),
    columns that need a cast (nulls, float64, int64, decimal) come out as the columns
    themselves would, overflow to float32's inf included."""
    if blocks:
        _blocks_for_any_matrix(monkeypatch, rows=4, features=4)
    rows = 11
    rng = np.random.default_rng(3)
    f32 = rng.standard_normal(rows).astype(np.float32)
    f64 = rng.standard_normal(rows) * 1e3
    f64[5] = 1e39  # finite, beyond float32's range
    ints = pa.array([None if i % 4 == 1 else i * 7 for i in range(rows)], pa.int64())
    dec = pa.array([decimal.Decimal(f"{i}.25") for i in range(rows)], pa.decimal128(6, 2))
    batch = pa.record_batch({"f32": f32, "f64": f64, "ints": ints, "dec": dec})
    matrix = to_matrix(batch, ("dec", "f32", "ints", "f64"))
    with np.errstate(over="ignore"):
        expected = np.column_stack([
            np.array([float(d) for d in dec.to_pylist()]),
            f32,
            np.array([np.nan if v is None else v for v in ints.to_pylist()]),
            f64,
        ]).astype(np.float32)
    np.testing.assert_array_equal(matrix, expected)  # NaN where expected has NaN
    assert np.isinf(matrix[5, 3]) and matrix.flags.c_contiguous


@pytest.mark.parametrize("blocks", [False, True])
def test_a_null_does_not_change_how_an_integer_column_converts(
        monkeypatch: pytest.MonkeyPatch, blocks: bool) -> None:
    """An integer beyond float64's exact range comes out as numpy rounds it, whether or
    not its column holds a null (which sends the column through Arrow's cast, in every
    block, even those without the null)."""
    if blocks:
        _blocks_for_any_matrix(monkeypatch, rows=4, features=1)
    # 2**60 + 2**36 + 1 rounds to another float32 through float64 than straight.
    big = [2**53 + 1, 2**63 - 1, -(2**63), 2**60 + 2**36 + 1]
    values: list[int | None] = big + [1] * 8
    plain = to_matrix(pa.record_batch({"x": pa.array(values, pa.int64())}), ("x",))
    values[10] = None  # in the last block only
    nulled = to_matrix(pa.record_batch({"x": pa.array(values, pa.int64())}), ("x",))
    expected = np.array(big, dtype=np.int64).astype(np.float32)
    np.testing.assert_array_equal(plain[:4, 0], expected)
    np.testing.assert_array_equal(nulled[:4, 0], expected)
    assert np.isnan(nulled[10, 0]) and np.array_equal(np.delete(plain, 10), np.delete(nulled, 10))
    for value in (2**64 - 1, 18446743523953737727):
        unsigned = pa.array([value, None], pa.uint64())
        assert to_matrix(pa.record_batch({"u": unsigned}), ("u",))[0, 0] == np.array(
            [value], dtype=np.uint64).astype(np.float32)[0]


def test_matrices_start_where_tensorflow_feeds_them_without_a_copy() -> None:
    for rows, cols in [(1, 1), (3, 5), (16_384, 32), (7, 33)]:
        m = aligned_matrix(rows, cols)
        assert m.shape == (rows, cols) and m.dtype == np.float32 and m.flags.c_contiguous
        assert m.ctypes.data % FEED_ALIGNMENT == 0
    assert aligned_matrix(0, 5).shape == (0, 5)  # an empty batch: nothing to align
    assert to_matrix(pa.record_batch({"a": pa.array([], pa.float64())}), ("a",)).shape == (0, 1)
    batch = pa.record_batch({"a": pa.array([1.0, 2.0, 3.0])})
    fresh = to_matrix(batch, ("a",))  # no buffer given: allocated aligned
    assert fresh.ctypes.data % FEED_ALIGNMENT == 0 and fresh[:, 0].tolist() == [1.0, 2.0, 3.0]
    again = to_matrix(batch.slice(0, 2), ("a",), fresh)  # reused: its first rows
    assert again.ctypes.data == fresh.ctypes.data and again.shape == (2, 1)


def test_bad_rows_name_the_first_offending_column() -> None:
    features = ("a", "b", "c")
    m = np.zeros((5, 3), dtype=np.float32)
    assert find_bad_rows(m, features) is None
    m[1, 2] = np.nan
    m[3, 1] = -np.inf
    m[3, 2] = np.nan
    bad = find_bad_rows(m, features)
    assert bad is not None and bad.count == 2
    assert bad.mask.tolist() == [False, True, False, True, False]
    assert bad.reasons == ["c is null or NaN", "b is infinite"]


def test_finite_values_whose_sum_overflows_are_not_bad() -> None:
    """The fast path sums the batch; an overflowing sum must not flag finite rows."""
    m = np.full((4, 3), 3e38, dtype=np.float32)
    m[2, 0] = -3e38
    assert find_bad_rows(m, ("a", "b", "c")) is None
    m[2, 1] = np.inf
    bad = find_bad_rows(m, ("a", "b", "c"))
    assert bad is not None and bad.reasons == ["b is infinite"]
