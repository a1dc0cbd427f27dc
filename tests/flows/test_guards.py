"""The guards against silently wrong scores, end to end on real checkpoints and Parquet:
the golden-set gate, the member quorum and the drift report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.bless import main as bless_main
from flows.demo import mlp_reference, mlp_weights, numpy_mlp
from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from flows.report import read_run_artifacts
from loaders.errors import (
    DataError,
    DriftExceeded,
    GoldenMismatch,
    ManifestError,
    ModelLoadError,
)
from tests.helpers import N_FEATURES, ckpt_member, read_dataset, write_manifest, write_table
from tests.helpers import save_tf2_saved_model as save_saved_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _data(folder: Path, features: list[str], *, shift: float = 0.0, parts: int = 2,
          rows: int = 1500, seed: int = 7) -> np.ndarray:
    """``parts`` partitions of standard normal features (``features[0]`` shifted by
    ``shift``); returns the whole (rows, features) matrix in id order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((parts * rows, N_FEATURES)).astype(np.float32)
    x[:, 0] += shift
    for p in range(parts):
        cols: dict[str, Any] = {"id": np.arange(p * rows, (p + 1) * rows)}
        for j, f in enumerate(features):
            cols[f] = x[p * rows:(p + 1) * rows, j]
        write_table(folder / f"part-{p}.parquet", cols)
    return x


def _tf1_manifest(path: Path, checkpoints: list[Path], features: list[str],
                  **extra: Any) -> Path:
    return write_manifest(path, {
        "id_column": "id", "features": features,
        "models": [ckpt_member(f"m{i}", c) for i, c in enumerate(checkpoints)],
        **extra,
    })


def _params(manifest: Path, data: Path, out: Path, **kw: Any) -> ScoreParams:
    return ScoreParams(models=str(manifest), input=str(data), output=str(out), **kw)


def _bless(manifest: Path, data: Path, *extra: str) -> None:
    assert bless_main(["--models", str(manifest), "--sample", str(data), *extra]) == 0


def _add_golden(manifest: Path, name: str = "golden.parquet") -> None:
    with manifest.open("a") as f:
        f.write(f"golden: {name}\n")


# ---------------------------------------------------------------------------- golden


def test_tf1_and_saved_model_bless_and_pass(tmp_path: Path, checkpoints: list[Path],
                                            features: list[str]) -> None:
    save_saved_model(tmp_path / "models" / "saved", mlp_weights(99, N_FEATURES))
    manifest = write_manifest(tmp_path / "models" / "m.yaml", {
        "id_column": "id", "features": features,
        "models": [ckpt_member("ckpt", checkpoints[0]),
                   {"name": "saved", "path": "saved"}],
    })
    _data(tmp_path / "data", features)
    _bless(manifest, tmp_path / "data", "--rows", "200")
    golden = pq.read_table(tmp_path / "models" / "golden.parquet")
    assert golden.num_rows == 200
    assert golden.column_names == ["id", *features, "score_ckpt", "score_saved"]
    meta = json.loads(golden.schema.metadata[b"ensemble_scoring_golden"])
    assert set(meta["members"]) == {"ckpt", "saved"} and meta["tensorflow"]
    assert meta["cpu_path"]
    _add_golden(manifest)
    summary = score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    assert summary.golden.startswith("passed: 2 member(s) on 200 blessed row(s)")
    assert summary.report is not None and summary.report.golden == summary.golden
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    artifacts = read_run_artifacts(record["flow_run_id"])
    assert "passed: 2 member(s)" in artifacts["ensemble-golden"]
    assert "Golden check" in artifacts["ensemble-summary"]


