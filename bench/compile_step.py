"""``torch.compile`` on the training step: the speed-up after warm-up, and what each shrink costs in recompiling.

A search changes the network's shapes at every shrink, so a compiled model recompiles then (dynamo's guards
on the parameter shapes fail). Whether compiling pays over a whole search is therefore

    (eager step - compiled step) x steps  versus  first compile + recompile after every shrink,

and this script measures the terms, side by side in one process (rounds interleaved): an eager and a compiled
copy of the same supernet (same seed, same batch, same memory format, SGD), shrunk with the same random masks
``--shrinks`` times. Per phase it reports the first compiled step (compile time, minus an eager step), the
median eager and compiled step after warm-up, the speed-up, and ``break_even_steps`` (steps the speed-up needs
to pay back that phase's compile). Compare the sum against a search's step count (``make search``: 8 epochs of
28 steps per rank, 5-9 shrinks). Also reported: dynamo's count of graphs compiled, and its recompile limit:
after that many recompiles of a frame dynamo runs it eagerly (a phase with compile_s near 0 and speed-up near
1). In training, validation (eval mode) would add its own recompile per shape.

Usage (one thread, as the other benchmarks)::

    python bench/compile_step.py                        # digits supernet, batch 32, 3 shrinks
    python bench/compile_step.py --config configs/hrnas_imagenet.yaml --batch 4 --image-size 224
    python bench/compile_step.py --quick                # a tiny supernet: checks that it runs, figures mean nothing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.models import build_model  # noqa: E402
from dist_hrnas.models.layout import memory_format, set_memory_format_  # noqa: E402
from dist_hrnas.optim import build_optimizer  # noqa: E402
from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model  # noqa: E402
from tests.conftest import TINY_MODEL  # noqa: E402

LR = 0.01


class Runner:
    """One copy of the supernet, trained eagerly or through ``torch.compile``."""

    def __init__(self, cfg, channels_last: bool, backend: str | None):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = set_memory_format_(build_model(cfg.model), channels_last).train()
        self.optimizer = build_optimizer(self.model, cfg.train, LR)
        self.forward = torch.compile(self.model, backend=backend) if backend else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(x), y).backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def shrink(self, masks: dict) -> None:
        """Surgery as a search does it, with the optimizer rebuilt around the new parameters (state carried)."""
        old_params = dict(self.model.named_parameters())
        result = shrink_model(self.model, masks)
        new = build_optimizer(self.model, self.cfg.train, LR)
        carry_optimizer_state(self.optimizer, old_params, new, self.model, result)
        self.optimizer = new


def random_masks(model, gen: torch.Generator, keep: float) -> dict:
    return {name: [torch.rand(w, generator=gen) < keep for w in block.widths] for name, block in model.named_blocks()}


def phase(eager: Runner, compiled: Runner, x, y, steps: int) -> dict:
    """The first compiled step (it compiles), then ``steps`` steps of each, interleaved; medians."""
    first_eager = eager.step(x, y)
    first_compiled = compiled.step(x, y)
    eager.step(x, y)
    compiled.step(x, y)                                                # warm-up: allocator, autotuning caches
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(eager.step(x, y))
        times["compiled"].append(compiled.step(x, y))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    compile_s = max(0.0, first_compiled - first_eager)
    return {"compile_s": round(compile_s, 3), "eager_step_s": round(e, 5), "compiled_step_s": round(c, 5),
            "speedup": round(e / c, 3), "break_even_steps": round(compile_s / (e - c)) if e > c else None,
            "params": sum(p.numel() for p in eager.model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=0, help="0 = the config's data.image_size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase and variant")
    parser.add_argument("--shrinks", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.8, help="share of channels each shrink keeps")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--default-format", action="store_true", help="train in NCHW instead of channels_last")
    parser.add_argument("--quick", action="store_true", help="tiny supernet, 2 steps, 1 shrink: checks it runs")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [*TINY_MODEL, "data.image_size=16"] if args.quick else []
    steps, shrinks, batch = (2, 1, 4) if args.quick else (args.steps, args.shrinks, args.batch)
    cfg = load_config(args.config, [*overrides, "train.optimizer=sgd", "model.dropout=0.0"])
    size = args.image_size or cfg.data.image_size
    channels_last = not args.default_format
    eager, compiled = Runner(cfg, channels_last, None), Runner(cfg, channels_last, args.backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.model.image_channels, size, size, generator=gen).contiguous(
        memory_format=memory_format(channels_last))
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=gen)
    started = time.perf_counter()
    result = {"config": Path(args.config).name, "batch": batch, "image_size": size, "threads": 1,
              "channels_last": channels_last, "backend": args.backend, "torch": torch.__version__,
              "quick": args.quick, "shrinks": shrinks, "phases": []}
    for i in range(shrinks + 1):
        if i:
            masks = random_masks(eager.model, gen, args.keep)
            eager.shrink(masks)
            compiled.shrink(masks)
        result["phases"].append(phase(eager, compiled, x, y, steps))
        # written after every phase: on this CPU one compile may take minutes, and a run stopped by a time
        # limit still leaves the phases it finished
        report(result, time.perf_counter() - started, args.out, done=i == shrinks)


def report(result: dict, wall_s: float, out: str, done: bool) -> None:
    """Totals so far into ``result``; the JSON to ``out`` (every phase) and to stdout (at the end)."""
    result |= {"complete": done, "wall_s": round(wall_s, 1),
               "total_compile_s": round(sum(p["compile_s"] for p in result["phases"]), 3),
               "dynamo_unique_graphs": torch._dynamo.utils.counters["stats"].get("unique_graphs", 0),
               "recompile_limit": getattr(torch._dynamo.config, "recompile_limit",
                                          getattr(torch._dynamo.config, "cache_size_limit", None))}
    text = json.dumps(result, indent=2)
    if out:
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    print(text if done else f"phase {len(result['phases'])} done after {wall_s:.0f} s", flush=True)

if __name__ == "__main__":
    main()
