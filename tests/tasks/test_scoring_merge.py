"""The plain functions under the tasks, on real checkpoints and Parquet files."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.reading
from flows.demo import build_mlp_checkpoint, mlp_reference
from loaders.base import GraphScorer
from loaders.errors import DataError, ManifestError, ModelLoadError
from loaders.manifest import Manifest, ModelSpec, parse_manifest
from tasks.merge import combine
from tasks.partitions import check_partition, discover_partitions
from tasks.reading import RowStream, batches_by_row_group, read_ahead
from tasks.scoring import committed_metadata, score_partition
from tasks.storage import store_for
from tests.helpers import N_FEATURES, save_reciprocal_checkpoint, write_table


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
    s = np.array([[0.1, 0.2, 0.6], [1.0, 1.0, 1.0]], dtype=np.float32)  # (rows, members)
    w = np.array([1.0, 1.0, 2.0])
    ens, std, n = combine(s.T, "mean", w)
    assert np.allclose(ens, s.mean(1)) and np.allclose(std, s.std(1)) and list(n) == [3, 3]
    ens, std, _ = combine(s.T, "weighted", w)
    assert np.allclose(ens, (s * w).sum(1) / 4) and np.allclose(std, s.std(1))
    ens, _, _ = combine(s.T, "median", w)
    assert np.allclose(ens, [0.2, 1.0])
    s[0, 2] = np.nan
    ens, std, n = combine(s.T, "mean", w)
    assert np.allclose(ens[0], 0.15) and np.isclose(std[0], 0.05) and list(n) == [2, 3]
    ens, _, _ = combine(s.T, "weighted", w)
    assert np.allclose(ens, [0.15, 1.0])


def test_row_stream_slices_across_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": np.arange(100)}), path, row_group_size=30)
    stream = RowStream(str(path), ["x"], batch_size=45)
    got = [stream.take(n).column(0).to_pylist() for n in (10, 40, 50)]
    assert [v for chunk in got for v in chunk] == list(range(100))
    with pytest.raises(ValueError, match="ended after 0 of 1 rows"):
        stream.take(1)


def test_batches_are_decoded_in_chunks_and_sliced_within_row_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": np.arange(2500), "y": np.arange(2500) * 2.0}), path,
                   row_group_size=1000)
    monkeypatch.setattr(tasks.reading, "DECODE_ROWS", 700)
    batches = list(batches_by_row_group(pq.ParquetFile(path), ["y", "x"], 300))
    # Row groups of 1000, 1000 and 500 rows, decoded 700 rows at a time, sliced to 300.
    assert [b.num_rows for b in batches] == [300, 300, 100, 300] * 2 + [300, 200]
    table = pa.Table.from_batches(batches)
    assert table.column_names == ["y", "x"]
    assert table.column("x").to_pylist() == list(range(2500))
    # A batch size above the decode size decodes that many rows per call.
    assert [b.num_rows for b in batches_by_row_group(pq.ParquetFile(path), ["x"], 800)] == [
        800, 200, 800, 200, 500]


def test_read_ahead_keeps_order_errors_and_stops_early() -> None:
    """Items come in order, an error producing one is raised where it is asked for, the
    next item is produced while the caller holds the current one, and a consumer that
    stops early leaves the producer one item ahead at most."""
    import threading
    import time

    threads: set[str] = set()
    produced: list[int] = []

    def numbers(fail_at: int | None = None):  # type: ignore[no-untyped-def]
        for i in range(10):
            threads.add(threading.current_thread().name)
            if i == fail_at:
                raise pa.ArrowInvalid(f"bad page at {i}")
            produced.append(i)
            yield i

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
    assert list(read_ahead(numbers(), pool)) == list(range(10))
    assert all(name.startswith("read-ahead") for name in threads)

    got = []
    with pytest.raises(pa.ArrowInvalid, match="bad page at 3"):
        for i in read_ahead(numbers(fail_at=3), pool):
            got.append(i)
    assert got == [0, 1, 2]

    produced.clear()
    ahead = read_ahead(numbers(), pool)
    assert next(ahead) == 0
    deadline = time.monotonic() + 10
    while 1 not in produced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert produced == [0, 1]  # the next item was made while the caller held this one
    assert next(ahead) == 1
    ahead.close()
    assert produced in ([0, 1, 2], [0, 1])  # the one in flight may still finish
    pool.shutdown()


def test_score_matches_reference_and_reruns_skip(tmp_path: Path, checkpoints: list[Path],
                                                 features: list[str]) -> None:
    x = _data(tmp_path, features)
    manifest = _manifest(checkpoints, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    out = tmp_path / "out"
    result = score_partition(part, manifest, str(out), batch_size=300, method="weighted")
    assert result.scored.rows == 1000 and [m.name for m in result.scored.members] == [
        "m0", "m1", "m2"]
    table = pq.read_table(result.merged.path)
    assert table.column_names == ["id", "score_m0", "score_m1", "score_m2", "ensemble_score",
                                  "ensemble_std", "n_members"]
    assert table.column("id").to_pylist() == list(range(0, 7000, 7))
    refs = np.stack([mlp_reference(p, x) for p in checkpoints], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy()
                  - refs @ np.array([1, 2, 3]) / 6).max() <= 1e-5
    assert np.abs(table.column("ensemble_std").to_numpy() - refs.std(axis=1)).max() <= 1e-5
    # Same inputs again: nothing is read or re-scored, and the figures are the same.
    again = score_partition(part, manifest, str(out), method="weighted")
    assert again.scored.rows == 0 and all(m.skipped for m in again.scored.members)
    assert again.merged.model_dump() == result.merged.model_dump()
    # Another method: members reused, ensemble recomputed.
    median = score_partition(part, manifest, str(out), method="median")
    assert all(m.skipped for m in median.scored.members)
    table = pq.read_table(median.merged.path)
    assert np.abs(table.column("ensemble_score").to_numpy()
                  - np.median(refs, axis=1)).max() <= 1e-5


def test_next_batch_starts_while_members_score_the_last(
        tmp_path: Path, checkpoints: list[Path], features: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch N+1 is decoded and its members start before batch N is finished: members
    that take their time must still score their own batch's rows."""
    x = _data(tmp_path, features)
    manifest = _manifest(checkpoints, features)
    real = GraphScorer.predict
    lock = threading.Lock()
    running = [0, 0]  # predicts in flight now, and at most

    def slow(self: GraphScorer, matrix: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.02)  # the next batch is decoded meanwhile
        try:
            return real(self, matrix)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(GraphScorer, "predict", slow)
    part = discover_partitions(str(tmp_path / "in"))[0]
    result = score_partition(part, manifest, str(tmp_path / "out"), batch_size=100)
    table = pq.read_table(result.merged.path)
    assert table.column("id").to_pylist() == list(range(0, 7000, 7))
    refs = np.stack([mlp_reference(p, x) for p in checkpoints], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert running[1] > len(checkpoints)  # members of two batches were in flight at once


def test_batches_larger_than_the_feed_are_fed_in_slices(
        tmp_path: Path, checkpoints: list[Path], features: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's feed size bounds every Session.run, whatever the batch size, and the
    slices' scores land in their own rows."""
    x = _data(tmp_path, features)
    manifest = _manifest(checkpoints, features)
    real = GraphScorer.predict
    fed: list[int] = []

    def counted(self: GraphScorer, matrix: np.ndarray) -> np.ndarray:
        fed.append(matrix.shape[0])
        return real(self, matrix)

    monkeypatch.setattr(GraphScorer, "predict", counted)
    part = discover_partitions(str(tmp_path / "in"))[0]
    result = score_partition(part, manifest, str(tmp_path / "out"), batch_size=700,
                             feed_rows=256)
    table = pq.read_table(result.merged.path)
    refs = np.stack([mlp_reference(p, x) for p in checkpoints], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    # Batches of 700 and 300 rows, in equal slices: 233 + 233 + 234 and 150 + 150, for
    # each member (and the 2-row probe of each load, where this test loads).
    assert sorted(set(fed) - {2}) == [150, 233, 234] and fed.count(233) == 2 * 3


def test_an_error_of_the_batch_before_is_reported_before_a_read_error(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    """Batch N+1 is read while batch N's members score: when both fail, batch N's error
    (a member's inf score) is the one reported, not the next row group's corrupt page
    (an OSError, which would be retried as transient)."""
    x = np.random.default_rng(1).uniform(0.5, 1.5, (512, N_FEATURES)).astype(np.float32)
    x[200, 0] = 0.0  # 1 / f00 is inf there: in row group 0's last 64-row batch
    path = tmp_path / "in" / "p.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": np.arange(512, dtype=np.int64),
                             **{f: x[:, j] for j, f in enumerate(features)}}),
                   path, row_group_size=256, compression="none", use_dictionary=False)
    page = pq.ParquetFile(path).metadata.row_group(1).column(3).data_page_offset
    data = bytearray(path.read_bytes())
    data[page:page + 12] = b"\xff" * 12  # row group 1's page header, unreadable
    path.write_bytes(bytes(data))
    model = save_reciprocal_checkpoint(tmp_path / "recip" / "model.ckpt")
    manifest = Manifest(id_column="id", features=tuple(features), models=(
        ModelSpec(name="recip", path=str(model), input="features:0", output="score:0"),))
    part = discover_partitions(str(tmp_path / "in"))[0]
    with pytest.raises(ModelLoadError, match=r"non-finite.*ids \[200\]"):
        score_partition(part, manifest, str(tmp_path / "out"), batch_size=64)
    assert not (tmp_path / "out" / "ensemble" / "p.parquet").exists()


def test_replaced_checkpoint_rescores_only_that_member(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    x = _data(tmp_path, features)
    local = [build_mlp_checkpoint(tmp_path / f"c{i}" / "model.ckpt", seed=100 + i,
                                  n_features=N_FEATURES, hidden=(16, 8))
             for i in range(len(checkpoints))]
    manifest = _manifest(local, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    out = tmp_path / "out"
    score_partition(part, manifest, str(out), batch_size=256)
    build_mlp_checkpoint(local[1], seed=555, n_features=N_FEATURES, hidden=(16, 8))
    result = score_partition(part, manifest, str(out), batch_size=400)
    assert [m.skipped for m in result.scored.members] == [True, False, True]
    table = pq.read_table(result.merged.path)
    refs = np.stack([mlp_reference(p, x) for p in local], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy() - refs.mean(1)).max() <= 1e-5
    assert committed_metadata(store_for(out), "ensemble/p.parquet")["members"]["m1"] == (
        result.scored.members[1].digest)


def test_changed_partition_is_rescored(tmp_path: Path, checkpoints: list[Path],
                                       features: list[str]) -> None:
    _data(tmp_path, features, seed=1)
    manifest = _manifest(checkpoints, features)
    out = tmp_path / "out"
    score_partition(discover_partitions(str(tmp_path / "in"))[0], manifest, str(out))
    x = _data(tmp_path, features, n=500, seed=2)
    os.utime(tmp_path / "in" / "p.parquet", ns=(1, 1))
    result = score_partition(discover_partitions(str(tmp_path / "in"))[0], manifest, str(out))
    assert not any(m.skipped for m in result.scored.members)
    table = pq.read_table(result.merged.path)
    assert table.num_rows == 500
    assert np.abs(table.column("score_m0").to_numpy()
                  - mlp_reference(checkpoints[0], x)).max() <= 1e-5


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
    result = score_partition(part, manifest, str(tmp_path / "out"), bad_rows="quarantine")
    assert result.scored.bad_rows == 3 and result.merged.rows == 47
    q = pq.read_table(tmp_path / "out" / "quarantine" / "p.parquet")
    assert q.column("id").to_pylist() == ["row-3", "row-9", "row-20"]
    assert q.column("reason").to_pylist()[2] == "f04 is null or NaN"
    table = pq.read_table(result.merged.path)
    assert "row-3" not in table.column("id").to_pylist() and table.num_rows == 47


def test_non_finite_model_output(tmp_path: Path, features: list[str]) -> None:
    """A model that returns NaN for large inputs: fail names it; quarantine sets rows aside."""
    from loaders._tf import tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FEATURES], name="features")
        total = tf.reduce_sum(x, axis=1)
        tf.where(total > 100.0, tf.fill(tf.shape(total), np.nan), total, name="score")
        tf.compat.v1.Variable(1.0, name="v")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(tmp_path / "nan" / "model.ckpt"))
    cols: dict[str, object] = {"id": np.arange(10)}
    for f in features:
        cols[f] = np.where(np.arange(10) == 4, 50.0, 0.1).astype(np.float32)
    write_table(tmp_path / "in" / "p.parquet", cols)
    manifest = Manifest(id_column="id", features=tuple(features), models=(
        ModelSpec(name="nanny", path=str(tmp_path / "nan" / "model.ckpt"), input="features",
                  output="score"),))
    part = discover_partitions(str(tmp_path / "in"))[0]
    with pytest.raises(ModelLoadError, match=r"\['nanny'\] returned non-finite.*ids \[4\]"):
        score_partition(part, manifest, str(tmp_path / "out"))
    result = score_partition(part, manifest, str(tmp_path / "out"), bad_rows="quarantine")
    assert result.merged.rows == 9
    q = pq.read_table(tmp_path / "out" / "quarantine" / "p.parquet")
    assert q.to_pylist() == [{"id": 4, "reason": "non-finite score from nanny"}]


