"""The plain functions under the tasks, on real checkpoints and Parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.demo import mlp_reference
from loaders.errors import DataError
from loaders.manifest import Manifest, ModelSpec
from tasks.merge import aligned_batches, combine, merge_partition
from tasks.partitions import discover_partitions
from tasks.scoring import score_partition
from tasks.storage import staged
from tests.conftest import N_FEATURES
from tests.helpers import write_table


def _manifest(checkpoints: list[Path], features: list[str]) -> Manifest:
    return Manifest(
        id_column="id", features=tuple(features),
        models=tuple(ModelSpec(name=f"m{i}", path=str(p), input="features", output="score",
                               weight=i + 1)
                     for i, p in enumerate(checkpoints)),
    )


def _data(tmp_path: Path, features: list[str], n: int = 1000, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)
    cols: dict[str, object] = {"other": np.zeros(n)}
    for j, f in reversed(list(enumerate(features))):  # columns stored in another order
        cols[f] = x[:, j]
    cols["id"] = np.arange(n, dtype=np.int64) * 7
    write_table(tmp_path / "in" / "p.parquet", cols)
    return x


def test_combine_methods() -> None:
    s = np.array([[0.1, 0.2, 0.6], [1.0, 1.0, 1.0]], dtype=np.float32)
    w = np.array([1.0, 1.0, 2.0])
    ens, std, n = combine(s, "mean", w)
    assert np.allclose(ens, s.mean(1)) and np.allclose(std, s.std(1)) and list(n) == [3, 3]
    ens, _, _ = combine(s, "weighted", w)
    assert np.allclose(ens, (s * w).sum(1) / 4)
    ens, _, _ = combine(s, "median", w)
    assert np.allclose(ens, [0.2, 1.0])
    s[0, 2] = np.nan
    ens, std, n = combine(s, "mean", w)
    assert np.allclose(ens[0], 0.15) and np.isclose(std[0], 0.05) and list(n) == [2, 3]


def test_aligned_batches_realigns_different_row_groups(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"x": np.arange(100)}), a, row_group_size=30)
    pq.write_table(pa.table({"x": np.arange(100)}), b, row_group_size=45)
    got = list(aligned_batches([pq.ParquetFile(a), pq.ParquetFile(b)], batch_size=40))
    assert all(len(x) == len(y) for x, y in got)
    assert np.concatenate([x.column(0).to_numpy() for x, _ in got]).tolist() == list(range(100))
    assert all(x.column(0).equals(y.column(0)) for x, y in got)


def test_score_then_merge_matches_reference(tmp_path: Path, checkpoints: list[Path],
                                            features: list[str]) -> None:
    x = _data(tmp_path, features)
    manifest = _manifest(checkpoints, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    out = tmp_path / "out"
    scored = score_partition(part, manifest, str(out), batch_size=300)
    assert scored.rows == 1000 and [m.name for m in scored.members] == ["m0", "m1", "m2"]
    merged = merge_partition(part, manifest, str(out), method="weighted")
    table = pq.read_table(merged.path)
    assert table.column_names == ["id", "score_m0", "score_m1", "score_m2", "ensemble_score",
                                  "ensemble_std", "n_members"]
    assert table.column("id").to_pylist() == list(range(0, 7000, 7))
    refs = np.stack([mlp_reference(p, x) for p in checkpoints], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy()
                  - refs @ np.array([1, 2, 3]) / 6).max() <= 1e-5
    assert np.abs(table.column("ensemble_std").to_numpy() - refs.std(axis=1)).max() <= 1e-5
    # Same inputs again: nothing is re-scored.
    again = score_partition(part, manifest, str(out))
    assert again.rows == 0 and all(m.skipped for m in again.members)


def test_bad_rows_fail_names_ids_and_column(tmp_path: Path, checkpoints: list[Path],
                                            features: list[str]) -> None:
    n = 50
    cols: dict[str, object] = {"id": [f"row-{i}" for i in range(n)]}
    for f in features:
        cols[f] = pa.array(np.ones(n, np.float32))
    vals = np.ones(n, np.float32)
    vals[[3, 9]] = np.nan
    cols[features[2]] = vals
    cols[features[4]] = pa.array([None if i == 20 else 1.0 for i in range(n)], pa.float32())
    write_table(tmp_path / "in" / "p.parquet", cols)
    part = discover_partitions(str(tmp_path / "in"))[0]
    manifest = _manifest(checkpoints, features)
    with pytest.raises(DataError, match=r"p.parquet: 3 row\(s\).*'row-3', 'row-9', 'row-20'.*"
                                        r"f02.*f04.*--bad-rows quarantine"):
        score_partition(part, manifest, str(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("*.parquet"))  # nothing half-written
    scored = score_partition(part, manifest, str(tmp_path / "out"), bad_rows="quarantine")
    assert scored.bad_rows == 3 and scored.scored_rows == 47
    q = pq.read_table(tmp_path / "out" / "quarantine" / "p.parquet")
    assert q.column("id").to_pylist() == ["row-3", "row-9", "row-20"]
    assert q.column("reason").to_pylist()[2] == "f04 is null or NaN"
    merged = merge_partition(part, manifest, str(tmp_path / "out"))
    assert merged.rows == 47


def test_merge_detects_mismatched_ids(tmp_path: Path, checkpoints: list[Path],
                                      features: list[str]) -> None:
    _data(tmp_path, features, n=100)
    manifest = _manifest(checkpoints, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    out = tmp_path / "out"
    score_partition(part, manifest, str(out))
    victim = out / "members" / "m1" / "p.parquet"
    t = pq.read_table(victim)
    ids = t.column("id").to_numpy().copy()
    ids[50] = -1
    pq.write_table(t.set_column(0, "id", pa.array(ids)), victim)
    with pytest.raises(DataError, match=r"ids of member 'm1' do not match those of 'm0'"):
        merge_partition(part, manifest, str(out))
    assert not (out / "ensemble" / "p.parquet").exists()


def test_staged_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x" / "f.parquet"
    with pytest.raises(RuntimeError), staged(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list((tmp_path / "x").iterdir()) == []


def test_merge_statistics_add_up(tmp_path: Path, checkpoints: list[Path],
                                 features: list[str]) -> None:
    _data(tmp_path, features, n=2500)
    manifest = _manifest(checkpoints, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    out = tmp_path / "out"
    score_partition(part, manifest, str(out))
    merged = merge_partition(part, manifest, str(out), batch_size=700)
    table = pq.read_table(merged.path)
    s = np.stack([table.column(f"score_m{k}").to_numpy() for k in range(3)], 1).astype(float)
    assert np.allclose(merged.member_sum, s.sum(0))
    assert np.allclose(merged.cross, s.T @ s)
    assert np.isclose(merged.score_sum, table.column("ensemble_score").to_numpy().sum(),
                      rtol=1e-6)
    assert 900 <= len(merged.sample_score) <= 1000
