"""Reuse planning: a pure function of the committed footer's record and this run's."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.reuse import Reuse, plan_reuse


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "partition": "p.parquet", "fingerprint": "100:5:abc", "id_column": "id",
        "features": ["a", "b"], "bad_rows": "fail", "method": "mean",
        "weights": [0.5, 0.5], "members": {"m0": "d0", "m1": "d1"},
    }
    return record | changes


def test_same_record_is_reused_whole() -> None:
    assert plan_reuse(_record(), _record()) == Reuse(True, ("m0", "m1"))


@pytest.mark.parametrize("key,value", [("fingerprint", "100:5:def"), ("id_column", "key"),
                                       ("features", ["b", "a"]), ("bad_rows", "quarantine")])
def test_other_rows_reuse_nothing(key: str, value: Any) -> None:
    assert plan_reuse(_record(**{key: value}), _record()) == Reuse(False, ())


def test_a_replaced_checkpoint_rescores_that_member_only() -> None:
    previous = _record(members={"m0": "d0", "m1": "old"})
    assert plan_reuse(previous, _record()) == Reuse(False, ("m0",))


@pytest.mark.parametrize("key,value", [("method", "median"), ("weights", [0.25, 0.75])])
def test_another_combination_keeps_every_member_but_not_the_file(key: str, value: Any
                                                                  ) -> None:
    assert plan_reuse(_record(**{key: value}), _record()) == Reuse(False, ("m0", "m1"))


def test_a_member_dropped_from_the_manifest_is_not_reused_whole() -> None:
    previous = _record(members={"m0": "d0", "m1": "d1", "m2": "d2"})
    assert plan_reuse(previous, _record()) == Reuse(False, ("m0", "m1"))


def test_no_record_or_force_reuses_nothing() -> None:
    assert plan_reuse(None, _record()) == Reuse(False, ())
    assert plan_reuse({}, _record()) == Reuse(False, ())
    assert plan_reuse(_record(), _record(), force=True) == Reuse(False, ())


def test_a_file_from_before_min_members_counts_as_needing_every_member() -> None:
    assert plan_reuse(_record(), _record(min_members=2)) == Reuse(True, ("m0", "m1"))
    assert plan_reuse(_record(), _record(min_members=1)) == Reuse(False, ("m0", "m1"))


def test_a_member_missing_last_time_is_scored_now_and_the_others_kept() -> None:
    previous = _record(members={"m0": "d0"}, min_members=1)
    assert plan_reuse(previous, _record(min_members=1)) == Reuse(False, ("m0",))
    # Still missing: the degraded file stands as it is.
    assert plan_reuse(previous, _record(members={"m0": "d0"}, min_members=1)) == Reuse(
        True, ("m0",))


def test_rows_left_out_for_their_scores_make_columns_unusable() -> None:
    previous = _record(members={"m0": "d0", "m1": "old"}, scores_set_aside=3)
    assert plan_reuse(previous, _record()) == Reuse(False, ())
    # ... but the file is still this run's result when nothing changed.
    assert plan_reuse(_record(scores_set_aside=3), _record()) == Reuse(True, ("m0", "m1"))


def test_a_member_that_cannot_load_now_keeps_a_file_it_scored_before() -> None:
    current = _record(members={"m0": "d0"}, absent=["m1"], min_members=1)
    assert plan_reuse(_record(), current) == Reuse(True, ("m0",))
    # ... but not when the member still loading changed, or the rows did.
    assert plan_reuse(_record(members={"m0": "old", "m1": "d1"}), current) == Reuse(
        False, ())
    assert plan_reuse(_record(fingerprint="other"), current) == Reuse(False, ())
