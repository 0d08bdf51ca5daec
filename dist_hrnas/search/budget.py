"""Latency budget: plan how many seconds to prune by when, steer rho to follow the plan, and fit each shrink to
where the plan is.

- :class:`PrunedSecondsPlan`: planned pruned seconds against (fractional) epoch, ``linear``, ``cosine`` or
  ``exp`` from ``prune.epoch_free`` to ``prune.epoch_target``.
- :class:`RhoController`: proportional-integral feedback on the gap between planned and predicted pruned
  seconds, in log-rho space (rho acts multiplicatively: a gap of 10% of the budget should scale rho, not add a
  constant to it), clipped to ``[rho0 / max_factor, rho0 * max_factor]`` with anti-windup.
- :class:`BudgetSteer`: how many channels a shrink takes along a ranking (:mod:`dist_hrnas.search.ranking`: the
  k worth least per unit of the penalty's cost; the L1 term has already zeroed most of them). When the target
  device is this machine, k is chosen by *measuring*: the calibrated latency model's pick is timed against the
  network now; only when it misses the band at the landing is another timed, aimed through what the miss
  measured (:meth:`BudgetSteer.probe_aim`), and :meth:`BudgetSteer.pick` chooses among those measured. With
  ``latency.lut_device`` the calibrated model alone decides (:meth:`BudgetSteer.model_k`).

Everything here is plain arithmetic on numbers every rank shares (the profile and the measurements are
broadcast by rank 0), so every rank computes the same rho at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from dist_hrnas.errors import UserError
from dist_hrnas.search.ranking import shortest_prefix

if TYPE_CHECKING:
    from dist_hrnas.config import PruneConfig

SCHEDULES = ("linear", "cosine", "exp")
_EXP_RATE = 3.0  # exp schedule: 95% of the budget pruned by the end, front-loaded
# Candidates a measured landing (the shrink aimed at the target) times at most: the model's pick, then, while the
# last one missed the band, one aimed through the miss, or one between two that bracket it (between, deferring).
# Each costs a few seconds of the search; a secant through a measured point is off by the model's curvature
# only, so the band is usually reached within two, and a bracket needs one or two more where a jump (a grid
# step of a wide branch, a whole branch going) lies across it.
MAX_PROBES = 4
# ... and, once two measured candidates bracket the band, bisection between them goes on to this many in all: on
# the digits supernet a 0.5 landing's probes read 49.4, 47.8 and 47.5 ms for a 42.9 ms target (channels taken
# off many branches at once, whose widths stayed on the same grid step) and then 30.7 ms; taking that one
# overshot by 28 % and cost 10 points of top-1, while each bisection step between the two costs seconds.
MAX_BRACKETED_PROBES = 8
# Where a measured candidate aims inside the band under the aim (``prune.budget_tolerance`` wide): this share of the
# band's width under the aim. At the middle (0.5) all 12 landings of benchmark runs V-X re-timed under their ratio
# afterwards (median -4.0 %, four of them 7.5-8.5 % under); the runs had read them at -2.9 % on average, and over
# the 24 landings of the six steady runs before, a landing's re-timed ratio sat 1.5 points under its own reading at
# the median (scattered by ~3 points either way: the machine's noise on two figures). Aimed a quarter of the band
# under, a landing reads about 1.25 points higher; a candidate is still taken only when it reads at or under the aim.
# So aimed (runs Y-AA, session 22) the steady runs read their landings at -2.4 % on average (-0.8 to -4.8 %), and
# the re-timing still sat 1.2 points under the reading at the median: within 5 % in 3 and 2 of 4.
BAND_AIM = 0.25
# A landing's candidate read in the band but more than this share of its width under the aim is not yet final: a
# candidate between it and the nearest one read over the aim is timed (at most NEAR_REFINEMENTS of them), and the
# slowest at or under the aim is taken as always. Before, the first candidate in the band ended the landing: over
# the 16 landings of benchmark runs AI-AL (one code) the runs read their landing at -2.8 % of the target at the
# median and 10 of 16 more than half the band under (-2.7 to -4.5 %), where BAND_AIM puts the aim at -1.25 %; a
# network further under its target than measurement can tell apart gives up channels (accuracy) for nothing, and its
# re-timing, scattered ~3 points either way about that reading, went to -5.4 and -5.0 %. With the refinement (run
# AM) the four landings read -2.1 / -2.3 / -0.2 / -1.3 %: the 0.35 one was refined from -4.0 % by two more
# candidates (+12.0 %, then -0.2 %), a few seconds of its 111 s; the other three read near the aim at once.
NEAR_AIM = 0.5
NEAR_REFINEMENTS = 2


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


class BudgetSteer:
    """Everything a search with ``prune.target_latency_ms`` / ``prune.target_ratio`` adds, in one place.

    The target is in measured seconds (end to end on the target device); the plan and rho work in the latency
    model's predicted seconds, mapped by the measured/predicted ratio of the latest measurement (the calibrated
    model keeps it near 1). A shrink aims at where the plan is by then (the target from ``prune.epoch_target``
    on, and at the last epoch), and takes the candidate measured slowest at or under that aim.
    """

    def __init__(self, prune: "PruneConfig", epochs: int, supernet_measured_s: float, supernet_predicted_s: float,
                 smallest_predicted_s: float, where: str, smallest_measured_s: Callable[[], float] | None = None):
        """``smallest_measured_s``: times the smallest network end to end on the device (None: no device here);
        asked only when the target lies under the model's estimate of it, which a model fitted near the
        supernet can put far too high (at batch 1: 5.1 ms predicted, 2.8 ms measured)."""
        if prune.target_latency_ms is not None:
            target_s, asked = prune.target_latency_ms / 1e3, f"prune.target_latency_ms={prune.target_latency_ms:g}"
        else:
            target_s, asked = prune.target_ratio * supernet_measured_s, f"prune.target_ratio={prune.target_ratio:g}"
        smallest_s, how = smallest_predicted_s * supernet_measured_s / supernet_predicted_s, "~"
        if target_s >= supernet_measured_s:
            raise UserError(f"{asked}: the supernet already runs in {supernet_measured_s * 1e3:.3f} ms on {where}; "
                            f"give a target below that (or prune.target_ratio < 1)")
        if target_s < smallest_s and smallest_measured_s is not None:
            smallest_s, how = smallest_measured_s(), "measured "
        if target_s < smallest_s:
            raise UserError(f"{asked}: below the smallest network this supernet can shrink to "
                            f"({how}{smallest_s * 1e3:.3f} ms on {where}: every prunable branch removed); raise "
                            f"the target or use a smaller supernet")
        self.target_s = target_s
        self.tolerance = prune.budget_tolerance
        self.supernet_measured_s = supernet_measured_s
        self.points = [(supernet_predicted_s, supernet_measured_s)]  # (predicted, measured) at every shrink
        self.supernet_predicted_s = supernet_predicted_s
        epoch_target = prune.epoch_target if prune.epoch_target > 0 else 0.75 * epochs
        self.plan = PrunedSecondsPlan(supernet_predicted_s - self.to_predicted(target_s), prune.epoch_free,
                                      epoch_target, prune.schedule)
        self.controller = RhoController(prune.rho, prune.controller_kp, prune.controller_ki, prune.rho_max_factor)
        self.last_epoch = prune.epoch_free

    @property
    def done(self) -> bool:
        return self.controller.done

    def to_predicted(self, measured_s: float) -> float:
        """Measured seconds in the latency model's units, by the latest measured/predicted ratio."""
        predicted, measured = self.points[-1]
        return measured_s * predicted / measured

    def relevel(self, factor: float) -> None:
        """The latency model's units moved by ``factor`` (``LatencyProfile.relevel``): the plan's pruned seconds
        with them, so the controller compares like with like. The target stays in measured seconds."""
        self.plan = replace(self.plan, total_s=self.plan.total_s * factor)
        self.supernet_predicted_s *= factor

    def rho(self, epoch: float, pruned_s: float) -> float:
        """rho for this step: 0 before ``epoch_free`` and once the budget is met, else the controller's."""
        if epoch < self.plan.epoch_free or self.done:
            return 0.0
        dt, self.last_epoch = max(0.0, epoch - self.last_epoch), epoch
        return self.controller.update(self.plan.planned_s(epoch), pruned_s, self.plan.total_s, dt)

    def aim_s(self, epoch: float, last_epoch: bool) -> float:
        """Measured seconds this shrink aims at: where the plan is by ``epoch`` (the target itself at the end:
        computed as S - 1.0 * (S - T) it came out above T in one case of eight, so the last shrink was not
        taken for the landing and timed one candidate only)."""
        share = 1.0 if last_epoch or self.plan.total_s <= 0 else self.plan.planned_s(epoch) / self.plan.total_s
        if share >= 1.0:
            return self.target_s
        return self.supernet_measured_s - share * (self.supernet_measured_s - self.target_s)

    def model_k(self, n: int, predict: Callable[[int], float], aim_predicted_s: float) -> int:
        """Fewest channels to take so the model predicts at most ``aim_predicted_s``."""
        return shortest_prefix(n, lambda k: predict(k) <= aim_predicted_s)

    def probe_aim(self, aim_s: float, tried: list[tuple[float, float]]) -> float:
        """Predicted seconds the next measured candidate aims at: BAND_AIM into the band under ``aim_s`` (so a
        model a little off still lands in it), mapped by the latest candidate's measured/predicted ratio
        (``tried``: (predicted, measured) of the candidates timed for this shrink), else by the latest shrink's."""
        mid_s = self.in_band_aim_s(aim_s)
        if not tried:
            return self.to_predicted(mid_s)
        predicted, measured = tried[-1]
        return mid_s * predicted / measured

    def next_k(self, n: int, predict: Callable[[int], float], aim_s: float,
               line: dict[int, tuple[float, float]]) -> int:
        """Channels the next measured candidate takes along a ranking (``line``: channels -> (predicted,
        measured) of those timed along it, in order): the model's pick, aimed through the latest miss."""
        return self.model_k(n, predict, self.probe_aim(aim_s, list(line.values())[-1:]))

    def bracket(self, line: dict[int, tuple[float, float]], aim_s: float,
                near: bool = False) -> tuple[int, int] | None:
        """(most channels measured over the aim, fewest measured under the band) along a ranking, when both
        exist in that order: the band lies between them (:func:`between` finds a candidate there). ``near``: the
        fast end is the fewest measured under :meth:`near_aim`'s part of the band instead (a landing refines)."""
        floor_s = aim_s * (1.0 - (NEAR_AIM if near else 1.0) * self.tolerance)
        slow = [k for k, (_, m) in line.items() if m > aim_s]
        fast = [k for k, (_, m) in line.items() if m < floor_s]
        return (max(slow), min(fast)) if slow and fast and max(slow) < min(fast) else None

    def interpolate(self, line: dict[int, tuple[float, float]], bracket: tuple[int, int], aim_s: float) -> int:
        """Channels at which the straight line through the bracket's two measured ends crosses BAND_AIM into the
        band, kept in the bracket's middle half: the bracket shrinks by a quarter at least, whatever the curve."""
        (s, f), mid_s = bracket, self.in_band_aim_s(aim_s)
        slow_s, fast_s, quarter = line[s][1], line[f][1], (f - s) / 4
        k = s + (f - s) * (slow_s - mid_s) / (slow_s - fast_s)
        return round(min(max(k, s + quarter), f - quarter))

    def in_band_aim_s(self, aim_s: float) -> float:
        """Measured seconds a candidate aims at inside the band under ``aim_s``: BAND_AIM of its width under it."""
        return aim_s * (1.0 - BAND_AIM * self.tolerance)

    def in_band(self, measured_s: float, aim_s: float, share: float = 1.0) -> bool:
        """At or under the aim by at most ``share`` of ``prune.budget_tolerance``."""
        return aim_s * (1.0 - share * self.tolerance) <= measured_s <= aim_s

    def near_aim(self, measured_s: float, aim_s: float) -> bool:
        """In the band's NEAR_AIM part under the aim: a landing stops refining here."""
        return self.in_band(measured_s, aim_s, NEAR_AIM)

    def pick(self, measured: dict[int, float], aim_s: float) -> int:
        """The candidate measured slowest at or under the aim (the fewest channels that meet it); if none
        meets it, the fastest (a later shrink takes the rest)."""
        meeting = [k for k, s in measured.items() if s <= aim_s]
        if meeting:
            return max(meeting, key=lambda k: (measured[k], -k))
        return min(measured, key=lambda k: (measured[k], k))

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """After a shrink: re-read the units; the budget is met once the measured latency is."""
        if predicted_s > 0:
            self.points.append((predicted_s, measured_s))
        if measured_s <= self.target_s:
            self.controller.finish()

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "points": [list(p) for p in self.points],
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.points = [(float(p), float(m)) for p, m in state["points"]]
        self.last_epoch = float(state["last_epoch"])
