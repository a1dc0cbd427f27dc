"""The feed probe: which batch size a run takes when the user gives none. Its decision rule
is checked on given rates (never on timings), and the probe itself on real checkpoints:
it measures both sizes, leaves the members scoring as before, and falls back to the
smaller size, saying why, where measuring would cost too much or cannot be done."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pytest

from flows.demo import build_mlp_checkpoint, feature_names, mlp_reference
from loaders.base import GraphScorer
from loaders.cache import MODEL_CACHE, load_scorer
from loaders.feed import (
    FEED_ROWS,
    LARGE_FEED_MAX_EXTRA,
    PAYBACK,
    REPROBE_AFTER,
    SMALL_FEED_MARGIN,
    FeedChoice,
    feed_bytes_per_row,
    feed_key,
    pick_feed,
    probe_evals,
    probe_feed,
    probe_members,
    probed_members,
    reused_feed,
    worth_probing,
)
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import ModelSpec, load_manifest
from tasks.steps import _choose_feed
from tests.helpers import N_FEATURES, ckpt_member, save_tf2_saved_model, write_manifest

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
    # Overall faster by the margin, but not in one half of the probe: one noisy round.
    halves = ({SMALL: 1.3, LARGE: 1.0}, {SMALL: 1.05, LARGE: 1.0})
    assert pick_feed({SMALL: 1.15, LARGE: 1.0}, *halves) == LARGE
    assert pick_feed({SMALL: 1.4, LARGE: 1.0}, halves[0], halves[0]) == SMALL


def _probed(**update: object) -> dict[str, object]:
    """The feed of a run record whose probe chose 65,536 rows an hour before NOW."""
    return {"rows": LARGE, "chosen_by": "probe", "rates": {str(SMALL): 1.0, str(LARGE): 1.1},
            "seconds": 0.7, "why": "w", "process": "host:1", "members": ["m0"], "key": "k",
            "probed_at": "2026-11-30T04:00:00+00:00", **update}


NOW = datetime.datetime(2026, 11, 30, 5, 0, tzinfo=datetime.timezone.utc)


def test_a_previous_choice_is_reused_only_under_the_same_key_and_not_for_ever() -> None:
    reused = reused_feed(_probed(), "k", NOW)
    assert reused is not None and reused.rows == LARGE and reused.chosen_by == "previous run"
    assert reused.seconds == 0.0 and reused.rates == {str(SMALL): 1.0, str(LARGE): 1.1}
    assert "probed at 2026-11-30T04:00:00+00:00 in host:1 on the same CPU" in reused.label
    again = reused_feed(reused.model_dump(), "k", NOW)  # a reuse is reused as well
    assert again is not None and again.probed_at == reused.probed_at
    later = NOW + REPROBE_AFTER
    assert reused_feed(_probed(), "k", later) is None  # probed over a week before
    for previous, key in [
        (_probed(), "other"), (_probed(), ""), (_probed(key=""), ""),
        (_probed(chosen_by="default"), "k"), (_probed(chosen_by="user"), "k"),
        (_probed(rows=123), "k"), (_probed(rows="65536x"), "k"),
        (_probed(probed_at="yesterday"), "k"), (_probed(probed_at="2026-11-30T04:00:00"), "k"),
        (_probed(probed_at="2026-12-30T04:00:00+00:00"), "k"),  # in the future
        (_probed(rates="fast"), "k"), (None, "k"), ([1, 2], "k"), ("k", "k"),
        # Figures and texts a probe does not write (they are logged and copied forward).
        (_probed(rates={"16k": 1.0, "64k": 1.1}), "k"), (_probed(rates={str(LARGE): 1.0}), "k"),
        (_probed(rates={str(SMALL): float("nan"), str(LARGE): 1.0}), "k"),
        (_probed(rates={str(SMALL): -1.0, str(LARGE): 1.0}), "k"),
        (_probed(half_rates=[{"1" * 5000: 1.0}]), "k"), (_probed(why="x" * 301), "k"),
        (_probed(why="fine\nforged log line"), "k"), (_probed(process="\x1b[31m"), "k"),
        (_probed(members=["m"] * 65), "k"), (_probed(process=""), "k"),
        (_probed(rates={str(SMALL): 1.7e308, str(LARGE): 1.0}), "k"),
    ]:
        assert reused_feed(previous, key, NOW) is None, previous


def test_a_label_names_whatever_sizes_a_choice_holds() -> None:
    odd = FeedChoice(rows=SMALL, chosen_by="default", rates={"16k": 1.0, "1" * 5000: 2.0})
    assert "'16k' rows" in odd.label and "'11111111111111111111' rows" in odd.label


def test_the_key_changes_with_what_the_choice_depends_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    members = [("m0", "a" * 64), ("m1", "b" * 64)]
    key = feed_key(members, 8, in_flight=2, runner="threads")
    assert key == feed_key(list(reversed(members)), 8, in_flight=2, runner="threads")
    assert len({key, feed_key(members[:1], 8, in_flight=2, runner="threads"),
                feed_key([("m0", "c" * 64), members[1]], 8, in_flight=2, runner="threads"),
                feed_key(members, 9, in_flight=2, runner="threads"),
                feed_key(members, 8, in_flight=1, runner="threads"),
                feed_key(members, 8, in_flight=2, runner="processes")}) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert feed_key(members, 8, in_flight=2, runner="threads") != key
    monkeypatch.delenv("OMP_NUM_THREADS")
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        everything = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(everything)})  # as `taskset -c 0` would
        try:
            assert feed_key(members, 8, in_flight=2, runner="threads") != key
        finally:
            os.sched_setaffinity(0, everything)


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
        choice = probe_feed(scorers, N_FEATURES, bytes_per_row=1e3, in_flight=2)
        assert choice.chosen_by == "probe" and choice.rows in FEED_ROWS
        assert set(choice.rates) == {str(SMALL), str(LARGE)}
        assert all(rate > 0 for rate in choice.rates.values()) and choice.seconds > 0
        halves = [{int(k): v for k, v in h.items()} for h in choice.half_rates]
        assert len(halves) == 2 and all(set(h) == {SMALL, LARGE} for h in halves)
        assert choice.rows == pick_feed({int(k): v for k, v in choice.rates.items()}, *halves)
        assert f"at most {choice.rows:,} rows per Session.run (probe: 16,384 rows" in choice.label
        assert choice.process.endswith(f":{os.getpid()}") and choice.process in choice.label
        assert "ran at" in choice.why and "in the probe's halves" in choice.why
        assert "taken at 1.10 or more in both" in choice.why
        # A previous run's choice is taken as it is, within this run's bounds: nothing timed.
        before = choice.model_copy(update={"chosen_by": "previous run", "process": "h:1"})
        again = probe_members(scorers, N_FEATURES, in_flight=2, previous=before)
        assert again.model_dump(exclude={"seconds"}) == before.model_dump(exclude={"seconds"})
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
        choice = probe_feed(scorers, N_FEATURES, bytes_per_row=1e3, in_flight=1,
                            budget_seconds=0.0)
    finally:
        scorers[0].close()
    assert choice.rows == SMALL and choice.chosen_by == "default" and not choice.rates
    assert "slow members: measuring would take" in choice.why and choice.seconds > 0


def test_wide_rows_keep_the_smaller_feed(tmp_path: Path) -> None:
    width = 300  # 65,536 rows x 300 float32 = 75 MiB
    prefix = build_mlp_checkpoint(tmp_path / "wide" / "model.ckpt", seed=3, n_features=width,
                                  hidden=(4,))
    scorer = load_scorer(ModelSpec(name="wide", path=str(prefix), input="features",
                                   output="score"), width)
    forged = FeedChoice(rows=LARGE, chosen_by="previous run", rates={
        str(SMALL): 1.0, str(LARGE): 2.0}, process="h:1")  # a record the user wrote
    try:
        choice = probe_feed([scorer], width, bytes_per_row=1e3, in_flight=1)
        reused = probe_members([scorer], width, in_flight=1, previous=forged)
    finally:
        scorer.close()
    for made in (choice, reused):
        assert made.rows == SMALL and made.chosen_by == "default"
        assert "300 features" in made.why and "64 MiB" in made.why


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
        choice = probe_feed([member], N_FEATURES, bytes_per_row=1e3, in_flight=1)
    finally:
        member.close()
    assert choice.rows == SMALL and choice.chosen_by == "default"
    assert choice.why == "a probe feed failed: MemoryError: no room for a large feed"


def test_the_task_leaves_absent_members_out(tmp_path: Path) -> None:
    prefixes = [build_mlp_checkpoint(tmp_path / f"m{i}" / "model.ckpt", seed=40 + i,
                                     n_features=N_FEATURES, hidden=(4,)) for i in range(3)]
    manifest = load_manifest(write_manifest(tmp_path / "models.yaml", {
        "features": feature_names(N_FEATURES), "id_column": "id",
        "models": [ckpt_member(f"m{i}", p) for i, p in enumerate(prefixes)]}))
    digests = [digest_files(resolve_model(s).files) for s in manifest.models]
    choice = _choose_feed(manifest, absent=["m0"], in_flight=2)
    assert choice.chosen_by == "probe" and choice.rows in FEED_ROWS
    assert [MODEL_CACHE.loads[d] for d in digests] == [0, 1, 1]


def test_memory_per_row_comes_from_the_members_own_tensors(tmp_path: Path) -> None:
    """TensorFlow's step stats: a layer 16 times as wide holds about 16 times the bytes per
    row, a SavedModel's function body included, whatever the process held before."""
    narrow = build_mlp_checkpoint(tmp_path / "n" / "model.ckpt", seed=1,
                                  n_features=N_FEATURES, hidden=(256,))
    wide = build_mlp_checkpoint(tmp_path / "w" / "model.ckpt", seed=1,
                                n_features=N_FEATURES, hidden=(4096,))
    rng = np.random.default_rng(3)
    saved = save_tf2_saved_model(tmp_path / "sm", [
        (rng.standard_normal((N_FEATURES, 256)).astype(np.float32), np.zeros(256, np.float32)),
        (rng.standard_normal((256, 1)).astype(np.float32), np.zeros(1, np.float32))])
    scorers = [load_scorer(ModelSpec(name=n, path=str(p), input="features", output="score"),
                           N_FEATURES) for n, p in (("n", narrow), ("w", wide))]
    scorers.append(load_scorer(ModelSpec(name="sm", path=str(saved)), N_FEATURES))
    try:
        per_row = [feed_bytes_per_row([s], N_FEATURES) for s in scorers]
        again = feed_bytes_per_row(scorers[:1], N_FEATURES)
    finally:
        for scorer in scorers:
            scorer.close()
    assert per_row[0] >= 256 * 4 and 12 < per_row[1] / per_row[0] < 20
    assert per_row[2] >= 256 * 4  # the hidden layer inside the SavedModel's function
    assert again == per_row[0]


