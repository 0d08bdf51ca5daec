"""``python -m dist_hrnas.train --config FILE [section.key=value ...]``: train (and search) a network.

Read top to bottom: set up -> per epoch: train, validate -> write summary.json.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dist_hrnas.checkpoint import rng_state, save_checkpoint, set_rng_state
from dist_hrnas.cli import add_config_args, config_from_args
from dist_hrnas.config import Config, save_config
from dist_hrnas.data import Datasets, build_datasets, build_loaders
from dist_hrnas.errors import NonFiniteLossError, UserError, exits_cleanly_on_user_error
from dist_hrnas.fileio import atomic_write_json
from dist_hrnas.metrics import NullWriter, get_logger, make_writer
from dist_hrnas.models import (HRNet, build_model, count_macs, count_params, export_arch, model_from_arch,
                               save_arch_file)
from dist_hrnas.models.bn import calibrate_bn
from dist_hrnas.models.layout import memory_format
from dist_hrnas.names import RunFiles, Tags
from dist_hrnas.optim import ModelEma, scaled_lr
from dist_hrnas.parallel import comm
from dist_hrnas.parallel.rewrap import TrainState, build_state
from dist_hrnas.search import Search, after_eval, board
from dist_hrnas.start import Start, decide_start


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
    comm.all_reduce_sum_(totals)
    count = max(1.0, totals[2].item())
    return totals[0].item() / count, totals[1].item() / count


def check_finite(loss: torch.Tensor, state: TrainState, ctx: comm.DistContext) -> None:
    """Every rank learns whether any rank's loss is non-finite, so all stop together (never a hang)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0 + ctx.rank], dtype=torch.float64)
    comm.all_reduce_max_(bad)
    if bad.item() > 0:
        raise NonFiniteLossError(f"non-finite loss at step {state.step} on rank {int(bad.item()) - 1}")


