"""Whole-network calibration of the per-op latency sum.

Ops timed one by one miss what the runtime does across them (fusion, cache contents, dispatch between ops), and
the miss is not a constant: it differs by resolution (memory-bound high-resolution depthwise work against
compute-bound low-resolution work) and it accumulates in one direction along a search, which removes exactly the
channels the per-op sum rates most expensive. So the sum is calibrated on whole networks measured end to end: the
supernet and sampled sub-networks spanning what a search visits (widths from full to near-empty, whole branches
removed, on and off the channel grid), plus every network a search measures after a shrink.

The model: measured ~= sum over parts of ``coef[part] * seconds[part]``, the parts being the fixed part (stem,
shortcuts, fuse, head; constant for one supernet, so its coefficient is the intercept), the block joins, and the
kernel branches grouped by resolution, those off their channel grid apart (``OFF_GRID``): a width off the grid
runs slower in a whole network than its op alone says, so with one coefficient per resolution the fit split the
difference, and networks on the grid (the supernet, and all a default search visits) read high. Coefficients are
non-negative (a part never saves time) and pulled gently towards 1 (the per-op sum) so that a few points cannot
send them anywhere; residuals are relative (the accuracy that matters is in percent) and points far off the fit
are dropped before the final fit, so one disturbed measurement cannot skew every later prediction.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

# Weight of the pull towards coefficient 1, against relative residuals: a coefficient moves away from 1 only when
# many points agree (one point 10 % off moves a free coefficient by far less than 10 %).
PRIOR_WEIGHT = 0.1
# A point whose relative residual is this many robust standard deviations (1.4826 MAD) from the median residual,
# and more than OUTLIER_FLOOR off, is left out of the final fit: a figure taken while the machine was busy.
OUTLIER_MADS = 3.5
OUTLIER_FLOOR = 0.03
# Fewer points than this: the fit is not trusted, the plain sum plus the supernet's offset is used instead.
MIN_POINTS = 4
# Suffix of a resolution's part for its branches off their channel grid (LatencyProfile.parts). Replayed on the
# samples of nine LUTs of sessions 20-21 (no timing; samples then on latency.width_step, every one with branches
# off their own grid, the supernet with none): with one coefficient per resolution the supernet read +4.6 to +11.7 %
# over its own figure in 8 of 9 and the samples on the step up to 3.7 % high on average, the others 0.7-4.5 % low;
# split, the supernet left out of the fit was predicted within 4.8 % at the median (7.2 % before; 7 of 9 closer)
# and the leave-one-out error on the samples fell in 7 of 9 (median of the nine 4.4 -> 3.6 %).
OFF_GRID = ":off"

Parts = dict[str, float]  # part name -> predicted seconds of that part (the per-op sum, split)


@dataclass
class Calibration:
    """Measured whole networks (their parts and seconds) and the coefficients fitted to them."""

    points: list[list] = field(default_factory=list)  # [[parts dict, measured seconds, source], ...]
    coef: dict[str, float] = field(default_factory=dict)
    dropped: int = 0                                     # points left out of the last fit as outliers

    def add(self, parts: Parts, measured_s: float, source: str) -> None:
        self.points.append([dict(parts), float(measured_s), source])

    @property
    def fitted(self) -> bool:
        return bool(self.coef)

    def coefficient(self, part: str) -> float:
        """A part's fitted coefficient; one the fit has not seen counts as its resolution's (off the grid) or 1."""
        return self.coef.get(part, self.coef.get(part.removesuffix(OFF_GRID), 1.0))

    def predict(self, parts: Parts) -> float:
        return sum(self.coefficient(k) * v for k, v in parts.items())

    def fit(self) -> "Calibration":
        """Fit ``coef`` to the points (nothing when there are too few)."""
        if len(self.points) < MIN_POINTS:
            self.coef, self.dropped = {}, 0
            return self
        cols = sorted({k for parts, _, _ in self.points for k in parts})
        keep = np.ones(len(self.points), dtype=bool)
        coef = _solve(self.points, cols, keep)
        residual = _relative_residuals(self.points, cols, coef)
        centre = float(np.median(residual))
        spread = 1.4826 * float(np.median(np.abs(residual - centre)))
        keep = np.abs(residual - centre) <= max(OUTLIER_MADS * spread, OUTLIER_FLOOR)
        if not keep.all() and keep.sum() >= MIN_POINTS:
            coef = _solve(self.points, cols, keep)
        self.coef = dict(zip(cols, (float(c) for c in coef)))
        self.dropped = int((~keep).sum())
        return self

    def errors_pct(self) -> list[float]:
        """Signed error of the fit on each point, in % of the measurement."""
        return [100.0 * (self.predict(parts) - m) / m for parts, m, _ in self.points if m > 0]

    def held_out_errors_pct(self) -> list[float]:
        """Signed error on each sampled point of a fit made without it (leave one out), in % of its measurement:
        how the calibration does on networks it has not seen, from figures taken in one sitting."""
        out = []
        for i, (parts, measured, source) in enumerate(self.points):
            if source != "sample" or measured <= 0:
                continue
            rest = Calibration(self.points[:i] + self.points[i + 1:]).fit()
            out.append(100.0 * (rest.predict(parts) - measured) / measured)
        return out

    def state_dict(self) -> dict:
        return {"points": [[dict(p), m, s] for p, m, s in self.points], "coef": dict(self.coef),
                "dropped": self.dropped}

    @classmethod
    def from_state_dict(cls, state: dict | None) -> "Calibration":
        if not state:
            return cls()
        return cls([[dict(p), float(m), str(s)] for p, m, s in state["points"]], dict(state["coef"]),
                   int(state.get("dropped", 0)))


def _design(points: list[list], cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([[parts.get(c, 0.0) for c in cols] for parts, _, _ in points], dtype=np.float64)
    y = np.array([m for _, m, _ in points], dtype=np.float64)
    return a, y


def _solve(points: list[list], cols: list[str], keep: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative residuals, with the pull towards 1."""
    a, y = _design(points, cols)
    a, y = a[keep] / y[keep, None], np.ones(int(keep.sum()))
    prior = PRIOR_WEIGHT * np.eye(len(cols))
    coef, _ = nnls(np.vstack([a, prior]), np.concatenate([y, PRIOR_WEIGHT * np.ones(len(cols))]))
    return coef


