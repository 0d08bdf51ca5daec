"""A comparison's figures in the start's units: the factor that takes them back when the machine's speed moved.

Only the network changes a network's latency, so the network now, timed beside its candidate, against its own
earlier figure (itself in the start's units) says how much faster or slower the machine runs this minute; the
calibrated model's prediction bounds how far such a factor may move the candidate's figure.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dist_hrnas.models import HRNet
from dist_hrnas.search.masks import Masks, predict_after_masks

if TYPE_CHECKING:
    from dist_hrnas.search.driver import Search

# How far under the calibrated model's prediction a scale may take a candidate's figure (not_far_under_predicted):
# about the model's own error on networks it has not seen (held-out median 2-6 %, max 6-15 %), so the bound stops
# a reference read in a slow spell (scales down to 0.67 here) without overruling the model's own few percent.
PREDICTION_SLACK = 0.10
# A network now whose figure is more than this away from its own earlier figure, either way, says the machine's
# speed moved by that much (the network is the same, and one figure's rounds agree within ~5 % here): the
# comparison is taken once more, the one nearer the earlier figure kept, and scaled back to the start's units by it
# (level_scale) even where its rounds disagree or it reads faster. Unscaled, session 20's benchmark run *U* kept two
# such figures: a rho search's network now read 1.54x its earlier figure in rounds that disagreed, its candidate
# entered the calibration at 1.43x its re-timing and the next shrink's at 1.44x (the trajectory's max, +27.8 %);
# a 0.7 budget's network now read 0.81x at its landing (the supernet's rounds disagreed), and the landing took a
# candidate read 0.78x its re-timing: 25 % over the ratio. Replayed on the records of the 74 shrinks of that
# session's 25 stored searches (each re-timed afterwards), 8 comparisons jumped so; scaled, their candidates'
# figures over their re-timing went from 1.16 / 0.90 / 1.41 / 0.75 / 0.84 / 0.78 / 1.43 / 1.44 to 0.86 / 0.82 /
# 1.00 / 0.95 / 1.18 / 0.96 / 0.93 / 1.05 (median error 23 % -> 6 %). The 1.18: a first shrink against a start
# figure read 1.12x its re-timing, which the scale holds the run to (a 0.7 landing: on its ratio, a truer one).
# Smaller moves stay with slow_spell_scale: scaling every comparison whose rounds disagree made things worse (run H).
LEVEL_JUMP = 0.15


def level_jumped(reference_s: float, now_s: float) -> bool:
    """Whether the network now's figure ``now_s`` is more than LEVEL_JUMP away from its earlier ``reference_s``."""
    return reference_s > 0 and now_s > 0 and max(now_s / reference_s, reference_s / now_s) > 1.0 + LEVEL_JUMP


def level_scale(reference_s: float, now_s: float, steady: bool) -> float:
    """The factor back to the start's units from the network now's figure against its earlier one: ``reference_s /
    now_s`` either way after a LEVEL_JUMP, whatever its rounds; else :func:`slow_spell_scale` when they agree."""
    if level_jumped(reference_s, now_s):
        return reference_s / now_s
    return slow_spell_scale(reference_s, now_s) if steady else 1.0


def near_predicted(scale: float, candidate_s: float, predicted_s: float) -> float:
    """``scale`` bounded so that the candidate's scaled figure stays within PREDICTION_SLACK of the calibrated
    model's prediction of it on the side the scale moves it to (:func:`not_far_under_predicted` under 1; over 1,
    a scale up never takes it more than PREDICTION_SLACK over the prediction, nor under 1)."""
    if scale <= 1.0 or candidate_s <= 0:
        return not_far_under_predicted(scale, candidate_s, predicted_s)
    return max(1.0, min(scale, (1.0 + PREDICTION_SLACK) * predicted_s / candidate_s))


