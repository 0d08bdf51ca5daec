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

from dist_hrnas.parallel import comm
from dist_hrnas.config import Config


class LocalEngine:
    """Single process: forward, backward and step on the bare module."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip_norm: float = 0.0):
        self.module = module
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_module(x)

    def forward_module(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip_norm > 0:  # gradients are already averaged over ranks here, so all ranks clip alike
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
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

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 grad_clip_norm: float = 0.0):
        super().__init__(module, optimizer, grad_clip_norm)
        # forward_sync_buffers=False: rank 0's BN statistics would silently overwrite the others' each step;
        # we all-reduce them before masks and validation instead (comm.sync_bn_buffers_).
        self.ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                           forward_sync_buffers=False)

    def forward_module(self, x: torch.Tensor) -> torch.Tensor:
        return self.ddp(x)

    def no_sync(self) -> ContextManager:
        return self.ddp.no_sync()

    def release(self) -> None:
        super().release()
        del self.ddp


def make_engine(cfg: Config, module: nn.Module, optimizer: torch.optim.Optimizer,
                ctx: comm.DistContext) -> LocalEngine:
    """The engine ``dist.engine`` names; a plain one when there is no process group (a single process,
    unless ``dist.always_group``)."""
    clip = cfg.train.grad_clip_norm
    if not ctx.backend:
        return LocalEngine(module, optimizer, clip)
    if cfg.dist.engine == "ddp":
        return DDPEngine(module, optimizer, ctx.device, clip)
    from dist_hrnas.parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_config  # deepspeed is an optional extra

    accum = cfg.train.grad_accum_steps
    ds_config = deepspeed_config(cfg.dist.deepspeed, cfg.train.batch_size_per_rank // accum, accum,
                                 cfg.train.bf16 and ctx.device.type == "cuda", clip)
    return DeepSpeedEngine(module, optimizer, ctx, ds_config, channels_last=cfg.train.channels_last)
