"""Compress-by-mask surgery: cut pruned hidden channels out of atomic blocks, keeping the eval function.

A keep-mask per kernel branch says which hidden channels survive. Surgery slices the branch's expand
conv/BN (or its ``input_index`` when it has no expand conv), depthwise conv/BN and project conv, drops
branches with nothing left and turns a block with no branch into shortcut + learned constant.

Function preservation: in eval mode a removed channel c whose depthwise-BN scale is 0 outputs the
constant act(beta_c); the project conv maps those constants to v = W_proj[:, removed] @ act(beta_removed)
per output channel. Subtracting the block's total v from ``pw_bn.running_mean`` leaves the eval output
unchanged; a block left without branches gets ``bias = pw_bn_eval(v)`` instead.

Sliced parameters (and state sliced by :meth:`ParamSlice.apply`) keep the memory format of the tensor they
are cut from, so a channels_last model stays channels_last.

Surgery works in place and touches no random number generator, so every process given the same model and
masks ends with bit-identical weights. :class:`ShrinkResult` tells, for every parameter name after
surgery, which old parameter it came from and how it was sliced, which is what
:func:`carry_optimizer_state` (and any other per-parameter state, e.g. an EMA) needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dist_hrnas.models.blocks import AtomicBlock, KernelBranch
from dist_hrnas.models.hrnet import HRNet
from dist_hrnas.models.layout import layout_like

# Optimizer hyper-parameters that schedules change during training: carried from old group i to new group i.
_GROUP_KEYS = ("lr", "initial_lr")


@dataclass
class ParamSlice:
    """How one parameter after surgery derives from one before it."""

    old_name: str | None        # parameter name before surgery; None = a new parameter (an emptied block's bias)
    dim: int | None             # dimension that was sliced; None = unchanged tensor
    index: torch.Tensor | None  # kept indices along ``dim`` (CPU long tensor); None when ``dim`` is None

    def apply(self, old: torch.Tensor) -> torch.Tensor:
        """Slice any tensor shaped like the old parameter (always returns a new tensor)."""
        if self.dim is None:
            return old.detach().clone()                      # clone keeps the memory format
        return layout_like(old.detach().index_select(self.dim, self.index.to(old.device)), old)


@dataclass
class ShrinkResult:
    """What one :func:`shrink_model` call did, for re-keying per-parameter and per-branch state."""

    params: dict[str, ParamSlice] = field(default_factory=dict)  # every new parameter name -> its origin
    removed_branches: list[str] = field(default_factory=list)    # "block_name:k<kernel>"
    emptied_blocks: list[str] = field(default_factory=list)      # blocks left with no branch


class _Slicer:
    """Builds sliced replacement parameters/modules and remembers where each new parameter came from."""

    def __init__(self, model: nn.Module):
        self.old = dict(model.named_parameters())             # also keeps old tensors alive: ids stay unique
        self.old_name = {id(p): n for n, p in self.old.items()}
        self.made: dict[int, ParamSlice] = {}

    def param(self, old: nn.Parameter | None, dim: int, index: torch.Tensor) -> nn.Parameter | None:
        if old is None:
            return None
        # index_select returns the default format: keep the old parameter's (channels_last stays channels_last)
        value = layout_like(old.detach().index_select(dim, index.to(old.device)), old)
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        self.made[id(new)] = ParamSlice(self.old_name[id(old)], dim, index)
        return new

    def new_param(self, value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
        new = nn.Parameter(value, requires_grad=requires_grad)
        self.made[id(new)] = ParamSlice(None, None, None)
        return new

    def conv(self, old: nn.Conv2d, dim: int, index: torch.Tensor, depthwise: bool = False) -> nn.Conv2d:
        """A new conv like ``old`` keeping output (``dim`` 0) or input (``dim`` 1, ungrouped) channels ``index``.

        A depthwise conv keeps channels ``index`` on both sides (one filter per channel, weight dim 0)."""
        out_ch = len(index) if dim == 0 else old.out_channels
        in_ch = len(index) if dim == 1 or depthwise else old.in_channels
        groups = len(index) if depthwise else old.groups
        new = nn.Conv2d(in_ch, out_ch, old.kernel_size, old.stride, old.padding, old.dilation, groups,
                        bias=old.bias is not None, padding_mode=old.padding_mode, device="meta",
                        dtype=old.weight.dtype)                # meta: no init, no RNG use
        new.weight = self.param(old.weight, dim, index)
        if old.bias is not None:
            new.bias = self.param(old.bias, 0, index) if dim == 0 else old.bias
        new.train(old.training)
        return new

    def bn(self, old: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
        ref = old.weight if old.weight is not None else old.running_mean
        new = nn.BatchNorm2d(len(index), eps=old.eps, momentum=old.momentum, affine=old.affine,
                             track_running_stats=old.track_running_stats, device="meta",
                             dtype=None if ref is None else ref.dtype)
        if old.affine:
            new.weight, new.bias = self.param(old.weight, 0, index), self.param(old.bias, 0, index)
        for name in ("running_mean", "running_var"):
            buf = getattr(old, name)
            setattr(new, name, None if buf is None else buf.index_select(0, index.to(buf.device)))
        if old.num_batches_tracked is not None:
            new.num_batches_tracked = old.num_batches_tracked.clone()
        new.train(old.training)
        return new


def _check_masks(model: HRNet, masks: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Validate every mask before touching the model; returns them as 1-D CPU bool tensors."""
    blocks = dict(model.named_blocks())
    unknown = sorted(set(masks) - set(blocks))
    if unknown:
        raise ValueError(f"shrink mask for unknown block {unknown[0]}")
    checked = {}
    for name, block_masks in masks.items():
        block = blocks[name]
        if len(block_masks) != len(block.branches):
            raise ValueError(f"block {name}: {len(block_masks)} masks for {len(block.branches)} branches "
                             f"(kernels {block.kernel_sizes})")
        out = []
        for i, (mask, branch) in enumerate(zip(block_masks, block.branches)):
            mask = torch.as_tensor(mask).detach().cpu()
            if mask.dtype != torch.bool or mask.ndim != 1 or mask.numel() != branch.hidden:
                raise ValueError(f"block {name} branch {i} (kernel {branch.kernel}): mask must be a 1-D bool "
                                 f"tensor of length {branch.hidden}, got {mask.dtype} of shape {tuple(mask.shape)}")
            if branch.dw_conv.groups != branch.hidden or branch.project.groups != 1:
                raise ValueError(f"block {name} branch {i}: expected a depthwise conv and an ungrouped project conv")
            out.append(mask)
        checked[name] = out
    return checked