def test_swapped_checkpoints_are_refused_before_anything_is_written(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    manifest = _tf1_manifest(tmp_path / "m.yaml", checkpoints, features)
    _data(tmp_path / "data", features)
    _bless(manifest, tmp_path / "data")
    swapped = [checkpoints[1], checkpoints[0], checkpoints[2]]
    _tf1_manifest(manifest, swapped, features, golden="golden.parquet")
    with pytest.raises(GoldenMismatch) as err:
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    text = str(err.value)
    assert "member 'm0' deviates by up to" in text and "member 'm1' deviates" in text
    assert "'m2'" not in text
    assert "its checkpoint changed since blessing" in text
    assert "ids [" in text and "bless again" in text
    out = tmp_path / "out"
    assert not (out / "ensemble").exists() and not (out / "_run.json").exists()


def test_reordered_features_are_refused(tmp_path: Path, checkpoints: list[Path],
                                        features: list[str]) -> None:
    manifest = _tf1_manifest(tmp_path / "m.yaml", checkpoints, features)
    _data(tmp_path / "data", features)
    _bless(manifest, tmp_path / "data")
    reordered = [features[1], features[0], *features[2:]]
    _tf1_manifest(manifest, checkpoints, reordered, golden="golden.parquet")
    with pytest.raises(GoldenMismatch) as err:
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    text = str(err.value)
    assert "its checkpoint is unchanged since blessing" in text
    assert f"{features[1]} (blessed at position 2, now 1)" in text


def test_golden_file_problems_are_explained(tmp_path: Path, checkpoints: list[Path],
                                            features: list[str]) -> None:
    manifest = _tf1_manifest(tmp_path / "m.yaml", checkpoints, features,
                             golden="golden.parquet")
    _data(tmp_path / "data", features)
    with pytest.raises(ManifestError, match=r"golden file .* does not exist; bless it"):
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    # A file bless did not write is neither trusted nor overwritten.
    shutil.copy(tmp_path / "data" / "part-0.parquet", tmp_path / "golden.parquet")
    with pytest.raises(ManifestError, match="not written by bless"):
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    assert bless_main(["--models", str(manifest), "--sample", str(tmp_path / "data")]) == 2
    assert pq.read_table(tmp_path / "golden.parquet").equals(
        pq.read_table(tmp_path / "data" / "part-0.parquet"))
    # A golden file edited by hand: rows removed, or its footer record forged.
    _bless(manifest, tmp_path / "data", "--out", str(tmp_path / "g.parquet"))
    table = pq.read_table(tmp_path / "g.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "golden.parquet")
    with pytest.raises(ManifestError, match="has 0 rows where bless wrote 1,000"):
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    forged = table.replace_schema_metadata({b"ensemble_scoring_golden": b"[1, 2]"})
    pq.write_table(forged, tmp_path / "golden.parquet")
    with pytest.raises(ManifestError, match="not written by bless"):
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))


def test_bless_keeps_its_file_out_of_the_data(tmp_path: Path, checkpoints: list[Path],
                                              features: list[str]) -> None:
    data = tmp_path / "data"
    _data(data, features)
    manifest = _tf1_manifest(data / "m.yaml", checkpoints, features)
    assert bless_main(["--models", str(manifest), "--sample", str(data)]) == 2
    assert not (data / "golden.parquet").exists()
    # Written there on purpose all the same: runs over the folder do not score it.
    _data(tmp_path / "sample", features, seed=3)
    _bless(manifest, tmp_path / "sample", "--out", str(tmp_path / "g.parquet"))
    (tmp_path / "g.parquet").rename(data / "golden.parquet")
    _tf1_manifest(manifest, checkpoints, features, golden="golden.parquet")
    summary = score_ensemble(_params(manifest, data, tmp_path / "out"))
    assert summary.partitions == 2 and summary.golden.startswith("passed")


def test_bless_refuses_a_member_without_finite_scores(tmp_path: Path, checkpoints: list[Path],
                                                      features: list[str]) -> None:
    from loaders._tf import tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FEATURES], name="features")
        v = tf.compat.v1.Variable(np.nan, name="v")
        tf.identity(tf.reduce_sum(x, axis=1, keepdims=True) * v, name="score")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(tmp_path / "nan" / "model.ckpt"))
    manifest = _tf1_manifest(tmp_path / "m.yaml", [checkpoints[0], tmp_path / "nan" /
                                                   "model.ckpt"], features)
    _data(tmp_path / "data", features)
    assert bless_main(["--models", str(manifest), "--sample", str(tmp_path / "data")]) == 2
    assert not (tmp_path / "golden.parquet").exists()


# ---------------------------------------------------------------------------- quorum


def _nan_model(path: Path) -> Path:
    """A TF1 checkpoint whose score is NaN where the features sum above 3."""
    from loaders._tf import tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FEATURES], name="features")
        total = tf.reduce_sum(x, axis=1, keepdims=True) * tf.compat.v1.Variable(1.0, name="v")
        tf.where(total > 3.0, tf.fill(tf.shape(total), np.nan), tf.sigmoid(total),
                 name="score")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(path / "model.ckpt"))
    return path / "model.ckpt"


