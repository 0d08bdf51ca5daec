"""HR-NAS building blocks: conv-BN-act and the searchable atomic inverted-residual block.

An :class:`AtomicBlock` holds one :class:`KernelBranch` per depthwise kernel size. Each branch is
expand 1x1 conv + BN + act -> kxk depthwise conv + BN + act -> 1x1 project conv; the branch outputs
are summed and normalised by one BN (``pw_bn``), then the shortcut is added. The BN after each
depthwise conv (``branch.dw_bn``) is what the search penalises and prunes, channel by channel.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
    "hswish": lambda: nn.Hardswish(inplace=True),
}


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation; 'same' padding for odd kernels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, act: str,
                 bn_kwargs: dict, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, **bn_kwargs),
            make_activation(act),
        )


class KernelBranch(nn.Module):
    """One kernel size of an atomic block, ``hidden`` channels wide."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, expand: bool,
                 act: str, bn_kwargs: dict):
        super().__init__()
        self.kernel = kernel
        self.expand = expand
        if expand:
            self.expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden, **bn_kwargs)
            self.expand_act = make_activation(act)
        else:
            # Without an expand conv the depthwise conv runs on the block input itself, so pruning a
            # hidden channel means dropping that input channel: remember which inputs survive.
            self.register_buffer("input_index", torch.arange(hidden), persistent=True)
        self.dw_conv = nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden, **bn_kwargs)
        self.dw_act = make_activation(act)
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)

    @property
    def hidden(self) -> int:
        return self.dw_bn.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            x = self.expand_act(self.expand_bn(self.expand_conv(x)))
        else:
            x = x.index_select(1, self.input_index)
        return self.project(self.dw_act(self.dw_bn(self.dw_conv(x))))


def shortcut_groups(in_ch: int, out_ch: int) -> int:
    """HR-NAS groups the 1x1 projection shortcut by the largest common divisor of the widths."""
    return math.gcd(in_ch, out_ch)


class AtomicBlock(nn.Module):
    """Searchable inverted-residual block with one branch per kernel size (HR-NAS's atomic block).

    ``widths[i]`` is the hidden width of the branch with kernel ``kernel_sizes[i]``. A block may have
    no branch at all: it is then its shortcut plus a learned per-channel constant (``bias``), which is
    what an all-pruned block computes in eval mode (see :mod:`dist_hrnas.search.surgery`).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, kernel_sizes: list[int], widths: list[int],
                 expand: bool, act: str, bn_kwargs: dict):
        super().__init__()
        if len(kernel_sizes) != len(widths):
            raise ValueError(f"kernel_sizes {kernel_sizes} and widths {widths} differ in length")
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.stride = stride
        self.expand = expand
        self.act = act
        self.bn_kwargs = dict(bn_kwargs)
        self.branches = nn.ModuleList(
            KernelBranch(in_ch, out_ch, w, k, stride, expand, act, bn_kwargs)
            for k, w in zip(kernel_sizes, widths))
        if len(self.branches):
            self.pw_bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_ch, **bn_kwargs)
            self.bias: nn.Parameter | None = None
        else:
            self.pw_bn = None
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.use_identity = stride == 1 and in_ch == out_ch
        self.shortcut = None if self.use_identity else nn.Conv2d(
            in_ch, out_ch, 1, stride, 0, groups=shortcut_groups(in_ch, out_ch), bias=False)

    @property
    def kernel_sizes(self) -> list[int]:
        return [b.kernel for b in self.branches]

    @property
    def widths(self) -> list[int]:
        return [b.hidden for b in self.branches]

    def depthwise_bns(self) -> list[nn.BatchNorm2d]:
        """The BNs whose scales the search penalises, one per branch, in branch order."""
        return [b.dw_bn for b in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        if self.pw_bn is None:
            return skip + self.bias.view(1, -1, 1, 1)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return skip + self.pw_bn(out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, stride={self.stride}, "
                f"kernels={self.kernel_sizes}, widths={self.widths}")