def not_far_under_predicted(scale: float, candidate_s: float, predicted_s: float) -> float:
    """A scale under 1, raised as far as needed (never above 1) that the candidate's scaled figure is not more than
    PREDICTION_SLACK under the calibrated model's prediction of it (made before this figure joins the fit). The
    scale assumes the reference and the candidate were slowed alike in their rounds, yet re-timed afterwards, in
    7 of 64 comparisons of benchmark runs G-I the network now read 1.16-1.49x its re-timing and its candidate (the
    same rounds, alternating) 0.86-1.22x; scaled by the network now, such candidates entered the calibration up to
    37 % under their re-timing. The candidate's own reading over its prediction bounds how much of a slow spell
    its figure can carry; replayed on runs G-I's figures, the bound at the prediction itself took the run figures'
    median error from 7.5 / 10.9 / 6.4 % to 6.9 / 5.8 / 4.3 %. The slack: with the bound at the prediction, a
    model reading high could not learn from the figures it bounded (each entered the fit as its own prediction):
    in the steady hour of run *O* the bound set 9 of 26 shrinks' figures to their predictions, which read 1-6 %
    over their re-timing, and the 0.7 budget at batch 1 landed on such a figure 10 % under its ratio."""
    if scale >= 1.0 or candidate_s <= 0:
        return scale
    return min(1.0, max(scale, (1.0 - PREDICTION_SLACK) * predicted_s / candidate_s))


def slow_spell_scale(reference_s: float, now_s: float) -> float:
    """The factor that takes a comparison's figures back to the start's units when the network now reads slower
    than its own earlier figure (``reference_s``, itself in those units): ``reference_s / now_s``, at most 1.
    Only the network changes a network's latency, and this VM's speed moved 10-17 % between minutes (once 1.6x
    for minutes), so a network now slower than before means the machine is slower now, by the same factor for
    the candidate timed in the same rounds; unscaled, those figures joined the calibration at that minute's speed
    and every later prediction leaned towards it (run F: predictions 3-10 % over the re-timed figures at batch
    32). Never above 1: a network now a little faster than before more often says its earlier figure was the
    slow one (a jump beyond LEVEL_JUMP, either way, is :func:`level_scale`'s). The reference is a chain (each network's
    figure is its comparison's ratio times the figure before), so the in-round noise of every comparison adds
    up: only comparisons whose network-now rounds agree are scaled (``_timed``). Tried without that check, and at
    landings whose supernet rounds disagreed (benchmark run H, a noisier hour): predictions out of sample median
    7.5 % against 4.9 % with it (run G), one rho search's own figures ended 16-37 % under their re-timing and a
    0.35 budget landed 40 % over its ratio."""
    return min(1.0, reference_s / now_s) if now_s > 0 and reference_s > 0 else 1.0


def start_level(search: "Search", model: HRNet, candidate: Masks, now: tuple[float, float],
                after: tuple[float, float], scale: float) -> float:
    """At a search's first shrink, how far the start's figures were off this minute's, read in the comparison that
    took the candidate (``now``, ``after``: (seconds, spread) of the network now and the candidate): the network now
    (the supernet) against its figure at the start, and the candidate against the calibrated model's prediction of
    it (fitted at the start's level). When both read faster, each beyond its rounds' spread (at least
    ``latency.network_spread``) and the network now not by a LEVEL_JUMP, the factor nearer 1 of the two; else 1.
    Such a comparison is left unscaled (a faster network now says the earlier figure was the slow one:
    :func:`slow_spell_scale`), so its figures are in this minute's units while the calibration's start points
    (the supernet, the LUT's samples scaled to it) are in the start's: the search's predictions then sat 10-18 %
    over its own figures, and the outlier guard kept the first of them out of the fit (runs AP and AQ, session 32:
    start figures 1.07-1.09 of their re-timing; their network now read 0.89-0.95 of them beside the first
    candidate). The start's points are moved to that level (:meth:`LatencyProfile.relevel`). Both must say so: in
    a search whose start figure was taken under an induced load (session 33) the network now read 0.940 of it while
    its candidate read 0.995 of its prediction, and the level from the network now alone put the next predictions
    6-10 % under their re-timing. In a budget search the plan moves with the model's units; the target stays (a
    ratio target is re-referenced to the supernet in the landing's own rounds), and a comparison scaled to the
    start's units (a landing's) leaves the start standing."""
    reference_s = search.latency_ms_measured * 1e-3
    if search.shrinks or scale != 1.0 or reference_s <= 0 or level_jumped(reference_s, now[0]):
        return 1.0
    predicted_s = predict_after_masks(search.profile, model, candidate)
    if predicted_s <= 0:
        return 1.0
    floor = search.cfg.latency.network_spread
    ratios = [(now[0] / reference_s, now[1]), (after[0] / predicted_s, after[1])]
    if any(ratio >= 1.0 - max(floor, spread) for ratio, spread in ratios):
        return 1.0
    return max(ratio for ratio, _ in ratios)
