"""BatchNorm running statistics re-estimated from data (after a shrink, and before validation)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable, steps: int, device: torch.device) -> None:
    """Re-estimate BN running statistics as a plain average over ``steps`` training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for i, (images, _labels) in enumerate(batches):
        if i >= steps:
            break
        model(images.to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
