"""The search's prune state: which BN scales are penalised, how much, when rho ramps, what is dead.

Registry entries are keyed by branch (``block:k<kernel>``), which survives surgery even when branch
indices shift. Penalties follow HR-NAS's normalisation: penalty_b = c_b / (sum_b h_b c_b / sum_b h_b), so an
average channel has penalty 1 whatever the unit of c (seconds, MACs, or 1 for ``equal``), and rho keeps
its meaning across modes.

With ``latency.cost: fixed_plus_marginal`` (and ``prune.penalty: seconds``) a branch's fixed seconds F_b (what
goes only with its last channel) add a group term F_b / (N * sqrt(h_b)) * ||gamma_b||_2, and each block's join
J_B (what goes only when it loses its last branch) the same over all the block's scales. N is then the network's
prunable seconds per channel, (sum_b h_b c_b + sum_b F_b + sum_B J_B) / sum_b h_b: with every scale equal the
whole penalty is what ``average`` charges (one per channel), so rho keeps its meaning; but the seconds that go
only with a whole branch pull on the branch as a group (its pull grows as its scales fall together), which no
per-channel cost can express.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dist_hrnas.config import PruneConfig
from dist_hrnas.latency import LatencyProfile, branch_key
from dist_hrnas.models import HRNet
from dist_hrnas.models.counting import macs_under


@dataclass
class PrunableBranch:
    """One kernel branch whose depthwise-BN scales the search penalises."""

    key: str
    block: str
    kernel: int
    width: int
    seconds_per_channel: float
    macs_per_channel: float
    penalty: float = 1.0
    grid: int = 1              # surviving widths are kept multiples of this (prune.round_to)
    fixed_s: float = 0.0       # seconds only the branch's last channel takes along (fixed_plus_marginal)
    group_penalty: float = 0.0  # weight of ||gamma||_2 (fixed_s normalised like the per-channel penalty)


def rho_at(cfg: PruneConfig, epoch: float) -> float:
    """Linear warm-up: 0 before epoch_free, rising to rho at epoch_warmup, then rho.

    ``epoch`` is fractional (step / steps_per_epoch); with ``stepwise`` off it is floored to whole epochs.
    """
    if cfg.penalty == "none":
        return 0.0
    if not cfg.stepwise:
        epoch = math.floor(epoch)
    if epoch < cfg.epoch_free:
        return 0.0
    if cfg.epoch_warmup > cfg.epoch_free and epoch < cfg.epoch_warmup:
        return cfg.rho * (epoch - cfg.epoch_free) / (cfg.epoch_warmup - cfg.epoch_free)
    return cfg.rho


def cost_normaliser(costs: list[float], widths: list[int]) -> float:
    """sum h_b c_b / sum h_b: the channel-weighted mean cost (0 when there is none)."""
    total_width = sum(widths)
    return sum(c * h for c, h in zip(costs, widths)) / total_width if total_width else 0.0


def normalised_penalties(costs: list[float], widths: list[int]) -> list[float]:
    """c_b / (sum h_b c_b / sum h_b): the channel-weighted mean cost maps to 1."""
    normaliser = cost_normaliser(costs, widths)
    if normaliser <= 0:
        return [1.0 for _ in costs]
    return [c / normaliser for c in costs]


class PruneRegistry:
    """The prunable depthwise BNs of a model with their per-channel costs and penalties."""

    def __init__(self, cfg: PruneConfig, entries: list[PrunableBranch], join_s: dict[str, float] | None = None):
        self.cfg = cfg
        self.entries = {e.key: e for e in entries}
        self.join_s = dict(join_s or {})        # per block: seconds its last branch's join takes along
        self.join_penalty: dict[str, float] = {}
        self.renormalise()

    @classmethod
    def build(cls, cfg: PruneConfig, model: HRNet, macs: dict[str, int], profile: LatencyProfile) -> "PruneRegistry":
        """Every branch of every block (but the first non-expanding one when ``skip_expand1``)."""
        entries, join_s = [], {}
        launch = profile.cost == "fixed_plus_marginal"
        skipped = False
        for name, block in model.named_blocks():
            if cfg.skip_expand1 and not block.expand and not skipped:
                skipped = True
                continue
            for i, branch in enumerate(block.branches):
                key = branch_key(name, branch.kernel)
                entries.append(PrunableBranch(
                    key=key, block=name, kernel=branch.kernel, width=branch.hidden,
                    seconds_per_channel=profile.per_channel_s(key),
                    macs_per_channel=macs_under(macs, f"{name}.branches.{i}") / branch.hidden,
                    grid=auto_grid(profile.grid(key), branch.hidden) if cfg.round_to == "auto" else int(cfg.round_to),
                    fixed_s=profile.launch_s(key) if launch else 0.0))
            if launch:
                join_s[name] = profile.join_launch_s(name)
        return cls(cfg, entries, join_s)

    def renormalise(self) -> None:
        entries = list(self.entries.values())
        if self.cfg.penalty == "seconds":
            costs = [e.seconds_per_channel for e in entries]
        elif self.cfg.penalty == "macs":
            costs = [e.macs_per_channel for e in entries]
        else:
            costs = [1.0 for _ in entries]
        widths = [e.width for e in entries]
        grouped = self.cfg.penalty == "seconds" and (any(e.fixed_s for e in entries) or any(self.join_s.values()))
        if not grouped:
            for e, p in zip(entries, normalised_penalties(costs, widths)):
                e.penalty, e.group_penalty = p, 0.0
            self.join_penalty = {}
            return
        # the seconds only whole branches (and blocks) take along are spread over the channels in the normaliser
        normaliser = cost_normaliser(costs, widths) + (sum(e.fixed_s for e in entries)
                                                       + sum(self.join_s.values())) / max(1, sum(widths))
        block_width: dict[str, int] = {}
        for e, c in zip(entries, costs):
            e.penalty = c / normaliser
            e.group_penalty = e.fixed_s / (normaliser * math.sqrt(e.width)) if e.width else 0.0
            block_width[e.block] = block_width.get(e.block, 0) + e.width
        self.join_penalty = {b: s / (normaliser * math.sqrt(block_width[b])) for b, s in self.join_s.items()
                             if block_width.get(b) and s > 0}

    def bns(self, model: HRNet) -> list[tuple[PrunableBranch, nn.BatchNorm2d]]:
        """(entry, depthwise BN) pairs for the model as it is now."""
        out = []
        for name, block in model.named_blocks():
            for branch in block.branches:
                entry = self.entries.get(branch_key(name, branch.kernel))
                if entry is not None:
                    out.append((entry, branch.dw_bn))
        return out

    def l1_loss(self, pairs: list[tuple[PrunableBranch, nn.BatchNorm2d]]) -> torch.Tensor:
        """sum_b penalty_b * sum |gamma_b|, plus the group terms of ``fixed_plus_marginal`` (multiply by rho
        outside)."""
        terms = [e.penalty * bn.weight.abs().sum() for e, bn in pairs]
        terms += [e.group_penalty * bn.weight.norm() for e, bn in pairs if e.group_penalty > 0]
        blocks: dict[str, list[torch.Tensor]] = {}
        for e, bn in pairs:
            if e.block in self.join_penalty:
                blocks.setdefault(e.block, []).append(bn.weight)
        terms += [self.join_penalty[b] * torch.cat(ws).norm() for b, ws in blocks.items()]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def masks(self, model: HRNet, ema_model: HRNet | None = None, ema_only: bool = False) -> dict[str, list[torch.Tensor]]:
        """Keep-masks per block (one per branch) for blocks where some registered channel is dead.

        A channel lives if its gamma or its EMA gamma is above the threshold; ``ema_only`` (the last
        epoch) lets the EMA value alone decide. Unregistered branches are kept whole.
        """
        thr = self.cfg.threshold
        ema_blocks = dict(ema_model.named_blocks()) if ema_model is not None else {}
        out: dict[str, list[torch.Tensor]] = {}
        for name, block in model.named_blocks():
            block_masks, any_dead = [], False
            for i, branch in enumerate(block.branches):
                entry = self.entries.get(branch_key(name, branch.kernel))
                if entry is None:
                    block_masks.append(torch.ones(branch.hidden, dtype=torch.bool))
                    continue
                score = branch.dw_bn.weight.detach().abs().cpu()
                if name in ema_blocks:
                    ema_score = ema_blocks[name].branches[i].dw_bn.weight.detach().abs().cpu()
                    score = ema_score if ema_only else torch.maximum(score, ema_score)
                live = score > thr  # alive if gamma or its EMA is (or, at the end, the EMA alone)
                if entry.grid > 1 and not bool(live.all()):
                    live = round_mask(score, int(live.sum()), entry.grid)
                any_dead |= not bool(live.all())
                block_masks.append(live)
            if any_dead:
                out[name] = block_masks
        return out

    def pruned_seconds(self, model: HRNet, masks: dict[str, list[torch.Tensor]]) -> float:
        """Predicted seconds the dead channels cost: sum of dead channels x per-channel seconds."""
        total = 0.0
        blocks = dict(model.named_blocks())
        for name, block_masks in masks.items():
            for branch, mask in zip(blocks[name].branches, block_masks):
                entry = self.entries.get(branch_key(name, branch.kernel))
                if entry is not None:
                    total += int((~mask).sum()) * entry.seconds_per_channel
                    total += entry.fixed_s if not bool(mask.any()) else 0.0  # the whole branch goes
            if not any(bool(m.any()) for m in block_masks):
                total += self.join_s.get(name, 0.0)
        return total

    def update_after_shrink(self, model: HRNet, profile: LatencyProfile | None = None) -> None:
        """Drop removed branches, record new widths, renormalise (registry carried through surgery).

        With a ``marginal`` ``profile``, each branch's seconds per channel is re-read from its latency curve
        at the new width, so the cost follows the staircase as the branch narrows (``average`` keeps the
        supernet's seconds / width, the seed's rule).
        """
        # the calibration is refitted after every shrink: costs follow it (and, for marginal, the new width)
        refresh = profile is not None
        alive = {}
        for name, block in model.named_blocks():
            for branch in block.branches:
                key = branch_key(name, branch.kernel)
                if key in self.entries:
                    self.entries[key].width = branch.hidden
                    if refresh:
                        width = branch.hidden if profile.cost != "average" else None
                        self.entries[key].seconds_per_channel = profile.per_channel_s(key, width)
                        if self.entries[key].fixed_s:
                            self.entries[key].fixed_s = profile.launch_s(key)
                    alive[key] = self.entries[key]
        self.entries = alive
        blocks = {e.block for e in alive.values()}
        self.join_s = {b: (profile.join_launch_s(b) if refresh else s) for b, s in self.join_s.items() if b in blocks}
        self.renormalise()

    def channels_alive(self, pairs: list[tuple[PrunableBranch, nn.BatchNorm2d]]) -> int:
        return sum(int((bn.weight.detach().abs() > self.cfg.threshold).sum()) for _, bn in pairs)

    def state_dict(self) -> dict:
        return {"entries": [asdict(e) for e in self.entries.values()], "join_s": dict(self.join_s)}

    @classmethod
    def from_state_dict(cls, cfg: PruneConfig, state: dict) -> "PruneRegistry":
        return cls(cfg, [PrunableBranch(**e) for e in state["entries"]], state.get("join_s"))


def auto_grid(grid: int, width: int) -> int:
    """The curve's grid, halved until it divides the branch's width (rounding up must never exceed it)."""
    while grid > 1 and width % grid:
        grid //= 2
    return grid


def round_mask(score: torch.Tensor, alive: int, multiple: int) -> torch.Tensor:
    """Keep-mask of the ``k`` channels with the largest score, k a multiple of ``multiple``.

    k is ``alive`` rounded up to the next multiple (a live channel is never dropped for alignment), or down
    to the largest multiple that fits when rounding up would exceed the width; 0 stays 0 (the branch goes).
    """
    width = score.numel()
    keep = math.ceil(alive / multiple) * multiple
    if keep > width:
        keep = (width // multiple) * multiple
    mask = torch.zeros(width, dtype=torch.bool)
    if keep:
        mask[torch.topk(score, keep, sorted=False).indices] = True
    return mask


def should_shrink(cfg: PruneConfig, pruned_seconds: float, dead_channels: int, last_epoch: bool) -> bool:
    """Shrink once the dead channels are worth ``shrink_delta_seconds`` (and exist), or at the last epoch."""
    if cfg.penalty == "none" or dead_channels == 0:
        return False
    return last_epoch or pruned_seconds >= cfg.shrink_delta_seconds
