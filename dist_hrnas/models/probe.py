"""One forward pass with hooks: how shapes and MACs are read off a network without training it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@torch.no_grad()
def probe_forward(model: nn.Module, image_channels: int, image_size: int,
                  install: Callable[[], list[RemovableHandle]]) -> None:
    """Run one all-zeros image through ``model`` in eval mode with the hooks ``install`` registers.

    The hooks are removed and the model's training mode restored afterwards, whatever happens.
    """
    hooks = install()
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, image_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
