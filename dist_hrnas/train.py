"""``python -m dist_hrnas.train --config FILE [section.key=value ...]``: train (and search) a network.

Read top to bottom: set up -> per epoch: train, validate -> write summary.json.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dist_hrnas import distributed
from dist_hrnas.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dist_hrnas.cli import add_config_args, config_from_args
from dist_hrnas.config import Config, save_config
from dist_hrnas.data import Datasets, build_datasets, build_loaders
from dist_hrnas.engine import LocalEngine, make_engine
from dist_hrnas.errors import NonFiniteLossError, UserError, exits_cleanly_on_user_error
from dist_hrnas.fileio import atomic_write_json
from dist_hrnas.metrics import NullWriter, get_logger, make_writer
from dist_hrnas.models import (HRNet, build_model, count_macs, count_params, export_arch, model_from_arch,
                               save_arch_file)
from dist_hrnas.optim import ModelEma, build_optimizer, build_scheduler, scaled_lr
from dist_hrnas.search import Search, calibrate_bn
from dist_hrnas.surgery import ShrinkResult, carry_optimizer_state


def resolve_run_dir(cfg: Config) -> Path:
    return Path(cfg.log.run_dir) if cfg.log.run_dir else Path("runs") / cfg.name


RUN_OUTPUTS = ("config.yaml", "summary.json", "shrinks.jsonl", "searched_arch.yaml", "report_schedule.png", "tb",
               "checkpoints")


def archive_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs into ``previous/<time>/`` so a fresh run neither appends to its
    ``shrinks.jsonl`` and TensorBoard events nor overwrites its checkpoint. Returns where they went."""
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while dest.exists():
        dest, suffix = dest.with_name(f"{dest.name.split('.')[0]}.{suffix}"), suffix + 1
    dest.mkdir(parents=True)
    for path in found:
        path.rename(dest / path.name)
    return dest


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


def build_state(cfg: Config, ctx: distributed.DistContext, model: HRNet, lr: float, steps_per_epoch: int,
                ema: ModelEma | None, step: int = 0,
                fill_optimizer: Callable[[torch.optim.Optimizer], None] | None = None) -> TrainState:
    """Optimizer, scheduler at ``step``, engine.

    ``fill_optimizer`` puts existing state (a checkpoint's, or the sliced state after a shrink) into the new
    optimizer *before* the engine takes it: ZeRO partitions the state when its engine is built.
    """
    optimizer = build_optimizer(model, cfg.train, lr)
    if fill_optimizer is not None:
        fill_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch, last_step=step - 1)
    engine = make_engine(cfg, model, optimizer, ctx)
    return TrainState(model, optimizer, scheduler, engine, ema, lr, steps_per_epoch, step)


def rebuild_after_shrink(state: TrainState, cfg: Config, ctx: distributed.DistContext, result: ShrinkResult,
                         old_params: dict[str, nn.Parameter]) -> None:
    """New optimizer (surviving state sliced over), scheduler at the same step, and a *new* engine."""
    old_optimizer = state.engine.optimizer_view()  # a collective under ZeRO: every rank is here
    state.engine.release()
    state.engine = None  # type: ignore[assignment]  # let the old DDP reducer go before building the new one
    fresh = build_state(cfg, ctx, state.model, state.lr, state.steps_per_epoch, state.ema, state.step,
                        lambda new: carry_optimizer_state(old_optimizer, old_params, new, state.model, result))
    state.optimizer, state.scheduler, state.engine = fresh.optimizer, fresh.scheduler, fresh.engine