def test_duplicate_ids_are_refused(tmp_path: Path, checkpoints: list[Path],
                                   features: list[str]) -> None:
    cols: dict[str, object] = {"id": [1, 2, 3, 2, 5, 1]}
    for f in features:
        cols[f] = np.zeros(6, np.float32)
    write_table(tmp_path / "in" / "p.parquet", cols)
    part = discover_partitions(str(tmp_path / "in"))[0]
    with pytest.raises(DataError, match=r"2 id\(s\) appear more than once \(\[1, 2\]\)"):
        score_partition(part, _manifest(checkpoints, features), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "ensemble" / "p.parquet").exists()

    cols["id"] = [1, None, 3, None, 5, 6]  # rows without an id cannot be told apart either
    write_table(tmp_path / "in" / "p.parquet", cols)
    part = discover_partitions(str(tmp_path / "in"))[0]
    with pytest.raises(DataError, match=r"p.parquet: 2 row\(s\) have no id"):
        score_partition(part, _manifest(checkpoints, features), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "ensemble" / "p.parquet").exists()


def test_staged_leaves_nothing_on_failure(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    with pytest.raises(RuntimeError), store.staged("x/f.parquet") as out:
        out.write(b"half")
        raise RuntimeError("boom")
    assert list((tmp_path / "x").iterdir()) == []
    with store.staged("x/f.parquet") as out:
        out.write(b"whole")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.parquet"]
    assert (tmp_path / "x" / "f.parquet").read_bytes() == b"whole"


def test_statistics_add_up(tmp_path: Path, checkpoints: list[Path],
                           features: list[str]) -> None:
    _data(tmp_path, features, n=2500)
    manifest = _manifest(checkpoints, features)
    part = discover_partitions(str(tmp_path / "in"))[0]
    merged = score_partition(part, manifest, str(tmp_path / "out"), batch_size=700).merged
    table = pq.read_table(merged.path)
    s = np.stack([table.column(f"score_m{k}").to_numpy() for k in range(3)], 1).astype(float)
    assert np.allclose(merged.member_sum, s.sum(0))
    assert np.allclose(merged.cross, s.T @ s)
    assert np.isclose(merged.score_sum, table.column("ensemble_score").to_numpy().sum(),
                      rtol=1e-6)
    assert 900 <= len(merged.sample_score) <= 1000


@pytest.mark.parametrize("weights", [(1e308, 1e308, 1.0), (5e-324, 1.0, 1.0),
                                     (5e-324, 5e-324, 5e-324)])
def test_extreme_legal_weights_give_a_finite_weighted_mean(
        tmp_path: Path, checkpoints: list[Path], features: list[str],
        weights: tuple[float, ...]) -> None:
    x = _data(tmp_path, features, n=200)
    manifest = Manifest(
        id_column="id", features=tuple(features),
        models=tuple(ModelSpec(name=f"m{i}", path=str(p), input="features", output="score",
                               weight=w) for i, (p, w) in enumerate(zip(checkpoints, weights,
                                                                        strict=True))))
    part = discover_partitions(str(tmp_path / "in"))[0]
    result = score_partition(part, manifest, str(tmp_path / "out"), method="weighted")
    ens = pq.read_table(result.merged.path).column("ensemble_score").to_numpy()
    refs = np.stack([mlp_reference(p, x) for p in checkpoints], axis=1)
    top = max(weights)
    share = np.array([w / top for w in weights])
    assert np.isfinite(ens).all()
    assert np.abs(ens - refs @ (share / share.sum())).max() <= 1e-5


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 0.0, -1.0])
def test_non_finite_or_non_positive_weight_is_refused(weight: float) -> None:
    with pytest.raises(ManifestError, match=r"models\.0\.weight: Input should be (a finite "
                                            r"number|greater than 0)$"):
        parse_manifest({"id_column": "id", "features": ["a"],
                        "models": [{"name": "m", "path": "x", "weight": weight}]})