def _relative_residuals(points: list[list], cols: list[str], coef: np.ndarray) -> np.ndarray:
    a, y = _design(points, cols)
    return (a @ coef - y) / y


# Draws per sample on its grid before it is drawn off the grid instead (as many again), and then kept even if a
# duplicate: on a branch's coarse grid (32 channels of 64, say) samples near the supernet often round back to it (on
# a small supernet always), and a network timed twice (or the supernet again) tells the fit nothing new.
SAMPLE_DRAWS = 10


def sample_arch_widths(widths: dict[str, list[int]], count: int, grid: int | dict[str, list[int]],
                       seed: int = 0) -> list[dict[str, list[int]]]:
    """``count`` sub-network widths (per block name, one width per branch; 0 = branch removed) spanning a search:
    from nearly the supernet down to nearly empty, with whole branches removed more often as they get smaller,
    every other sample on the grid (multiples of ``grid`` channels, or per block of each branch's own ``grid``),
    the others anywhere; none the supernet or another sample again while a few more draws can avoid it."""
    grids = grid if isinstance(grid, dict) else {name: [grid] * len(ws) for name, ws in widths.items()}
    seen, out = {_key(widths)}, []
    for i in range(count):
        level = 1.0 - 0.9 * i / max(1, count - 1)
        for draw in range(2 * SAMPLE_DRAWS):  # the first draw as before; more only for a duplicate
            on_grid = i % 2 == 0 and draw < SAMPLE_DRAWS
            sample = _draw(widths, grids, level, on_grid, random.Random(seed * 1000 + i + 100_000 * draw))
            if _key(sample) not in seen:
                break
        seen.add(_key(sample))
        out.append(sample)
    return out


def _draw(widths: dict[str, list[int]], grids: dict[str, list[int]], level: float, on_grid: bool,
          rng: random.Random) -> dict[str, list[int]]:
    sample = {}
    for name, block_widths in widths.items():
        row = []
        for w, g in zip(block_widths, grids[name]):
            if rng.random() < 0.6 * (1.0 - level):
                row.append(0)
                continue
            k = min(w, max(1, round(w * level * rng.uniform(0.75, 1.25))))
            if on_grid and g > 1:
                k = min(w, math.ceil(k / g) * g)
            row.append(k)
        sample[name] = row
    return sample


def _key(sample: dict[str, list[int]]) -> tuple:
    return tuple((name, tuple(ws)) for name, ws in sorted(sample.items()))