def check_finite(loss: torch.Tensor, state: TrainState, ctx: distributed.DistContext) -> None:
    """Every rank learns whether any rank's loss is non-finite, so all stop together (never a hang)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0 + ctx.rank], dtype=torch.float64)
    distributed.all_reduce_max_(bad)
    if bad.item() > 0:
        raise NonFiniteLossError(f"non-finite loss at step {state.step} on rank {int(bad.item()) - 1}")


def forward_backward(state: TrainState, search: Search | None, cfg: Config, ctx: distributed.DistContext,
                     images: torch.Tensor, labels: torch.Tensor, rho: float,
                     accum: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss (+ rho-weighted L1) and gradients for one batch, split into ``accum`` micro-batches.

    All but the last micro-batch run under ``no_sync`` so gradients are communicated once per step.
    """
    losses, l1 = [], None
    chunks = list(zip(images.chunk(accum), labels.chunk(accum)))
    for j, (x, y) in enumerate(chunks):
        sync = contextlib.nullcontext() if j == len(chunks) - 1 else state.engine.no_sync()
        with sync, autocast(ctx.device, cfg.train.bf16):
            loss = F.cross_entropy(state.engine(x), y, label_smoothing=cfg.train.label_smoothing)
            l1 = search.penalty(rho) if search else None
            total = loss + l1 if l1 is not None else loss
        state.engine.backward(total / len(chunks))
        losses.append(loss.detach())
    return torch.stack(losses).mean(), l1


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; CPU trains in fp32 (CPU autocast is slower here, not faster)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(state: TrainState, loader, search: Search | None, cfg: Config, ctx: distributed.DistContext,
                    writer: NullWriter, epoch: int) -> None:
    """One pass over this rank's training shard."""
    model = state.model
    model.train()
    accum = cfg.train.grad_accum_steps
    steps = state.steps_per_epoch
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not (ctx.is_main and cfg.log.progress), file=sys.stdout)
    tick = time.perf_counter()
    logged_at, logged_step = tick, state.step
    for i, (images, labels) in enumerate(loader):
        if i >= steps:
            break
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        rho = search.rho(state.step / steps) if search else 0.0
        loss, l1 = forward_backward(state, search, cfg, ctx, images, labels, rho, accum)
        check_finite(loss, state, ctx)
        state.engine.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(model)
        state.step += 1
        bar.update(1)
        if state.step % cfg.train.log_every == 0 or i == steps - 1:
            mean_loss = distributed.all_reduce_mean_(loss.detach().float().reshape(1).cpu()).item()
            writer.scalar("train/loss", mean_loss, state.step)
            writer.scalar("train/lr", state.scheduler.get_last_lr()[0], state.step)
            now = time.perf_counter()
            writer.scalar("train/samples_per_s", (i + 1) * images.shape[0] * ctx.world_size / (now - tick),
                          state.step)
            writer.scalar("train/step_time_s", (now - logged_at) / max(1, state.step - logged_step), state.step)
            logged_at, logged_step = now, state.step
            if search:
                search.log(writer, model, state.step, rho, l1.item() if l1 is not None else 0.0)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
    bar.close()


def checkpoint_payload(state: TrainState, search: Search | None, epochs_done: int, meta: dict,
                       cfg: Config) -> dict:
    """Everything needed to continue exactly here, as plain tensors/dicts (``weights_only`` loadable).

    Gathering a sharded optimizer state is a collective: every rank calls this, rank 0 writes.
    """
    return {"arch": export_arch(state.model), "model": state.model.state_dict(),
            "optimizer": state.engine.optimizer_state_dict(), "scheduler": state.scheduler.state_dict(),
            "ema": state.ema.module.state_dict() if state.ema else None,
            "ema_updates": state.ema.updates if state.ema else 0,
            "search": search.state_dict() if search else None, "step": state.step, "epoch": epochs_done,
            "rng": rng_state(), "meta": meta, "config": cfg.to_dict()}


def write_checkpoint(path: Path, state: TrainState, search: Search | None, epochs_done: int, meta: dict,
                     cfg: Config, ctx: distributed.DistContext) -> None:
    payload = checkpoint_payload(state, search, epochs_done, meta, cfg)
    if ctx.is_main:
        save_checkpoint(path, payload)
    distributed.barrier()  # nobody races ahead (and possibly dies) before last.pt is complete


