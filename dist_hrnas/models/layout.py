"""Memory format of the network: ``torch.channels_last`` (NHWC) or the default (NCHW), for modules and tensors.

oneDNN's convolutions run NHWC natively (in the default format every conv reorders its input and output) and
cuDNN's tensor-core convolutions prefer NHWC too; ``bench/overhead.py`` times a training step in both formats.

"In a format" means *canonical strides*: a tensor laid out exactly as ``torch.empty(shape,
memory_format=...)`` lays it out. ``is_contiguous(memory_format=...)`` is not enough to tell the formats apart:
a depthwise weight (C, 1, k, k) or a 1x1 weight (O, I, 1, 1) is "contiguous" in both, but its strides still
decide how kernels read it, and ``Tensor.to(memory_format=...)`` / ``Module.to`` produce canonical strides.
"""
from __future__ import annotations

import torch
from torch import nn


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def in_format(t: torch.Tensor, fmt: torch.memory_format) -> bool:
    """Whether ``t`` has the canonical strides of ``fmt`` (always true for tensors that are not 4-D)."""
    if t.ndim != 4:
        return True
    return t.stride() == torch.empty(t.shape, memory_format=fmt, device="meta").stride()


def format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last when ``t`` is a 4-D tensor laid out that way, else the default format."""
    channels_last = t.ndim == 4 and in_format(t, torch.channels_last) and not in_format(t, torch.contiguous_format)
    return torch.channels_last if channels_last else torch.contiguous_format


def to_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` with the canonical strides of ``fmt`` (``t`` itself when it has them already)."""
    if in_format(t, fmt):
        return t
    # not .contiguous(memory_format=fmt): it keeps a tensor that is "contiguous" in both formats as it is
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def layout_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` in the memory format of ``ref`` (e.g. a sliced parameter like the one it was cut from)."""
    return to_format(value, format_of(ref)) if value.ndim == 4 else value


def set_memory_format_(module: nn.Module, channels_last: bool) -> nn.Module:
    """Every 4-D parameter and buffer of ``module`` in that format, in place (the Parameter objects stay, so
    an optimizer built on them remains valid)."""
    return module.to(memory_format=memory_format(channels_last))


@torch.no_grad()
def match_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Lay every per-parameter state tensor (momentum, moments) out like its parameter: state loaded from a
    checkpoint written in the other format, or carried through a shrink, would otherwise make every update
    mix layouts (slower, and foreach kernels fall back to per-tensor loops)."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                state[key] = layout_like(value, p)
