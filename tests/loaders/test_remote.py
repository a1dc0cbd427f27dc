"""Members on S3 (``loaders.remote``), against the real moto S3 server of ``tests/conftest.py``:
real objects, real checkpoints and SavedModels, downloaded into a cache folder under
``tmp_path`` and scored against their numpy references."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from flows.demo import build_mlp_checkpoint, mlp_reference, mlp_weights, numpy_mlp
from loaders import remote
from loaders.cache import load_scorer
from loaders.errors import ManifestError, ModelFetchError, ModelLoadError
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import Manifest, ModelSpec, load_manifest, parse_manifest
from tasks.fs import s3_filesystem
from tasks.steps import is_transient
from tests.helpers import N_FEATURES, save_tf2_saved_model

REPO = Path(__file__).resolve().parents[2]
X = np.random.default_rng(5).standard_normal((64, N_FEATURES)).astype(np.float32)


def _upload(local: Path, key: str) -> None:
    pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_filesystem())


def _put(key: str, data: bytes) -> None:
    with s3_filesystem().open_output_stream(key) as f:
        f.write(data)


@pytest.fixture
def models(tmp_path: Path, bucket: str) -> dict[str, Any]:
    """A TF1 checkpoint (as a prefix and as a folder with its state file) and a TF2
    SavedModel on S3, with their numpy references."""
    ckpt = build_mlp_checkpoint(tmp_path / "src" / "fold0" / "model.ckpt-1200", seed=41,
                                n_features=N_FEATURES, hidden=(16, 8))
    _upload(ckpt.parent, f"{bucket}/models/fold0")
    weights = mlp_weights(43, N_FEATURES, (16, 8))
    saved = save_tf2_saved_model(tmp_path / "src" / "sm", weights)
    _upload(saved, f"{bucket}/models/sm")
    return {"ckpt": ckpt, "saved": saved, "ckpt_ref": mlp_reference(ckpt, X),
            "saved_ref": numpy_mlp(weights, X)}


def _manifest(bucket: str, *extra: ModelSpec) -> Manifest:
    return Manifest(id_column="id", features=tuple(f"f{i:02d}" for i in range(N_FEATURES)),
                    models=(
        ModelSpec(name="tf1", path=f"s3://{bucket}/models/fold0/model.ckpt-1200",
                  input="features:0", output="score:0"),
        ModelSpec(name="tf1dir", path=f"s3://{bucket}/models/fold0/", input="features:0",
                  output="score:0"),
        ModelSpec(name="sm", path=f"s3://{bucket}/models/sm"), *extra))


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_s3_members_score_like_local_ones(tmp_path: Path, models: dict[str, Any],
                                          bucket: str, checkpoints: list[Path]) -> None:
    cache = tmp_path / "cache"
    local = ModelSpec(name="local", path=str(checkpoints[0]), input="features:0",
                      output="score:0")
    pinned = remote.pin_manifest(_manifest(bucket, local), cache_dir=cache)
    assert pinned.models[3] == local  # local members are untouched
    before = sum(remote.DOWNLOADS.values())
    refs = [models["ckpt_ref"], models["ckpt_ref"], models["saved_ref"],
            mlp_reference(checkpoints[0], X)]
    for spec, ref in zip(pinned.models, refs, strict=True):
        scorer = load_scorer(spec, N_FEATURES)
        try:
            assert np.abs(scorer.predict(X).reshape(-1) - ref).max() <= 1e-5
        finally:
            scorer.close()
    # One entry per distinct set of objects: the prefix and the folder with its state
    # file differ by that file; one download each, none for a second use.
    assert sum(remote.DOWNLOADS.values()) - before == 3
    assert len(_entries(cache)) == 3 and all(n.startswith("s3-") for n in _entries(cache))
    for spec in pinned.models:
        resolve_model(spec)
    assert sum(remote.DOWNLOADS.values()) - before == 3
    # Provenance: the digest is that of the same files kept locally.
    local_ckpt = ModelSpec(name="x", path=str(models["ckpt"]), input="a", output="b")
    assert (digest_files(resolve_model(pinned.models[0]).files)
            == digest_files(resolve_model(local_ckpt).files))
    local_sm = ModelSpec(name="x", path=str(models["saved"]))
    assert (digest_files(resolve_model(pinned.models[2]).files)
            == digest_files(resolve_model(local_sm).files))


def test_manifest_read_from_s3_takes_relative_paths_from_its_prefix(
        tmp_path: Path, models: dict[str, Any], bucket: str) -> None:
    text = yaml.safe_dump({"id_column": "id", "features": ["f00"], "models": [
        {"name": "a", "path": "../models/fold0/model.ckpt-1200", "input": "features:0",
         "output": "score:0"},
        {"name": "b", "path": "../models/sm"},
        {"name": "c", "path": f"s3://{bucket}/models/sm"}]})
    _put(f"{bucket}/team/models.yaml", text.encode())
    manifest = load_manifest(f"s3://{bucket}/team/models.yaml")
    assert [m.path for m in manifest.models] == [
        f"s3://{bucket}/models/fold0/model.ckpt-1200", f"s3://{bucket}/models/sm",
        f"s3://{bucket}/models/sm"]
    pinned = remote.pin_manifest(manifest, cache_dir=tmp_path / "cache")
    scorer = load_scorer(pinned.models[1], N_FEATURES)
    try:
        assert np.abs(scorer.predict(X).reshape(-1) - models["saved_ref"]).max() <= 1e-5
    finally:
        scorer.close()
    with pytest.raises(ManifestError, match="leads out of bucket"):
        parse_manifest({"id_column": "id", "features": ["f"], "models": [
            {"name": "a", "path": "../../../etc/x"}]}, f"s3://{bucket}/team")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(f"s3://{bucket}/team/nope.yaml")
    with pytest.raises(ManifestError, match="'remote'"):
        parse_manifest({"id_column": "id", "features": ["f"], "models": [
            {"name": "a", "path": "x", "remote": {"root": "s3://b", "files": [], "local": "",
                                                 "key": "k", "cache_dir": "/", "max_bytes": 1}}]})


def test_missing_object_fails_planning_naming_member_and_key(
        tmp_path: Path, models: dict[str, Any], bucket: str) -> None:
    fs = s3_filesystem()
    for name in os.listdir(models["ckpt"].parent):
        if ".data-" not in name:
            fs.copy_file(f"{bucket}/models/fold0/{name}", f"{bucket}/broken/{name}")
    spec = ModelSpec(name="fold7", path=f"s3://{bucket}/broken/model.ckpt-1200",
                     input="features:0", output="score:0")
    manifest = Manifest(id_column="id", features=("f",), models=(spec,))
    with pytest.raises(ManifestError, match=rf"model 'fold7'.*s3://{bucket}/broken/"
                       r"model\.ckpt-1200\.data-00000-of-00001 is missing"):
        remote.pin_manifest(manifest, cache_dir=tmp_path / "cache")
    fs.delete_file(f"{bucket}/broken/model.ckpt-1200.index")
    with pytest.raises(ManifestError, match=r"model 'fold7'.*model\.ckpt-1200\.index is missing"):
        remote.pin_manifest(manifest, cache_dir=tmp_path / "cache")
    # A SavedModel's variables are checked the same way.
    fs.delete_file(f"{bucket}/models/sm/variables/variables.data-00000-of-00001")
    sm = Manifest(id_column="id", features=("f",), models=(
        ModelSpec(name="sm", path=f"s3://{bucket}/models/sm"),))
    with pytest.raises(ManifestError, match=r"model 'sm'.*variables\.data-00000-of-00001"):
        remote.pin_manifest(sm, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing was downloaded


def test_unsafe_keys_are_refused(tmp_path: Path, models: dict[str, Any], bucket: str,
                                s3_endpoint: str) -> None:
    # A key that climbs out: S3 stores it as written (sent raw, as any client can).
    conn = http.client.HTTPConnection(s3_endpoint.split("://", 1)[1], timeout=10)
    conn.request("PUT", f"/{bucket}/models/sm/assets/../../../evil", body=b"x")
    assert conn.getresponse().status == 200
    spec = ModelSpec(name="sm", path=f"s3://{bucket}/models/sm")
    with pytest.raises(ManifestError, match=r"model 'sm': refusing object .*assets/\.\./"):
        remote.pin_model(spec, cache_dir=tmp_path, max_bytes=1 << 30)
    with pytest.raises(ManifestError, match="leads outside"):
        remote._checked_rel("m", "../../etc/passwd", "s3://b")
    with pytest.raises(ManifestError, match="leads outside"):
        remote._checked_rel("m", "/etc/passwd", "s3://b")


def test_truncated_download_is_never_loaded_and_is_retried(
        tmp_path: Path, models: dict[str, Any], bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    spec = remote.pin_manifest(_manifest(bucket), cache_dir=cache).models[2]
    real = remote.fetch_object
    cuts: list[str] = []

    def short(fs: pafs.FileSystem, src: str, dest: Path) -> str:
        etag = real(fs, src, dest)
        if src.endswith("variables.data-00000-of-00001") and len(cuts) < limit:
            cuts.append(src)
            with open(dest, "r+b") as f:  # as a connection dropped mid-transfer leaves it
                f.truncate(dest.stat().st_size // 2)
        return etag

    monkeypatch.setattr(remote, "fetch_object", short)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    limit = remote.FETCH_ATTEMPTS  # every attempt is cut short: the member fails, retryably
    with pytest.raises(ModelFetchError, match=r"incomplete \(\d[\d,]* of [\d,]+ bytes\)") as err:
        load_scorer(spec, N_FEATURES)
    assert is_transient(err.value) and len(cuts) == remote.FETCH_ATTEMPTS
    assert _entries(cache) == []  # no entry, no temporary folder left
    limit = len(cuts) + 1  # the next call's first attempt is cut, its retry succeeds
    before = sum(remote.DOWNLOADS.values())
    scorer = load_scorer(spec, N_FEATURES)
    try:
        assert np.abs(scorer.predict(X).reshape(-1) - models["saved_ref"]).max() <= 1e-5
    finally:
        scorer.close()
    assert sum(remote.DOWNLOADS.values()) - before == 1 and len(_entries(cache)) == 1


def test_replaced_object_is_a_new_entry(tmp_path: Path, models: dict[str, Any],
                                        bucket: str) -> None:
    cache = tmp_path / "cache"
    first = remote.pin_manifest(_manifest(bucket), cache_dir=cache).models[0]
    old_digest = digest_files(resolve_model(first).files)
    other = build_mlp_checkpoint(tmp_path / "other" / "model.ckpt-1200", seed=77,
                                 n_features=N_FEATURES, hidden=(16, 8))
    _upload(other.parent, f"{bucket}/models/fold0")
    second = remote.pin_manifest(_manifest(bucket), cache_dir=cache).models[0]
    assert second.remote and first.remote and second.remote.key != first.remote.key
    scorer = load_scorer(second, N_FEATURES)
    try:
        assert np.abs(scorer.predict(X).reshape(-1) - mlp_reference(other, X)).max() <= 1e-5
    finally:
        scorer.close()
    assert digest_files(resolve_model(second).files) != old_digest
    # A worker holding the old pin never loads the new object under the old key.
    import shutil

    shutil.rmtree(cache / first.remote.key)
    with pytest.raises(ModelLoadError, match="replaced since the run was planned"):
        resolve_model(first)


def test_untrusted_or_altered_entries_are_refused(tmp_path: Path, models: dict[str, Any],
                                                  bucket: str) -> None:
    cache = tmp_path / "cache"
    spec = remote.pin_manifest(_manifest(bucket), cache_dir=cache).models[2]
    assert spec.remote is not None
    entry = Path(resolve_model(spec).location).parent
    assert entry.name == spec.remote.key
    remote._verified.clear()  # as a new process sees it
    (entry / "files" / "saved_model.pb").chmod(0o666)
    with pytest.raises(ModelLoadError, match="writable by other users"):
        resolve_model(spec)
    (entry / "files" / "saved_model.pb").chmod(0o644)
    with open(entry / "files" / "saved_model.pb", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match="changed since it was downloaded"):
        resolve_model(spec)
    moved = entry.rename(tmp_path / "elsewhere")
    entry.symlink_to(moved)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        resolve_model(spec)


def test_least_recently_used_entries_are_evicted(tmp_path: Path, models: dict[str, Any],
                                                 bucket: str, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    cache = tmp_path / "cache"
    pinned = remote.pin_manifest(_manifest(bucket), cache_dir=cache, max_bytes=1)
    monkeypatch.setattr(remote, "EVICT_GRACE_SECONDS", 0.0)
    (cache / "mine").mkdir(parents=True)  # not the tool's: never touched
    resolve_model(pinned.models[0])
    first = pinned.models[0].remote
    assert first is not None and (cache / first.key).is_dir()
    old = time.time() - 100
    os.utime(cache / first.key, (old, old))
    resolve_model(pinned.models[2])  # over the limit: the older entry goes
    second = pinned.models[2].remote
    assert second is not None
    assert _entries(cache) == sorted(["mine", second.key])
    assert remote.evict(cache, 1) == [second.key]
    assert _entries(cache) == ["mine"]


_WORKER = textwrap.dedent("""
    import json, sys, time
    from loaders import remote
    from loaders.manifest import ModelSpec
    specs = [ModelSpec.model_validate(s) for s in json.loads(sys.argv[1])]
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    for spec in specs:
        remote.localize(spec)
    print(json.dumps(dict(remote.DOWNLOADS)))
