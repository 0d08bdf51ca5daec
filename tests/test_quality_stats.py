"""bench/quality_stats.py: fronts through per-rho means, latency at matched top-1, and the seed bootstrap."""
from __future__ import annotations

import pytest

from bench.quality_stats import bootstrap_ratio, latency_at, matched_ratio, mean_se, pareto, summarise_cell


def _cell(latencies, top1s):
    return {"latency_ms": list(latencies), "val_top1": list(top1s)}


def test_pareto_keeps_only_points_no_faster_point_beats():
    assert pareto([(10, 0.9), (8, 0.95), (12, 0.97), (9, 0.94)]) == [(8, 0.95), (12, 0.97)]


def test_latency_at_interpolates_along_the_front_and_refuses_an_unreached_accuracy():
    front = [(10.0, 0.90), (20.0, 0.96)]
    assert latency_at(front, 0.93) == pytest.approx(15.0)
    assert latency_at(front, 0.85) == 10.0
    with pytest.raises(ValueError, match="not reached"):
        latency_at(front, 0.97)


def test_a_mode_twice_as_fast_at_every_accuracy_has_ratio_one_half_and_a_tight_interval():
    slow = [_cell([20, 21, 19], [0.90, 0.91, 0.89]), _cell([40, 41, 39], [0.96, 0.95, 0.97])]
    fast = [_cell([10, 10.5, 9.5], [0.90, 0.91, 0.89]), _cell([20, 20.5, 19.5], [0.96, 0.95, 0.97])]
    ratio, matched = matched_ratio(fast, slow)
    assert ratio == pytest.approx(0.5) and matched == pytest.approx(0.96)
    low, high = bootstrap_ratio(fast, slow, resamples=300)
    assert low <= 0.5 <= high and high < 0.7


def test_noise_as_large_as_the_effect_gives_an_interval_that_spans_one():
    a = [_cell([10, 30, 20], [0.90, 0.92, 0.91]), _cell([30, 50, 40], [0.95, 0.97, 0.96])]
    b = [_cell([12, 28, 22], [0.91, 0.90, 0.92]), _cell([35, 45, 40], [0.96, 0.95, 0.97])]
    low, high = bootstrap_ratio(a, b, resamples=300)
    assert low < 1.0 < high


def test_mean_and_standard_error_per_cell():
    assert mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))
    assert mean_se([5.0]) == (5.0, 0.0)
    s = summarise_cell(_cell([10, 12], [0.9, 0.8]))
    assert s["latency_ms"] == 11 and s["latency_ms_se"] == pytest.approx(1.0) and s["seeds"] == 2
