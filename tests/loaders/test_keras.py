"""Keras files as members: ``.keras`` (functional and subclassed) and legacy ``.h5``,
exported once in a process of their own, cached by content, and scored as SavedModels.

Every member is checked against ``model.predict`` run in a fresh process. The module's
tests share one export cache (``ENSEMBLE_SCORING_CACHE_DIR``, a temporary folder), so a
file is exported once for all of them; the tests that count exports use their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.demo import mlp_reference, mlp_weights
from loaders import keras_file
from loaders.cache import load_scorer
from loaders.errors import ManifestError, ModelLoadError
from loaders.inspect import digest_files, resolve_model
from loaders.keras_file import CACHE_ENV, EXPORTS, cache_root, export_key
from loaders.manifest import ModelSpec, parse_manifest
from tests.helpers import (
    KERAS_CUSTOM_MODULE,
    N_FEATURES,
    ckpt_member,
    keras_mlp,
    keras_predict,
    read_dataset,
    save_keras_lambda,
    save_keras_multi_io,
    write_manifest,
    write_table,
)

F = N_FEATURES
X = np.random.default_rng(5).standard_normal((400, F)).astype(np.float32)
EXTRA = np.random.default_rng(6).standard_normal((400, 3)).astype(np.float32)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got.astype(np.float64) - want).max() <= 1e-5


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Small real Keras models saved in a temporary folder, the custom-objects module on
    ``sys.path``, a module-wide export cache, and each model's ``model.predict`` on X."""
    import keras

    root = tmp_path_factory.mktemp("keras")
    module = f"ensemble_custom_{uuid.uuid4().hex[:8]}"
    (root / "code").mkdir()
    (root / "code" / f"{module}.py").write_text(KERAS_CUSTOM_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "code"))
        mp.setenv(CACHE_ENV, str(root / "cache"))
        keras_mlp(mlp_weights(41, F, hidden=(16, 8))).save(root / "functional.keras")
        custom = __import__(module)
        keras.utils.set_random_seed(42)
        subclassed = custom.ResidualScorer(units=5)
        subclassed(X[:2])
        subclassed.save(root / "subclassed.keras")
        keras_mlp(mlp_weights(43, F, hidden=(8,))).save(root / "legacy.h5")
        save_keras_multi_io(root / "multi.keras", seed=44, n_features=F)
        refs = keras_predict({
            "functional": {"path": root / "functional.keras", "inputs": X},
            "subclassed": {"path": root / "subclassed.keras", "inputs": X,
                           "custom_objects": module},
            "legacy": {"path": root / "legacy.h5", "inputs": X},
            "multi": {"path": root / "multi.keras", "inputs": [X, EXTRA], "output": 0},
        }, root / "predict")
        yield {"root": root, "module": module, "refs": refs,
               "specs": {
                   "functional": ModelSpec(name="functional", path=str(root / "functional.keras")),
                   "subclassed": ModelSpec(name="subclassed", path=str(root / "subclassed.keras"),
                                           custom_objects=module),
                   "legacy": ModelSpec(name="legacy", path=str(root / "legacy.h5")),
               }}


@pytest.mark.parametrize("member", ["functional", "subclassed", "legacy"])
def test_keras_member_scores_like_predict(keras_models: dict[str, Any], member: str) -> None:
    spec = keras_models["specs"][member]
    scorer = load_scorer(spec, F)
    try:
        assert scorer.source == spec.path
        assert Path(scorer.export_dir).parent == cache_root()
        assert resolve_model(spec).format == "keras"
        assert scorer.digest == digest_files(resolve_model(spec).files)
        info = json.loads((Path(scorer.export_dir) / "export.json").read_text())
        assert info["pid"] != os.getpid()  # Keras ran in the export process, not here
        _close(scorer.predict(X), keras_models["refs"][member])
    finally:
        scorer.close()


def test_multi_input_model_picked_by_name(keras_models: dict[str, Any]) -> None:
    path = str(keras_models["root"] / "multi.keras")
    scorer = load_scorer(ModelSpec(name="multi", path=path, input="features", output="score"),
                         F)
    try:
        _close(scorer.predict(X), keras_models["refs"]["multi"])
    finally:
        scorer.close()
    with pytest.raises(ModelLoadError, match=r"'multi': Keras model .*multi\.keras has no "
                                             r"input 'feats'; its inputs are \['extra', "
                                             r"'features'\]"):
        load_scorer(ModelSpec(name="multi", path=path, input="feats", output="score"), F)
    with pytest.raises(ModelLoadError, match=r"has no output 'prob'; its outputs are "
                                             r"\['mixed', 'score'\]"):
        load_scorer(ModelSpec(name="multi", path=path, input="features", output="prob"), F)
    with pytest.raises(ModelLoadError, match=r"has 2 inputs \['extra', 'features'\]; choose "
                                             r"one with 'input:'"):
        load_scorer(ModelSpec(name="multi", path=path, output="score"), F)
    with pytest.raises(ModelLoadError, match=r"output 'mixed' of Keras model .* needs other "
                                             r"inputs than 'features'"):
        load_scorer(ModelSpec(name="multi", path=path, input="features", output="mixed"), F)


