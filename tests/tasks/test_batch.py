"""The per-batch core alone: real scorers in, columns and rows set aside out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flows.demo import mlp_reference
from loaders.cache import load_scorer
from loaders.errors import DataError, ModelLoadError
from loaders.manifest import ModelSpec
from tasks.batch import ScoringContext, score_batch
from tasks.features import to_matrix
from tests.helpers import N_FEATURES, save_reciprocal_checkpoint


def _ctx(paths: list[Path], policy: str = "fail") -> ScoringContext:
    features = tuple(f"f{i:02d}" for i in range(N_FEATURES))
    scorers = {k: load_scorer(ModelSpec(name=f"m{k}", path=str(p), input="features:0",
                                        output="score:0"), N_FEATURES)
               for k, p in enumerate(paths)}
    return ScoringContext(where="p.parquet", names=[f"m{k}" for k in range(len(paths))],
                          features=features, scorers=scorers, policy=policy,  # type: ignore[arg-type]
                          method="mean", weights=np.full(len(paths), 1 / len(paths)))


X = np.random.default_rng(2).standard_normal((50, N_FEATURES)).astype(np.float32)
IDS = pa.array(np.arange(50, dtype=np.int64))


def test_scores_and_combines_like_numpy(checkpoints: list[Path]) -> None:
    result = score_batch(_ctx(checkpoints), X.copy(), IDS)
    refs = np.stack([mlp_reference(p, X) for p in checkpoints])
    assert np.abs(result.scores - refs).max() <= 1e-5
    assert np.abs(result.ensemble - refs.mean(0)).max() <= 1e-5
    assert np.abs(result.std - refs.std(0)).max() <= 1e-5
    assert list(result.count) == [3] * 50 and result.rows_set_aside == 0


def test_reused_members_are_taken_not_scored(checkpoints: list[Path]) -> None:
    ctx = _ctx(checkpoints)
    del ctx.scorers[1]  # member 1 comes from the previous table
    given = np.full(50, 0.25, np.float32)
    result = score_batch(ctx, X.copy(), IDS, lambda ids: {1: given[:len(ids)]})
    assert (result.scores[1] == 0.25).all() and 1 not in ctx.seconds


def test_bad_features_fail_or_are_set_aside(checkpoints: list[Path]) -> None:
    x = X.copy()
    x[[3, 7], 2] = np.nan
    x[9, 0] = np.inf
    with pytest.raises(DataError, match=r"p.parquet: 3 row\(s\) with null, NaN, infinite or "
                                        r"out-of-range features \(ids \[3, 7, 9\], column\(s\) "
                                        r"\['f00', 'f02'\]: f02 is null or NaN\)"):
        score_batch(_ctx(checkpoints), x.copy(), IDS)
    result = score_batch(_ctx(checkpoints, "quarantine"), x.copy(), IDS)
    assert result.aside_ids[0].to_pylist() == [3, 7, 9]
    assert result.aside_reasons[0] == ["f02 is null or NaN", "f02 is null or NaN",
                                       "f00 is infinite"]
    assert len(result.ids) == 47 and 3 not in result.ids.to_pylist()


def test_non_finite_member_scores_fail_or_are_set_aside(tmp_path: Path,
                                                        checkpoints: list[Path]) -> None:
    paths = [checkpoints[0], save_reciprocal_checkpoint(tmp_path / "r" / "model.ckpt")]
    x = X.copy()
    x[[4, 11], 0] = 0.0
    with pytest.raises(ModelLoadError, match=r"model\(s\) \['m1'\] returned non-finite "
                                             r"scores for 2 row\(s\) .*\(ids \[4, 11\]\)"):
        score_batch(_ctx(paths), x.copy(), IDS)
    result = score_batch(_ctx(paths, "quarantine"), x.copy(), IDS)
    assert result.aside_ids[0].to_pylist() == [4, 11]
    assert result.aside_reasons[0] == ["non-finite score from m1"] * 2
    assert np.isfinite(result.ensemble).all() and len(result.ensemble) == 48


def test_a_finite_value_too_large_for_float32_is_named_as_such(checkpoints: list[Path]
                                                               ) -> None:
    x = X.astype(np.float64)
    x[5, 3] = 1e39  # finite in the data, infinite once cast to the models' float32
    batch = pa.record_batch([IDS, *(pa.array(x[:, j]) for j in range(N_FEATURES))],
                            names=["id", *(f"f{j:02d}" for j in range(N_FEATURES))])
    ctx = _ctx(checkpoints)
    matrix = to_matrix(batch, ctx.features)
    with pytest.raises(DataError, match=r"f03 is 1e\+39, beyond float32's range"):
        score_batch(ctx, matrix, IDS, source=batch)
    ctx.policy = "quarantine"
    result = score_batch(ctx, to_matrix(batch, ctx.features), IDS, source=batch)
    assert result.aside_reasons[0] == ["f03 is 1e+39, beyond float32's range (±3.4e38)"]


def test_quorum_keeps_rows_with_enough_members(tmp_path: Path, checkpoints: list[Path]
                                               ) -> None:
    ctx = _ctx([checkpoints[0], save_reciprocal_checkpoint(tmp_path / "r" / "model.ckpt")])
    x = X.copy()
    x[[3, 7], 0] = 0.0  # the reciprocal member gives inf on these rows
    ctx.min_members = 1
    result = score_batch(ctx, x, IDS)
    assert result.rows_set_aside == 0 and len(result.ids) == 50
    assert list(np.flatnonzero(result.count == 1)) == [3, 7]
    ref = mlp_reference(checkpoints[0], x)
    assert np.abs(result.ensemble[[3, 7]] - ref[[3, 7]]).max() <= 1e-6
    # A member that did not load counts as missing on every row.
    ctx.absent, ctx.scorers = (1,), {0: ctx.scorers[0]}
    assert list(score_batch(ctx, x, IDS).count) == [1] * 50
    ctx.min_members, ctx.policy = 2, "quarantine"
    result = score_batch(ctx, x, IDS)
    assert result.rows_set_aside == result.scores_set_aside == 50
    assert result.aside_reasons[0][0] == ("not loaded: m1 (1 of 2 members present, "
                                          "min_members 2)")