def _removed_constant(branch: KernelBranch, removed: torch.Tensor) -> torch.Tensor:
    """v_b (float64, shape out_channels): what the removed channels add in eval mode when their gamma is 0."""
    bn, proj = branch.dw_bn, branch.project
    beta = torch.zeros(len(removed), dtype=torch.float64) if bn.bias is None else \
        bn.bias.detach().index_select(0, removed.to(bn.bias.device)).to(torch.float64)
    act = branch.dw_act(beta.clone())                          # activations are inplace: work on a copy
    w = proj.weight.detach().index_select(1, removed.to(proj.weight.device)).to(torch.float64)
    return w.sum(dim=(2, 3)) @ act.to(w.device)


def _shrink_branch(branch: KernelBranch, keep: torch.Tensor, s: _Slicer) -> None:
    if branch.expand:
        branch.expand_conv = s.conv(branch.expand_conv, 0, keep)
        branch.expand_bn = s.bn(branch.expand_bn, keep)
    else:
        branch.input_index = branch.input_index.index_select(0, keep.to(branch.input_index.device))
    branch.dw_conv = s.conv(branch.dw_conv, 0, keep, depthwise=True)
    branch.dw_bn = s.bn(branch.dw_bn, keep)
    branch.project = s.conv(branch.project, 1, keep)


