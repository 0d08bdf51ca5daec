"""Latency budget: plan how many seconds to prune by when, steer rho to follow the plan, land on the target.

Three pieces, all plain arithmetic on numbers every rank already shares (the profile is broadcast by rank 0,
the masks are broadcast before they are used), so every rank computes the same rho at every step:

- :class:`PrunedSecondsPlan`: planned pruned seconds against (fractional) epoch, ``linear``, ``cosine`` or
  ``exp`` from ``prune.epoch_free`` to ``prune.epoch_target``.
- :class:`RhoController`: proportional-integral feedback on the gap between planned and predicted pruned
  seconds, in log-rho space (rho acts multiplicatively: a gap of 10% of the budget should scale rho, not add a
  constant to it), clipped to ``[rho0 / max_factor, rho0 * max_factor]`` with anti-windup.
- :func:`fit_masks_to_budget`: the last word at a shrink. Dead channels that would take the network more
  than the tolerance below the target are revived (best |gamma| per second first); at the last chance, live
  channels are removed (worst |gamma| per second first) until the network fits the target.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from dist_hrnas.errors import UserError

if TYPE_CHECKING:
    from dist_hrnas.config import PruneConfig

SCHEDULES = ("linear", "cosine", "exp")
_EXP_RATE = 3.0  # exp schedule: 95% of the budget pruned by the end, front-loaded
AIM_SHARE_OF_TOLERANCE = 0.3  # shrinks aim this far into the band under the target (see BudgetSteer)
FINAL_APPROACH_GAIN = 0.5     # within 2 tolerances of the target, a shrink takes this share of the gap


def schedule_fraction(shape: str, x: float) -> float:
    """Share of the budget planned to be pruned at progress ``x`` in [0, 1]."""
    x = min(1.0, max(0.0, x))
    if shape == "linear":
        return x
    if shape == "cosine":
        return (1.0 - math.cos(math.pi * x)) / 2.0
    if shape == "exp":
        return (1.0 - math.exp(-_EXP_RATE * x)) / (1.0 - math.exp(-_EXP_RATE))
    raise ValueError(f"unknown schedule {shape!r}; use one of {SCHEDULES}")


@dataclass(frozen=True)
class PrunedSecondsPlan:
    """Seconds (predicted, latency-model units) to have pruned by each point of training."""

    total_s: float
    epoch_free: float
    epoch_target: float
    shape: str = "linear"

    def planned_s(self, epoch: float) -> float:
        span = self.epoch_target - self.epoch_free
        x = 1.0 if span <= 0 else (epoch - self.epoch_free) / span
        return self.total_s * schedule_fraction(self.shape, x)


class RhoController:
    """PI controller on ``(planned - actual) / total`` that sets rho; frozen at 0 once the budget is met."""

    def __init__(self, rho0: float, kp: float, ki: float, max_factor: float):
        self.rho0, self.kp, self.ki, self.max_factor = rho0, kp, ki, max_factor
        self.integral = 0.0
        self.error = 0.0
        self.rho = rho0
        self.done = False

    def update(self, planned_s: float, actual_s: float, total_s: float, dt_epochs: float) -> float:
        """New rho from the gap now; ``dt_epochs`` since the last update weights the integral."""
        if self.done:
            return 0.0
        self.error = (planned_s - actual_s) / total_s if total_s > 0 else 0.0  # > 0: behind the plan
        limit = math.log(self.max_factor)
        candidate = self.integral + self.error * dt_epochs
        # anti-windup: stop integrating in the direction that is already saturated
        if self.ki <= 0 or abs(self.kp * self.error + self.ki * candidate) <= limit or \
                abs(candidate) < abs(self.integral):
            self.integral = candidate
        u = max(-limit, min(limit, self.kp * self.error + self.ki * self.integral))
        self.rho = self.rho0 * math.exp(u)
        return self.rho

    def finish(self) -> None:
        """Budget reached: no more penalty, masks frozen (the loop stops shrinking)."""
        self.done, self.rho = True, 0.0

    def state_dict(self) -> dict:
        return {"integral": self.integral, "error": self.error, "rho": self.rho, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.error = float(state["integral"]), float(state["error"])
        self.rho, self.done = float(state["rho"]), bool(state["done"])


@dataclass
class BranchChannels:
    """The channels of one prunable branch as a shrink decision sees them."""

    block: str
    index: int                 # branch index inside the block (masks are per block, in branch order)
    scores: torch.Tensor       # |gamma| per channel
    seconds_per_channel: float


@dataclass
class BudgetFit:
    revived: int = 0
    removed: int = 0
    latency_s_after: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


Masks = dict[str, list[torch.Tensor]]


def linear_predictor(current_s: float, branches: list[BranchChannels]) -> Callable[[Masks], float]:
    """Seconds after ``masks`` as ``current_s`` minus each removed channel's cost (the per-channel model)."""
    def predict(masks: Masks) -> float:
        return current_s - sum(int((~masks[b.block][b.index]).sum()) * b.seconds_per_channel for b in branches)
    return predict


