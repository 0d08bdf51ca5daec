"""The statistics of bench/search_quality.py: Pareto fronts of per-rho means, latency at matched accuracy, and
a bootstrap over seeds that says whether a latency ratio is more than noise.

A *cell* is one (mode, rho) setting run with several seeds: ``{"latency_ms": [...], "val_top1": [...]}`` with
one entry per seed, in seed order. Fronts are drawn through the cells' means; the bootstrap resamples each
cell's seeds with replacement and redraws everything from there, so seed noise in both curves is in the interval.
"""
from __future__ import annotations

import math
import random
import statistics

Cell = dict[str, list[float]]
Point = tuple[float, float]  # (latency_ms, val_top1)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def pareto(points: list[Point]) -> list[Point]:
    """(latency, top1) points not beaten by a faster-and-at-least-as-accurate one, by latency."""
    front, best = [], -1.0
    for lat, acc in sorted(points):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def latency_at(front: list[Point], acc: float) -> float:
    """Latency the front needs to reach ``acc`` (linear between neighbouring points; the fastest point when it
    already reaches it). A front that never reaches ``acc`` is a ValueError."""
    if front and acc <= front[0][1]:
        return front[0][0]
    for (l0, a0), (l1, a1) in zip(front, front[1:]):
        if a0 <= acc <= a1:
            return l0 if a1 == a0 else l0 + (l1 - l0) * (acc - a0) / (a1 - a0)
    raise ValueError(f"accuracy {acc} is not reached on this curve")


def cell_means(cells: list[Cell]) -> list[Point]:
    return [(statistics.fmean(c["latency_ms"]), statistics.fmean(c["val_top1"])) for c in cells]


def matched_ratio(cells_a: list[Cell], cells_b: list[Cell]) -> tuple[float, float]:
    """(latency of front A / latency of front B at the best top-1 both reach, that top-1)."""
    front_a, front_b = pareto(cell_means(cells_a)), pareto(cell_means(cells_b))
    matched = min(front_a[-1][1], front_b[-1][1])
    return latency_at(front_a, matched) / latency_at(front_b, matched), matched


def _resample(cell: Cell, rng: random.Random) -> Cell:
    n = len(cell["latency_ms"])
    idx = [rng.randrange(n) for _ in range(n)]
    return {k: [v[i] for i in idx] for k, v in cell.items()}


def bootstrap_ratio(cells_a: list[Cell], cells_b: list[Cell], resamples: int = 2000, level: float = 0.90,
                    seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of :func:`matched_ratio` over seed resamples of every cell."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        ratios.append(matched_ratio([_resample(c, rng) for c in cells_a], [_resample(c, rng) for c in cells_b])[0])
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * (len(ratios) - 1))], ratios[math.ceil((1.0 - tail) * (len(ratios) - 1))]


def summarise_cell(cell: Cell) -> dict:
    """Mean and standard error of a cell's latency and top-1 (what the tables and error bars show)."""
    (lat, lat_se), (acc, acc_se) = mean_se(cell["latency_ms"]), mean_se(cell["val_top1"])
    return {"latency_ms": round(lat, 4), "latency_ms_se": round(lat_se, 4), "val_top1": round(acc, 5),
            "val_top1_se": round(acc_se, 5), "seeds": len(cell["latency_ms"])}
