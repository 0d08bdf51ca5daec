"""What the search machinery costs, measured side by side on this machine. Prints one JSON object and writes it
to ``bench/results/overhead.json``.

(a) ``search_step_ratio``: step time of search training (latency-weighted L1 term + its logging) over plain
    training of the same digits supernet, same data, rounds interleaved. Target <= 1.05.
(b) ``shrink_s``: one shrink of the ImageNet supernet on CPU, 2 gloo ranks: mask broadcast + surgery +
    cross-rank hash check + optimizer rebuild with sliced state + a new DDP (and DeepSpeed ZeRO-2) engine.
    Target <= 2 s.
(c) ``two_rank_speedup``: plain training throughput of 2 gloo ranks over 1 rank (one thread per process,
    same per-rank batch). Target >= 1.6.
(d) ``memory_format``: the same step in both memory formats, side by side in one process, rounds interleaved:
    a training step (forward, backward, SGD) of the ImageNet supernet at batch 4, 224 px, one thread
    (``train_step_ratio`` = channels_last / default, target <= 0.65), and forward passes (eval, no grad) of
    the digits supernet at batch 32 and 1 and the ImageNet supernet at batch 1 (``inference_ratio``).
(a)-(c) train in the configs' format (``train.channels_last``, default channels_last).
(e) ``candidate_timing_share``: a default digits search (``configs/digits.yaml``, one process): the seconds it
    spent timing candidate networks before its shrinks (summary.json ``candidate_timing_s``) over its wall
    time. Target <= 0.10.

Usage: ``python bench/overhead.py [--rounds N] [--steps N] [--sections a,b,...] [--set KEY=VALUE] [--quick]
[--out FILE]``
(``--quick``: tiny sizes, only to check that it runs end to end; its figures mean nothing)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.parallel.comm import DistContext  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402  (2 gloo ranks, FileStore rendezvous)

DIGITS = ROOT / "configs" / "digits.yaml"
IMAGENET = ROOT / "configs" / "hrnas_imagenet.yaml"
QUIET = ["log.progress=false", "log.tensorboard=false", "latency.warmup=1", "latency.repeats=3"]


def _digits_state(ctx: DistContext, steps: int, overrides: list[str]):
    """Config, loaders and a TrainState for the digits supernet, the way train.run builds them."""
    from dist_hrnas.data import build_datasets, build_loaders
    from dist_hrnas.models import build_model
    from dist_hrnas.models.layout import set_memory_format_
    from dist_hrnas.optim import scaled_lr
    from dist_hrnas.parallel.rewrap import build_state

    cfg = load_config(DIGITS, [*QUIET, f"train.max_steps_per_epoch={steps}", *overrides])
    torch.manual_seed(0)
    data = build_datasets(cfg.data)
    model = set_memory_format_(build_model(cfg.model), cfg.train.channels_last)
    loader, _, sampler = build_loaders(data, cfg.train.batch_size_per_rank, 0, 0, ctx.rank, ctx.world_size,
                                       channels_last=cfg.train.channels_last)
    lr = scaled_lr(cfg.train, cfg.train.batch_size_per_rank * ctx.world_size)
    return cfg, data, loader, build_state(cfg, ctx, model, lr, steps, None)


def _epoch_s(state, loader, search, cfg, ctx, epoch: int) -> float:
    from dist_hrnas.parallel import comm
    from dist_hrnas.metrics import NullWriter
    from dist_hrnas.train import train_one_epoch

    comm.barrier()
    start = time.perf_counter()
    train_one_epoch(state, loader, search, cfg, ctx, NullWriter(), epoch)
    comm.barrier()
    return time.perf_counter() - start


def search_step_ratio(steps: int, rounds: int) -> dict:
    """Interleaved rounds of plain and search epochs on one model; ratio of the median step times."""
    from dist_hrnas.search import Search

    torch.set_num_threads(1)
    ctx = DistContext()
    cfg, data, loader, state = _digits_state(ctx, steps, ["prune.penalty=seconds", "train.log_every=10"])
    with tempfile.TemporaryDirectory() as tmp:
        search = Search(cfg, state.model, data.image_size, Path(tmp))
        _epoch_s(state, loader, None, cfg, ctx, 0)                      # warm-up: allocator, caches
        plain, searching = [], []
        for r in range(rounds):
            plain.append(_epoch_s(state, loader, None, cfg, ctx, 2 * r + 1) / steps)
            searching.append(_epoch_s(state, loader, search, cfg, ctx, 2 * r + 2) / steps)
    return {"plain_step_s": statistics.median(plain), "search_step_s": statistics.median(searching),
            "search_step_ratio": statistics.median(searching) / statistics.median(plain),
            "steps_per_round": steps, "rounds": rounds, "target_max": 1.05}


def _shrink_rank(rank: int, engine: str) -> dict:
    """One shrink of the ImageNet supernet with optimizer state, timed phase by phase on every rank."""
    from dist_hrnas.parallel import comm
    from dist_hrnas.models import build_model
    from dist_hrnas.models.layout import set_memory_format_
    from dist_hrnas.parallel.rewrap import build_state, rewrap
    from dist_hrnas.search.masks import broadcast_masks
    from dist_hrnas.search.shrink import check_same_on_all_ranks
    from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model

    cfg = load_config(IMAGENET, [*QUIET, f"dist.engine={engine}", "dist.deepspeed.zero_stage=2"])
    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    torch.manual_seed(0)
    model = set_memory_format_(build_model(cfg.model), cfg.train.channels_last)
    state = build_state(cfg, ctx, model, 0.1, 100, None)
    x = torch.randn(2, 3, 64, 64)                                      # one real step: optimizer state to carry
    state.engine.backward(state.engine(x).logsumexp(1).mean())
    state.engine.step()
    gen = torch.Generator().manual_seed(rank)                          # ranks propose different masks...
    masks = {name: [torch.rand(w, generator=gen) > 0.3 for w in block.widths] for name, block in model.named_blocks()}
    phases = {}
    comm.barrier()
    start = time.perf_counter()
    masks = broadcast_masks(model, masks)                              # ...rank 0's are applied everywhere
    phases["broadcast_masks_s"] = time.perf_counter() - start
    old_params = dict(model.named_parameters())
    result = shrink_model(model, masks)
    phases["surgery_s"] = time.perf_counter() - start - sum(phases.values())
    check_same_on_all_ranks(model, step=1)
    phases["hash_check_s"] = time.perf_counter() - start - sum(phases.values())
    rewrap(state, cfg, ctx, lambda old, new: carry_optimizer_state(old, old_params, new, model, result))
    phases["rebuild_s"] = time.perf_counter() - start - sum(phases.values())
    comm.barrier()
    phases["shrink_s"] = time.perf_counter() - start
    state.engine.release()
    return phases


def shrink_time() -> dict:
    out = {}
    engines = ["ddp"]
    try:
        import deepspeed  # noqa: F401
        engines.append("deepspeed")
    except ImportError:
        pass
    for engine in engines:
        (s0, r0), (s1, r1) = run_ranks(_shrink_rank, engine)
        if s0 != "ok" or s1 != "ok":
            raise RuntimeError(f"shrink benchmark failed: {r0 if s0 != 'ok' else r1}")
        out[engine if engine == "ddp" else "deepspeed_zero2"] = {k: round(max(r0[k], r1[k]), 4) for k in r0}
    return {"shrink_s": out, "model": "hrnas_imagenet supernet", "target_max_s": 2.0}


def _throughput_rank(rank: int, steps: int, world_size: int) -> float:
    ctx = DistContext(rank=rank, world_size=world_size, backend="gloo" if world_size > 1 else "")
    cfg, _, loader, state = _digits_state(ctx, steps, ["prune.penalty=none"])
    _epoch_s(state, loader, None, cfg, ctx, 0)
    seconds = statistics.median(_epoch_s(state, loader, None, cfg, ctx, e) for e in (1, 2, 3))
    state.engine.release()
    return steps * cfg.train.batch_size_per_rank * world_size / seconds


def scaling(steps: int) -> dict:
    torch.set_num_threads(1)
    one = _throughput_rank(0, steps, 1)
    (s0, r0), (s1, r1) = run_ranks(_throughput_rank, steps, 2)
    if s0 != "ok" or s1 != "ok":
        raise RuntimeError(f"scaling benchmark failed: {r0 if s0 != 'ok' else r1}")
    return {"samples_per_s_1rank": one, "samples_per_s_2ranks": r0, "two_rank_speedup": r0 / one,
            "threads_per_rank": 1, "target_min": 1.6}


FORMATS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def _interleaved(fns: dict[str, object], rounds: int, reps: int) -> dict[str, float]:
    """Median over ``rounds`` of each callable's mean seconds over ``reps`` calls; in every round each callable
    runs once after the other, so drift and interference on the machine hit both formats alike."""
    for fn in fns.values():                                            # warm-up: allocator, oneDNN primitives
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


def _supernet(config: Path, fmt: torch.memory_format, overrides: list[str]):
    from dist_hrnas.models import build_model

    cfg = load_config(config, [*QUIET, *overrides])
    torch.manual_seed(0)                                               # the same weights in both formats
    return cfg, build_model(cfg.model).to(memory_format=fmt)


def _train_step(config: Path, fmt: torch.memory_format, batch: int, size: int):
    """One training step (forward, backward, SGD) of the supernet on a fixed batch in ``fmt``."""
    import torch.nn.functional as F

    from dist_hrnas.optim import build_optimizer

    cfg, model = _supernet(config, fmt, [f"data.image_size={size}", "train.optimizer=sgd"])
    optimizer = build_optimizer(model.train(), cfg.train, 0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.model.image_channels, size, size, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=gen)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def _forward(config: Path, fmt: torch.memory_format, batch: int, size: int):
    cfg, model = _supernet(config, fmt, [])
    model.eval()
    x = torch.randn(batch, cfg.model.image_channels, size, size).contiguous(memory_format=fmt)

    @torch.no_grad()
    def forward() -> None:
        model(x)
    return forward


def memory_format_ratios(rounds: int, quick: bool) -> dict:
    """(d): channels_last / default time of a training step and of forward passes, measured side by side."""
    torch.set_num_threads(1)
    train_batch, train_size, imagenet_size = (2, 64, 64) if quick else (4, 224, 224)
    step_s = _interleaved({name: _train_step(IMAGENET, fmt, train_batch, train_size)
                           for name, fmt in FORMATS.items()}, rounds, 1 if quick else 3)
    out = {"train_step": {"model": "hrnas_imagenet supernet", "batch": train_batch, "image_size": train_size,
                          "optimizer": "sgd", "threads": 1, "rounds": rounds,
                          **{f"{name}_s": round(v, 4) for name, v in step_s.items()},
                          "train_step_ratio": round(step_s["channels_last"] / step_s["default"], 3),
                          "target_max": 0.65}}
    inference = {}
    for label, config, batch, size in (("digits_batch32", DIGITS, 32, 32), ("hrnas_imagenet_batch1", IMAGENET, 1,
                                       imagenet_size), ("digits_batch1", DIGITS, 1, 32)):
        fwd = _interleaved({name: _forward(config, fmt, batch, size) for name, fmt in FORMATS.items()}, rounds,
                           1 if quick else 10)
        inference[label] = {"batch": batch, "image_size": size, **{f"{n}_s": round(v, 5) for n, v in fwd.items()},
                            "inference_ratio": round(fwd["channels_last"] / fwd["default"], 3)}
    return {"memory_format": out | {"inference": inference}}


SECTIONS = ("search_step", "shrink", "scaling", "memory_format", "candidates")


def candidate_timing(work: Path, overrides: list[str]) -> dict:
    """(e): one default digits search (``overrides`` on top), measured shrinks and all; what deciding by
    measurement cost it."""
    import subprocess

    run_dir = work / "digits_search"
    cmd = [sys.executable, "-m", "dist_hrnas.train", "--config", str(DIGITS), "log.progress=false",
           "checkpoint.resume=never", *overrides, f"log.run_dir={run_dir}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"candidate_timing_s": summary["candidate_timing_s"], "candidate_networks_timed":
            summary["candidate_networks_timed"], "candidate_comparisons": summary["candidate_comparisons"],
            "shrinks": summary["shrinks"], "digits_search_wall_s": summary["wall_time_s"],
            "candidate_timing_share": round(summary["candidate_timing_s"] / summary["wall_time_s"], 3),
            "candidate_timing_target_max": 0.10, "overrides": overrides,
            "shrinks_deferred": _deferred(run_dir)}


def _deferred(run_dir: Path) -> int:
    """Evaluations whose shrink waited for its timing share (prune/shrink_refused = 5)."""
    from dist_hrnas.metrics import read_scalars
    from dist_hrnas.names import Tags
    from dist_hrnas.search.decide import DEFERRED_MEASURE_SHARE

    refused = read_scalars(run_dir / "tb").get(Tags.SHRINK_REFUSED, [])
    return sum(1 for _, code in refused if code == DEFERRED_MEASURE_SHARE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for (e)'s search, e.g. prune.measure_share=1 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, figures mean nothing")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    args = parser.parse_args()
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()}, "quick": args.quick}
    if "search_step" in sections:
        result |= search_step_ratio(steps, rounds)
    if "shrink" in sections:
        result |= shrink_time()
    if "scaling" in sections:
        result |= scaling(steps)
    if "memory_format" in sections:
        result |= memory_format_ratios(rounds, args.quick)
    if "candidates" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            result |= candidate_timing(Path(tmp), args.set)
    from dist_hrnas.fileio import atomic_write_json

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
