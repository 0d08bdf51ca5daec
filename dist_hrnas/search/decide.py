"""What a shrink takes, decided once (rank 0) and handed to every rank.

When the target device is this machine every candidate is *measured before any rank cuts*: latency depends on
the architecture only, so rank 0 builds the candidate with fresh weights and times it end to end against the
network now, in the same rounds (:func:`dist_hrnas.latency.measure.compare_networks`). A candidate that does not
measure faster is re-fitted (only its whole-branch removals kept) or refused; with a budget, a few candidate
channel counts proposed by the calibrated latency model are measured and the one measured slowest at or under
the aim is taken. Every measured network also becomes a calibration point. With ``latency.lut_device`` (no
device here) the calibrated latency model decides instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dist_hrnas.models import HRNet, export_arch
from dist_hrnas.parallel import comm
from dist_hrnas.search.budget import branch_channels, full_masks, masks_without, ranked_channels
from dist_hrnas.search.masks import (Masks, arch_after_masks, broadcast_masks, dead_channels, flatten_masks, predict_after_masks,
                                     shrunk_view, unflatten_masks, whole_branches_only)

if TYPE_CHECKING:
    from dist_hrnas.search.driver import Search

# prune/shrink_refused values: why a shrink kept channels, was changed, or did not happen
REFUSED_BRANCH_SLOWER = 1   # model: some branches keep their channels (narrower would run slower, a staircase)
REFUSED_NETWORK_SLOWER = 2  # model: the whole shrink is refused (the network would not get faster)
REFITTED_WHOLE_BRANCHES = 3  # measured: not faster as proposed; only its whole-branch removals are taken
REFUSED_MEASURED_SLOWER = 4  # measured: not faster (nor re-fitted); nothing is cut, the penalty goes on
# A candidate must measure at least this much faster than the network now, in the same rounds, to be taken,
# and more than the two figures' own round-to-round spreads together (required_gain): on this VM a single
# figure moved ~5 % between comparisons, so a 2 % gain inside a 2 % spread re-timed 4.6 % slower afterwards.
MIN_GAIN = 0.01
# Candidates and the network now are timed in this many rounds (each network once per round, alternating who
# goes first; more while they disagree beyond latency.network_spread). Two alternating rounds put each network
# once first and once second; a single round was not enough here: the first child after training ran up to 30 %
# slow, and a one-round figure of the network now made candidates look far faster than they re-timed.
CANDIDATE_ROUNDS = 2
# Before the last epoch a candidate is timed only when the calibrated model predicts it at least this much faster:
# the fastest rounds of one figure agree within about this here (the default latency.network_spread), so a
# smaller gain cannot be told from noise and timing it costs the search more than it can tell.
MEASURABLE_GAIN = 0.05


def required_gain(now_spread: float, after_spread: float) -> float:
    """The fraction a candidate must beat the network now by: its and the network's spreads, at least MIN_GAIN."""
    return max(MIN_GAIN, now_spread + after_spread)


@dataclass
class Decision:
    """A shrink's masks (the same on every rank), whether it is due, and what was measured to decide it."""

    masks: Masks
    due: bool
    refusals: list[int] = field(default_factory=list)
    measured_s: float | None = None   # the chosen candidate, end to end (None: not measured)
    before_s: float | None = None     # the network now, timed in the same rounds
    probes: list[tuple[dict, float]] = field(default_factory=list)  # (calibration parts, measured seconds)


