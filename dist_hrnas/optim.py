"""Optimizer, learning-rate schedule and EMA of weights, each built by a function from the config."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dist_hrnas.config import TrainConfig


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """``train.lr`` scaled linearly from ``train.lr_base_batch`` to the real global batch."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights only; BN scales are steered by the search's L1 term, not by L2."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps,
                                   momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.adamw_betas))


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (stepwise warm-up, then the schedule)."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "exp":
        return cfg.exp_gamma ** ((step - warmup) / steps_per_epoch / cfg.exp_decay_epochs)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch), last_epoch=last_step)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers, kept as a whole module copy.

    A module (not a loose dict) so that surgery can shrink it exactly like the live model and
    validation can run it directly. The decay ramps up as (1 + t) / (10 + t) so short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        for name, shadow in self.module.state_dict().items():
            if shadow.dtype.is_floating_point:
                shadow.lerp_(live[name].detach(), 1.0 - d)
            else:
                shadow.copy_(live[name])
