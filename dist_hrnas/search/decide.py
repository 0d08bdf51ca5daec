"""What a shrink takes, decided once (rank 0) and handed to every rank.

When the target device is this machine every candidate is *measured before any rank cuts*: latency depends on
the architecture only, so rank 0 builds the candidate with fresh weights and times it end to end against the
network now, in the same rounds (:func:`dist_hrnas.latency.networks.compare_networks`). A candidate that does not
measure faster is re-fitted (only its whole-branch removals kept) or refused. With a budget the calibrated
model's pick is measured (at the landing, corrected by measurement while it misses the band), and with a
``prune.target_ratio`` every figure is taken against the supernet in the same rounds (else against the network
now's own earlier figure, :mod:`dist_hrnas.search.units`). Without a budget, before the last epoch nothing is
timed once the search has spent ``prune.measure_share`` of its wall timing: the shrink waits for a later
evaluation (a budget's shrinks follow its plan and are always timed), and past that share the last epoch's
candidates are compared once each, without the retakes that sharpen a figure (:func:`may_retake`). Every measured
network also becomes a calibration point. With ``latency.lut_device`` (no device here) the calibrated latency model
decides instead.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dist_hrnas.models import HRNet, export_arch
from dist_hrnas.parallel import comm
from dist_hrnas.search.budget import MAX_BRACKETED_PROBES, MAX_PROBES, NEAR_REFINEMENTS
from dist_hrnas.search.ranking import (between, branch_channels, deferring, full_masks, masks_without,
                                      ranked_channels, same_masks, shortest_prefix)
from dist_hrnas.search.masks import (Masks, arch_after_masks, broadcast_masks, dead_channels, flatten_masks,
                                     predict_after_masks, shrunk_view, unflatten_masks, whole_branches_only)
from dist_hrnas.search.units import level_jumped, level_scale, near_predicted, start_level

if TYPE_CHECKING:
    from dist_hrnas.search.driver import Search

# prune/shrink_refused values: why a shrink kept channels, was changed, or did not happen
REFUSED_BRANCH_SLOWER = 1   # model: some branches keep their channels (narrower would run slower, a staircase)
REFUSED_NETWORK_SLOWER = 2  # model: the whole shrink is refused (the network would not get faster)
REFITTED_WHOLE_BRANCHES = 3  # measured: not faster as proposed; only its whole-branch removals are taken
REFUSED_MEASURED_SLOWER = 4  # measured: not faster (nor re-fitted); nothing is cut, the penalty goes on
DEFERRED_MEASURE_SHARE = 5   # not timed: prune.measure_share of the wall is spent; a later evaluation shrinks
# A candidate must measure at least this much faster than the network now, in the same rounds, to be taken,
# and more than the two figures' own round-to-round spreads together (required_gain): on this VM a single
# figure moved ~5 % between comparisons, so a 2 % gain inside a 2 % spread re-timed 4.6 % slower afterwards.
MIN_GAIN = 0.01
# Candidates and the network now are timed in this many rounds (each network once per round, alternating who
# goes first; more while they disagree beyond latency.network_spread), each round latency.candidate_repeats runs.
# Alternating rounds put each network first and second; a single round was not enough here: the first child after
# training ran up to 30 % slow, and a one-round figure of the network now made candidates look far faster than they
# re-timed. Three short rounds cost less than two long ones and their fastest is as steady: side by side on the
# digits supernet (5 comparisons each), 3 x 5 runs gave ratios 0.85-0.93 and 0.62-0.69 for candidates that 2 x 15
# runs put at 0.85-1.00 and 0.61-0.70, in 6-7 s instead of 13-19 s per comparison.
CANDIDATE_ROUNDS = 3
# ... and taken again at most this many times while they disagree (latency.network_spread): a comparison whose
# rounds still disagree after that refuses by itself (required_gain grows with the spread), and every retake
# costs the search a few seconds per network (candidate timing was 47 % of a digits search's wall with 2).
CANDIDATE_RETAKES = 1
# ... except at a budget's landing, where the supernet's figure scales the comparison to the start's units: a
# landing is a few comparisons per budget search, and one whose supernet rounds disagreed after one retake went
# unscaled (benchmark run G: a 0.35 budget landed 12 % under its ratio, its figures taken as the machine's speed
# changed). More rounds give the fastest three more chances to agree.
LANDING_RETAKES = 3
# Before the last epoch a candidate is timed only when the calibrated model predicts it at least this much faster:
# the fastest rounds of one figure agree within about this here (the default latency.network_spread), so a
# smaller gain cannot be told from noise and timing it costs the search more than it can tell.
MEASURABLE_GAIN = 0.05
# A candidate whose figure over the calibrated model's prediction exceeds the network now's (its earlier figure
# over its prediction) by more than this is timed once more: it was likely read in a slow spell that the scale
# did not take out. In benchmark runs M and N a waypoint and a landing read 1.26x and 1.28x their predictions
# (the network now about 1.0x) where the model, before those figures joined its fit, was within 1-3 % of their
# re-timing; the 0.5 budget of N landed 25 % under its ratio on that landing's figure. The model's error on
# networks it has not seen was 2-6 % at the median, 6-15 % at the max, so a smaller departure is its own.
DEPARTURE = 0.15
# At a landing whose comparison is cheap (its timed runs, rounds x latency.candidate_repeats x the networks' figures,
# under LANDING_MEDIAN_S) a candidate that reads at or under the aim (one the landing may take) is compared
# LANDING_COMPARISONS times and the comparison whose candidate reads the median is kept. The repeats time the same
# processes again (a search keeps a comparison's children: CleanProcessTimer.compare), so they take out the
# rounds' minute-to-minute noise, not a process's own speed. At batch 1 both are large: side by side (10
# comparisons of the same two networks per protocol, fresh children each), a landed 0.7 network's ratio to the
# supernet read 0.59-0.69 from one comparison to the next, median 0.643 with every protocol tried, and both
# batch-1 0.7 budgets of runs O and P landed on a single comparison 10-11 % under their ratio (R-T, with the
# repeats: -6.3 / -3.6 / -1.5 %). Repeats in fresh children were tried (session 20, 4 batch-1 0.7 budgets each,
# side by side): landings +22.7 / +2.4 / -4.8 / +13.6 % against the ratio, against +7.0 / +5.3 / -3.4 / -5.6 %
# with the kept ones, at twice the candidate timing (18 s against 8 s on average): not taken. At batch 1 a comparison's
# runs take ~0.2 s (its wall ~1 s), so two more cost a few seconds of the search; at batch 32 ~1.2 s of runs (~4 s
# of wall) each, so there the single comparison (with the DEPARTURE retake) stands. Comparing every probe so
# (benchmark run R) took a batch-1 0.7 search's candidate timing from 4-6 s to 22 s (19 % of its wall); probes
# read over the aim only steer the next one.
LANDING_COMPARISONS = 3
LANDING_MEDIAN_S = 0.5
# Anywhere else a cheap comparison (LANDING_MEDIAN_S) that reads the candidate faster, but by less than this, is
# also taken LANDING_COMPARISONS times and the one whose ratio (candidate / network now) reads the median decides.
# Over the 50 batch-1 shrinks of the benchmark runs of sessions 20-22 none read more than 10 % faster re-timed
# over 0.946 of the network before it; of the 17 read 3-10 % faster three re-timed at 0.989, 1.004 and 1.025
# (AB's first 0.7 shrink, read 4.3 % faster: a one-comparison ratio here moves by ~8 % from the next). About a
# third of batch-1 shrinks, ~2 s each.
CLEAR_GAIN = 0.10


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
    scale: float = 1.0  # measured figures were scaled by this to the start's units (see _timed)
    probes_before_s: list[float] = field(default_factory=list)  # the network now, in each probe's comparison
    level: float = 1.0  # the start's figures times this are the machine's (start_level); 1: they stand


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
                "probes": decision.probes, "scale": decision.scale, "probes_before_s": decision.probes_before_s,
                "level": decision.level}

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
        if search.measure_share_spent():
            return Decision(masks, False, [DEFERRED_MEASURE_SHARE])
    probes = []
    for candidate in candidates:
        (now_s, now_spread), (after_s, after_spread), scale = _timed(search, model, candidate)
        probes.append((search.profile.parts(shrunk_view(model, candidate)), after_s))
        if after_s < now_s * (1.0 - required_gain(now_spread, after_spread)):
            refitted = [REFITTED_WHOLE_BRANCHES] if candidate is whole else []
            return Decision(candidate, True, refitted, after_s, now_s, probes[-1:], scale,
                            level=start_level(search, model, candidate, (now_s, now_spread), (after_s, after_spread),
                                              scale))
    return Decision(masks, False, [REFUSED_MEASURED_SLOWER], before_s=now_s, probes=probes, scale=scale)


def _budget_candidates(search: "Search", model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
    """The calibrated model's pick for the aim, measured with the network now; at the landing (the aim is the
    target), while the last one missed the band, another (at most MAX_PROBES): aimed through the miss, or, once
    two bracket the band, one between them (up to MAX_BRACKETED_PROBES in all), or past the jump between them
    along a ranking that defers the jumping branch; one read in the band but under its near part (NEAR_AIM) is
    followed by up to NEAR_REFINEMENTS between it and a slower one. Taken: the slowest measured at or under the
    aim (the fastest when none is), if it measures faster than the network now. Before the landing a pick the
    model rates less than MEASURABLE_GAIN faster is not timed (the penalty goes on), and one that measures under
    the target's band makes that shrink the landing."""
    budget = search.budget
    base = full_masks(model, {})
    ranked = ranked_channels(branch_channels(model, search.pairs, search.cfg.prune.penalty))

    def predict(n: int) -> float:
        return predict_after_masks(search.profile, model, masks_without(base, ranked, n))

    aim = budget.aim_s(epoch + 1.0, last_epoch)
    landing = aim <= budget.target_s
    timed: list[tuple] = []  # per candidate timed: (masks, (now s, spread), (after s, spread), scale)
    line: dict[int, tuple[float, float]] = {}  # channels taken along `ranked` -> (predicted, measured)
    refined = 0  # candidates timed after one read in the band, to land nearer the aim (NEAR_AIM)
    for probe in range(MAX_BRACKETED_PROBES):
        refining = landing and any(budget.in_band(t[2][0], aim) for t in timed)
        bracket, k = budget.bracket(line, aim, near=refining), None
        if probe >= MAX_PROBES and bracket is None:
            break
        if bracket is not None:
            s, k = between(base, ranked, *bracket, prefer=budget.interpolate(line, bracket, aim))
            if k is None and not refining:  # no candidate between the two: the branch that jumps keeps its width
                ranked, line = deferring(ranked, s), {j: v for j, v in line.items() if j <= s}
        if refining and k is None:  # nothing between the band's candidate and a slower one: the band's stands
            break
        if k is None:
            k = budget.next_k(len(ranked), predict, aim, line)
            if landing and not timed:  # the model may put the network now in the band: time it beside the least cut
                k = max(k, shortest_prefix(len(ranked), lambda j: dead_channels(masks_without(base, ranked, j)) > 0))
        candidate = masks_without(base, ranked, k)
        if (dead_channels(candidate) == 0 or any(same_masks(candidate, t[0]) for t in timed)
                or (not timed and not search.due(model, candidate, last_epoch))):
            break
        if not landing and not measurable(search, model, candidate):  # as in _confirm: a gain timing cannot see
            break
        timed.append((candidate, *_timed(search, model, candidate, landing, aim if landing else None)))
        line.setdefault(0, (predict(0), timed[0][1][0]))  # the network now: every ranking's first point
        line[k] = (predict(k), timed[-1][2][0])
        if not landing and timed[-1][2][0] < budget.target_s * (1.0 - budget.tolerance):
            # a waypoint's pick measured under the target's band would overshoot the whole budget (a 0.7 budget
            # at batch 32 ended 11 % under its target so): this shrink is the landing, and aims at the target
            landing, aim = True, budget.target_s
        refined += refining
        if (budget.near_aim(timed[-1][2][0], aim) or _now_s(timed) <= budget.target_s or not landing
                or refined >= NEAR_REFINEMENTS):
            break
    if not timed:
        return Decision(masks, False)
    probes = [(search.profile.parts(shrunk_view(model, t[0])), t[2][0]) for t in timed]
    befores = [t[1][0] for t in timed]
    if _now_s(timed) <= budget.target_s:  # the network as it is already measures at or under the target: met
        return Decision(masks, False, before_s=_now_s(timed), probes=probes, scale=timed[0][3],
                        probes_before_s=befores)
    candidate, (now_s, now_spread), (after_s, after_spread), scale = timed[
        budget.pick({i: t[2][0] for i, t in enumerate(timed)}, aim)]
    # at the landing a pick that meets the target is taken when faster at all: the gain the budget asks is then
    # larger than the noise the spreads guard against, and refusing it leaves the budget missed (6 of 24 budget
    # searches at batch 32 were refused so and ended 11-34 % over); any other pick must beat the spreads
    gain = 0.0 if landing and after_s <= aim else required_gain(now_spread, after_spread)
    if after_s >= now_s * (1.0 - gain):
        return Decision(masks, False, [REFUSED_MEASURED_SLOWER], before_s=now_s, probes=probes, scale=scale,
                        probes_before_s=befores)
    return Decision(candidate, True, [], after_s, now_s, probes, scale, befores,
                    level=start_level(search, model, candidate, (now_s, now_spread), (after_s, after_spread), scale))