def test_same_size_same_mtime_replacement_is_rescored(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    """A partition re-exported with other values, the same size and its old mtime (as
    rsync -t or cp -p leave it): the footer hash in the fingerprint tells it apart, and
    every member is rescored on the new data (none reused)."""
    manifest = _manifest(checkpoints, features)
    path = tmp_path / "in" / "p.parquet"

    def write(x: np.ndarray) -> None:
        cols: dict[str, object] = {f: x[:, j] for j, f in enumerate(features)}
        cols["id"] = np.arange(len(x), dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path, compression="none", use_dictionary=False)

    rng = np.random.default_rng(7)
    old, new = (rng.standard_normal((500, N_FEATURES)).astype(np.float32) for _ in range(2))
    write(old)
    st = path.stat()
    first = score_partition(check_partition(discover_partitions(str(path))[0], manifest),
                            manifest, str(tmp_path / "out"))
    write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = score_partition(check_partition(discover_partitions(str(path))[0], manifest),
                            manifest, str(tmp_path / "out"))
    assert again.scored.rows == 500 and not any(m.skipped for m in again.scored.members)
    table = pq.read_table(again.merged.path)
    for k, prefix in enumerate(checkpoints):
        assert np.abs(table.column(f"score_m{k}").to_numpy()
                      - mlp_reference(prefix, new)).max() <= 1e-5
    assert first.merged.path == again.merged.path