def _shrink_block(name: str, block: AtomicBlock, masks: list[torch.Tensor], s: _Slicer,
                  result: ShrinkResult) -> None:
    v = None
    kept_branches = []
    for branch, mask in zip(block.branches, masks):
        keep = torch.nonzero(mask).flatten()
        removed = torch.nonzero(~mask).flatten()
        if len(removed):
            vb = _removed_constant(branch, removed)
            v = vb if v is None else v + vb
        if len(keep) == 0:
            result.removed_branches.append(f"{name}:k{branch.kernel}")
            continue
        if len(removed):
            _shrink_branch(branch, keep, s)
        kept_branches.append(branch)
    if len(kept_branches) != len(block.branches):
        branches = nn.ModuleList(kept_branches)
        branches.training = block.branches.training
        block.branches = branches
    bn = block.pw_bn
    if kept_branches:
        if v is not None and bn.running_mean is not None:
            bn.running_mean.sub_(v.to(bn.running_mean))
        return
    # No branch left: the block is shortcut + pw_bn(v), a constant per output channel.
    ref = bn.weight if bn.weight is not None else bn.running_mean
    dtype, device = (torch.float32, None) if ref is None else (ref.dtype, ref.device)
    v = torch.zeros(block.out_channels, dtype=torch.float64) if v is None else v
    gamma = torch.ones_like(v) if bn.weight is None else bn.weight.detach().to(torch.float64).cpu()
    beta = torch.zeros_like(v) if bn.bias is None else bn.bias.detach().to(torch.float64).cpu()
    if bn.running_mean is not None:
        mean, var = bn.running_mean.to(torch.float64).cpu(), bn.running_var.to(torch.float64).cpu()
        bias = gamma * (v.cpu() - mean) / torch.sqrt(var + bn.eps) + beta
    else:                                                      # batch statistics of a constant input: beta
        bias = beta
    requires_grad = True if bn.weight is None else bn.weight.requires_grad
    block.pw_bn = None
    block.bias = s.new_param(bias.to(device=device, dtype=dtype), requires_grad)
    result.emptied_blocks.append(name)


@torch.no_grad()
def shrink_model(model: HRNet, masks: dict[str, list[torch.Tensor]]) -> ShrinkResult:
    """Cut every hidden channel whose mask entry is False out of ``model`` (in place); see the module doc.

    ``masks[block_name]`` holds one bool tensor per current branch of that block (in ``block.branches``
    order), as long as that branch's hidden width; True keeps the channel. Blocks not in ``masks`` are
    left alone. All masks are validated (ValueError) before anything changes.
    """
    checked = _check_masks(model, masks)
    s = _Slicer(model)
    result = ShrinkResult()
    for name, block in model.named_blocks():                   # fixed order: deterministic everywhere
        if name in checked:
            _shrink_block(name, block, checked[name], s, result)
    for name, p in model.named_parameters():
        made = s.made.get(id(p))
        result.params[name] = made if made is not None else ParamSlice(s.old_name[id(p)], None, None)
    return result


@torch.no_grad()
def carry_optimizer_state(old_opt: torch.optim.Optimizer, old_params: dict[str, nn.Parameter],
                          new_opt: torch.optim.Optimizer, new_model: nn.Module, result: ShrinkResult) -> None:
    """Move per-parameter optimizer state across a shrink, sliced like the parameters themselves.

    ``old_params`` is ``dict(model.named_parameters())`` taken before :func:`shrink_model`; ``new_opt`` was
    built on the shrunk ``new_model`` with the same class and param-group layout as ``old_opt``. State
    tensors shaped like the old parameter are sliced, anything else (e.g. a scalar ``step``) is copied.
    Each group's ``lr`` (and ``initial_lr``) is copied from old group i to new group i.
    """
    if type(old_opt) is not type(new_opt) or len(old_opt.param_groups) != len(new_opt.param_groups):
        raise ValueError(f"cannot carry {type(old_opt).__name__} state with {len(old_opt.param_groups)} groups "
                         f"into {type(new_opt).__name__} with {len(new_opt.param_groups)} groups")
    for old_group, new_group in zip(old_opt.param_groups, new_opt.param_groups):
        for key in _GROUP_KEYS:
            if key in old_group:
                new_group[key] = old_group[key]
    in_new = {id(p) for group in new_opt.param_groups for p in group["params"]}
    for name, p in new_model.named_parameters():
        where = result.params.get(name)
        if where is None:
            raise KeyError(f"parameter {name} is not in the shrink result (was the result for another model?)")
        if where.old_name is None or id(p) not in in_new:
            continue
        old_p = old_params[where.old_name]
        old_state = old_opt.state.get(old_p)
        if not old_state:
            continue
        new_state = {}
        for key, value in old_state.items():
            if torch.is_tensor(value):
                new_state[key] = where.apply(value) if value.shape == old_p.shape else value.detach().clone()
            else:
                new_state[key] = value
        new_opt.state[p] = new_state
