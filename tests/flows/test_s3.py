"""Input and output on S3, against a real S3-compatible server (moto's server mode) bound to
127.0.0.1 and started here: scoring, resume, hiding of stale results, and the lock.

Models stay on local disk here (models on S3: ``test_s3_models.py``); only the data in and
out goes through S3. The server and the ``bucket`` fixture (which sets the AWS_* variables
with monkeypatch, for these tests only) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from flows.demo import build_demo, build_mlp_checkpoint, mlp_reference
from loaders.errors import DataError, OutputError, OutputLocked
from loaders.manifest import Manifest, ModelSpec, load_manifest
from tasks.fs import S3Path, s3_filesystem
from tasks.partitions import check_partition, discover_partitions
from tasks.scoring import committed_metadata, score_partition
from tasks.storage import check_writable, output_lock, store_for
from tests.helpers import N_FEATURES, assert_matches_reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _upload(local: Path, fs: pafs.FileSystem, key: str) -> None:
    pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def _objects(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Every object below ``prefix``: key -> last-modified (ns)."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path: i.mtime_ns for i in infos if i.type == pafs.FileType.File}


def _hidden(objects: dict[str, int]) -> list[str]:
    return [k for k in objects if k.rsplit("/", 1)[-1].startswith(".")]


def _reference(manifest_path: Path, data: Path) -> dict[int, tuple[float, ...]]:
    manifest = load_manifest(manifest_path)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(data.glob("*.parquet"))])
    x = np.stack([table.column(f).to_numpy() for f in manifest.features], axis=1)
    refs = np.stack([mlp_reference(m.path, x) for m in manifest.models], axis=1)
    ids = table.column("id").to_pylist()
    return {i: (*r, r.mean()) for i, r in zip(ids, refs, strict=True)}


def _assert_table_matches(fs: pafs.FileSystem, ensemble: str,
                          ref: dict[int, tuple[float, ...]]) -> None:
    # Read as any reader would: a plain pyarrow dataset, which skips hidden names.
    assert_matches_reference(ds.dataset(ensemble, filesystem=fs, format="parquet").to_table(),
                             ref)


@pytest.mark.usefixtures("prefect_harness")
def test_flow_scores_s3_input_into_s3_output_and_resumes(tmp_path: Path, bucket: str) -> None:
    from flows.ensemble import score_ensemble
    from flows.params import ScoreParams
    from flows.records import RunSummary

    fs = s3_filesystem()
    manifest = build_demo(tmp_path / "demo", partitions=3, rows=3000, n_features=8)
    data = manifest.parent / "data"
    _upload(data, fs, f"{bucket}/in")

    def run() -> RunSummary:
        return score_ensemble(ScoreParams(models=str(manifest), input=f"s3://{bucket}/in",
                                          output=f"s3://{bucket}/out", batch_size=1000))

    first = run()
    assert first.rows == 9000 and not first.failed
    _assert_table_matches(fs, f"{bucket}/out/ensemble", _reference(manifest, data))
    objects = _objects(fs, f"{bucket}/out")
    assert not _hidden(objects), "staging or lock objects left behind"
    committed = {k: v for k, v in objects.items() if "/ensemble/" in k}
    assert sorted(committed) == [f"{bucket}/out/ensemble/part-{i:04d}.parquet"
                                 for i in range(3)]
    with fs.open_input_stream(f"{bucket}/out/_run.json") as f:
        record = json.loads(f.read())
    assert set(record["partitions"]) == {f"part-{i:04d}.parquet" for i in range(3)}
    # The committed file's footer is read back from S3 for resume.
    meta = committed_metadata(store_for(f"s3://{bucket}/out"), "ensemble/part-0000.parquet")
    assert meta is not None and meta["partition"] == "part-0000.parquet"

    # Second run: everything reused, nothing rewritten.
    second = run()
    assert second.skipped_member_partitions == 9
    assert {k: v for k, v in _objects(fs, f"{bucket}/out").items()
            if "/ensemble/" in k} == committed

    # One input object changes: only that partition is rescored.
    time.sleep(1.1)  # S3's Last-Modified has one-second resolution on AWS
    old = pq.read_table(data / "part-0001.parquet").slice(0, 2000)
    pq.write_table(pa.table({n: old.column(n) if n == "id" else
                             (old.column(n).to_numpy() * 0.5).astype(np.float32)
                             for n in old.column_names}), data / "part-0001.parquet")
    _upload(data / "part-0001.parquet", fs, f"{bucket}/in/part-0001.parquet")
    third = run()
    assert third.skipped_member_partitions == 6 and third.rows == 8000
    now = {k: v for k, v in _objects(fs, f"{bucket}/out").items() if "/ensemble/" in k}
    assert [k for k in now if now[k] != committed[k]] == [
        f"{bucket}/out/ensemble/part-0001.parquet"]
    _assert_table_matches(fs, f"{bucket}/out/ensemble", _reference(manifest, data))
    assert not _hidden(_objects(fs, f"{bucket}/out"))


def _manifest(checkpoints: list[Path], features: list[str]) -> Manifest:
    return Manifest(id_column="id", features=tuple(features), models=tuple(
        ModelSpec(name=f"m{i}", path=str(p), input="features", output="score")
        for i, p in enumerate(checkpoints)))


def _put_table(fs: pafs.FileSystem, key: str, columns: dict[str, object]) -> None:
    pq.write_table(pa.table(columns), key, filesystem=fs)


def _features_table(features: list[str], x: np.ndarray) -> dict[str, object]:
    cols: dict[str, object] = {"id": np.arange(len(x), dtype=np.int64) * 3}
    for j, f in enumerate(features):
        cols[f] = x[:, j]
    return cols


def test_replaced_checkpoint_rescores_only_that_member_on_s3(
        tmp_path: Path, bucket: str, features: list[str]) -> None:
    fs = s3_filesystem()
    x = np.random.default_rng(3).standard_normal((700, N_FEATURES)).astype(np.float32)
    _put_table(fs, f"{bucket}/in/day=1/p.parquet", _features_table(features, x))
    local = [build_mlp_checkpoint(tmp_path / f"c{i}" / "model.ckpt", seed=200 + i,
                                  n_features=N_FEATURES, hidden=(16, 8)) for i in range(3)]
    manifest = _manifest(local, features)
    part = discover_partitions(f"s3://{bucket}/in")[0]
    assert part.relpath == "day=1/p.parquet" and part.path == f"s3://{bucket}/in/day=1/p.parquet"
    out = f"s3://{bucket}/out"
    first = score_partition(part, manifest, out, batch_size=256)
    assert first.merged.path == f"{out}/ensemble/day=1/p.parquet"
    build_mlp_checkpoint(local[1], seed=999, n_features=N_FEATURES, hidden=(16, 8))
    result = score_partition(part, manifest, out, batch_size=300)
    assert [m.skipped for m in result.scored.members] == [True, False, True]
    table = pq.read_table(f"{bucket}/out/ensemble/day=1/p.parquet", filesystem=fs)
    refs = np.stack([mlp_reference(p, x) for p in local], axis=1)
    for k in range(3):
        assert np.abs(table.column(f"score_m{k}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy() - refs.mean(1)).max() <= 1e-5
    assert not _hidden(_objects(fs, f"{bucket}/out"))


def test_failed_rescore_leaves_neither_partial_nor_stale_object(
        bucket: str, checkpoints: list[Path], features: list[str]) -> None:
    fs = s3_filesystem()
    manifest = _manifest(checkpoints, features)
    x = np.random.default_rng(4).standard_normal((500, N_FEATURES)).astype(np.float32)
    _put_table(fs, f"{bucket}/in/p.parquet", _features_table(features, x))
    out = f"s3://{bucket}/out"
    score_partition(discover_partitions(f"s3://{bucket}/in")[0], manifest, out)
    assert f"{bucket}/out/ensemble/p.parquet" in _objects(fs, f"{bucket}/out")
    # The input changes and now has a NaN late in the file: the rescore fails mid-way.
    time.sleep(1.1)
    x[450, 2] = np.nan
    _put_table(fs, f"{bucket}/in/p.parquet", _features_table(features, x))
    part = discover_partitions(f"s3://{bucket}/in")[0]
    with pytest.raises(DataError, match=r"1 row\(s\) with null, NaN"):
        score_partition(part, manifest, out, batch_size=100)
    # The old (stale) table is out of sight and no partial one appeared.
    assert _objects(fs, f"{bucket}/out") == {}


def test_missing_or_unreachable_storage_is_a_clear_error(
        bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"does not exist; check the input "
                                          r"\(params.input, --input\)"):
        discover_partitions(f"s3://{bucket}/nothing-here")
    with pytest.raises(DataError, match="no Parquet files found at s3://"):
        discover_partitions(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/*.parquet")
    with pytest.raises(OutputError, match=r"s3://no-such-bucket-.* is not writable"):
        check_writable(S3Path(f"no-such-bucket-{uuid.uuid4().hex[:8]}/out"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody there
    with pytest.raises(DataError, match=r"cannot list input s3://.*AWS_ENDPOINT_URL"):
        discover_partitions(f"s3://{bucket}/x/")


def test_glob_on_s3(bucket: str, features: list[str]) -> None:
    fs = s3_filesystem()
    cols = _features_table(features, np.zeros((2, N_FEATURES), np.float32))
    for key in ("d/x/a.parquet", "d/y/b.parquet", "d/y/_meta.parquet", "d/z/c.txt"):
        _put_table(fs, f"{bucket}/{key}", cols)
    parts = discover_partitions(f"s3://{bucket}/d/**/*.parquet")
    assert [p.relpath for p in parts] == ["x/a.parquet", "y/b.parquet"]
    assert [p.relpath for p in discover_partitions(f"s3://{bucket}/d/*/a.parquet")] == [
        "x/a.parquet"]
    assert all(p.size > 0 and p.mtime_ns > 0 for p in parts)
    # The run's own output below the input prefix is left out.
    assert [p.relpath for p in discover_partitions(
        f"s3://{bucket}/d", exclude=S3Path(f"{bucket}/d/y"))] == ["x/a.parquet"]


def test_fingerprint_tells_same_size_rewrites_apart(bucket: str, features: list[str]) -> None:
    """Last-Modified has one-second resolution on AWS: the ETag (and the footer's hash)
    catch a same-size rewrite within that second."""
    fs = s3_filesystem()
    manifest = _manifest([Path("unused")], features)
    x = np.random.default_rng(5).standard_normal((100, N_FEATURES)).astype(np.float32)

    def put() -> None:
        pq.write_table(pa.table(_features_table(features, x)), f"{bucket}/in/p.parquet",
                       filesystem=fs, compression="none", use_dictionary=False)

    put()
    before = check_partition(discover_partitions(f"s3://{bucket}/in")[0], manifest)
    assert before.etag and before.footer and before.etag in before.fingerprint
    x[7, 3] += 1.0
    put()
    after = check_partition(discover_partitions(f"s3://{bucket}/in")[0], manifest)
    assert after.size == before.size
    assert after.model_copy(update={"mtime_ns": before.mtime_ns}).fingerprint != (
        before.fingerprint)


def test_lock_object_keeps_a_second_run_out(bucket: str, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    import tasks.storage

    out = f"s3://{bucket}/out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from tasks.storage import output_lock\n"
         f"with output_lock({out!r}):\n print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"output folder {out} is in use by another "
                                               rf"run \(pid {holder.pid} on "), output_lock(out):
            pass
        assert len(_objects(s3_filesystem(), f"{bucket}/out")) == 1  # only the holder's
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as kill -9: its lock object stays
        holder.wait()
    with pytest.raises(OutputLocked), output_lock(out):
        pass
    # Once the dead holder's object is older than the TTL (server clock), it is taken over.
    monkeypatch.setattr(tasks.storage, "_S3_LOCK_TTL", 1.0)
    time.sleep(2.1)
    with output_lock(out), output_lock(Path(out)):  # re-entrant, also as Path("s3:/...")
        assert len(_objects(s3_filesystem(), f"{bucket}/out")) == 1
    assert _objects(s3_filesystem(), f"{bucket}/out") == {}
