"""Keep-masks over the kernel branches' hidden channels: flattened for one broadcast, and judged by the latency
model (what a shrink by these masks would leave) before any surgery."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from dist_hrnas.latency.curve import LatencyProfile, branch_key
from dist_hrnas.models import HRNet, export_arch
from dist_hrnas.parallel import comm

Masks = dict[str, list[torch.Tensor]]


def flatten_masks(model: HRNet, masks: Masks) -> torch.Tensor:
    """All branches' keep-masks in model order as one bool tensor (blocks without a mask: all kept)."""
    parts = []
    for name, block in model.named_blocks():
        given = masks.get(name)
        for i, branch in enumerate(block.branches):
            parts.append(given[i] if given is not None else torch.ones(branch.hidden, dtype=torch.bool))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def unflatten_masks(model: HRNet, flat: torch.Tensor) -> Masks:
    """Inverse of :func:`flatten_masks`; keeps only blocks where something is dropped."""
    out, offset = {}, 0
    for name, block in model.named_blocks():
        block_masks = []
        for branch in block.branches:
            block_masks.append(flat[offset:offset + branch.hidden].clone())
            offset += branch.hidden
        if any(not bool(m.all()) for m in block_masks):
            out[name] = block_masks
    return out


def broadcast_masks(model: HRNet, masks: Masks) -> Masks:
    """Rank 0's masks on every rank, as one flat bool tensor (sizes follow from the shared architecture)."""
    flat = flatten_masks(model, masks).to(torch.uint8)
    comm.broadcast_(flat, src=0)
    return unflatten_masks(model, flat.bool())


def dead_channels(masks: Masks) -> int:
    return sum(int((~m).sum()) for ms in masks.values() for m in ms)


def shrunk_view(model: HRNet, masks: Masks) -> SimpleNamespace:
    """What the latency model reads of ``model`` shrunk by ``masks`` (block names, kernels, widths), unbuilt."""
    blocks = []
    for name, block in model.named_blocks():
        given = masks.get(name)
        kept = [SimpleNamespace(kernel=b.kernel, hidden=int(given[i].sum()) if given is not None else b.hidden)
                for i, b in enumerate(block.branches)]
        blocks.append((name, SimpleNamespace(branches=[b for b in kept if b.hidden > 0])))
    return SimpleNamespace(named_blocks=lambda: blocks)


def arch_after_masks(model: HRNet, masks: Masks) -> dict:
    """The architecture surgery by ``masks`` gives (to build and time a candidate before any surgery)."""
    arch = export_arch(model)
    for entry in arch["blocks"]:
        given = masks.get(entry["name"])
        if given is not None:
            widths = [int(m.sum()) for m in given]
            entry["kernel_sizes"] = [k for k, w in zip(entry["kernel_sizes"], widths) if w > 0]
            entry["widths"] = [w for w in widths if w > 0]
    return arch


def predict_after_masks(profile: LatencyProfile, model: HRNet, masks: Masks) -> float:
    """Predicted seconds of ``model`` shrunk by ``masks``, without building it (same widths surgery gives)."""
    return profile.predict_s(shrunk_view(model, masks))


def whole_branches_only(masks: Masks) -> Masks:
    """``masks`` keeping only the removal of whole branches (every partly cut branch kept whole)."""
    return {name: [m if not bool(m.any()) else torch.ones_like(m) for m in ms] for name, ms in masks.items()}


# A branch keeps its channels only when its curve says the narrower width is clearly slower: curve samples
# carry timing noise, and a stricter rule would block most small shrinks on a busy machine.
SLOWER_MARGIN = 1.02


def keep_branches_that_would_slow_down(profile: LatencyProfile, model: HRNet, masks: Masks) -> int:
    """Keep every channel of a branch whose curve says the narrower width runs slower (a staircase step):
    removing them would cost accuracy for nothing. Edits ``masks``; returns how many branches were kept."""
    kept = 0
    for name, block in model.named_blocks():
        for i, branch in enumerate(block.branches):
            mask = masks.get(name, [None] * (i + 1))[i]
            if mask is None or bool(mask.all()) or not bool(mask.any()):
                continue  # nothing removed, or the whole branch goes (then its cost and join go too)
            key = branch_key(name, branch.kernel)
            if profile.curve_s(key, int(mask.sum())) > SLOWER_MARGIN * profile.curve_s(key, branch.hidden):
                masks[name][i] = torch.ones_like(mask)
                kept += 1
    return kept


def smallest_masks(model: HRNet, prunable: set[str] | dict) -> Masks:
    """Masks removing every prunable branch (key in ``prunable``): the smallest network a search can reach."""
    return {name: [torch.full((b.hidden,), branch_key(name, b.kernel) not in prunable) for b in block.branches]
            for name, block in model.named_blocks()}


def smallest_predicted_s(profile: LatencyProfile, model: HRNet, prunable: set[str] | dict) -> float:
    """Predicted seconds with every prunable branch removed: no search goes below this."""
    return predict_after_masks(profile, model, smallest_masks(model, prunable))