@pytest.mark.parametrize("name,fmt", [("lambda.keras", "auto"), ("lambda.h5", "auto"),
                                      ("lambda_h5.model", "keras")])
def test_lambda_refused_by_safe_mode(tmp_path: Path, keras_models: dict[str, Any], name: str,
                                     fmt: str) -> None:
    saved = save_keras_lambda(tmp_path / (name if fmt == "auto" else "lambda_h5.h5"), F)
    path = saved if fmt == "auto" else saved.rename(tmp_path / name)
    with pytest.raises(ModelLoadError, match=(
            r"refusing .*: its Lambda layer\(s\) \['doubled'\] hold Python code, and Keras's "
            r"safe mode, which this loader always uses, forbids deserializing Python lambdas"
            r".*Rewrite each as a proper layer.*'custom_objects:'.*export the model as a "
            r"SavedModel yourself")):
        load_scorer(ModelSpec(name="lam", path=str(path), format=fmt), F)  # type: ignore[arg-type]
    assert not list(cache_root().glob(".*.tmp"))  # the failed export left nothing behind


def test_custom_class_needs_custom_objects(keras_models: dict[str, Any]) -> None:
    path = keras_models["specs"]["subclassed"].path
    with pytest.raises(ModelLoadError, match=r"'sub': .*subclassed\.keras uses a class or "
                                             r"function that is not built into Keras.*"
                                             r"'custom_objects: your\.module'.*ResidualScorer"):
        load_scorer(ModelSpec(name="sub", path=path), F)


