"""Rounds of end-to-end figures: how whole networks are compared with each other (what each round times is
:mod:`dist_hrnas.latency.networks`' business; this module only schedules rounds and reads their medians)."""
from __future__ import annotations

from typing import Callable

from dist_hrnas.config import LatencyConfig

# End-to-end figures decide whether a shrink or a budget is taken, so they get more care than single ops: the
# best of a few rounds, each the median of latency.network_repeats runs. Interference from other work on the
# machine only ever slows a round down; the fastest round is the network's own speed.
NETWORK_ROUNDS = 3
# Rounds that disagree by more than latency.network_spread are taken again, at most this many more times (a busy
# machine stays busy: past that the fastest rounds stand, and the spread they had is reported).
RETAKES = 2


def spread(medians: list[float]) -> float:
    """How far a figure's rounds disagree: (slowest - fastest) / fastest."""
    return (max(medians) - min(medians)) / min(medians) if medians and min(medians) > 0 else 0.0


def settled(take_round: Callable[[], float], cfg: LatencyConfig, rounds: int = NETWORK_ROUNDS) -> tuple[float, float]:
    """(fastest round, spread of the fastest ``rounds``): rounds re-taken while they disagree beyond
    ``latency.network_spread``."""
    medians = [take_round() for _ in range(rounds)]
    for _ in range(RETAKES):
        if spread(sorted(medians)[:rounds]) <= cfg.network_spread:
            break
        medians += [take_round() for _ in range(rounds)]
    return min(medians), spread(sorted(medians)[:rounds])


Figures = list[tuple[float, float]]  # per network: (fastest round's seconds, spread of its fastest rounds)
# A comparison's ``decided`` is first asked after this many rounds: each network has then gone first once, so a
# slow first child (up to 30 % slow after training, here) cannot decide it alone.
DECIDING_ROUNDS = 2


def interleaved(takes: list[Callable[[], float]], cfg: LatencyConfig, rounds: int = NETWORK_ROUNDS,
                retakes: int = RETAKES, decided: Callable[[Figures, int], bool] | None = None) -> Figures:
    """Each network's (fastest round, spread of its fastest ``rounds``), all timed in the same rounds: every
    round takes each network once, alternating who goes first, so a slow spell of the machine falls on all of
    them; ``rounds`` more are taken (at most ``retakes`` times) while any network's disagree beyond
    ``latency.network_spread``. ``decided(figures, rounds taken)``, asked after every round from
    DECIDING_ROUNDS on, ends the comparison when the figures so far already settle what they are taken for (a
    further round only sharpens figures; it costs a round of every network); it must ask more of fewer rounds."""
    medians: list[list[float]] = [[] for _ in takes]
    for taken in range(1, rounds * (1 + retakes) + 1):
        order = list(range(len(takes)))
        for i in order if taken % 2 else order[::-1]:
            medians[i].append(takes[i]())
        figures = [(min(m), spread(sorted(m)[:rounds])) for m in medians]
        if taken % rounds == 0 and max(f[1] for f in figures) <= cfg.network_spread:
            break
        if decided is not None and taken >= DECIDING_ROUNDS and decided(figures, taken):
            break
    return [(min(m), spread(sorted(m)[:rounds])) for m in medians]