@pytest.mark.parametrize("min_members", [3, 2])
def test_member_returning_nan(tmp_path: Path, checkpoints: list[Path], features: list[str],
                              min_members: int) -> None:
    nan = _nan_model(tmp_path / "nan")
    manifest = _tf1_manifest(tmp_path / "m.yaml", [checkpoints[0], checkpoints[1], nan],
                             features, min_members=min_members, bad_rows="quarantine")
    x = _data(tmp_path / "data", features)
    summary = score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    table = read_dataset(tmp_path / "out" / "ensemble").sort_by("id")
    nan_rows = x.astype(np.float64).sum(axis=1) > 3.0
    assert 0 < nan_rows.sum() < len(x)
    ref = np.stack([mlp_reference(c, x) for c in checkpoints[:2]], axis=1)
    if min_members == 3:  # every member needed: those rows are set aside, as before
        assert table.num_rows == len(x) - nan_rows.sum() == summary.rows
        quarantined = pq.read_table(tmp_path / "out" / "quarantine")
        assert quarantined.num_rows == nan_rows.sum()
        assert set(quarantined.column("reason").to_pylist()) == {"non-finite score from m2"}
        return
    assert table.num_rows == len(x)
    nulls = np.asarray(table.column("score_m2").is_null())
    assert (nulls == nan_rows).all()
    n = table.column("n_members").to_numpy()
    assert (n[nan_rows] == 2).all() and (n[~nan_rows] == 3).all()
    ens = table.column("ensemble_score").to_numpy()
    assert np.abs(ens[nan_rows] - ref[nan_rows].mean(axis=1)).max() <= 1e-5
    assert not (tmp_path / "out" / "quarantine").exists()
    assert summary.report is not None
    assert any(w.startswith(f"member 'm2' gave no finite score for {nan_rows.sum():,} of")
               for w in summary.report.warnings)
    m2 = next(m for m in summary.report.members if m.name == "m2")
    assert m2.rows == len(x) - nan_rows.sum()


def test_broken_member_within_quorum_then_repaired(tmp_path: Path, checkpoints: list[Path],
                                                   features: list[str]) -> None:
    models = []
    for i, c in enumerate(checkpoints):
        shutil.copytree(c.parent, tmp_path / f"m{i}")
        models.append(tmp_path / f"m{i}" / c.name)
    data_file = next((tmp_path / "m2").glob("*.data-*"))
    good = data_file.read_bytes()
    data_file.write_bytes(good[: len(good) // 3])  # truncated: the checkpoint is broken
    manifest = _tf1_manifest(tmp_path / "m.yaml", models, features, min_members=2)
    x = _data(tmp_path / "data", features)
    out = tmp_path / "out"
    ref = np.stack([mlp_reference(c, x) for c in checkpoints], axis=1)

    with pytest.raises(ModelLoadError, match="fewer than"):  # all members needed: refused
        score_ensemble(_params(manifest, tmp_path / "data", out, min_members=3))
    summary = score_ensemble(_params(manifest, tmp_path / "data", out))
    assert list(summary.missing_members) == ["m2"]
    assert summary.report is not None
    assert any("could not be loaded" in w and "m2" in w for w in summary.report.warnings)
    assert not any("correlate at" in w for w in summary.report.warnings)
    record = json.loads((out / "_run.json").read_text())
    assert [m["name"] for m in record["members"] if m["missing"]] == ["m2"]
    table = read_dataset(out / "ensemble").sort_by("id")
    assert table.column("score_m2").null_count == len(x)
    assert (table.column("n_members").to_numpy() == 2).all()
    assert np.abs(table.column("ensemble_score").to_numpy()
                  - ref[:, :2].mean(axis=1)).max() <= 1e-5

    data_file.write_bytes(good)  # repaired
    summary = score_ensemble(_params(manifest, tmp_path / "data", out))
    assert not summary.missing_members
    assert summary.report is not None
    scored = {m.name: (m.scored_rows, m.reused_partitions) for m in summary.report.members}
    assert scored == {"m0": (0, 2), "m1": (0, 2), "m2": (len(x), 0)}
    table = read_dataset(out / "ensemble").sort_by("id")
    got = np.stack([table.column(f"score_m{i}").to_numpy() for i in range(3)], axis=1)
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy() - ref.mean(axis=1)).max() <= 1e-5

    # Moved away for a night: the complete files stand, m2's scores included.
    (tmp_path / "m2").rename(tmp_path / "m2-away")
    summary = score_ensemble(_params(manifest, tmp_path / "data", out))
    assert list(summary.missing_members) == ["m2"]
    assert summary.skipped_member_partitions == 2 * 3
    assert read_dataset(out / "ensemble").sort_by("id").equals(table)


# ---------------------------------------------------------------------------- drift


def _f0_models(folder: Path) -> list[Path]:
    """Two SavedModels whose scores lean on the first feature."""
    paths = []
    for seed in (3, 4):
        layers = mlp_weights(seed, N_FEATURES, (8,))
        layers[0][0][0] *= 4.0
        paths.append(save_saved_model(folder / f"s{seed}", layers))
    return paths


def _drift_manifest(path: Path, models: list[Path], features: list[str], **extra: Any
                    ) -> Path:
    return write_manifest(path, {"id_column": "id", "features": features,
                                 "models": [{"name": p.name, "path": str(p)} for p in models],
                                 **extra})


def test_same_data_twice_flags_nothing(tmp_path: Path, features: list[str]) -> None:
    manifest = _drift_manifest(tmp_path / "m.yaml", _f0_models(tmp_path), features)
    _data(tmp_path / "data", features)
    first = score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out"))
    assert first.drift == [] and first.drift_baseline == ""  # nothing to compare with yet
    again = score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out",
                                   force=True))
    assert again.drift_baseline and again.drift[0].startswith("nothing drifted")
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    lines = record["drift"]["lines"]
    assert {line["column"] for line in lines} == {*features, "score_s3", "score_s4",
                                                  "ensemble_score"}
    assert all(line["band"] == "stable" for line in lines)