def _shortest_prefix(n: int, ok: Callable[[int], bool]) -> int:
    """Smallest k in [0, n] with ``ok(k)`` (assumed monotone in k), or n when none is."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def fit_masks_to_budget(masks: Masks, branches: list[BranchChannels], current_s: float,
                        target_s: float, tolerance: float, force: bool,
                        ceiling_s: float | None = None,
                        predict: Callable[[Masks], float] | None = None) -> BudgetFit:
    """Edit ``masks`` in place so the shrunk network lands in ``[ceiling (1 - tolerance), ceiling]`` seconds.

    ``masks`` must hold a mask list for every block named in ``branches``. ``current_s``: predicted seconds
    of the network before this shrink; ``ceiling_s`` defaults to the target (a schedule passes where the
    plan is now, so shrinks follow the plan instead of running ahead of it). Too far below the ceiling:
    revive dead channels, highest |gamma| per second first, as many as stay under it. Above the ceiling and
    ``force``: remove live channels, lowest |gamma| per second first, until it is met.

    The channels are *ranked* by the per-channel costs, but how many to take is judged by ``predict`` (the
    latency model's whole-network prediction, default the per-channel sum): removing a branch's last
    channels also removes its launch overhead, which a per-channel cost does not see, and fitting by the
    sum alone overshot by a whole branch's worth.
    """
    ceiling_s = target_s if ceiling_s is None else max(ceiling_s, target_s)
    predict = predict or linear_predictor(current_s, branches)

    def value(b: BranchChannels, c: int) -> float:  # what a channel is worth per second it costs
        return float(b.scores[c]) / max(b.seconds_per_channel, 1e-15)

    original = {name: [m.clone() for m in ms] for name, ms in masks.items()}

    def apply(channels: list[tuple[float, BranchChannels, int]], k: int, keep: bool) -> float:
        for name, ms in original.items():
            for m, o in zip(masks[name], ms):
                m.copy_(o)
        for _, b, c in channels[:k]:
            masks[b.block][b.index][c] = keep
        return predict(masks)

    fit = BudgetFit()
    after = predict(masks)
    if after < ceiling_s * (1.0 - tolerance):
        dead = sorted(((value(b, c), b, c) for b in branches
                       for c in torch.nonzero(~masks[b.block][b.index]).flatten().tolist()), key=lambda t: -t[0])
        # the longest prefix of revivals that stays under the ceiling: the first k after which one more overflows
        fit.revived = _shortest_prefix(len(dead), lambda k: apply(dead, k + 1, True) > ceiling_s)
        after = apply(dead, fit.revived, True)
    elif after > ceiling_s and force:
        live = sorted(((value(b, c), b, c) for b in branches
                       for c in torch.nonzero(masks[b.block][b.index]).flatten().tolist()), key=lambda t: t[0])
        # The latency model is least accurate near the floor, where most of the time is fixed costs: chasing
        # the ceiling there could strip the network bare. Take at most half of what is alive per shrink; the
        # measurement after it re-calibrates the next one.
        cap = len(live) // 2
        fit.removed = min(cap, _shortest_prefix(len(live), lambda k: apply(live, k, False) <= ceiling_s))
        after = apply(live, fit.removed, False)
    fit.latency_s_after = after
    return fit


class BudgetSteer:
    """Everything a search with ``prune.target_latency_ms`` / ``prune.target_ratio`` adds, in one place.

    Latencies come in two units: *measured* (end to end on the target device, what the user asked for) and
    *predicted* (the latency model's sum, what masks and the plan are computed in). The target is mapped into
    predicted units from the latest measurement, re-read after every shrink: to go from the measured latency now
    to the target, remove ``(measured - target) / slope`` predicted seconds. The slope is the measured/predicted
    ratio, or the slope between the last two shrinks when that is steeper (capped at twice the ratio): the
    model misses costs that do not shrink with the channels, so the true slope is usually below the ratio,
    but not always. A steeper slope removes less, and that is the safe side: a shrink that falls short is
    followed by another, one that overshoots cannot be undone. For the same reason shrinks aim high in the
    accepted band, at ``target * (1 - 0.3 * tolerance)``, and within two tolerances of the target take only
    half of the estimated gap per shrink: timing noise still lands inside the band, and when a shrink lands
    above the target the next one takes (half of) the rest.
    """

    def __init__(self, prune: "PruneConfig", epochs: int, supernet_measured_s: float, supernet_predicted_s: float,
                 smallest_predicted_s: float, where: str):
        if prune.target_latency_ms is not None:
            target_s, asked = prune.target_latency_ms / 1e3, f"prune.target_latency_ms={prune.target_latency_ms:g}"
        else:
            target_s, asked = prune.target_ratio * supernet_measured_s, f"prune.target_ratio={prune.target_ratio:g}"
        smallest_s = smallest_predicted_s * supernet_measured_s / supernet_predicted_s
        if target_s >= supernet_measured_s:
            raise UserError(f"{asked}: the supernet already runs in {supernet_measured_s * 1e3:.3f} ms on {where}; "
                            f"give a target below that (or prune.target_ratio < 1)")
        if target_s < smallest_s:
            raise UserError(f"{asked}: below the smallest network this supernet can shrink to "
                            f"(~{smallest_s * 1e3:.3f} ms on {where}: every prunable branch removed); raise the "
                            f"target or use a smaller supernet")
        self.target_s = target_s
        self.tolerance = prune.budget_tolerance
        self.points = [(supernet_predicted_s, supernet_measured_s)]  # (predicted, measured) at every shrink
        self.supernet_predicted_s = supernet_predicted_s
        epoch_target = prune.epoch_target if prune.epoch_target > 0 else 0.75 * epochs
        self.plan = PrunedSecondsPlan(supernet_predicted_s - self.target_predicted_s(), prune.epoch_free,
                                      epoch_target, prune.schedule)
        self.controller = RhoController(prune.rho, prune.controller_kp, prune.controller_ki, prune.rho_max_factor)
        self.last_epoch = prune.epoch_free

    @property
    def done(self) -> bool:
        return self.controller.done

    @property
    def measured_over_predicted(self) -> float:
        predicted, measured = self.points[-1]
        return measured / predicted

    def slope(self) -> float:
        """Measured seconds gained per predicted second removed, near where the network is now."""
        ratio = self.measured_over_predicted
        if len(self.points) < 2:
            return ratio
        (p0, m0), (p1, m1) = self.points[-2:]
        secant = (m0 - m1) / (p0 - p1) if p0 > p1 else ratio
        return min(2.0 * ratio, max(ratio, secant))

    def predicted_for(self, measured_s: float) -> float:
        """Predicted seconds at which the network should measure ``measured_s`` (today's calibration)."""
        predicted, measured = self.points[-1]
        return predicted - (measured - measured_s) / self.slope()

    def target_predicted_s(self) -> float:
        return self.predicted_for(self.target_s)

    def rho(self, epoch: float, pruned_s: float) -> float:
        """rho for this step: 0 before ``epoch_free`` and once the budget is met, else the controller's."""
        if epoch < self.plan.epoch_free or self.done:
            return 0.0
        dt, self.last_epoch = max(0.0, epoch - self.last_epoch), epoch
        return self.controller.update(self.plan.planned_s(epoch), pruned_s, self.plan.total_s, dt)

    def fit(self, masks: Masks, branches: list[BranchChannels], current_predicted_s: float,
            epoch: float, last_epoch: bool, predict: Callable[[Masks], float] | None = None) -> BudgetFit:
        """Fit a shrink's masks: never far below the target; at or under where the plan is by ``epoch``.

        The L1 term alone cannot be trusted to keep pace (plain SGD makes scales hover around zero rather
        than under the threshold), so each shrink also takes the lowest |gamma|-per-second channels the plan
        calls for by now: the schedule is followed at every shrink, and the last one meets the target.
        """
        target = self.predicted_for(self.target_s * (1.0 - AIM_SHARE_OF_TOLERANCE * self.tolerance))
        now_predicted, now_measured = self.points[-1]
        if target < now_predicted and now_measured <= self.target_s * (1.0 + 2.0 * self.tolerance):
            # Close to the target, where one overshoot is final: take half of the estimated gap per shrink
            # and approach it from above (the local slope was seen to be twice the estimate).
            target = now_predicted - FINAL_APPROACH_GAIN * (now_predicted - target)
        planned_share = 1.0 if last_epoch or self.plan.total_s <= 0 else self.plan.planned_s(epoch) / self.plan.total_s
        ceiling = self.supernet_predicted_s - planned_share * (self.supernet_predicted_s - target)
        # Revive dead channels unless they leave the network within 1.5 % under the ceiling: channels the L1
        # term has already zeroed would otherwise take a shrink anywhere into a 5 % band, on top of the gap.
        return fit_masks_to_budget(masks, branches, current_predicted_s, target,
                                   AIM_SHARE_OF_TOLERANCE * self.tolerance, force=True,
                                   ceiling_s=ceiling, predict=predict)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """After a shrink: re-calibrate the units; the budget is met once the measured latency is."""
        if predicted_s > 0:
            self.points.append((predicted_s, measured_s))
        if measured_s <= self.target_s:
            self.controller.finish()

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "points": [list(p) for p in self.points],
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        if "points" in state:
            self.points = [(float(p), float(m)) for p, m in state["points"]]
        else:  # a checkpoint from before the calibration kept its points: keep the ratio it had
            self.points = [(self.supernet_predicted_s, self.supernet_predicted_s * float(state["measured_over_predicted"]))]
        self.last_epoch = float(state["last_epoch"])


def full_masks(model, masks: Masks) -> Masks:
    """``masks`` with an all-kept mask list for every block that has none (fitting may edit any block)."""
    return {name: [m.clone() for m in masks[name]] if name in masks else
            [torch.ones(b.hidden, dtype=torch.bool) for b in block.branches] for name, block in model.named_blocks()}


def branch_channels(model, pairs) -> list[BranchChannels]:
    """The registered branches of ``model`` (``(entry, dw_bn)`` pairs of the prune registry) for fitting."""
    blocks = dict(model.named_blocks())
    out = []
    for entry, bn in pairs:
        index = [b.kernel for b in blocks[entry.block].branches].index(entry.kernel)
        out.append(BranchChannels(entry.block, index, bn.weight.detach().abs().cpu(), entry.seconds_per_channel))
    return out
