"""Latency-vs-width curves of kernel branches, and the per-channel costs and predictions derived from them.

Latency is not linear in channels: kernels run channel counts in groups (multiples of 8/16/32 on CPUs and
GPUs), so the curve is a staircase on top of a fixed per-branch cost. Each branch keeps its curve (seconds at
a few sampled widths, plus the implicit point (0, 0): a branch without channels is removed and costs nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_hrnas.config import LatencyConfig
from dist_hrnas.latency.calibration import OFF_GRID, Calibration, Parts

# A noisy curve can dip (a wider op timed faster than a narrower one); the marginal cost never falls below
# this share of the average cost, so no channel looks free (a zero penalty would never prune it).
MIN_MARGINAL_FRACTION = 0.1

Curve = list[list[float]]  # [[width, seconds], ...] sorted by width; plain data for checkpoints and JSON


def branch_key(block_name: str, kernel: int) -> str:
    """Stable name of a kernel branch: kernel sizes are unique inside a block, indices shift on removal."""
    return f"{block_name}:k{kernel}"


def sample_widths(width: int, cfg: LatencyConfig) -> list[int]:
    """Widths a branch is timed at: every width_step (coarser for wide branches) plus width - step and width.

    Both cost modes keep the whole curve: the prediction after shrinks reads it. The sample grid stays on
    multiples of ``width_step`` so that segments line up with the hardware's channel groups.
    """
    if width <= 1:
        return [width]
    step = cfg.width_step
    coarse = step * max(1, math.ceil(width / step / cfg.max_samples))
    widths = set(range(coarse, width, coarse)) | {width}
    if width - step >= 1:
        widths.add(width - step)  # the slope at the current width is measured on one hardware step
    return sorted(widths)


def curve_value(curve: Curve, width: float, step: int = 1) -> float:
    """Seconds at ``width``: linear between samples, through (0, 0); exact at sampled widths.

    With ``step`` > 1 (the hardware's channel group, ``latency.width_step``) a width between two multiples of
    ``step`` costs what the next multiple costs (but no more than the widest sample it lies under): kernels run
    a partial group at the price of a whole one (measured here: 41-47 channels as slow as 48, 49 as slow as 56),
    so interpolating linearly inside a group under-predicted widths that are not aligned.
    """
    if width <= 0:
        return 0.0
    if step > 1 and curve:
        width = min(math.ceil(width / step) * step, max(width, curve[-1][0]))
    prev_w, prev_s = 0.0, 0.0
    for w, s in curve:
        if width <= w:
            return prev_s + (s - prev_s) * (width - prev_w) / (w - prev_w)
        prev_w, prev_s = w, s
    if len(curve) >= 2:  # beyond the last sample: extend the last segment
        (w0, s0), (w1, s1) = curve[-2], curve[-1]
        return s1 + (s1 - s0) / (w1 - w0) * (width - w1)
    return prev_s * width / prev_w


def marginal_s(curve: Curve, width: int) -> float:
    """Seconds one more channel costs at ``width``: the slope of the sampled segment (a, b] holding ``width``."""
    if width <= 0:
        return 0.0
    prev_w, prev_s = 0.0, 0.0
    slope = None
    for w, s in curve:
        if width <= w:
            slope = (s - prev_s) / (w - prev_w)
            break
        prev_w, prev_s = w, s
    if slope is None:
        slope = curve_value(curve, width) / width if len(curve) < 2 else \
            (curve[-1][1] - curve[-2][1]) / (curve[-1][0] - curve[-2][0])
    average = curve_value(curve, width) / width
    return max(slope, MIN_MARGINAL_FRACTION * average)


def launch_s(curve: Curve) -> float:
    """What a branch costs before its first channel: its narrowest sample less that many channels at the slope
    of its narrowest segment (the dispatch and setup of its ops), within [0, the narrowest sample]. It goes
    only with the branch's last channel, so no per-channel cost (average or slope) can trade it
    (``latency.cost: fixed_plus_marginal``). The narrowest segment, not a line through every sample: the
    curve is a staircase, and a line through it would lean on the wide steps."""
    if len(curve) < 2:
        return 0.0  # one sample cannot split fixed from per-channel seconds
    (w1, s1), (w2, s2) = curve[0], curve[1]
    return min(max(0.0, s1 - w1 * (s2 - s1) / (w2 - w1)), s1)


# A branch's cost is on a grid of g channels when, inside its groups of g, most of the group's rise is already
# paid at the widths in between (a staircase); on a linear curve half of it would be left.
GRID_RISE_LEFT = 0.25
GRID_CANDIDATES = (2, 4)  # grids tried, in multiples of latency.width_step


def curve_grid(curve: Curve, step: int) -> int:
    """The channel group this branch's cost moves in, read from its curve: the largest ``g`` among ``step`` times
    GRID_CANDIDATES whose groups rise mostly at their start (median over the groups the curve samples inside);
    ``step`` when none does or the curve has no samples inside a group."""
    cost = {int(w): s for w, s in curve}
    best = step
    for g in (step * m for m in GRID_CANDIDATES):
        left = []
        for top in (w for w in cost if w % g == 0 and w - g in cost | {0: 0.0}):
            low = cost.get(top - g, 0.0)
            rise = cost[top] - low
            inside = [w for w in cost if top - g < w < top]
            if rise > 0 and inside:
                left += [(cost[top] - cost[w]) / rise for w in inside]
        if left and sorted(left)[len(left) // 2] < GRID_RISE_LEFT:
            best = g
    return best


@dataclass
class LatencyProfile:
    """Measured seconds of the network and the latency curve of each kernel branch.

    ``branch_s``/``branch_width`` are each branch's seconds and width when it was measured (the supernet);
    ``curves`` hold the samples the per-channel cost and the prediction are read from at any width.
    """

    network_s: float                                   # end to end, at the widths it was measured at
    branch_s: dict[str, float]                         # per branch key, at ``branch_width``
    branch_width: dict[str, int]
    curves: dict[str, Curve] | None = None             # None: one sample per branch (its measured width)
    cost: str = "average"                              # latency.cost: average, marginal or fixed_plus_marginal
    # Stem, shortcuts, fuse sums/upsampling, head conv, classifier: measured on its own (the network with
    # every branch removed) when given, else what the branches leave of the end-to-end time.
    fixed_s: float | None = None
    # Per block, seconds of joining n = 1, 2, ... branches (their sum, the block's output BN, the skip add):
    # it goes with the block's last branch, so the fixed part cannot hold it.
    combine_s: dict[str, list[float]] | None = None
    width_step: int = 1                                # latency.width_step: widths round up to it (curve_value)
    # What the ops timed one by one miss of the measured supernet (cache contents and dispatch between ops,
    # see calibrated()): measured - (fixed part + branches + joins) on the supernet, added to every prediction.
    context_s: float = 0.0
    # Per block, the part its branches count in (their resolution, ``res:HxW``), and the whole-network
    # calibration of the parts (latency/calibration.py); without a fitted one the plain sum + context_s is used.
    groups: dict[str, str] | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.curves is None:
            self.curves = {k: [[float(self.branch_width[k]), float(s)]] for k, s in self.branch_s.items()}
        self.combine_s = self.combine_s or {}
        if self.fixed_s is None:
            self.fixed_s = max(0.0, self.network_s - sum(self.branch_s.values())
                               - sum(c[-1] for c in self.combine_s.values()))
        self._grids: dict[str, int] = {}  # grid() per branch key: read from its curve once

    def per_channel_s(self, key: str, width: int | None = None) -> float:
        """Cost of one channel of a branch at ``width`` (default: its measured width), per ``cost``."""
        width = self.branch_width[key] if width is None else width
        if width <= 0:
            return 0.0
        if self.cost in ("marginal", "fixed_plus_marginal"):
            return marginal_s(self.curves[key], width) * self.scale(key, width)
        return self.curve_s(key, width) / width * self.scale(key, width)

    def launch_s(self, key: str) -> float:
        """A branch's fixed seconds (:func:`launch_s`, calibrated): what only removing the whole branch saves."""
        return launch_s(self.curves[key]) * self.scale(key)

    def join_launch_s(self, block: str) -> float:
        """Seconds of joining a block's last branch (calibrated): what only emptying the block saves."""
        joins = self.combine_s.get(block)
        if not joins:
            return 0.0
        coef = self.calibration.coef.get("join", 1.0) if self._fitted else 1.0
        return max(0.0, joins[0]) * coef

    def grid(self, key: str) -> int:
        """The channel group this branch's cost moves in (``prune.round_to: auto``)."""
        if key not in self._grids:
            self._grids[key] = curve_grid(self.curves[key], self.width_step)
        return self._grids[key]

    def part(self, block: str, key: str, width: int) -> str:
        """The calibration part a branch's seconds count in: its resolution's, apart when off its grid."""
        group = (self.groups or {}).get(block, "branches")
        return group if width % self.grid(key) == 0 else group + OFF_GRID

    def scale(self, key: str, width: int | None = None) -> float:
        """The calibration's factor for a branch's seconds at ``width`` (default: on its grid; 1 without a fitted
        calibration)."""
        if self.calibration is None or not self.calibration.fitted or not self.groups:
            return 1.0
        block = key.rsplit(":k", 1)[0]
        return self.calibration.coefficient(self.part(block, key, self.grid(key) if width is None else width))

    def curve_s(self, key: str, width: int) -> float:
        """One branch's seconds at ``width``. Not a per-branch share of :meth:`predict_s`: the block joins are
        per block (a block's share is the drop in ``predict_s`` when it loses its branches)."""
        return curve_value(self.curves[key], width, self.width_step)

    def calibrated(self, supernet) -> "LatencyProfile":
        """This profile with ``context_s`` set so that it predicts ``network_s`` for ``supernet`` exactly.

        Ops timed alone sum short of the network they come from (digits on the 2-core CPU: 4-13 % with
        evicted caches, 9-20 % without), by a part that stays about the same as branches shrink: the measured
        supernet gives it once, then every shrunk network's prediction carries it.
        """
        self.context_s = self.network_s - sum(self.parts(supernet).values())
        return self

    def relevel(self, factor: float) -> None:
        """Every figure taken at the start (the supernet's, and the calibration's supernet and sample points: one
        machine speed) times ``factor``, and the fit again: a search whose own later figures say the start's speed
        was not the machine's (``search.units.start_level``) moves its model to theirs. The points its shrinks
        added are in their own minute's units already and stay. Without a fitted calibration only the context part
        moves (the supernet's prediction by ``factor``, a smaller network's by the same seconds)."""
        self.context_s += (factor - 1.0) * self.network_s  # context = network - the supernet's parts
        self.network_s *= factor
        if self.calibration is not None:
            for point in self.calibration.points:
                if point[2] in ("supernet", "sample"):
                    point[1] *= factor
            self.calibration.fit()

    def refit(self, parts: Parts, measured_s: float, source: str) -> None:
        """Add one measured network to the calibration and fit it again."""
        if self.calibration is None:
            self.calibration = Calibration()
        self.calibration.add(parts, measured_s, source)
        self.calibration.fit()

    def parts(self, model) -> Parts:
        """The per-op sum for ``model`` (possibly shrunk), split into the parts the calibration scales: the fixed
        part, the block joins of the surviving branches, and each resolution's kernel branches (:meth:`part`)."""
        out = {"fixed": self.fixed_s, "join": 0.0}
        for name, block in model.named_blocks():
            joins = self.combine_s.get(name)
            if joins and block.branches:
                out["join"] += joins[min(len(block.branches), len(joins)) - 1]
            for branch in block.branches:
                key = branch_key(name, branch.kernel)
                part = self.part(name, key, branch.hidden)
                out[part] = out.get(part, 0.0) + self.curve_s(key, branch.hidden)
        return out

    def fixed_part_s(self) -> float:
        """The fixed part as the prediction counts it (its calibrated share)."""
        return self.calibration.predict({"fixed": self.fixed_s}) if self._fitted else self.fixed_s

    def context_part_s(self) -> float:
        """The supernet's offset, in the prediction only without a fitted calibration."""
        return 0.0 if self._fitted else self.context_s

    @property
    def _fitted(self) -> bool:
        return self.calibration is not None and self.calibration.fitted

    def predict_s(self, model) -> float:
        """Predicted end-to-end seconds of ``model`` (possibly shrunk): the calibrated sum of its parts, or
        without a fitted calibration the plain sum plus the context part."""
        parts = self.parts(model)
        if self.calibration is not None and self.calibration.fitted:
            return self.calibration.predict(parts)
        return sum(parts.values()) + self.context_s

    def to_tensor(self, keys: list[str]) -> torch.Tensor:
        """[network_s, fixed_s, context_s, each key's curve seconds in order]: what rank 0 broadcasts."""
        values = [self.network_s, self.fixed_s, self.context_s] + [s for k in keys for _, s in self.curves[k]]
        values += [s for joins in self.combine_s.values() for s in joins]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, keys: list[str], widths: dict[str, int],
                    samples: dict[str, list[int]] | None = None, cost: str = "average",
                    joins: dict[str, int] | None = None, width_step: int = 1) -> "LatencyProfile":
        """Inverse of :meth:`to_tensor`; ``samples`` (per key, the widths of its curve) default to ``widths``;
        ``joins``: per block, how many combine costs it has (its branch count)."""
        values = t.tolist()
        samples = samples or {k: [widths[k]] for k in keys}
        curves, offset = {}, 3
        for k in keys:
            n = len(samples[k])
            curves[k] = [[float(w), s] for w, s in zip(samples[k], values[offset:offset + n])]
            offset += n
        combine_s = {}
        for name, n in (joins or {}).items():
            combine_s[name] = values[offset:offset + n]
            offset += n
        branch_s = {k: curve_value(curves[k], widths[k]) for k in keys}
        return cls(values[0], branch_s, {k: widths[k] for k in keys}, curves, cost, values[1], combine_s, width_step,
                   values[2])

    def state_dict(self) -> dict:
        """Plain data (checkpoints stay ``weights_only``-loadable)."""
        return {"network_s": self.network_s, "branch_s": dict(self.branch_s), "branch_width": dict(self.branch_width),
                "curves": {k: [list(p) for p in c] for k, c in self.curves.items()}, "cost": self.cost,
                "fixed_s": self.fixed_s, "combine_s": {k: list(v) for k, v in self.combine_s.items()},
                "width_step": self.width_step, "context_s": self.context_s, "groups": dict(self.groups or {}),
                "calibration": self.calibration.state_dict() if self.calibration is not None else None}

    @classmethod
    def from_state_dict(cls, p: dict, cost: str | None = None) -> "LatencyProfile":
        """Restore; checkpoints written before curves existed hold one sample per branch."""
        return cls(p["network_s"], dict(p["branch_s"]), dict(p["branch_width"]),
                   {k: [list(x) for x in c] for k, c in p["curves"].items()} if "curves" in p else None,
                   cost or p.get("cost", "average"), p.get("fixed_s"),
                   {k: list(v) for k, v in p.get("combine_s", {}).items()}, int(p.get("width_step", 1)),
                   float(p.get("context_s", 0.0)), dict(p.get("groups") or {}),
                   Calibration.from_state_dict(p.get("calibration")))
