"""bench/level_drift.py: how far two figures of one network a given time apart disagree."""
from __future__ import annotations

import pytest

from bench.level_drift import drift_report, lag_disagreement


def test_a_steady_machine_disagrees_with_itself_by_nothing_at_any_lag():
    series = [(10.0 * i, 40.0) for i in range(120)]  # 20 minutes, one figure every 10 s
    report = drift_report(series, (30, 300))
    assert report["spread_pct"] == 0.0 and report["median_ms"] == 40.0
    assert report["lags"]["30"]["pairs"] > 0 and report["lags"]["30"]["max_pct"] == 0.0
    assert report["lags"]["300"]["median_pct"] == 0.0


def test_a_machine_slowing_one_percent_a_minute_reads_about_five_percent_apart_at_five_minutes():
    series = [(10.0 * i, 40.0 * (1.0 + 0.01 * i / 6.0)) for i in range(120)]
    five = lag_disagreement(series, 300)
    # pairs 230-370 s apart on a ramp of 1 %/min from 1.0 to ~1.2: the earlier figure 3.2-5.8 % under the later
    assert 3.0 < five["median_pct"] < 5.5 and five["max_pct"] <= 5.9
    assert lag_disagreement(series, 30)["median_pct"] < five["median_pct"]


def test_only_pairs_near_the_lag_count_and_a_lag_longer_than_the_series_has_none():
    series = [(0.0, 10.0), (60.0, 11.0), (300.0, 20.0)]
    one_minute = lag_disagreement(series, 60)
    gap = 100 * (1 - 10 / 11)  # the earlier figure as a prediction of the later: 9.1 % under it
    assert one_minute == {"pairs": 1, **{k: pytest.approx(gap, abs=0.01)
                                         for k in ("median_pct", "p90_pct", "p95_pct", "max_pct")}}
    assert lag_disagreement(series, 600) == {"pairs": 0}


def test_the_benchmark_protocol_outvotes_one_disturbed_start_figure_that_single_figures_carry():
    series = [(10.0 * i, 80.0 if i == 1 else 40.0) for i in range(60)]  # one figure read 2x, at 10 s
    assert lag_disagreement(series, 60)["max_pct"] == pytest.approx(100.0)
    protocol = lag_disagreement(series, 60, anchor=3, judge=2)  # median of 3 at the start, mean of 2 later
    assert protocol["pairs"] > 0 and protocol["max_pct"] == 0.0