def test_shifted_feature_is_flagged_and_can_fail_the_run(tmp_path: Path,
                                                         features: list[str]) -> None:
    models = _f0_models(tmp_path)
    manifest = _drift_manifest(tmp_path / "m.yaml", models, features)
    _data(tmp_path / "before", features)
    score_ensemble(_params(manifest, tmp_path / "before", tmp_path / "base"))
    x = _data(tmp_path / "data", features, shift=1.0, seed=8)
    summary = score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out",
                                     baseline=str(tmp_path / "base" / "_run.json")))
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    bands = {line["column"]: line["band"] for line in record["drift"]["lines"]}
    assert bands[features[0]] == "major"
    assert bands["ensemble_score"] in ("moderate", "major")
    assert all(bands[f] == "stable" for f in features[1:])
    assert summary.drift[0].startswith(f"{features[0]} (feature): PSI")
    artifacts = read_run_artifacts(record["flow_run_id"])
    assert f"| {features[0]} | feature |" in artifacts["ensemble-drift"]
    assert "Drift" in artifacts["ensemble-summary"]

    # A --baseline that is not there is an error, not a run without the guard.
    with pytest.raises(DataError, match="does not exist"):
        score_ensemble(_params(manifest, tmp_path / "data", tmp_path / "out",
                               baseline=str(tmp_path / "base" / "_run.jsn")))

    # drift: fail fails the run above max_psi, with the table committed.
    failing = _drift_manifest(tmp_path / "f.yaml", models, features, drift="fail")
    with pytest.raises(DriftExceeded, match=rf"{features[0]} \(feature\): PSI"):
        score_ensemble(_params(failing, tmp_path / "data", tmp_path / "out2",
                               baseline=str(tmp_path / "base" / "_run.json")))
    table = read_dataset(tmp_path / "out2" / "ensemble")
    assert table.num_rows == len(x)
    ref = np.stack([numpy_mlp(_weights(p), x) for p in models], axis=1).mean(axis=1)
    assert np.abs(np.sort(table.column("ensemble_score").to_numpy()) - np.sort(ref)).max() \
        <= 1e-5


def _weights(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    seed = int(path.name[1:])
    layers = mlp_weights(seed, N_FEATURES, (8,))
    layers[0][0][0] *= 4.0
    return layers


def test_columns_in_one_run_only_are_listed() -> None:
    from flows.guards import compare_with_baseline
    from flows.records import Sketches
    from tasks.drift import sketch_values

    x = np.random.default_rng(0).standard_normal(1000)
    before = Sketches(features={"f05": sketch_values(x, 1000), "a": sketch_values(x, 1000)})
    now = Sketches(features={"g05": sketch_values(x * 1000, 1000),
                             "a": sketch_values(x, 1000)})
    record = compare_with_baseline(now, (before, "previous run"), [])
    assert record is not None and [d.column for d in record.lines] == ["a"]
    assert record.text()[1:] == ["not in this run: f05", "new in this run: g05"]
    assert "- new in this run: g05" in record.unmatched_markdown()


def test_the_golden_file_is_not_a_partition_whatever_the_input_path(
        tmp_path: Path, checkpoints: list[Path], features: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from loaders.manifest import load_manifest
    from tasks.plan import make_plan

    _data(tmp_path / "data", features)
    manifest = _tf1_manifest(tmp_path / "m.yaml", checkpoints, features,
                             golden="data/golden.parquet")
    shutil.copy(tmp_path / "data" / "part-0.parquet", tmp_path / "data" / "golden.parquet")
    monkeypatch.chdir(tmp_path)
    plan = make_plan(load_manifest(manifest), "data", str(tmp_path / "out"))
    assert sorted(p.relpath for p in plan.partitions) == ["part-0.parquet", "part-1.parquet"]
    with pytest.raises(DataError, match=r"only Parquet file .* is the manifest's golden"):
        make_plan(load_manifest(manifest), "data/golden.parquet", str(tmp_path / "out"))