def forward_backward(state: TrainState, search: Search | None, cfg: Config, ctx: comm.DistContext,
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


def train_one_epoch(state: TrainState, loader, search: Search | None, cfg: Config, ctx: comm.DistContext,
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
            mean_loss = comm.all_reduce_mean_(loss.detach().float().reshape(1).cpu()).item()
            writer.scalar(Tags.TRAIN_LOSS, mean_loss, state.step)
            writer.scalar(Tags.TRAIN_LR, state.scheduler.get_last_lr()[0], state.step)
            now = time.perf_counter()
            writer.scalar(Tags.TRAIN_SAMPLES_PER_S, (i + 1) * images.shape[0] * ctx.world_size / (now - tick),
                          state.step)
            writer.scalar(Tags.TRAIN_STEP_TIME_S, (now - logged_at) / max(1, state.step - logged_step), state.step)
            logged_at, logged_step = now, state.step
            if search:
                board.log_step(search, writer, model, state.step, rho, l1.item() if l1 is not None else 0.0)
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
                     cfg: Config, ctx: comm.DistContext) -> None:
    payload = checkpoint_payload(state, search, epochs_done, meta, cfg)
    # nobody races ahead (and possibly dies) before last.pt is complete; a failed write stops every rank
    comm.on_rank0(lambda: save_checkpoint(path, payload), f"writing the checkpoint {path}")


@dataclass
class Job:
    """Everything the epochs need, built once by :func:`setup` (identical structure on every rank)."""

    cfg: Config
    ctx: comm.DistContext
    log: logging.Logger
    files: RunFiles
    data: Datasets
    state: TrainState
    search: Search | None
    train_loader: Iterable
    val_loader: Iterable
    sampler: object
    writer: NullWriter
    meta: dict
    first_epoch: int
    resumed: bool


def prepare_run_dir(files: RunFiles, cfg: Config, ctx: comm.DistContext, resuming: bool,
                    log: logging.Logger) -> None:
    """Rank 0 keeps an earlier run's outputs under ``previous/`` (unless resuming it) and writes the config.

    Called once the run has decided to go on (:func:`dist_hrnas.start.decide_start`) and its network and
    search are built: a run stopped by bad input never reaches it, so its run directory stays as it was.
    """
    def tidy() -> None:
        files.root.mkdir(parents=True, exist_ok=True)
        if not resuming:
            moved = files.archive()
            if moved:
                log.info(f"a fresh run in {files.root}: the previous run's files are kept in {moved}")
        save_config(cfg, files.config)

    comm.on_rank0(tidy, "preparing the run directory")  # nobody reads the run directory while rank 0 tidies it


def setup(cfg: Config, ctx: comm.DistContext, start: Start | None = None) -> Job:
    """Checks and the resume decision (writing nothing), data, model (the checkpoint's architecture when
    resuming), search, then the run directory, optimizer and engine."""
    log = get_logger(ctx.is_main)
    files = RunFiles(resolve_run_dir(cfg))
    resume = (start or decide_start(cfg, files)).resume
    torch.manual_seed(cfg.train.seed)
    data = build_datasets(cfg.data)
    # nanoGPT's rule: rebuild the (possibly shrunk) architecture stored in the checkpoint, then load weights.
    model = model_from_arch(resume["arch"], source=str(files.last_checkpoint)) if resume else build_model(cfg.model)
    check_data_matches_model(cfg, data, model)
    if resume:
        model.load_state_dict(resume["model"])
        set_rng_state(resume["rng"])
    model.to(ctx.device, memory_format=memory_format(cfg.train.channels_last))  # before the EMA copy and optimizer
    meta = resume["meta"] if resume else {
        "params": count_params(model), "macs": sum(count_macs(model, data.channels, data.image_size).values())}
    log.info(f"model: {meta['params']:,} params, {meta['macs']:,} MACs at {data.image_size}px; run dir {files.root}")
    search = start_search(cfg, ctx, model, data.image_size, files, resume, log)
    prepare_run_dir(files, cfg, ctx, resume is not None, log)
    train_loader, val_loader, sampler = build_loaders(
        data, cfg.train.batch_size_per_rank, cfg.data.num_workers, cfg.train.seed, ctx.rank, ctx.world_size,
        channels_last=cfg.train.channels_last)
    steps_per_epoch = len(train_loader) if not cfg.train.max_steps_per_epoch else min(
        len(train_loader), cfg.train.max_steps_per_epoch)
    state = resume_state(cfg, ctx, model, steps_per_epoch, resume)
    if resume:
        log.info(f"resumed from {files.last_checkpoint}: epoch {resume['epoch']}, step {state.step}, "
                 f"{len(search.shrinks) if search else 0} shrinks so far")
    writer = make_writer(files.root, cfg.log.tensorboard, ctx.is_main)
    writer.scalar(Tags.WORLD_SIZE, ctx.world_size, state.step)
    return Job(cfg, ctx, log, files, data, state, search, train_loader, val_loader, sampler, writer, meta,
               resume["epoch"] if resume else 0, resume is not None)


def start_search(cfg: Config, ctx: comm.DistContext, model: HRNet, image_size: int, files: RunFiles,
                 resume: dict | None, log: logging.Logger) -> Search | None:
    """The search (latency profile measured on rank 0, or restored from the checkpoint), or None."""
    if cfg.prune.penalty == "none":
        return None
    search = Search(cfg, model, image_size, files.root, saved=resume["search"] if resume else None)
    if resume:  # a shrink logged after the checkpoint was taken is undone too
        comm.on_rank0(search.rewrite_shrink_log, "rewriting the shrink log")
    log.info(f"search: penalty {cfg.prune.penalty}, {len(search.registry.entries)} prunable branches, "
             f"supernet {search.latency_ms_supernet:.3f} ms on {cfg.latency.device} "
             f"(batch {cfg.latency.batch_size})")
    return search


def resume_state(cfg: Config, ctx: comm.DistContext, model: HRNet, steps_per_epoch: int,
                 resume: dict | None) -> TrainState:
    """EMA, optimizer, scheduler and engine: fresh, or at the checkpoint's step with its state."""
    lr = scaled_lr(cfg.train, cfg.train.batch_size_per_rank * ctx.world_size)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema and resume and resume["ema"] is not None:
        ema.module.load_state_dict(resume["ema"])
        ema.updates = resume["ema_updates"]
    state = build_state(cfg, ctx, model, lr, steps_per_epoch, ema, step=resume["step"] if resume else 0,
                        fill_optimizer=(lambda opt: opt.load_state_dict(resume["optimizer"])) if resume else None)
    if resume:
        state.scheduler.load_state_dict(resume["scheduler"])
    return state


def validate(job: Job, epoch: int) -> tuple[float, float]:
    """(top-1, loss) of the model the run hands over (its EMA when it keeps one), logged."""
    evaluated = job.state.ema.module if job.state.ema else job.state.model
    if job.cfg.train.eval_bn_calibration_steps:  # running statistics only: training itself is unaffected
        calibrate_bn(evaluated, job.train_loader, job.cfg.train.eval_bn_calibration_steps, job.ctx.device)
    comm.sync_bn_buffers_(evaluated)
    top1, loss = evaluate(evaluated, job.val_loader, job.ctx.device)
    job.writer.scalar(Tags.VAL_TOP1, top1, job.state.step)
    job.writer.scalar(Tags.VAL_LOSS, loss, job.state.step)
    job.log.info(f"epoch {epoch + 1}/{job.cfg.train.epochs} step {job.state.step}: val top1 {top1:.4f} "
                 f"loss {loss:.4f}")
    return top1, loss


def evaluate_and_shrink(job: Job, epoch: int, last: bool) -> tuple[float, float, bool]:
    """Validate, then let the search shrink; (top-1, loss, shrunk) of the network after it."""
    top1, loss = validate(job, epoch)
    if not job.search or not after_eval(job.search, job.state, job.ctx, last, epoch, lambda: job.train_loader,
                                        job.writer):
        return top1, loss, False
    rec, model = job.search.shrinks[-1], job.state.model
    job.log.info(f"shrink {len(job.search.shrinks)}: -{rec['channels_removed']} channels, predicted "
                 f"{rec['latency_ms_predicted_after']:.3f} ms, measured {rec['latency_ms_measured_after']:.3f} ms")
    board.log_architecture(job.writer, model, job.state.step)
    comm.on_rank0(lambda: save_arch_file(export_arch(model), job.files.arch), f"writing {job.files.arch}")
    if last:  # report the accuracy of the network the search hands over
        top1, loss = validate(job, epoch)
    return top1, loss, True


def run_epochs(job: Job) -> tuple[float, float]:
    """Train, evaluate (and shrink) and checkpoint, epoch by epoch; the last (top-1, loss) evaluated."""
    cfg, top1, val_loss = job.cfg, math.nan, math.nan
    for epoch in range(job.first_epoch, cfg.train.epochs):
        if job.sampler is not None:
            job.sampler.set_epoch(epoch)
        try:
            train_one_epoch(job.state, job.train_loader, job.search, cfg, job.ctx, job.writer, epoch)
        except NonFiniteLossError as err:
            ckpt = job.files.last_checkpoint
            good = str(ckpt) if ckpt.is_file() else "none written yet"
            raise NonFiniteLossError(f"{err}; stopping all ranks; last good checkpoint: {good}") from None
        last = epoch == cfg.train.epochs - 1
        shrunk = False
        if last or (epoch + 1) % cfg.train.eval_every == 0:
            top1, val_loss, shrunk = evaluate_and_shrink(job, epoch, last)
        every = cfg.checkpoint.every_epochs
        if shrunk or (every and (epoch + 1) % every == 0) or last:
            write_checkpoint(job.files.last_checkpoint, job.state, job.search, epoch + 1, job.meta, cfg, job.ctx)
    return top1, val_loss


def write_summary(job: Job, top1: float, val_loss: float, wall_s: float) -> dict:
    """summary.json (rank 0 writes it and the final searched_arch.yaml); returned on every rank."""
    cfg, model, search, data = job.cfg, job.state.model, job.search, job.data
    summary = {"val_top1": top1, "val_loss": val_loss, "params": job.meta["params"], "macs": job.meta["macs"],
               "world_size": job.ctx.world_size, "epochs": cfg.train.epochs, "steps": job.state.step,
               "wall_time_s": round(wall_s, 2)}
    if search:
        summary |= search.summary(model, data.channels, data.image_size)

    def write() -> None:
        if search:
            save_arch_file(export_arch(model), job.files.arch)
        atomic_write_json(job.files.summary, summary)
        job.log.info(f"done: val top1 {top1:.4f}; summary in {job.files.summary}")

    comm.on_rank0(write, f"writing {job.files.summary}")
    return summary


def run(cfg: Config, ctx: comm.DistContext) -> dict:
    """The whole job on this rank: set up -> epochs -> summary (written to summary.json by rank 0)."""
    files = RunFiles(resolve_run_dir(cfg))
    start = decide_start(cfg, files)
    if start.finished_summary is not None:  # a finished run is never overwritten: it is reported as it is
        get_logger(ctx.is_main).info(f"{files.root} holds this run, finished: summary in {files.summary} "
                                     f"(raise train.epochs to train on; checkpoint.resume=never starts afresh)")
        return start.finished_summary
    job = setup(cfg, ctx, start)
    started = time.perf_counter()
    try:
        top1, val_loss = run_epochs(job)
    finally:
        job.writer.close()
        job.state.engine.release()
        if job.search is not None:
            job.search.close()
    if job.resumed and math.isnan(top1):  # resumed after the last epoch had finished: evaluate what we have
        state = job.state
        top1, val_loss = evaluate(state.ema.module if state.ema else state.model, job.val_loader, ctx.device)
    return write_summary(job, top1, val_loss, time.perf_counter() - started)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.train", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    ctx = comm.init_distributed(cfg.dist)
    failed = True
    try:
        run(cfg, ctx)
        failed = False
    finally:
        comm.shutdown(ctx, failed=failed)  # after a failure no barrier: never wait for a rank that is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