def test_larger_feeds_holding_too_much_memory_keep_the_smaller(tmp_path: Path) -> None:
    """A 4096-wide layer holds ~16 KiB per row: 65,536-row feeds of 8 partitions in flight
    would hold ~6 GiB more than 16,384-row ones, 2 partitions under 2 GiB."""
    prefix = build_mlp_checkpoint(tmp_path / "w" / "model.ckpt", seed=1,
                                  n_features=N_FEATURES, hidden=(4096,))
    scorer = load_scorer(ModelSpec(name="w", path=str(prefix), input="features",
                                   output="score"), N_FEATURES)
    try:
        per_row = feed_bytes_per_row([scorer], N_FEATURES)
        crowded = probe_feed([scorer], N_FEATURES, bytes_per_row=per_row, in_flight=8)
        alone = probe_feed([scorer], N_FEATURES, bytes_per_row=per_row, in_flight=1,
                           budget_seconds=0.0)
    finally:
        scorer.close()
    assert crowded.rows == SMALL and crowded.chosen_by == "default" and not crowded.rates
    assert "GiB, the members' calls of 8 partition(s) in flight" in crowded.why
    assert per_row * LARGE * 8 > LARGE_FEED_MAX_EXTRA
    assert "memory" not in alone.why  # one partition: within the bound, on to timing