def run(cfg: Config, ctx: distributed.DistContext) -> dict:
    """The whole job on this rank; returns the summary (written to summary.json by rank 0)."""
    log = get_logger(ctx.is_main)
    run_dir = resolve_run_dir(cfg)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resuming = cfg.checkpoint.resume == "auto" and ckpt_path.is_file()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            moved = archive_previous_run(run_dir)
            if moved:
                log.info(f"a fresh run in {run_dir}: the previous run's files are kept in {moved}")
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier()  # nobody reads the run directory while rank 0 tidies it
    torch.manual_seed(cfg.train.seed)

    data = build_datasets(cfg.data)
    resume = load_checkpoint(ckpt_path) if resuming else None
    # nanoGPT's rule: rebuild the (possibly shrunk) architecture stored in the checkpoint, then load weights.
    model = model_from_arch(resume["arch"], source=str(ckpt_path)) if resume else build_model(cfg.model)
    check_data_matches_model(cfg, data, model)
    if resume:
        model.load_state_dict(resume["model"])
        set_rng_state(resume["rng"])
    model.to(ctx.device)
    meta = resume["meta"] if resume else {
        "params": count_params(model), "macs": sum(count_macs(model, data.channels, data.image_size).values())}
    log.info(f"model: {meta['params']:,} params, {meta['macs']:,} MACs at {data.image_size}px; run dir {run_dir}")
    search = None
    if cfg.prune.penalty != "none":
        search = Search(cfg, model, data.image_size, run_dir, saved=resume["search"] if resume else None)
        if resume and ctx.is_main:
            search.rewrite_shrink_log()  # a shrink logged after the checkpoint was taken is undone too
        log.info(f"search: penalty {cfg.prune.penalty}, {len(search.registry.entries)} prunable branches, "
                 f"supernet {search.latency_ms_supernet:.3f} ms on {cfg.latency.device} "
                 f"(batch {cfg.latency.batch_size})")

    train_loader, val_loader, sampler = build_loaders(
        data, cfg.train.batch_size_per_rank, cfg.data.num_workers, cfg.train.seed, ctx.rank, ctx.world_size)
    steps_per_epoch = len(train_loader) if not cfg.train.max_steps_per_epoch else min(
        len(train_loader), cfg.train.max_steps_per_epoch)
    lr = scaled_lr(cfg.train, cfg.train.batch_size_per_rank * ctx.world_size)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema and resume and resume["ema"] is not None:
        ema.module.load_state_dict(resume["ema"])
        ema.updates = resume["ema_updates"]
    state = build_state(cfg, ctx, model, lr, steps_per_epoch, ema, step=resume["step"] if resume else 0,
                        fill_optimizer=(lambda opt: opt.load_state_dict(resume["optimizer"])) if resume else None)
    if resume:
        state.scheduler.load_state_dict(resume["scheduler"])
    first_epoch = resume["epoch"] if resume else 0
    if resume:
        log.info(f"resumed from {ckpt_path}: epoch {first_epoch}, step {state.step}, "
                 f"{len(search.shrinks) if search else 0} shrinks so far")
    writer = make_writer(run_dir, cfg.log.tensorboard, ctx.is_main)
    writer.scalar("dist/world_size", ctx.world_size, state.step)

    top1, val_loss = math.nan, math.nan
    started = time.perf_counter()

    def validate(epoch: int) -> tuple[float, float]:
        evaluated = state.ema.module if state.ema else model
        if cfg.train.eval_bn_calibration_steps:  # running statistics only: training itself is unaffected
            calibrate_bn(evaluated, train_loader, cfg.train.eval_bn_calibration_steps, ctx.device)
        distributed.sync_bn_buffers_(evaluated)
        result = evaluate(evaluated, val_loader, ctx.device)
        writer.scalar("val/top1", result[0], state.step)
        writer.scalar("val/loss", result[1], state.step)
        log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}: val top1 {result[0]:.4f} "
                 f"loss {result[1]:.4f}")
        return result

    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            try:
                train_one_epoch(state, train_loader, search, cfg, ctx, writer, epoch)
            except NonFiniteLossError as err:
                good = str(ckpt_path) if ckpt_path.is_file() else "none written yet"
                raise NonFiniteLossError(f"{err}; stopping all ranks; last good checkpoint: {good}") from None
            last = epoch == cfg.train.epochs - 1
            shrunk = False
            if last or (epoch + 1) % cfg.train.eval_every == 0:
                top1, val_loss = validate(epoch)
                shrunk = bool(search) and search.after_eval(
                    model, state.ema.module if state.ema else None, last, state.step, epoch,
                    lambda result, old: rebuild_after_shrink(state, cfg, ctx, result, old),
                    lambda: train_loader, writer)
                if shrunk:
                    rec = search.shrinks[-1]
                    log.info(f"shrink {len(search.shrinks)}: -{rec['channels_removed']} channels, predicted "
                             f"{rec['latency_ms_predicted_after']:.3f} ms, measured "
                             f"{rec['latency_ms_measured_after']:.3f} ms")
                    writer.text("prune/architecture", architecture_markdown(model), state.step)
                    if ctx.is_main:
                        save_arch_file(export_arch(model), run_dir / "searched_arch.yaml")
                    if last:  # report the accuracy of the network the search hands over
                        top1, val_loss = validate(epoch)
            every = cfg.checkpoint.every_epochs
            if shrunk or (every and (epoch + 1) % every == 0) or last:
                write_checkpoint(ckpt_path, state, search, epoch + 1, meta, cfg, ctx)
    finally:
        writer.close()
        state.engine.release()

    if resume and math.isnan(top1):  # resumed after the last epoch had finished: evaluate what we have
        top1, val_loss = evaluate(state.ema.module if state.ema else model, val_loader, ctx.device)
    summary = {"val_top1": top1, "val_loss": val_loss, "params": meta["params"], "macs": meta["macs"],
               "world_size": ctx.world_size, "epochs": cfg.train.epochs, "steps": state.step,
               "wall_time_s": round(time.perf_counter() - started, 2)}
    if search:
        summary |= {"penalty": cfg.prune.penalty, "shrinks": len(search.shrinks),
                    "latency_ms_supernet": round(search.latency_ms_supernet, 4),
                    "latency_ms_searched": round(search.latency_ms_measured, 4),
                    # where the latency figures come from: timed on this machine, or another machine's LUT
                    "latency_source": f"lut:{cfg.latency.lut_device}" if cfg.latency.lut_device else "measured",
                    "latency_ms_searched_predicted": round(search.predicted_ms(model), 4),
                    "params_searched": count_params(model),
                    "macs_searched": sum(count_macs(model, data.channels, data.image_size).values()),
                    "latency_device": cfg.latency.device, "latency_batch_size": cfg.latency.batch_size}
        if search.budget is not None:
            target_ms = search.budget.target_s * 1e3
            summary |= {"target_latency_ms": round(target_ms, 4), "budget_met": search.budget.done,
                        "latency_vs_target_pct": round(100 * (search.latency_ms_measured / target_ms - 1), 2)}
    if ctx.is_main:
        if search:
            save_arch_file(export_arch(model), run_dir / "searched_arch.yaml")
        atomic_write_json(run_dir / "summary.json", summary)
        log.info(f"done: val top1 {top1:.4f}; summary in {run_dir / 'summary.json'}")
    return summary


def architecture_markdown(model: HRNet) -> str:
    """The network as it stands, one table row per atomic block (TensorBoard's Text tab renders it)."""
    rows = ["| block | kernels | widths |", "|---|---|---|"]
    for name, block in model.named_blocks():
        kernels = ", ".join(map(str, block.kernel_sizes)) or "(shortcut only)"
        rows.append(f"| {name} | {kernels} | {', '.join(map(str, block.widths))} |")
    return "\n".join(rows)


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