def decide_by_model(search: "Search", model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
    """The calibrated latency model decides (no device to measure on): rank 0's masks, then the model's review."""
    if search.budget is not None:
        base = full_masks(model, {})
        ranked = ranked_channels(branch_channels(model, search.pairs, search.cfg.prune.penalty))
        aim = search.budget.to_predicted(search.budget.aim_s(epoch + 1.0, last_epoch))
        aim *= 1.0 - 0.5 * search.budget.tolerance  # the middle of the band: the model may be a few % off
        k = search.budget.model_k(len(ranked), lambda n: predict_after_masks(search.profile, model,
                                                                             masks_without(base, ranked, n)), aim)
        masks = masks_without(base, ranked, k)
    masks = broadcast_masks(model, masks)
    due, refusals = search.review(model, masks, last_epoch)
    return Decision(masks, due, refusals)


def decide_by_measurement(search: "Search", model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
    """Rank 0 proposes, measures and chooses; every rank receives the decision (or rank 0's error)."""
    def on_rank0() -> dict:
        decision = (_budget_candidates if search.budget is not None else _confirm)(search, model, masks, epoch,
                                                                                   last_epoch)
        return {"flat": flatten_masks(model, decision.masks).tolist(), "due": decision.due,
                "refusals": decision.refusals, "measured_s": decision.measured_s, "before_s": decision.before_s,
                "probes": decision.probes}

    payload = comm.broadcast_object(comm.on_rank0(on_rank0, "measuring the shrink's candidates"))
    masks = unflatten_masks(model, torch.tensor(payload.pop("flat"), dtype=torch.bool))
    return Decision(masks, **payload)


def measurable(search: "Search", model: HRNet, masks: Masks) -> bool:
    """Whether the calibrated model predicts ``masks`` at least MEASURABLE_GAIN faster than the network now."""
    after = predict_after_masks(search.profile, model, masks)
    return after <= search.profile.predict_s(model) * (1.0 - MEASURABLE_GAIN)


def _confirm(search: "Search", model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
    """The proposed masks, timed against the network now; re-fitted to whole branches or refused if not faster."""
    if not search.due(model, masks, last_epoch):
        return Decision(masks, False)
    candidates = [masks]
    whole = whole_branches_only(masks)
    if dead_channels(whole) > 0 and not flatten_masks(model, whole).equal(flatten_masks(model, masks)):
        candidates.append(whole)
    if not last_epoch:  # before the last epoch only gains the timing can see are timed; the penalty goes on
        candidates = [c for c in candidates if measurable(search, model, c)]
        if not candidates:
            return Decision(masks, False)
    now_arch = export_arch(model)
    for candidate in candidates:
        (now_s, now_spread), (after_s, after_spread) = search.compare_on_rank0(
            [now_arch, arch_after_masks(model, candidate)], CANDIDATE_ROUNDS)
        if after_s < now_s * (1.0 - required_gain(now_spread, after_spread)):
            probe = (search.profile.parts(shrunk_view(model, candidate)), after_s)
            refitted = [REFITTED_WHOLE_BRANCHES] if candidate is whole else []
            return Decision(candidate, True, refitted, after_s, now_s, [probe])
    return Decision(masks, False, [REFUSED_MEASURED_SLOWER])


def _budget_candidates(search: "Search", model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
    """A few candidate channel counts from the calibrated model, measured with the network now; the slowest at or
    under the aim is taken (the fastest when none reaches it), if it measures faster than the network now."""
    budget = search.budget
    base = full_masks(model, {})
    ranked = ranked_channels(branch_channels(model, search.pairs, search.cfg.prune.penalty))
    aim = budget.aim_s(epoch + 1.0, last_epoch)
    ks = [k for k in budget.probe_ks(len(ranked), lambda n: predict_after_masks(
        search.profile, model, masks_without(base, ranked, n)), aim) if k > 0]
    candidates = {k: masks_without(base, ranked, k) for k in ks}
    candidates = {k: m for k, m in candidates.items() if dead_channels(m) > 0}
    if not candidates or not search.due(model, next(iter(candidates.values())), last_epoch):
        return Decision(masks, False)
    figures = search.compare_on_rank0([export_arch(model)] + [arch_after_masks(model, m) for m in candidates.values()],
                                      CANDIDATE_ROUNDS)
    now_s, now_spread = figures[0]
    measured = {k: f[0] for k, f in zip(candidates, figures[1:])}
    spreads = {k: f[1] for k, f in zip(candidates, figures[1:])}
    probes = [(search.profile.parts(shrunk_view(model, m)), measured[k]) for k, m in candidates.items()]
    k = budget.pick(measured, aim)
    if measured[k] >= now_s * (1.0 - required_gain(now_spread, spreads[k])):
        return Decision(masks, False, [REFUSED_MEASURED_SLOWER], before_s=now_s, probes=probes)
    return Decision(candidates[k], True, [], measured[k], now_s, probes)