""")


def test_two_processes_fetching_at_once_download_each_model_once(
        tmp_path: Path, models: dict[str, Any], bucket: str) -> None:
    cache = tmp_path / "cache"
    pinned = remote.pin_manifest(_manifest(bucket), cache_dir=cache)
    specs = json.dumps([m.model_dump() for m in pinned.models])
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.time() + 8  # both have imported everything by then
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, specs, str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-2000:] for _, e in outs]
    downloads: dict[str, int] = {}
    for out, _ in outs:
        for key, n in json.loads(out.decode().strip().splitlines()[-1]).items():
            downloads[key] = downloads.get(key, 0) + n
    keys = sorted({m.remote.key for m in pinned.models if m.remote})
    assert downloads == dict.fromkeys(keys, 1)
    assert _entries(cache) == keys  # complete entries only, no temporary folder left
    for key in keys:
        info = json.loads((cache / key / "entry.json").read_text())
        assert info["key"] == key and info["bytes"] > 0


def test_without_a_run_setting_each_host_uses_its_environment(
        tmp_path: Path, models: dict[str, Any], bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = remote.pin_manifest(_manifest(bucket)).models[2]
    assert spec.remote is not None and spec.remote.cache_dir == ""
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "host-cache"))
    assert Path(resolve_model(spec).location).parent == tmp_path / "host-cache" / spec.remote.key
    assert remote.parse_size("20G") == 20 * 2**30 and remote.parse_size("512MiB") == 2**29
    monkeypatch.setenv(remote.MAX_BYTES_ENV, "lots")
    with pytest.raises(ManifestError, match="ENSEMBLE_MODEL_CACHE_MAX_BYTES"):
        remote.pin_manifest(_manifest(bucket))


def test_keys_a_disk_cannot_hold_are_refused_at_planning(
        tmp_path: Path, models: dict[str, Any], bucket: str) -> None:
    """A key both a file and a folder (``assets`` beside ``assets/x``), or a part longer
    than a file name can be: refused at planning, naming the keys, not after downloads."""
    _put(f"{bucket}/models/sm/assets", b"a file where a folder is")
    _put(f"{bucket}/models/sm/assets/x.txt", b"x")
    spec = ModelSpec(name="sm", path=f"s3://{bucket}/models/sm")
    with pytest.raises(ManifestError, match=r"model 'sm': objects .*/models/sm/assets and "
                                            r".*/models/sm/assets/x\.txt cannot both"):
        remote.pin_model(spec, cache_dir=tmp_path / "cache")
    long_name = "model.ckpt-1200." + "L" * 300
    _put(f"{bucket}/models/fold0/{long_name}", b"stray")
    ckpt = ModelSpec(name="tf1", path=f"s3://{bucket}/models/fold0/model.ckpt-1200",
                     input="features:0", output="score:0")
    with pytest.raises(ManifestError, match="longer than 255 bytes"):
        remote.pin_model(ckpt, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_stray_shard_of_an_earlier_save_does_not_fail_planning(
        tmp_path: Path, models: dict[str, Any], bucket: str) -> None:
    """As on local disk: one complete set of shards is enough (TensorFlow reads the count
    its .index names)."""
    _put(f"{bucket}/models/fold0/model.ckpt-1200.data-00000-of-00003", b"left over")
    spec = ModelSpec(name="tf1", path=f"s3://{bucket}/models/fold0/model.ckpt-1200",
                     input="features:0", output="score:0")
    scorer = load_scorer(remote.pin_model(spec, cache_dir=tmp_path / "cache"), N_FEATURES)
    try:
        assert np.abs(scorer.predict(X).reshape(-1) - models["ckpt_ref"]).max() <= 1e-5
    finally:
        scorer.close()


def test_same_sized_models_without_etags_get_their_own_entries(
        tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two folds of one network have files of the same sizes; where a server gives no
    ETag and Last-Modified agrees to the second, the prefix still tells them apart."""
    for fold, seed in (("a", 1), ("b", 2)):
        ckpt = build_mlp_checkpoint(tmp_path / "src" / fold / "model.ckpt", seed=seed,
                                    n_features=N_FEATURES, hidden=(16, 8))
        _upload(ckpt.parent, f"{bucket}/folds/{fold}")
    monkeypatch.setattr(remote, "_tag", lambda fs, path, info: "mtime:0")  # no ETags
    pins = [remote.pin_model(ModelSpec(name=f, path=f"s3://{bucket}/folds/{f}/model.ckpt",
                                       input="features:0", output="score:0"),
                             cache_dir=tmp_path / "cache") for f in ("a", "b")]
    a, b = (p.remote for p in pins)
    assert a is not None and b is not None
    assert [size for _, size, _ in a.files] == [size for _, size, _ in b.files]
    assert a.key != b.key


