"""BatchNorm folding: the network as a deployment runtime runs it, every BN merged into the conv before it.

Eval-mode BN is a per-channel affine map y = s * (x - mean) + beta with s = gamma / sqrt(var + eps), so after a
conv it merges into the conv: W' = s * W (per output channel), b' = s * (b - mean) + beta. onnxruntime, TensorRT
and a frozen TorchScript all do this; :func:`fold_bn` does it here so that the exported graph holds no BN and
the latency model can time the form that is deployed (``latency.form=deployed``).

The block BN of an :class:`AtomicBlock` (``pw_bn``) normalises the *sum* of its branches' project convs, and a
linear map of a sum is the sum of the maps: each project conv takes s, and one of them (the first) the shift
beta - s * mean. The constant of channels a shrink removed is already in that running mean (function
preservation, :mod:`dist_hrnas.search.surgery`), so it arrives in the bias with it. A block without branches
is its shortcut plus a learned constant: there is no BN to fold.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dist_hrnas.models.blocks import AtomicBlock, KernelBranch

_BN = nn.modules.batchnorm._BatchNorm


def _scale_shift(bn: _BN) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn_eval(x) = s * x + t per channel, in float64 (folding must not lose what fp32 keeps)."""
    if bn.running_mean is None or bn.running_var is None:
        # without running statistics eval mode normalises by the batch: not a fixed affine map
        raise ValueError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False)")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().double()
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mean


def _scaled_conv(conv: nn.Conv2d, s: torch.Tensor, t: torch.Tensor | None) -> nn.Conv2d:
    """A copy of ``conv`` computing ``s * conv(x) + t`` per output channel (``t`` None: no bias of its own)."""
    w = conv.weight.detach().double() * s.view(-1, 1, 1, 1)
    b = None if conv.bias is None else conv.bias.detach().double() * s
    if t is not None:
        b = t if b is None else b + t
    dtype, device = conv.weight.dtype, conv.weight.device
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=b is not None, padding_mode=conv.padding_mode,
                    device="meta")  # meta: no init, no RNG use (folding never changes a random stream)
    new.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
    return new


def fuse_conv_bn(conv: nn.Conv2d, bn: _BN) -> nn.Conv2d:
    """The conv that computes ``bn(conv(x))`` in eval mode."""
    s, t = _scale_shift(bn)
    return _scaled_conv(conv, s.to(conv.weight.device), t.to(conv.weight.device))


def _fold_sequential(seq: nn.Sequential) -> None:
    """Every (Conv2d, BN) pair of a Sequential (e.g. ConvBNAct) becomes (fused conv, Identity)."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], _BN):
            seq[i], seq[i + 1] = fuse_conv_bn(seq[i], seq[i + 1]), nn.Identity()


def _fold_branch(branch: KernelBranch) -> None:
    if branch.expand and isinstance(branch.expand_bn, _BN):
        branch.expand_conv, branch.expand_bn = fuse_conv_bn(branch.expand_conv, branch.expand_bn), nn.Identity()
    if isinstance(branch.dw_bn, _BN):
        branch.dw_conv, branch.dw_bn = fuse_conv_bn(branch.dw_conv, branch.dw_bn), nn.Identity()


def _fold_block_bn(block: AtomicBlock) -> None:
    """pw_bn(sum_b project_b(h_b)) = sum_b (s * project_b)(h_b) + t: s into every project conv, t into the first."""
    if not isinstance(block.pw_bn, _BN) or not len(block.branches):
        return  # already folded, or a block without branches (shortcut + bias): nothing to fold
    s, t = _scale_shift(block.pw_bn)
    for i, branch in enumerate(block.branches):
        device = branch.project.weight.device
        branch.project = _scaled_conv(branch.project, s.to(device), t.to(device) if i == 0 else None)
    block.pw_bn = nn.Identity()


@torch.no_grad()
def fold_bn(module: nn.Module, inplace: bool = False) -> nn.Module:
    """``module`` (or a copy of it) in eval mode with every BatchNorm folded into the conv before it.

    Knows the layouts of this package: conv-BN pairs in a Sequential (``ConvBNAct``), the expand and depthwise
    pairs of a :class:`KernelBranch`, the block BN of an :class:`AtomicBlock`. A BN anywhere else is left in
    place (:func:`batchnorms` lists what is left). Eval outputs equal the original's up to float rounding.
    """
    out = module if inplace else copy.deepcopy(module)
    out.eval()
    for sub in list(out.modules()):
        if isinstance(sub, nn.Sequential):
            _fold_sequential(sub)
        elif isinstance(sub, KernelBranch):
            _fold_branch(sub)
        elif isinstance(sub, AtomicBlock):
            _fold_block_bn(sub)
    return out


def batchnorms(module: nn.Module) -> list[str]:
    """Names of the BatchNorm modules in ``module`` (after :func:`fold_bn`: those it could not fold)."""
    return [name for name, sub in module.named_modules() if isinstance(sub, _BN)]
