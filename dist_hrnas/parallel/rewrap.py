"""What the training loop holds around the model, and how it is rebuilt after a shrink.

After surgery the optimizer is rebuilt on the new parameters with the surviving state carried over, the
scheduler is set to the same step, and a *new* engine (DDP or DeepSpeed) is built around the shrunk module:
the old one is released first, never patched (``ddp.module = new_model`` lets ranks drift apart silently).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dist_hrnas.config import Config
from dist_hrnas.models import HRNet
from dist_hrnas.models.layout import match_optimizer_state_
from dist_hrnas.optim import ModelEma, build_optimizer, build_scheduler
from dist_hrnas.parallel.comm import DistContext
from dist_hrnas.parallel.engine import LocalEngine, make_engine

# (old optimizer, as the engine shows it; new optimizer) -> put the surviving state into the new one
CarryState = Callable[[torch.optim.Optimizer, torch.optim.Optimizer], None]


@dataclass
class TrainState:
    """Everything a shrink rebuilds: the model is shrunk in place, the rest is rebuilt around it."""

    model: HRNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: LocalEngine
    ema: ModelEma | None
    lr: float
    steps_per_epoch: int
    step: int = 0


def build_state(cfg: Config, ctx: DistContext, model: HRNet, lr: float, steps_per_epoch: int,
                ema: ModelEma | None, step: int = 0,
                fill_optimizer: Callable[[torch.optim.Optimizer], None] | None = None) -> TrainState:
    """Optimizer, scheduler at ``step``, engine.

    ``fill_optimizer`` puts existing state (a checkpoint's, or the sliced state after a shrink) into the new
    optimizer *before* the engine takes it: ZeRO partitions the state when its engine is built.
    """
    optimizer = build_optimizer(model, cfg.train, lr)
    if fill_optimizer is not None:
        fill_optimizer(optimizer)
        match_optimizer_state_(optimizer)  # a checkpoint of the other format, a shrink: state laid out like params
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch, last_step=step - 1)
    engine = make_engine(cfg, model, optimizer, ctx)
    return TrainState(model, optimizer, scheduler, engine, ema, lr, steps_per_epoch, step)


def rewrap(state: TrainState, cfg: Config, ctx: DistContext, carry: CarryState) -> None:
    """New optimizer (state carried by ``carry``), scheduler at the same step, and a *new* engine."""
    old_optimizer = state.engine.optimizer_view()  # a collective under ZeRO: every rank is here
    state.engine.release()
    state.engine = None  # type: ignore[assignment]  # let the old DDP reducer go before building the new one
    fresh = build_state(cfg, ctx, state.model, state.lr, state.steps_per_epoch, state.ema, state.step,
                        lambda new: carry(old_optimizer, new))
    state.optimizer, state.scheduler, state.engine = fresh.optimizer, fresh.scheduler, fresh.engine