def test_an_s3_manifest_names_no_local_files(bucket: str) -> None:
    for path in ("/etc/models/m.ckpt", "~/models/m.ckpt"):
        _put(f"{bucket}/team/m.yaml", yaml.safe_dump({
            "id_column": "id", "features": ["f"], "models": [
                {"name": "m", "path": path, "input": "x:0", "output": "y:0"}]}).encode())
        with pytest.raises(ManifestError, match="names models on S3 only"):
            load_manifest(f"s3://{bucket}/team/m.yaml")
    with pytest.raises(ManifestError, match="path"):
        parse_manifest({"id_column": "id", "features": ["f"], "models": [
            {"name": "m", "path": ""}]})


def test_a_cache_inside_the_output_or_unwritable_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=r"model cache .* is inside the output"):
        remote.check_cache_folder(str(out / "ensemble" / "cache"),
                                  apart_from={"input": str(tmp_path / "in"), "output": str(out)})
    with pytest.raises(ManifestError, match=r"model cache .* is inside the input"):
        remote.check_cache_folder(str(tmp_path / "in" / "c"), apart_from={
            "input": str(tmp_path / "in" / "**" / "*.parquet"), "output": str(out)})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ManifestError, match="cannot be written"):
        remote.check_cache_folder(str(tmp_path / "afile" / "c"), apart_from={})
    assert remote.check_cache_folder(str(tmp_path / "c"), apart_from={
        "input": str(tmp_path / "in"), "output": str(out)}) == tmp_path / "c"
