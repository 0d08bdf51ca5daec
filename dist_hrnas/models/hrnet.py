"""The HR-NAS multi-branch, multi-resolution network (classification).

stem (two 3x3 conv-BN-act) -> per stage: fuse module + parallel module -> head -> dropout + linear.
Every :class:`AtomicBlock` is created through one factory that knows the block's module path, so a
searched architecture (per-block kernel lists and widths, keyed by that path) rebuilds exactly.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dist_hrnas.config import ModelConfig
from dist_hrnas.models.blocks import AtomicBlock, ConvBNAct, make_activation

# (kernel_sizes, widths) of one block, keyed by its module path.
BlockShapes = Mapping[str, tuple[list[int], list[int]]]
BlockFactory = Callable[[str, int, int, int], AtomicBlock]


class FuseModule(nn.Module):
    """Turns the previous stage's resolutions into this stage's, fusing neighbouring resolutions only.

    Output i sums: input i through a stride-1 block, input i-1 (higher resolution) through a stride-2
    block, input i+1 (lower resolution) through a stride-1 block then 2x nearest upsampling; then the
    activation. A resolution the stage adds comes from the previous fused output via a stride-2 block.
    """

    def __init__(self, prefix: str, in_channels: list[int], out_channels: list[int], make_block: BlockFactory,
                 act: str):
        super().__init__()
        self.n_in, self.n_out = len(in_channels), len(out_channels)
        self.paths = nn.ModuleDict()
        for i in range(min(self.n_in, self.n_out)):
            for j in (i - 1, i, i + 1):
                if 0 <= j < self.n_in:
                    stride = 2 if j < i else 1
                    name = f"{i}_{j}"
                    self.paths[name] = make_block(f"{prefix}.paths.{name}", in_channels[j], out_channels[i], stride)
        self.extend = nn.ModuleList(
            make_block(f"{prefix}.extend.{b - self.n_in}", out_channels[b - 1], out_channels[b], 2)
            for b in range(self.n_in, self.n_out))
        self.act = make_activation(act)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i in range(min(self.n_in, self.n_out)):
            y = None
            for j in (i - 1, i, i + 1):
                if 0 <= j < self.n_in:
                    z = self.paths[f"{i}_{j}"](xs[j])
                    if j > i:
                        z = F.interpolate(z, size=xs[i].shape[-2:], mode="nearest")
                    y = z if y is None else y + z
            out.append(self.act(y))
        for block in self.extend:
            out.append(block(out[-1]))
        return out


class ParallelModule(nn.Module):
    """Each resolution runs its own sequence of stride-1 atomic blocks."""

    def __init__(self, prefix: str, num_blocks: list[int], channels: list[int], make_block: BlockFactory):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(make_block(f"{prefix}.branches.{i}.{k}", c, c, 1) for k in range(n)))
            for i, (n, c) in enumerate(zip(num_blocks, channels)))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [branch(x) for branch, x in zip(self.branches, xs)]


class HeadModule(nn.Module):
    """Per-resolution increase blocks, stride-2 blocks chained high -> low adding each level, 1x1 conv, pool."""

    def __init__(self, prefix: str, in_channels: list[int], head_channels: list[int], last_channel: int,
                 make_block: BlockFactory, act: str, bn_kwargs: dict):
        super().__init__()
        self.incre = nn.ModuleList(
            make_block(f"{prefix}.incre.{i}", c, h, 1) for i, (c, h) in enumerate(zip(in_channels, head_channels)))
        self.down = nn.ModuleList(
            make_block(f"{prefix}.down.{i}", head_channels[i], head_channels[i + 1], 2)
            for i in range(len(head_channels) - 1))
        self.final = ConvBNAct(head_channels[-1], last_channel, 1, 1, act, bn_kwargs)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        y = self.incre[0](xs[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](xs[i + 1]) + down(y)
        return self.final(y).mean(dim=(2, 3))


class HRNet(nn.Module):
    """HR-NAS supernet, or a narrower network when ``block_shapes`` gives per-block kernels/widths."""

    def __init__(self, spec: ModelConfig, block_shapes: BlockShapes | None = None):
        super().__init__()
        self.spec = spec
        bn_kwargs = {"momentum": spec.bn_momentum, "eps": spec.bn_eps}
        expand = spec.expand_ratio != 1
        shapes = dict(block_shapes or {})
        used: set[str] = set()

        def make_block(name: str, in_ch: int, out_ch: int, stride: int) -> AtomicBlock:
            if name in shapes:
                kernels, widths = shapes[name]
                used.add(name)
            else:
                kernels = list(spec.kernel_sizes)
                widths = [int(round(in_ch * spec.expand_ratio))] * len(kernels)
            return AtomicBlock(in_ch, out_ch, stride, list(kernels), list(widths), expand, spec.active_fn,
                               bn_kwargs)

        c0, c1 = spec.input_channel
        self.stem = nn.Sequential(
            ConvBNAct(spec.image_channels, c0, 3, 2, spec.active_fn, bn_kwargs),
            ConvBNAct(c0, c1, 3, 2 if spec.input_stride == 4 else 1, spec.active_fn, bn_kwargs))
        stages = []
        prev = [c1]
        for s, (_, num_blocks, channels) in enumerate(spec.stages):
            fuse = FuseModule(f"stages.{s}.fuse", prev, list(channels), make_block, spec.active_fn)
            parallel = ParallelModule(f"stages.{s}.parallel", list(num_blocks), list(channels), make_block)
            stages.append(nn.ModuleDict({"fuse": fuse, "parallel": parallel}))
            prev = list(channels)
        self.stages = nn.ModuleList(stages)
        self.head = HeadModule("head", prev, list(spec.head_channels), spec.last_channel, make_block,
                               spec.active_fn, bn_kwargs)
        self.classifier = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.last_channel, spec.num_classes))
        unknown = sorted(set(shapes) - used)
        if unknown:
            raise KeyError(f"no atomic block named {unknown[0]} in this network")
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def named_blocks(self) -> list[tuple[str, AtomicBlock]]:
        """All atomic blocks in construction order (fuse, parallel per stage, then head)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, AtomicBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.stem(x)]
        for stage in self.stages:
            xs = stage["parallel"](stage["fuse"](xs))
        return self.classifier(self.head(xs))
