"""Every supported format loads into its own graph and scores like its numpy reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.demo import build_mlp_checkpoint, mlp_reference, mlp_weights, numpy_mlp
from loaders.cache import load_scorer
from loaders.errors import ManifestError, ModelLoadError
from loaders.manifest import ModelSpec
from tests.helpers import save_keras_export, save_tf1_builder_saved_model, save_tf2_saved_model

F = 6
X = np.random.default_rng(3).standard_normal((300, F)).astype(np.float32)


def test_checkpoint_folder_uses_latest_and_training_ops(tmp_path: Path) -> None:
    old = build_mlp_checkpoint(tmp_path / "run" / "model.ckpt-100", seed=1, n_features=F,
                               with_training_ops=True)
    new = build_mlp_checkpoint(tmp_path / "run" / "model.ckpt-200", seed=2, n_features=F,
                               with_training_ops=True)
    scorer = load_scorer(ModelSpec(name="a", path=str(tmp_path / "run"), input="features",
                                   output="score"), F)
    assert scorer.source == str(new)
    assert np.abs(scorer.predict(X) - mlp_reference(new, X)).max() <= 1e-5
    assert np.abs(scorer.predict(X) - mlp_reference(old, X)).max() > 1e-3
    scorer.close()


def test_checkpoint_folder_moved_from_another_machine(tmp_path: Path) -> None:
    prefix = build_mlp_checkpoint(tmp_path / "a" / "model.ckpt", seed=1, n_features=F)
    moved = tmp_path / "moved"
    shutil.copytree(prefix.parent, moved)
    (moved / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt"\n')
    scorer = load_scorer(ModelSpec(name="a", path=str(moved), input="features:0",
                                   output="score:0"), F)
    assert np.abs(scorer.predict(X) - mlp_reference(prefix, X)).max() <= 1e-5
    scorer.close()


@pytest.mark.parametrize("builder", [save_tf2_saved_model, save_tf1_builder_saved_model,
                                     save_keras_export])
def test_saved_models(tmp_path: Path, builder) -> None:  # type: ignore[no-untyped-def]
    weights = mlp_weights(7, F)
    path = builder(tmp_path / "sm", weights)
    scorer = load_scorer(ModelSpec(name="sm", path=str(path)), F)
    assert np.abs(scorer.predict(X) - numpy_mlp(weights, X)).max() <= 1e-5
    scorer.close()


def test_saved_model_unknown_signature(tmp_path: Path) -> None:
    path = save_tf2_saved_model(tmp_path / "sm", mlp_weights(1, F))
    with pytest.raises(ModelLoadError, match=r"no signature 'nope'.*serving_default"):
        load_scorer(ModelSpec(name="sm", path=str(path), signature="nope"), F)


def test_unknown_tensor_lists_placeholders(tmp_path: Path) -> None:
    prefix = build_mlp_checkpoint(tmp_path / "model.ckpt", seed=1, n_features=F)
    with pytest.raises(ModelLoadError, match=r"'m'.*input tensor 'nope:0'.*features:0"):
        load_scorer(ModelSpec(name="m", path=str(prefix), input="nope", output="score"), F)


def test_wrong_feature_count(tmp_path: Path) -> None:
    prefix = build_mlp_checkpoint(tmp_path / "model.ckpt", seed=1, n_features=F)
    with pytest.raises(ModelLoadError, match=r"takes 6 features but the manifest lists 5"):
        load_scorer(ModelSpec(name="m", path=str(prefix), input="features", output="score"), 5)


def test_missing_data_shard(tmp_path: Path) -> None:
    prefix = build_mlp_checkpoint(tmp_path / "model.ckpt", seed=1, n_features=F)
    for shard in tmp_path.glob("model.ckpt.data-*"):
        shard.unlink()
    with pytest.raises(ModelLoadError, match=r"cannot read checkpoint .*data-00000-of-00001; "
                                             r"No such file.*every \.data-\* shard"):
        load_scorer(ModelSpec(name="m", path=str(prefix), input="features", output="score"), F)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"model 'm': no checkpoint at"):
        load_scorer(ModelSpec(name="m", path=str(tmp_path / "nope.ckpt"), input="x",
                              output="y"), F)
