"""How far this machine's speed moves with time, and so how closely any latency figure can be judged here.

The digits supernet is timed end to end again and again for ``--minutes`` (each figure in a fresh child process,
the fastest of its rounds: the protocol of the re-timing, bench/retime.py), at each batch size in turn. For each
lag the report gives how far two figures of the *same* network taken that far apart disagree. That is the error a
prediction anchored at one moment shows when it is judged at a later one even if the latency model were exact:
the floor under the trajectory and held-out figures of ``bench/latency_accuracy.py`` (a search takes its start
figure of the supernet, shrinks 1-4 minutes later, and is re-timed a few minutes after that). Nothing else may
run while it does. Prints one JSON object (``--out`` also keeps it, rewritten after every cycle).

Usage: ``python bench/level_drift.py [--minutes 20] [--batch-sizes 1 32] [--out F]`` (``--report F``: the
report of a kept run again, timing nothing)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Lags, in seconds, at which figures are compared: from the next figure to the span between a search's start and
# its re-timing (a digits search runs 2-4 minutes here; bench/latency_accuracy.py re-times it right after).
LAGS_S = (30, 60, 120, 300, 600)
# Two figures count as ``lag`` apart when their distance in time is within this share of it.
LAG_TOLERANCE = 0.25
# The benchmark's own protocol: a search's start figure of the supernet is the median of at least three figures
# (dist_hrnas.latency.networks.calibrate), and its truth the mean of two re-timing passes (--retime-passes 2).
ANCHOR_FIGURES, JUDGE_FIGURES = 3, 2

Series = list[tuple[float, float]]  # (seconds since the start, milliseconds)


def lag_disagreement(series: Series, lag_s: float, tolerance: float = LAG_TOLERANCE, anchor: int = 1,
                     judge: int = 1) -> dict:
    """The error of an exact prediction anchored on ``anchor`` consecutive figures (their median) and judged
    ``lag_s`` later (within ``tolerance`` of it, counted from the last anchor figure) by the mean of ``judge``
    consecutive figures, as bench/latency_accuracy.py counts errors: ``|anchored / judged - 1|`` in %, over every
    such pair of windows: its median, 90th and 95th percentiles (nearest rank) and max."""
    values = [v for _, v in series]
    gaps = []
    for i in range(len(series) - anchor + 1):
        anchored, t0 = statistics.median(values[i:i + anchor]), series[i + anchor - 1][0]
        for j in range(i + anchor, len(series) - judge + 1):
            if abs((series[j][0] - t0) - lag_s) <= tolerance * lag_s:
                gaps.append(100.0 * abs(anchored / statistics.fmean(values[j:j + judge]) - 1.0))
    if not gaps:
        return {"pairs": 0}
    gaps.sort()
    return {"pairs": len(gaps), "median_pct": round(statistics.median(gaps), 2),
            "p90_pct": round(_nearest_rank(gaps, 0.90), 2), "p95_pct": round(_nearest_rank(gaps, 0.95), 2),
            "max_pct": round(gaps[-1], 2)}


def _nearest_rank(ordered: list[float], share: float) -> float:
    return ordered[math.ceil(share * len(ordered)) - 1]


def drift_report(series: Series, lags_s: tuple[float, ...] = LAGS_S) -> dict:
    """One batch size's figures: their count, median, spread (slowest over fastest), and at each lag the
    disagreement of single figures (``lags``) and of the benchmark's protocol (``protocol_lags``: ANCHOR_FIGURES
    against JUDGE_FIGURES, :func:`lag_disagreement`)."""
    values = [v for _, v in series]
    return {"figures": len(values), "median_ms": round(statistics.median(values), 3) if values else None,
            "spread_pct": round(100.0 * (max(values) / min(values) - 1.0), 2) if values else None,
            "lags": {str(int(lag)): lag_disagreement(series, lag) for lag in lags_s},
            "protocol_lags": {str(int(lag)): lag_disagreement(series, lag, anchor=ANCHOR_FIGURES, judge=JUDGE_FIGURES)
                              for lag in lags_s}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(ROOT) / "configs" / "digits.yaml"))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", help="also write the JSON here (after every cycle, so a stopped run keeps it)")
    parser.add_argument("--report", help="time nothing: the report of the series kept in this JSON (an --out)")
    args = parser.parse_args()
    if args.report and not Path(args.report).is_file():
        parser.error(f"no such file {args.report} (--report takes the JSON an --out run wrote)")
    if args.minutes <= 0 or any(b < 1 for b in args.batch_sizes):
        parser.error("--minutes must be > 0 and every --batch-sizes entry >= 1")
    if args.report:
        kept = json.loads(Path(args.report).read_text())
        print(json.dumps({**kept, **{k: {**drift_report([tuple(p) for p in v["series"]]), "series": v["series"]}
                                     for k, v in kept.items() if isinstance(v, dict) and "series" in v}}, indent=1))
        return

    from dist_hrnas.config import load_config
    from dist_hrnas.fileio import atomic_write_json
    from dist_hrnas.latency import CleanProcessTimer
    from dist_hrnas.models import build_model, export_arch

    cfg = load_config(args.config)
    arch = export_arch(build_model(cfg.model))
    timers = {b: CleanProcessTimer(dataclasses.replace(cfg.latency, batch_size=b, clean_process=True, lut="",
                                                       lut_device=""), cfg.data.image_size)
              for b in args.batch_sizes}
    series: dict[int, Series] = {b: [] for b in args.batch_sizes}
    start = time.monotonic()
    result: dict = {}
    while time.monotonic() - start < 60.0 * args.minutes:
        for batch, timer in timers.items():
            seconds = timer.compare([arch])[0][0]
            series[batch].append((round(time.monotonic() - start, 2), round(seconds * 1e3, 4)))
        result = {"config": args.config, "minutes": args.minutes, "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                  **{f"batch{b}": {**drift_report(s), "series": s} for b, s in series.items()}}
        if args.out:
            atomic_write_json(Path(args.out), result)
        print(f"{time.monotonic() - start:7.0f} s  " + "  ".join(f"b{b}: {s[-1][1]:.2f} ms" for b, s in series.items()),
              file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