def _now_s(timed: list[tuple]) -> float:
    """The network now's figure over a shrink's comparisons so far (each timed it beside a candidate): the median.
    Before, the latest comparison's figure could stop a landing's probes ("already at the target") while the
    first comparison's decided that it was not, and the landing then took a candidate under the band: a way run
    *Q*'s 0.7 landing at batch 32 could end on 35.5 ms for a 38.8 ms target after a probe at 39.5 ms (its record
    holds the taken comparison's figures only)."""
    return statistics.median(t[1][0] for t in timed)


def _settled(figures: list[tuple[float, float]], taken: int = CANDIDATE_ROUNDS) -> bool:
    """Whether (network now, candidate) figures already decide "faster than now" (taken beyond both spreads, or
    not faster at all), so rounds that disagree need no retake: a retake sharpens the spreads, which moves only a
    candidate in between. Measured on digits searches, retakes were taken in most comparisons, a third of the
    candidate timing. Before CANDIDATE_ROUNDS rounds (two: each network once first) only a clear case decides:
    every round of the candidate faster than every round of the network now by the required gain, or none
    faster than any (its fastest round at or over the network's slowest); on a digits search most candidates
    the model rates MEASURABLE_GAIN faster are that clear, and a third round of both cost a third of the timing."""
    (now_s, now_spread), (after_s, after_spread) = figures[:2]
    gain = required_gain(now_spread, after_spread)
    if taken < CANDIDATE_ROUNDS:  # with two rounds, spread = (slower - faster) / faster: the slower round's figure
        return after_s * (1.0 + after_spread) < now_s * (1.0 - gain) or after_s >= now_s * (1.0 + now_spread)
    return after_s < now_s * (1.0 - gain) or after_s >= now_s


