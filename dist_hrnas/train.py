"""``python -m dist_hrnas.train --config FILE [section.key=value ...]``: train (and search) a network.

Read top to bottom: set up -> per epoch: train, validate -> write summary.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dist_hrnas import distributed
from dist_hrnas.cli import add_config_args, config_from_args
from dist_hrnas.config import Config, save_config
from dist_hrnas.data import Datasets, build_datasets, build_loaders
from dist_hrnas.errors import UserError, exits_cleanly_on_user_error
from dist_hrnas.fileio import atomic_write_json
from dist_hrnas.metrics import NullWriter, get_logger, make_writer
from dist_hrnas.models import HRNet, build_model, count_macs, count_params
from dist_hrnas.optim import ModelEma, build_optimizer, build_scheduler, scaled_lr


def resolve_run_dir(cfg: Config) -> Path:
    return Path(cfg.log.run_dir) if cfg.log.run_dir else Path("runs") / cfg.name


def check_data_matches_model(cfg: Config, data: Datasets, model: HRNet) -> None:
    spec = model.spec
    if data.num_classes != spec.num_classes:
        raise UserError(f"data set {cfg.data.name} has {data.num_classes} classes but the model has "
                        f"{spec.num_classes}: set model.num_classes={data.num_classes}")
    if data.channels != spec.image_channels:
        raise UserError(f"data set {cfg.data.name} yields {data.channels}-channel images but the model expects "
                        f"{spec.image_channels}: set model.image_channels={data.channels}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(top-1, mean loss) over this rank's validation shard, summed over ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        totals[0] += (logits.argmax(1) == labels).sum().item()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum").item()
        totals[2] += labels.numel()
    model.train(was_training)
    distributed.all_reduce_sum_(totals)
    count = max(1.0, totals[2].item())
    return totals[0].item() / count, totals[1].item() / count


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, ema: ModelEma | None, cfg: Config,
                    ctx: distributed.DistContext, writer: NullWriter, epoch: int, step: int) -> int:
    """One pass over the training shard; returns the global step after it."""
    model.train()
    steps = len(loader) if not cfg.train.max_steps_per_epoch else min(len(loader), cfg.train.max_steps_per_epoch)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not (ctx.is_main and cfg.log.progress), file=sys.stdout)
    tick = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        if i >= steps:
            break
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.train.label_smoothing)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step} on rank {ctx.rank}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or i == steps - 1:
            stats = distributed.all_reduce_mean_(loss.detach().float().reshape(1).cpu())
            elapsed = time.perf_counter() - tick
            writer.scalar("train/loss", stats.item(), step)
            writer.scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            writer.scalar("train/samples_per_s", (i + 1) * images.shape[0] * ctx.world_size / elapsed, step)
            bar.set_postfix(loss=f"{stats.item():.3f}")
    bar.close()
    return step


def run(cfg: Config, ctx: distributed.DistContext) -> dict:
    """The whole training job on this rank; returns the summary (written to summary.json by rank 0)."""
    log = get_logger(ctx.is_main)
    run_dir = resolve_run_dir(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)

    data = build_datasets(cfg.data)
    model = build_model(cfg.model)
    check_data_matches_model(cfg, data, model)
    model.to(ctx.device)
    params, macs = count_params(model), sum(count_macs(model, data.channels, data.image_size).values())
    log.info(f"model: {params:,} params, {macs:,} MACs at {data.image_size}px; run dir {run_dir}")

    train_loader, val_loader, sampler = build_loaders(
        data, cfg.train.batch_size_per_rank, cfg.data.num_workers, cfg.train.seed, ctx.rank, ctx.world_size)
    steps_per_epoch = len(train_loader) if not cfg.train.max_steps_per_epoch else min(
        len(train_loader), cfg.train.max_steps_per_epoch)
    lr = scaled_lr(cfg.train, cfg.train.batch_size_per_rank * ctx.world_size)
    optimizer = build_optimizer(model, cfg.train, lr)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    writer = make_writer(run_dir, cfg.log.tensorboard, ctx.is_main)
    writer.scalar("dist/world_size", ctx.world_size, 0)

    step, top1, val_loss = 0, math.nan, math.nan
    started = time.perf_counter()
    try:
        for epoch in range(cfg.train.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            step = train_one_epoch(model, train_loader, optimizer, scheduler, ema, cfg, ctx, writer, epoch, step)
            last = epoch == cfg.train.epochs - 1
            if last or (epoch + 1) % cfg.train.eval_every == 0:
                distributed.sync_bn_buffers_(model)
                top1, val_loss = evaluate(ema.module if ema else model, val_loader, ctx.device)
                writer.scalar("val/top1", top1, step)
                writer.scalar("val/loss", val_loss, step)
                log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}: val top1 {top1:.4f} "
                         f"loss {val_loss:.4f}")
    finally:
        writer.close()

    summary = {"val_top1": top1, "val_loss": val_loss, "params": params, "macs": macs,
               "world_size": ctx.world_size, "epochs": cfg.train.epochs, "steps": step,
               "wall_time_s": round(time.perf_counter() - started, 2)}
    if ctx.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
        log.info(f"done: val top1 {top1:.4f}; summary in {run_dir / 'summary.json'}")
    return summary


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.train", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    ctx = distributed.init_distributed(cfg.dist)
    try:
        run(cfg, ctx)
    finally:
        distributed.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
