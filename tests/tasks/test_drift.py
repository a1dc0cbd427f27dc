"""Column sketches, their merge across partitions, PSI drift and its report, on known numbers."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest

from tasks.drift import (
    QUANTILE_LEVELS,
    ColumnSketch,
    DriftLine,
    drift_lines,
    merge_sketches,
    psi,
    render_drift_markdown,
    render_drift_text,
    sketch_columns,
    sketch_values,
)

N = 1000
NAMES = [f"f{i}" for i in range(24)]


def normal(seed: int, loc: float = 0.0, size: int | tuple[int, int] = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, size)


def mixture_quantile(p: float, parts: list[tuple[float, float]]) -> float:
    """The p-quantile of a mixture of unit normals given as (weight, mean), by bisection."""
    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(w * NormalDist(m, 1.0).cdf(mid) for w, m in parts) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sketch_matches_numpy_on_the_finite_values(dtype: type) -> None:
    sample: np.ndarray = normal(1, size=(N, 3)).astype(dtype)
    sample[:100, 1] = np.nan
    sample[100:110, 1] = np.inf
    sample[110:115, 1] = -np.inf
    sketches = sketch_columns(["a", "b", "c"], sample, rows=50_000)
    assert list(sketches) == ["a", "b", "c"]
    for j, name in enumerate("abc"):
        column = sample[:, j].astype(np.float64)
        finite = column[np.isfinite(column)]
        s = sketches[name]
        assert (s.rows, s.sampled, s.nulls) == (50_000, N, N - len(finite))
        assert s.mean == pytest.approx(finite.mean(), abs=1e-12)
        assert s.std == pytest.approx(finite.std(), abs=1e-12)
        np.testing.assert_allclose(s.quantiles, np.quantile(finite, QUANTILE_LEVELS), atol=1e-12)
        assert all(type(q) is float for q in s.quantiles)
    assert sketches["b"].nulls == 115 and sketches["b"].null_share == pytest.approx(0.115)


def test_sketches_are_small_json_that_round_trips() -> None:
    sample = normal(2, size=(N, len(NAMES))).astype(np.float32)
    sample[:, 5] = np.nan
    sketches = sketch_columns(NAMES, sample, rows=N)
    text = json.dumps({name: s.model_dump() for name, s in sketches.items()}, allow_nan=False)
    assert len(text.encode()) < 25_000
    back = {name: ColumnSketch.model_validate(v) for name, v in json.loads(text).items()}
    assert back == sketches
    assert back["f5"].quantiles == [] and back["f5"].mean is None and back["f5"].std is None


def test_sketch_of_an_empty_sample_and_bad_input() -> None:
    empty = sketch_columns(["a"], np.empty((0, 1), np.float32), rows=0)["a"]
    assert (empty.sampled, empty.nulls, empty.quantiles, empty.null_share) == (0, 0, [], 0.0)
    with pytest.raises(ValueError, match=r"expected \(n, 2\)"):
        sketch_columns(["a", "b"], np.zeros((5, 3)), rows=5)
    with pytest.raises(ValueError, match="repeat"):
        sketch_columns(["a", "a"], np.zeros((5, 2)), rows=5)
    with pytest.raises(ValueError, match="1-D"):
        sketch_values(np.zeros((5, 2)), rows=5)


def test_sketch_from_another_version_or_with_nan_is_refused() -> None:
    """A stored sketch with other quantile levels cannot be compared; NaN is not JSON."""
    with pytest.raises(ValueError, match="made by another version"):
        ColumnSketch(rows=1, sampled=1, nulls=0, mean=0.0, std=0.0, quantiles=[0.0] * 21)
    with pytest.raises(ValueError):
        ColumnSketch(rows=1, sampled=1, nulls=0, mean=float("nan"), std=0.0, quantiles=[])


def test_same_distribution_is_stable() -> None:
    base = sketch_columns(NAMES, normal(3, size=(N, len(NAMES))), rows=N)
    other = sketch_columns(NAMES, normal(4, size=(N, len(NAMES))), rows=N)
    values = [psi(base[n], other[n]) for n in NAMES]
    assert all(v is not None and 0 <= v < 0.1 for v in values), values
    assert all(psi(base[n], base[n]) == pytest.approx(0.0, abs=1e-12) for n in NAMES)


def test_one_sigma_shift_is_major_with_the_known_value() -> None:
    """10 decile bins of N(0,1) against N(1,1): PSI 0.93 in theory, a little more sampled."""
    value = psi(sketch_values(normal(5), N), sketch_values(normal(6, loc=1.0), N))
    assert value is not None and 0.8 <= value <= 1.3
    lines = drift_lines({"f3": sketch_values(normal(5), N)},
                        {"f3": sketch_values(normal(6, loc=1.0), N)}, {})
    assert lines[0].band == "major" and lines[0].kind == "feature"


def test_half_sigma_shift_is_at_least_moderate() -> None:
    """PSI 0.24 in theory for a half-sigma shift."""
    value = psi(sketch_values(normal(7), N), sketch_values(normal(8, loc=0.5), N))
    assert value is not None and 0.15 <= value <= 0.4
    line = drift_lines({"x": sketch_values(normal(7), N)},
                       {"x": sketch_values(normal(8, loc=0.5), N)}, {})[0]
    assert line.band in ("moderate", "major")


def test_merge_of_parts_from_one_distribution() -> None:
    samples = [normal(10 + i) for i in range(4)]
    merged = merge_sketches([{"x": sketch_values(s, N)} for s in samples])["x"]
    pooled = np.concatenate(samples)
    assert (merged.rows, merged.sampled, merged.nulls) == (4 * N, 4 * N, 0)
    assert merged.mean == pytest.approx(pooled.mean(), abs=1e-9)
    assert merged.std == pytest.approx(pooled.std(), abs=1e-9)
    for i in range(1, 10):
        assert merged.quantiles[4 * i] == pytest.approx(NormalDist().inv_cdf(i / 10), abs=0.1)
    assert merged.quantiles[0] == pooled.min() and merged.quantiles[-1] == pooled.max()
    assert merged.quantiles == sorted(merged.quantiles)


def test_merge_weights_parts_by_rows_not_sample_size() -> None:
    """Both parts sampled 1000 rows, but one stands for 3x the rows: a 3:1 mixture."""
    big = sketch_values(normal(20), rows=30_000)
    small = sketch_values(normal(21, loc=5.0), rows=10_000)
    merged = merge_sketches([{"x": big}, {"x": small}])["x"]
    mixture = [(0.75, 0.0), (0.25, 5.0)]
    assert merged.rows == 40_000
    assert merged.quantiles[20] == pytest.approx(mixture_quantile(0.5, mixture), abs=0.1)
    assert merged.quantiles[36] == pytest.approx(mixture_quantile(0.9, mixture), abs=0.15)
    assert merged.mean == pytest.approx(0.75 * big.mean + 0.25 * small.mean)  # type: ignore[operator]
    assert merged.std == pytest.approx(np.sqrt(1 + 0.75 * 0.25 * 25), abs=0.1)


def test_merge_over_missing_columns_and_all_null_parts() -> None:
    a = sketch_columns(["x", "y"], normal(30, size=(N, 2)), rows=N)
    b = {"x": sketch_values(np.full(200, np.nan), rows=200)}
    c = {"x": sketch_values(normal(31), N), "z": sketch_values(normal(32), N)}
    merged = merge_sketches([a, b, c])
    assert list(merged) == ["x", "y", "z"]
    assert merged["y"] == a["y"]
    x = merged["x"]
    assert (x.rows, x.sampled, x.nulls) == (2 * N + 200, 2 * N + 200, 200)
    both = np.concatenate([normal(30, size=(N, 2))[:, 0], normal(31)])
    assert x.mean == pytest.approx(both.mean(), abs=1e-9)
    assert x.std == pytest.approx(both.std(), abs=1e-9)
    empty = merge_sketches([b, b])["x"]
    assert (empty.quantiles, empty.mean, empty.nulls) == ([], None, 400)


def test_merge_of_one_part_keeps_it() -> None:
    part = sketch_values(normal(33), N)
    merged = merge_sketches([{"x": part}])["x"]
    np.testing.assert_allclose(merged.quantiles, part.quantiles, atol=1e-12)
    assert psi(part, merged) == pytest.approx(0.0, abs=1e-9)


def test_nulls_count_as_drift_even_when_values_do_not_move() -> None:
    values = normal(40)
    with_nulls = values.copy()
    with_nulls[np.random.default_rng(41).permutation(N)[:200]] = np.nan
    current = sketch_values(with_nulls, N)
    assert current.null_share == pytest.approx(0.2)
    value = psi(sketch_values(values, N), current)
    assert value is not None and value >= 0.25


def test_constant_columns() -> None:
    five = sketch_values(np.full(N, 5.0), N)
    assert len(set(five.quantiles)) == 1
    assert psi(five, sketch_values(np.full(N, 5.0, np.float32), N)) == 0.0
    for moved in (3.0, 7.0):  # down as well as up
        line = drift_lines({"c": five}, {"c": sketch_values(np.full(N, moved), N)}, {})[0]
        assert line.band == "major", moved
    spread = psi(five, sketch_values(normal(42, loc=5.0), N))
    assert spread is not None and spread >= 0.25


def test_a_column_going_all_null_is_major_drift_and_renders() -> None:
    gone = sketch_values(np.full(N, np.nan, np.float32), N)
    assert gone.quantiles == [] and gone.null_share == 1.0
    value = psi(sketch_values(normal(50), N), gone)
    assert value is not None and value > 10  # the null share alone: 0 % -> 100 %
    assert psi(gone, sketch_values(normal(50), N)) == value
    assert psi(gone, gone) == 0.0
    lines = drift_lines({"f1": sketch_values(normal(50), N)}, {"f1": gone}, {})
    assert lines[0].band == "major"
    md = render_drift_markdown(lines, "previous run")
    assert "| f1 | feature |" in md and "100.0%" in md
    assert render_drift_text(lines)[0].startswith("f1 (feature): PSI")
    nothing = sketch_values(np.empty(0, np.float32), 0)
    assert psi(nothing, gone) is None
    assert render_drift_text([]) == []


def test_psi_needs_two_bins() -> None:
    s = sketch_values(normal(51), N)
    with pytest.raises(ValueError, match="at least 2 bins"):
        psi(s, s, bins=1)


def _line(column: str, value: float | None, kind: str = "feature") -> DriftLine:
    band = "n/a" if value is None else ("major" if value >= 0.25 else
                                       "moderate" if value >= 0.1 else "stable")
    return DriftLine(column=column, kind=kind, psi=value, band=band, baseline_mean=0.01,
                     current_mean=1.02, baseline_null_share=0.0, current_null_share=0.0)


def test_drift_lines_sort_by_psi_and_take_kinds() -> None:
    base = {"f1": sketch_values(normal(60), N), "score_m1": sketch_values(normal(61), N),
            "ensemble_score": sketch_values(normal(62), N), "gone": sketch_values(normal(63), N),
            "only_then": sketch_values(normal(64), N)}
    now = {"f1": sketch_values(normal(70), N),
           "score_m1": sketch_values(normal(71, loc=1.0), N),
           "ensemble_score": sketch_values(normal(72, loc=0.5), N),
           "gone": sketch_values(np.empty(0), 0),
           "only_now": sketch_values(normal(74), N)}
    kinds = {"score_m1": "member", "ensemble_score": "ensemble"}
    lines = drift_lines(base, now, kinds)
    assert [line.column for line in lines] == ["score_m1", "ensemble_score", "f1", "gone"]
    assert [line.kind for line in lines] == ["member", "ensemble", "feature", "feature"]
    assert lines[0].band == "major" and lines[-1].band == "n/a"
    assert lines[0].current_mean == now["score_m1"].mean
    with pytest.raises(ValueError, match="use one of"):
        drift_lines(base, now, {"f1": "label"})


def test_markdown_report_orders_marks_and_says_what_it_left_out() -> None:
    lines = [_line("b", 0.05), _line("a|x", 0.5, "member"), _line("c", None),
             _line("d", 0.15), _line("e", 0.05)]
    page = render_drift_markdown(lines, "previous run 2026-11-28T02:00:00Z (flow run abc)",
                                 limit=4)
    assert "previous run 2026-11-28T02:00:00Z (flow run abc)" in page.splitlines()[0]
    assert "0.1-0.25" in page and "⚠" in page and "⛔" in page
    rows = [r for r in page.splitlines() if r.startswith("| ") and "column" not in r]
    assert [r.split(" | ")[0][2:] for r in rows] == ["a\\|x", "d", "b", "e"]
    assert "| a\\|x | member | 0.500 | ⛔ major | 0.01 → 1.02 | 0.0% → 0.0% |" in rows[0]
    assert "| ⚠ moderate |" in rows[1] and "| stable |" in rows[2]
    assert "1 more columns left out" in page
    assert "left out" not in render_drift_markdown(lines, "x")
    assert "nothing to compare" in render_drift_markdown([], "x")


def test_text_summary_is_the_top_lines() -> None:
    lines = [_line("f1", 0.05), _line("f3", 0.412), _line("f9", None), _line("f2", 0.2)]
    assert render_drift_text(lines, top=2) == [
        "f3 (feature): PSI 0.412 major, mean 0.01 -> 1.02",
        "f2 (feature): PSI 0.200 moderate, mean 0.01 -> 1.02",
    ]
    assert len(render_drift_text(lines)) == 3
    nulls = _line("f4", 1.5).model_copy(update={"current_null_share": 0.2})
    assert render_drift_text([nulls])[0].endswith(", nulls 0.0% -> 20.0%")


def test_mixture_cdf_equals_the_sum_of_the_parts_cdfs() -> None:
    """The merge's one-pass mixture CDF against evaluating every part's CDF on the grid,
    with ties (point masses) and constant parts among them."""
    from tasks.drift import _cdf, _mixture_cdf

    rng = np.random.default_rng(1)
    for _ in range(50):
        parts = []
        for kind in rng.integers(0, 3, size=rng.integers(1, 20)):
            if kind == 0:
                parts.append(np.sort(rng.normal(rng.normal(), 1.0, 41)))
            elif kind == 1:
                parts.append(np.full(41, float(rng.integers(0, 3))))
            else:
                parts.append(np.sort(np.round(rng.normal(0.0, 1.0, 41), 1)))
        w = rng.random(len(parts))
        w /= w.sum()
        grid, left, right = _mixture_cdf(np.array(parts), w)
        assert np.array_equal(grid, np.unique(np.concatenate(parts)))
        want_left = sum(wp * _cdf(q, grid, left=True) for wp, q in zip(w, parts, strict=True))
        want_right = sum(wp * _cdf(q, grid) for wp, q in zip(w, parts, strict=True))
        assert np.abs(left - want_left).max() < 1e-9
        assert np.abs(right - want_right).max() < 1e-9