def _timed(search: "Search", model: HRNet, candidate: Masks, landing: bool = False,
           aim_s: float | None = None) -> tuple[tuple[float, float], tuple[float, float], float]:
    """:func:`_compared`. Where that is cheap (LANDING_MEDIAN_S) a candidate is compared LANDING_COMPARISONS times
    and the median comparison kept when it reads at or under the aim at a landing (aiming at ``aim_s``: one the
    landing may take; by the candidate's figure), or, elsewhere, faster than the network now by less than
    CLEAR_GAIN (by the ratio of the two): a probe over the aim only steers the next one, and a clear gain or none
    decides alone. Otherwise a candidate whose figure departs from the calibrated model by more than DEPARTURE
    (:func:`departure`) is compared once more, and the comparison whose candidate reads faster kept. Neither
    once :func:`may_retake` says no."""
    first = _compared(search, model, candidate, landing)
    (now_s, _), (after_s, _), _ = first
    if not may_retake(search):
        return first
    if timed_runs_s(search, first) <= LANDING_MEDIAN_S:
        if aim_s is not None and after_s <= aim_s:
            return _median_comparison(search, model, candidate, landing, first, lambda f: f[1][0])
        if aim_s is None and now_s * (1.0 - CLEAR_GAIN) < after_s < now_s:
            return _median_comparison(search, model, candidate, landing, first, lambda f: f[1][0] / f[0][0])
    if departure(search, model, candidate, after_s) <= 1.0 + DEPARTURE:
        return first
    return min(first, _compared(search, model, candidate, landing), key=lambda figures: figures[1][0])


