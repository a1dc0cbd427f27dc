"""The feed probe: which batch size a run takes when the user gives none. Its decision rule
is checked on given rates (never on timings), and the probe itself on real checkpoints:
it measures both sizes, leaves the members scoring as before, and falls back to the
smaller size, saying why, where measuring would cost too much or cannot be done."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flows.demo import build_mlp_checkpoint, feature_names, mlp_reference
from loaders.base import GraphScorer
from loaders.cache import MODEL_CACHE, load_scorer
from loaders.feed import (
    FEED_ROWS,
    LARGE_FEED_MAX_EXTRA,
    PAYBACK,
    SMALL_FEED_MARGIN,
    pick_feed,
    probe_evals,
    probe_feed,
    probed_members,
    worth_probing,
)
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import ModelSpec, load_manifest
from tasks.steps import _choose_feed
from tests.helpers import N_FEATURES, ckpt_member, write_manifest

SMALL, LARGE = FEED_ROWS


def _scorers(checkpoints: list[Path]) -> list[GraphScorer]:
    return [load_scorer(ModelSpec(name=f"m{i}", path=str(p), input="features",
                                  output="score"), N_FEATURES)
            for i, p in enumerate(checkpoints)]


def test_the_smaller_feed_is_taken_only_when_clearly_faster() -> None:
    assert pick_feed({SMALL: 1.0, LARGE: 1.0}) == LARGE
    assert pick_feed({SMALL: 1.0, LARGE: 1.2}) == LARGE
    assert pick_feed({SMALL: 1.0 + SMALL_FEED_MARGIN / 2, LARGE: 1.0}) == LARGE
    assert pick_feed({SMALL: 1.0 + SMALL_FEED_MARGIN, LARGE: 1.0}) == SMALL
    assert pick_feed({SMALL: 1.5, LARGE: 1.0}) == SMALL  # the AVX2 machine's 256-wide MLP


def test_the_probe_runs_only_where_it_can_pay_for_itself() -> None:
    needed = PAYBACK * probe_evals(4) // 4
    assert worth_probing(needed, 4) and not worth_probing(needed - 1, 4)
    assert not worth_probing(1_000_000, 4)  # a minute's work on 2 cores: not worth 0.6 s
    assert worth_probing(16_000_000, 4)  # the benchmark's default workload


def test_probe_measures_both_sizes_and_leaves_members_as_they_were(
        checkpoints: list[Path]) -> None:
    scorers = _scorers(checkpoints)
    x = np.random.default_rng(4).standard_normal((70_000, N_FEATURES)).astype(np.float32)
    try:
        choice = probe_feed(scorers, N_FEATURES, concurrent_calls=6)
        assert choice.chosen_by == "probe" and choice.rows in FEED_ROWS
        assert set(choice.rates) == {str(SMALL), str(LARGE)}
        assert all(rate > 0 for rate in choice.rates.values()) and choice.seconds > 0
        assert choice.rows == pick_feed({int(k): v for k, v in choice.rates.items()})
        assert f"{choice.rows:,} rows per Session.run (probe: 16,384 rows" in choice.label
        assert choice.process.endswith(f":{os.getpid()}") and choice.process in choice.label
        assert "faster" in choice.why  # the rule that decided
        # A feed larger than the largest size probed is split, and scores the same.
        for scorer, prefix in zip(scorers, checkpoints, strict=True):
            np.testing.assert_allclose(scorer.predict(x), mlp_reference(prefix, x),
                                       rtol=1e-5, atol=1e-6)
    finally:
        for scorer in scorers:
            scorer.close()


def test_slow_members_keep_the_smaller_feed_unmeasured(checkpoints: list[Path]) -> None:
    scorers = _scorers(checkpoints[:1])
    try:
        choice = probe_feed(scorers, N_FEATURES, concurrent_calls=1, budget_seconds=0.0)
    finally:
        scorers[0].close()
    assert choice.rows == SMALL and choice.chosen_by == "default" and not choice.rates
    assert "measuring would take" in choice.why and choice.seconds > 0


def test_wide_rows_keep_the_smaller_feed(tmp_path: Path) -> None:
    width = 300  # 65,536 rows x 300 float32 = 75 MiB
    prefix = build_mlp_checkpoint(tmp_path / "wide" / "model.ckpt", seed=3, n_features=width,
                                  hidden=(4,))
    scorer = load_scorer(ModelSpec(name="wide", path=str(prefix), input="features",
                                   output="score"), width)
    try:
        choice = probe_feed([scorer], width, concurrent_calls=1)
    finally:
        scorer.close()
    assert choice.rows == SMALL and choice.chosen_by == "default"
    assert "300 features" in choice.why and "64 MiB" in choice.why


class _NoRoomForLargeFeeds:
    """A loaded member that cannot allocate a large feed's activations (its own failure,
    as a model too big for the machine would raise it)."""

    def __init__(self, scorer: GraphScorer) -> None:
        self.name, self.digest, self.load_seconds = scorer.name, scorer.digest, 0.0
        self._scorer = scorer

    def predict(self, features: np.ndarray) -> np.ndarray:
        if features.shape[0] > SMALL:
            raise MemoryError("no room for a large feed")
        return self._scorer.predict(features)

    def close(self) -> None:
        self._scorer.close()


def test_a_member_failing_on_a_large_feed_leaves_the_smaller_one(
        checkpoints: list[Path]) -> None:
    member = _NoRoomForLargeFeeds(_scorers(checkpoints[:1])[0])
    try:
        choice = probe_feed([member], N_FEATURES, concurrent_calls=1)
    finally:
        member.close()
    assert choice.rows == SMALL and choice.chosen_by == "default"
    assert choice.why == "a probe feed failed: MemoryError: no room for a large feed"


def test_the_task_loads_only_the_members_it_feeds(tmp_path: Path) -> None:
    prefixes = [build_mlp_checkpoint(tmp_path / f"m{i}" / "model.ckpt", seed=40 + i,
                                     n_features=N_FEATURES, hidden=(4,)) for i in range(4)]
    manifest = load_manifest(write_manifest(tmp_path / "models.yaml", {
        "features": feature_names(N_FEATURES), "id_column": "id",
        "models": [ckpt_member(f"m{i}", p) for i, p in enumerate(prefixes)]}))
    digests = [digest_files(resolve_model(s).files) for s in manifest.models]
    choice = _choose_feed(manifest, absent=["m0"], concurrency=2)
    assert choice.chosen_by == "probe" and choice.rows in FEED_ROWS
    fed = probed_members(3)  # one per core, of the three present
    assert [MODEL_CACHE.loads[d] for d in digests] == [0] + [1] * fed + [0] * (3 - fed)


def test_larger_feeds_holding_too_much_memory_keep_the_smaller(
        checkpoints: list[Path]) -> None:
    """A member whose 65,536-row feeds hold 256 MiB more (as TensorFlow's pool keeps a
    wide layer's activations), with 9 calls in flight: over the 2 GiB bound."""
    scorers = _scorers(checkpoints[:1])
    wide = np.zeros(1, np.float32)

    class _Hungry:
        name, digest, load_seconds = "hungry", "", 0.0

        def predict(self, features: np.ndarray) -> np.ndarray:
            nonlocal wide
            if features.shape[0] > SMALL and wide.size < 2**26:
                wide = np.ones(2**26, np.float32)  # 256 MiB held, as a pool would
            return scorers[0].predict(features)

        def close(self) -> None:
            scorers[0].close()

    try:
        choice = probe_feed([_Hungry()], N_FEATURES,
                            concurrent_calls=LARGE_FEED_MAX_EXTRA // 2**28 + 1)
    finally:
        scorers[0].close()
    # A tiny model: 64k feeds win on per-call overhead, then lose on memory.
    assert pick_feed({int(k): v for k, v in choice.rates.items()}) == LARGE
    assert choice.rows == SMALL and choice.chosen_by == "probe"
    assert "GiB more memory over 9 concurrent calls" in choice.why
