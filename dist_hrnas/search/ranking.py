"""Channels ranked for a shrink, and the candidates along a ranking: what a latency budget's shrink chooses
among (:class:`dist_hrnas.search.budget.BudgetSteer` picks how far along, decide.py measures them).

A ranking lists every prunable channel by what it is worth per unit of the penalty's cost (|gamma| per second,
per MAC, or plain |gamma|); taking its first k, each branch's survivors rounded up to its grid, is a candidate.
Plain tensor arithmetic, the same on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dist_hrnas.search.masks import Masks


@dataclass
class BranchChannels:
    """The channels of one prunable branch as a shrink decision sees them."""

    block: str
    index: int                 # branch index inside the block (masks are per block, in branch order)
    scores: torch.Tensor       # |gamma| per channel
    cost_per_channel: float    # the penalty's unit: seconds, MACs or 1
    grid: int = 1              # surviving widths stay multiples of this


Ranked = list[tuple[float, BranchChannels, int]]  # (worth per unit of cost, branch, channel), least worth first


def ranked_channels(branches: list[BranchChannels]) -> Ranked:
    """Every prunable channel, least worth first: |gamma| per unit of its branch's cost."""
    out = [(float(b.scores[c]) / max(b.cost_per_channel, 1e-30), b, c) for b in branches for c in range(len(b.scores))]
    return sorted(out, key=lambda t: (t[0], t[1].block, t[1].index, t[2]))


def masks_without(masks: Masks, ranked: Ranked, k: int) -> Masks:
    """``masks`` (every block present) with the ``k`` channels worth least removed, each branch's survivors rounded
    up to its grid (the best-scored of the removed come back; a branch may still go to 0)."""
    out = {name: [m.clone() for m in ms] for name, ms in masks.items()}
    for _, b, c in ranked[:k]:
        out[b.block][b.index][c] = False
    for b in {id(b): b for _, b, _ in ranked}.values():
        mask = out[b.block][b.index]
        kept = int(mask.sum())
        if b.grid > 1 and 0 < kept and kept % b.grid:
            keep = min(len(mask), math.ceil(kept / b.grid) * b.grid)
            mask.zero_()
            mask[torch.topk(b.scores, keep).indices] = True
    return out


def same_masks(a: Masks, b: Masks) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))


def between(masks: Masks, ranked: Ranked, slow_k: int, fast_k: int, prefer: int | None = None) -> tuple[int, int | None]:
    """Bisection on the ranking between a candidate measured too slow (``slow_k`` channels taken) and one too
    fast (``fast_k``): (s, k) with k a count whose architecture differs from both (to time; ``prefer`` if it
    does), or None when none does. A count giving one end's architecture moves that end untimed (latency
    depends on the architecture only), so with None, s + 1 is the other end: taking ``ranked[s]`` is the jump
    (a grid step, or a whole branch)."""
    s, f = slow_k, fast_k
    slow, fast = masks_without(masks, ranked, s), masks_without(masks, ranked, f)
    if prefer is not None and s < prefer < f:
        taken = masks_without(masks, ranked, prefer)
        if not same_masks(taken, slow) and not same_masks(taken, fast):
            return s, prefer
    while f - s > 1:
        mid = (s + f) // 2
        taken = masks_without(masks, ranked, mid)
        if same_masks(taken, slow):
            s = mid
        elif same_masks(taken, fast):
            f = mid
        else:
            return s, mid
    return s, None


def deferring(ranked: Ranked, s: int) -> Ranked:
    """``ranked`` with the channels of ``ranked[s]``'s branch from position ``s`` on moved to the end: candidates
    along it keep that branch as the first ``s`` leave it and take other branches' channels, so a jump across
    the band is stepped around, not over."""
    branch, rest = ranked[s][1], ranked[s:]
    return ranked[:s] + [t for t in rest if t[1] is not branch] + [t for t in rest if t[1] is branch]


def shortest_prefix(n: int, ok: Callable[[int], bool]) -> int:
    """Smallest k in [0, n] with ``ok(k)`` (assumed monotone in k), or n when none is."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def full_masks(model, masks: Masks) -> Masks:
    """``masks`` with an all-kept mask list for every block that has none (fitting may edit any block)."""
    return {name: [m.clone() for m in masks[name]] if name in masks else
            [torch.ones(b.hidden, dtype=torch.bool) for b in block.branches] for name, block in model.named_blocks()}


def branch_channels(model, pairs, penalty: str) -> list[BranchChannels]:
    """The registered branches of ``model`` (``(entry, dw_bn)`` pairs of the prune registry), costed in the
    penalty's unit (issue: the budget ranks channels the way the search penalises them)."""
    blocks = dict(model.named_blocks())
    out = []
    for entry, bn in pairs:
        index = [b.kernel for b in blocks[entry.block].branches].index(entry.kernel)
        cost = {"seconds": entry.seconds_per_channel, "macs": entry.macs_per_channel}.get(penalty, 1.0)
        out.append(BranchChannels(entry.block, index, bn.weight.detach().abs().cpu(), cost, entry.grid))
    return out