def test_the_costliest_members_are_timed_and_a_broken_one_is_named(
        tmp_path: Path, checkpoints: list[Path]) -> None:
    """Whatever the manifest's order, the members holding the most per row are the ones
    timed; a member whose tensors cannot be read leaves the smaller feed, named."""
    prefix = build_mlp_checkpoint(tmp_path / "w" / "model.ckpt", seed=2,
                                  n_features=N_FEATURES, hidden=(512,))
    scorers = _scorers(checkpoints[:2])
    scorers.append(load_scorer(ModelSpec(name="wide", path=str(prefix), input="features",
                                         output="score"), N_FEATURES))
    try:
        choice = probe_members(scorers, N_FEATURES, in_flight=1)
        assert choice.members[0] == "wide" and len(choice.members) == probed_members(3)
        refused = probe_members(scorers, N_FEATURES, in_flight=10_000)  # over the bound
        assert "GiB, the members' calls of 10000 partition(s)" in refused.why
        assert refused.process == choice.process and refused.process in refused.label
        scorers[1].close()
        broken = probe_members(scorers, N_FEATURES, in_flight=1)
    finally:
        for scorer in scorers:
            scorer.close()
    assert broken.rows == SMALL and broken.chosen_by == "default"
    assert broken.why.startswith("member 'm1': its memory per row could not be read: ")
