"""The in-process parts of ``bench/gpu_check.py``, each run by it as a worker subprocess (so a crash or a hang
is one failed step, not the end of the check):

- :func:`predict_networks`: predicted vs measured end-to-end latency of the ImageNet supernet and 4 shrunk
  networks, from the LUT the profile CLI just built;
- :func:`throughput`: training throughput of the ImageNet supernet on synthetic data (bf16 on CUDA) without and
  with the search penalty, and the time of one shrink, in the engine and process group of a real run.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.latency_accuracy import random_shrink
from dist_hrnas.config import Config, load_config
from dist_hrnas.latency import make_timer, measure_network, profile_on_rank0
from dist_hrnas.metrics import NullWriter
from dist_hrnas.models import build_model, count_params, export_arch, model_from_arch
from dist_hrnas.parallel import comm
from dist_hrnas.parallel.rewrap import TrainState, build_state, rewrap
from dist_hrnas.search import Search
from dist_hrnas.search.masks import broadcast_masks
from dist_hrnas.search.shrink import check_same_on_all_ranks
from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model
from dist_hrnas.train import train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "configs" / "hrnas_imagenet.yaml"
SHARES = (0.8, 0.6, 0.4, 0.2)  # channels kept by the 4 shrunk networks (aligned to latency.width_step)


def predict_networks(device: str, lut: str, overrides: list[str]) -> list[dict]:
    """The supernet and 4 random shrinks: predicted (curves from ``lut``, calibrated on the supernet as a search
    does) vs measured end to end. The supernet's row is a second measurement: its error is repeat noise."""
    cfg = load_config(IMAGENET, [f"latency.device={device}", f"latency.lut={lut}", *overrides])
    model, size = build_model(cfg.model), cfg.data.image_size
    timer = make_timer(cfg.latency)
    profile = profile_on_rank0(model, size, cfg.latency, timer)  # every op from the LUT; the supernet timed here
    rng = random.Random(0)
    rows = []
    for share in (1.0, *SHARES):
        shrunk = model if share == 1.0 else random_shrink(build_model(cfg.model), rng, share, cfg.latency.width_step)
        net = model_from_arch(export_arch(shrunk))   # what searched_arch.yaml would build
        predicted, measured = profile.predict_s(net), measure_network(net, size, cfg.latency, timer)
        rows.append({"network": "supernet" if share == 1.0 else f"shrunk_keep_{share}",
                     "channels": sum(sum(b.widths) for _, b in net.named_blocks()),
                     "predicted_ms": round(predicted * 1e3, 4), "measured_ms": round(measured * 1e3, 4),
                     "error_pct": round(100 * (predicted - measured) / measured, 2)})
    return rows


def _sync(ctx: comm.DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def _step_s(state: TrainState, batch: tuple, n: int, search: Search | None, cfg: Config, ctx: comm.DistContext,
            epoch: int) -> float:
    """Seconds per step of ``n`` steps of the real training loop on one device-resident batch."""
    comm.barrier()
    _sync(ctx)
    start = time.perf_counter()
    train_one_epoch(state, [batch] * n, search, cfg, ctx, NullWriter(), epoch)
    _sync(ctx)
    return (time.perf_counter() - start) / n


def _one_shrink(state: TrainState, cfg: Config, ctx: comm.DistContext) -> dict:
    """One shrink (30 % of every branch's channels), phase by phase, as ``search/shrink.py`` runs it."""
    model = state.model
    gen = torch.Generator().manual_seed(ctx.rank)            # ranks propose different masks; rank 0's win
    masks = {name: [torch.rand(w, generator=gen) > 0.3 for w in block.widths] for name, block in model.named_blocks()}
    phases, params_before = {}, count_params(model)
    comm.barrier()
    _sync(ctx)
    start = time.perf_counter()

    def mark(name: str) -> None:
        _sync(ctx)
        phases[name] = round(time.perf_counter() - start - sum(phases.values()), 4)

    masks = broadcast_masks(model, masks)
    mark("broadcast_masks_s")
    old_params = dict(model.named_parameters())
    result = shrink_model(model, masks)
    mark("surgery_s")
    check_same_on_all_ranks(model, state.step)
    mark("hash_check_s")
    rewrap(state, cfg, ctx, lambda old, new: carry_optimizer_state(old, old_params, new, model, result))
    mark("rebuild_s")
    return {"shrink_s": round(sum(phases.values()), 4), **phases, "params_before": params_before,
            "params_after": count_params(model)}


def throughput(device: str, lut: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Run under torchrun: the process group and engine of a real run (``dist.always_group``)."""
    cfg = load_config(IMAGENET, ["data.name=synthetic", "data.synthetic_classes=1000", "train.bf16=true",
                                 "train.ema_decay=0", "prune.penalty=seconds", "dist.always_group=true",
                                 "log.progress=false", "log.tensorboard=false", f"latency.device={device}",
                                 "latency.batch_size=1", *([f"latency.lut={lut}"] if lut else []), *overrides])
    ctx = comm.init_distributed(cfg.dist)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _throughput(cfg, ctx, steps, warmup, Path(tmp))
    finally:
        comm.shutdown(ctx)


def _throughput(cfg: Config, ctx: comm.DistContext, steps: int, warmup: int, run_dir: Path) -> dict:
    size, batch = cfg.data.image_size, cfg.train.batch_size_per_rank
    torch.manual_seed(0)
    model = build_model(cfg.model).to(ctx.device)
    started = time.perf_counter()
    search = Search(cfg, model, size, run_dir)                # the penalty's latency profile (batch 1)
    profile_s = time.perf_counter() - started
    state = build_state(cfg, ctx, model, cfg.train.lr, steps, None)
    data = (torch.randn(batch, cfg.model.image_channels, size, size, device=ctx.device),
            torch.randint(0, cfg.model.num_classes, (batch,), device=ctx.device))
    for epoch, with_search in enumerate((search, None)):     # warm-up: allocator, cuDNN plans, both loss paths
        _step_s(state, data, warmup, with_search, cfg, ctx, epoch)
    # interleaved halves, so a clock or thermal drift does not land on one side only
    plain, searching = [], []
    for r in range(2):
        plain.append(_step_s(state, data, max(1, steps // 2), None, cfg, ctx, 2 + 2 * r))
        searching.append(_step_s(state, data, max(1, steps // 2), search, cfg, ctx, 3 + 2 * r))
    plain_s, search_s = statistics.mean(plain), statistics.mean(searching)
    shrink = _one_shrink(state, cfg, ctx)
    after_s = _step_s(state, data, warmup, None, cfg, ctx, 6)  # the shrunk network trains in its new engine
    state.engine.release()
    return {"engine": type(state.engine).__name__, "backend": ctx.backend, "world_size": ctx.world_size,
            "device": str(ctx.device), "bf16": cfg.train.bf16 and ctx.device.type == "cuda", "image_size": size,
            "batch_per_rank": batch, "steps": 2 * max(1, steps // 2), "warmup_steps": warmup,
            "latency_profile_s": round(profile_s, 2), "step_s_plain": round(plain_s, 5),
            "step_s_search": round(search_s, 5), "samples_per_s_plain": round(batch * ctx.world_size / plain_s, 2),
            "samples_per_s_search": round(batch * ctx.world_size / search_s, 2),
            "search_overhead_ratio": round(search_s / plain_s, 4), "shrink": shrink,
            "step_s_after_shrink_incl_warmup": round(after_s, 5)}
