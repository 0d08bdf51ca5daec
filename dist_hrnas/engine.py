"""Data-parallel engines around the (unwrapped) model: plain, DDP, DeepSpeed.

An engine is rebuilt after every shrink: surgery happens on ``engine.module``; then a *new* engine is
made around the shrunk module and a new optimizer (never ``ddp.module = new_model``: that lets ranks
drift apart silently). All engines share one small interface so the training loop does not branch.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_hrnas import distributed


class LocalEngine:
    """Single process: forward, backward and step on the bare module."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module = module
        self.optimizer = optimizer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_module(x)

    def forward_module(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> ContextManager:
        """Context for micro-batches that accumulate gradients without communicating."""
        return contextlib.nullcontext()

    def optimizer_view(self) -> torch.optim.Optimizer:
        """The optimizer state per module parameter, unsharded (what surgery slices)."""
        return self.optimizer

    def optimizer_state_dict(self) -> dict:
        """A torch optimizer state_dict of the full state (checkpoints load it into a fresh optimizer)."""
        return self.optimizer.state_dict()

    def release(self) -> None:
        """Drop references to the wrapper so its communication state can be freed."""
        self.optimizer = None


class DDPEngine(LocalEngine):
    """DistributedDataParallel around the module; BN buffers are synchronised explicitly, not broadcast."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        super().__init__(module, optimizer)
        # forward_sync_buffers=False: rank 0's BN statistics would silently overwrite the others' each step;
        # we all-reduce them before masks and validation instead (distributed.sync_bn_buffers_).
        self.ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                           forward_sync_buffers=False)

    def forward_module(self, x: torch.Tensor) -> torch.Tensor:
        return self.ddp(x)

    def no_sync(self) -> ContextManager:
        return self.ddp.no_sync()

    def release(self) -> None:
        super().release()
        del self.ddp


def make_engine(kind: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                ctx: distributed.DistContext) -> LocalEngine:
    if ctx.world_size == 1 or kind == "none":
        return LocalEngine(module, optimizer)
    if kind == "ddp":
        return DDPEngine(module, optimizer, ctx.device)
    raise ValueError(f"unknown engine {kind}")