def may_retake(search: "Search") -> bool:
    """Whether a candidate's comparison (or its rounds: CANDIDATE_RETAKES) may be taken again only to sharpen its
    figures (after a LEVEL_JUMP, a DEPARTURE, or LANDING_COMPARISONS times): always in a budget search (its
    landings are judged on those figures); without a budget only while ``prune.measure_share`` is not spent. Past
    it each candidate is compared once, the last epoch's too: the "faster than now" decision is read in that
    comparison's own rounds, and the retakes cost 2-3 comparisons a candidate (benchmark run of session 31: the
    last epoch's timing, ~12 s of 221 s, took a default digits search to 10.2 % of its wall after the share had
    held the epochs before to 5 %)."""
    return search.budget is not None or not search.measure_share_spent()


def _median_comparison(search: "Search", model: HRNet, candidate: Masks, landing: bool, first: tuple,
                       key) -> tuple[tuple[float, float], tuple[float, float], float]:
    """``first`` and LANDING_COMPARISONS - 1 more comparisons of the candidate: the one whose ``key`` is the median."""
    taken = [first, *(_compared(search, model, candidate, landing) for _ in range(LANDING_COMPARISONS - 1))]
    return sorted(taken, key=key)[len(taken) // 2]


def timed_runs_s(search: "Search", figures: tuple[tuple[float, float], tuple[float, float], float]) -> float:
    """Seconds of timed runs a comparison of the network now and a candidate takes (``figures`` as
    :func:`_compared` returns them, scaled: the raw figures are the scaled ones over the scale)."""
    (now_s, _), (after_s, _), scale = figures
    return CANDIDATE_ROUNDS * search.cfg.latency.candidate_repeats * (now_s + after_s) / scale


def departure(search: "Search", model: HRNet, candidate: Masks, after_s: float) -> float:
    """How much slower the candidate reads (``after_s``, in the start's units) against the calibrated model's
    prediction of it than the network now read against its own: 1 when the model is off alike for both."""
    predicted_now, now_s = search.profile.predict_s(model), search.latency_ms_measured * 1e-3
    predicted_after = predict_after_masks(search.profile, model, candidate)
    if min(predicted_now, now_s, predicted_after) <= 0:
        return 1.0
    return (after_s / predicted_after) / (now_s / predicted_now)


def _compared(search: "Search", model: HRNet, candidate: Masks,
              landing: bool = False) -> tuple[tuple[float, float], tuple[float, float], float]:
    """(network now, candidate) end to end, each (seconds, spread of its rounds), timed in the same rounds, and the
    scale applied to both. At a ``prune.target_ratio`` budget's landing the supernet runs in those rounds too and
    both figures are scaled by (the supernet's figure at the start) / (its figure now): the target is a ratio to
    the supernet, and this VM's speed moved 10-17 % between minutes, so a landing judged against a start figure
    taken minutes before missed by that much. A supernet figure whose rounds disagree beyond
    ``latency.network_spread`` (after LANDING_RETAKES) is not used: one disturbed figure must not move the landing.
    Without the supernet in the rounds, or with one not used, both are scaled by :func:`level_scale` (the
    network now against its own earlier figure; after a LEVEL_JUMP the comparison is taken once more first).
    Before the landing only "faster than now" is decided (a ratio the scale leaves alone), and no retake once
    it is settled."""
    archs = [export_arch(model), arch_after_masks(model, candidate)]
    reference = search.budget_reference_arch() if landing else None
    at = None if reference is None else 0 if reference == archs[0] else len(archs)  # the supernet's figure
    if at == len(archs):
        archs.append(reference)
    spread = search.cfg.latency.network_spread  # a figure whose rounds disagree more is not a reference
    reference_s = search.latency_ms_measured * 1e-3
    figures = []
    for _ in range(2):  # a second time only when the network now jumped from its earlier figure (LEVEL_JUMP)
        retakes = LANDING_RETAKES if landing else CANDIDATE_RETAKES if may_retake(search) else 0
        figures.append(search.compare_on_rank0(archs, CANDIDATE_ROUNDS, retakes, None if landing else _settled))
        if ((at is not None and figures[-1][at][1] <= spread) or not level_jumped(reference_s, figures[-1][0][0])
                or not may_retake(search)):
            break
    figures = min(figures, key=lambda f: abs(math.log(f[0][0] / reference_s)) if reference_s > 0 else 0.0)
    if at is not None and figures[at][1] <= spread:
        scale = search.budget.supernet_measured_s / figures[at][0]
    else:  # no supernet in the rounds, or its rounds disagree: the network now against its own earlier figure
        scale = level_scale(reference_s, figures[0][0], figures[0][1] <= spread)
    scale = near_predicted(scale, figures[1][0], predict_after_masks(search.profile, model, candidate))
    return (figures[0][0] * scale, figures[0][1]), (figures[1][0] * scale, figures[1][1]), scale