def test_export_crash_is_a_model_load_error(tmp_path: Path, keras_models: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"ensemble_abort_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("import os\nos.abort()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = keras_models["specs"]["functional"].path
    with pytest.raises(ModelLoadError, match=r"'crash': the Keras export of .*functional\.keras "
                                             r"crashed: its process was killed by SIGABRT"):
        load_scorer(ModelSpec(name="crash", path=path, custom_objects=module), F)
    assert sorted(p.name for p in (tmp_path / "cache" / "keras").iterdir()) == []


def test_truncated_file_is_a_model_load_error(tmp_path: Path, keras_models: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = keras_models["specs"]["functional"].path
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(Path(path).read_bytes()[:700])
    with pytest.raises(ModelLoadError, match=r"'cut': .*truncated\.keras is not a readable "
                                             r"Keras archive"):
        load_scorer(ModelSpec(name="cut", path=str(truncated)), F)
    assert sorted(p.name for p in (tmp_path / "cache" / "keras").iterdir()) == []


def test_cached_export_reused(tmp_path: Path, keras_models: dict[str, Any],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    spec = keras_models["specs"]["legacy"]
    key = export_key(spec, resolve_model(spec))
    before = EXPORTS[key]
    first = load_scorer(spec, F)
    first.close()
    assert first.export_seconds > 0 and EXPORTS[key] == before + 1
    entry = tmp_path / "cache" / "keras" / key
    assert first.export_dir == str(entry)
    assert sorted(p.name for p in entry.parent.iterdir()) == [key]  # no temporary left
    stamp = (entry / "export.json").stat().st_mtime_ns
    second = load_scorer(spec, F)
    try:
        assert second.export_seconds == 0.0 and EXPORTS[key] == before + 1
        assert (entry / "export.json").stat().st_mtime_ns == stamp
        _close(second.predict(X), keras_models["refs"]["legacy"])
    finally:
        second.close()
    # The same bytes under another name (and format: keras) are the same export.
    copy = tmp_path / "copy.model"
    shutil.copyfile(spec.path, copy)
    third = load_scorer(ModelSpec(name="copy", path=str(copy), format="keras"), F)
    third.close()
    assert third.export_dir == str(entry) and third.export_seconds == 0.0
    assert EXPORTS[key] == before + 1


def test_lost_race_discards_only_its_own_folder(tmp_path: Path, keras_models: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process renamed its export into place first: ours is deleted, theirs kept,
    and nothing else in the cache folder is touched."""
    monkeypatch.setenv(CACHE_ENV, str(keras_models["root"] / "cache"))
    spec = keras_models["specs"]["functional"]
    load_scorer(spec, F).close()
    key = export_key(spec, resolve_model(spec))
    parent = cache_root()
    theirs = (parent / key / "export.json").read_bytes()
    others = parent / f".{key}.someone-else.tmp"
    others.mkdir()
    ours = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
    shutil.copytree(parent / key, ours, dirs_exist_ok=True)
    assert keras_file._publish(ours, parent / key, key) is False
    assert not ours.exists() and others.is_dir()
    assert (parent / key / "export.json").read_bytes() == theirs
    others.rmdir()


def test_custom_objects_module_is_part_of_the_digest(keras_models: dict[str, Any],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = keras_models["specs"]["subclassed"]
    resolved = resolve_model(spec)
    assert resolved.code is not None and resolved.code.endswith(f"{spec.custom_objects}.py")
    assert resolved.files == (spec.path, resolved.code)
    code = tmp_path / "code"
    shutil.copytree(Path(resolved.code).parent, code)
    monkeypatch.syspath_prepend(str(code))  # the same module, edited
    (code / Path(resolved.code).name).write_text(KERAS_CUSTOM_MODULE + "\n# changed\n")
    edited = resolve_model(spec)
    assert edited.code == str(code / Path(resolved.code).name)
    assert digest_files(edited.files) != digest_files(resolved.files)
    assert export_key(spec, edited) != export_key(spec, resolved)
    assert export_key(spec, edited).split("-")[0] == export_key(spec, resolved).split("-")[0]


def test_keras_manifest_entries(tmp_path: Path, keras_models: dict[str, Any]) -> None:
    manifest = parse_manifest({
        "id_column": "id", "features": ["a"],
        "models": [{"name": "k", "path": "folds/fold0.keras"},
                   {"name": "e", "path": "any.name", "format": "keras",
                    "custom_objects": "team.layers"}],
    }, tmp_path)
    assert manifest.models[0].format == "auto"
    assert manifest.models[1].format == "keras"
    assert manifest.models[1].custom_objects == "team.layers"
    with pytest.raises(ManifestError, match=r"models\.0\.custom_objects: String should match"):
        parse_manifest({"id_column": "id", "features": ["a"], "models": [
            {"name": "k", "path": "m.keras", "custom_objects": "os; import this"}]})
    functional = keras_models["specs"]["functional"].path
    with pytest.raises(ManifestError, match=r"'k': no Keras file at .*fold0\.keras"):
        resolve_model(manifest.models[0])
    (tmp_path / "text.keras").write_text("not a model")
    with pytest.raises(ManifestError, match=r"neither a Keras 3 archive .* nor an HDF5 file"):
        resolve_model(ModelSpec(name="t", path=str(tmp_path / "text.keras")))
    with pytest.raises(ManifestError, match=r"'custom_objects' applies to Keras files"):
        resolve_model(ModelSpec(name="c", path=str(tmp_path), custom_objects="team.layers"))
    with pytest.raises(ManifestError, match=r"'signature' and 'tags' apply to SavedModels"):
        resolve_model(ModelSpec(name="s", path=functional, signature="serve"))
    with pytest.raises(ManifestError, match=r"custom_objects module 'no_such_module_xyz' is "
                                            r"not importable here"):
        resolve_model(ModelSpec(name="m", path=functional, custom_objects="no_such_module_xyz"))


_LOAD_IN_CHILD = """
import json, sys
import numpy as np
from loaders.cache import load_scorer
from loaders.keras_file import EXPORTS
from loaders.manifest import ModelSpec
scorer = load_scorer(ModelSpec(name="m", path=sys.argv[1]), int(sys.argv[2]))
x = np.load(sys.argv[3])
print(json.dumps({"export_seconds": scorer.export_seconds, "exports": sum(EXPORTS.values()),
                  "scores": scorer.predict(x).tolist()}))
"""


@pytest.mark.slow
def test_processes_race_then_reuse(tmp_path: Path, keras_models: dict[str, Any],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes on an empty cache export at once: one export is kept, the other
    discarded; a third process (and this one) reuse it without exporting."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    np.save(tmp_path / "x.npy", X)
    path = str(keras_models["specs"]["functional"].path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    argv = [sys.executable, "-c", _LOAD_IN_CHILD, path, str(F), str(tmp_path / "x.npy")]
    racers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, text=True) for _ in range(2)]
    results = []
    for proc in racers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["exports"] for r in results) == 1  # the loser's rename found the winner's
    assert all(r["export_seconds"] > 0 for r in results)  # both did export
    entries = sorted(p.name for p in (tmp_path / "cache" / "keras").iterdir())
    spec = keras_models["specs"]["functional"]
    assert entries == [export_key(spec, resolve_model(spec))]  # no temporary folder left
    third = subprocess.run(argv, capture_output=True, env=env, text=True, check=False)
    assert third.returncode == 0, third.stderr[-3000:]
    reused = json.loads(third.stdout.strip().splitlines()[-1])
    assert reused["export_seconds"] == 0.0 and reused["exports"] == 0
    for r in [*results, reused]:
        _close(np.asarray(r["scores"], np.float32), keras_models["refs"]["functional"])


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_mixes_keras_members_with_a_checkpoint(
        tmp_path: Path, keras_models: dict[str, Any], checkpoints: list[Path],
        features: list[str]) -> None:
    from flows.ensemble import score_ensemble
    from flows.params import ScoreParams

    specs = keras_models["specs"]
    manifest = write_manifest(tmp_path / "models" / "manifest.yaml", {
        "id_column": "id",
        "features": features,
        "models": [
            ckpt_member("ckpt", checkpoints[0]),
            {"name": "functional", "path": specs["functional"].path},
            {"name": "subclassed", "path": specs["subclassed"].path, "format": "keras",
             "custom_objects": specs["subclassed"].custom_objects},
            {"name": "legacy", "path": specs["legacy"].path},
        ],
    })
    for part, rows in enumerate((slice(0, 250), slice(250, 400))):
        write_table(tmp_path / "data" / f"part-{part}.parquet",
                    {"id": np.arange(400)[rows], **{f: X[rows, j] for j, f in enumerate(features)}})
    summary = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "data"),
                                         output=str(tmp_path / "out")))
    assert summary.rows == 400 and not summary.failed
    table = read_dataset(tmp_path / "out" / "ensemble")
    order = np.argsort(table.column("id").to_numpy())
    refs = {"ckpt": mlp_reference(checkpoints[0], X), **{
        k: keras_models["refs"][k] for k in ("functional", "subclassed", "legacy")}}
    for name, ref in refs.items():
        _close(table.column(f"score_{name}").to_numpy()[order], ref)
    mean = np.mean(np.stack(list(refs.values())), axis=0)
    _close(table.column("ensemble_score").to_numpy()[order], mean)
    record = {m["name"]: m for m in
              json.loads((tmp_path / "out" / "_run.json").read_text())["members"]}
    assert record["ckpt"]["format"] == "checkpoint"
    for name in ("functional", "subclassed", "legacy"):
        assert record[name]["format"] == "keras"
        assert record[name]["location"] == specs[name].path
        # what resume compares: the Keras file's (and custom_objects module's) digest
        assert record[name]["digest"] == digest_files(resolve_model(specs[name]).files)


def test_cache_entries_that_others_could_have_written_are_refused(
        tmp_path: Path, keras_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry is the model that will be scored: a link to elsewhere, or one writable by
    other users, is refused rather than trusted."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    spec = keras_models["specs"]["legacy"]
    load_scorer(spec, F).close()
    entry = tmp_path / "cache" / "keras" / export_key(spec, resolve_model(spec))
    (entry / "saved_model.pb").chmod(0o666)
    with pytest.raises(ModelLoadError, match="is writable by other users"):
        load_scorer(spec, F)
    (entry / "saved_model.pb").chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    with pytest.raises(ModelLoadError, match="is a symbolic link; refusing it"):
        load_scorer(spec, F)


def test_the_export_reads_a_checked_copy_and_refuses_a_config_bomb(
        tmp_path: Path, keras_models: dict[str, Any]) -> None:
    import zipfile

    from loaders.keras_file import _snapshot

    spec = keras_models["specs"]["functional"]
    resolved = resolve_model(spec)
    folder = tmp_path / "t"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="changed while it was being read"):
        _snapshot(spec, resolved, "keras", "not-its-key", folder)  # as if replaced
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", " " * (65 * 2**20))
    bomb_spec = ModelSpec(name="bomb", path=str(bomb))
    with pytest.raises(ModelLoadError, match=r"config\.json of 65 MB uncompressed"):
        _snapshot(bomb_spec, resolve_model(bomb_spec), "keras",
                  export_key(bomb_spec, resolve_model(bomb_spec)), folder)
