"""Parameter and MAC counts (MACs of convs and linear layers, as HR-NAS counts them)."""
from __future__ import annotations

import torch
from torch import nn

from dist_hrnas.models.probe import probe_forward


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, image_channels: int, image_size: int) -> dict[str, int]:
    """MACs per conv/linear module name for one image, from a real forward pass.

    conv: C_in * C_out * k_h * k_w * H_out * W_out / groups; linear: in * out.
    """
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, _inp, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                macs[name] = (mod.in_channels * mod.out_channels * kh * kw * out.shape[2] * out.shape[3]
                              // mod.groups)
            else:
                macs[name] = mod.in_features * mod.out_features
        return fn

    probe_forward(model, image_channels, image_size, lambda: [
        mod.register_forward_hook(hook(name)) for name, mod in model.named_modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))])
    return macs


def macs_under(macs: dict[str, int], prefix: str) -> int:
    """Sum of the MACs of every module inside ``prefix`` (a module path)."""
    dotted = prefix + "."
    return sum(v for k, v in macs.items() if k.startswith(dotted) or k == prefix)
