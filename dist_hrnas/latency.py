"""Latency on the target device: per kernel branch, end to end, and the per-channel cost the search uses.

Only global rank 0 measures (so no other rank disturbs the timing); the others wait at a barrier and
receive the figures as one broadcast tensor (:func:`profile_on_rank0`).
"""
from __future__ import annotations

import copy
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from dist_hrnas import distributed
from dist_hrnas.config import LatencyConfig
from dist_hrnas.errors import UserError
from dist_hrnas.models import AtomicBlock, HRNet


def branch_key(block_name: str, kernel: int) -> str:
    """Stable name of a kernel branch: kernel sizes are unique inside a block, indices shift on removal."""
    return f"{block_name}:k{kernel}"


def target_device(cfg: LatencyConfig) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"latency.device={cfg.device} but CUDA is not available here: use latency.device=cpu "
                            f"or profile on the target machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"latency.device={cfg.device} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Fix the intra-op thread count while timing, so numbers are comparable run to run."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Timing:
    median_s: float
    spread_s: float  # (max - min) of the timed runs


class Timer:
    """Times a callable: ``warmup`` untimed calls, then the median of ``repeats`` timed calls."""

    def __init__(self, device: torch.device, warmup: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.device, self.warmup, self.repeats, self.clock = device, warmup, repeats, clock
        self.calls = 0  # how many callables were timed (tests assert who measured)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        self.calls += 1
        for _ in range(self.warmup):
            fn()
        self._sync()
        samples = []
        for _ in range(self.repeats):
            start = self.clock()
            fn()
            self._sync()
            samples.append(self.clock() - start)
        return Timing(statistics.median(samples), max(samples) - min(samples))


def make_timer(cfg: LatencyConfig) -> Timer:
    return Timer(target_device(cfg), cfg.warmup, cfg.repeats)


@torch.no_grad()
def block_input_shapes(model: HRNet, image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) entering each atomic block, from one forward pass at the training resolution."""
    shapes: dict[str, tuple[int, int, int]] = {}
    hooks = [block.register_forward_pre_hook(
        lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
        for name, block in model.named_blocks()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, model.spec.image_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def op_signature(block: AtomicBlock, branch_index: int, in_shape: tuple[int, int, int]) -> tuple:
    """What decides a branch's latency; identical ops anywhere in the network share one measurement."""
    branch = block.branches[branch_index]
    return (block.in_channels, block.out_channels, branch.hidden, branch.kernel, block.stride,
            in_shape[1], in_shape[2], branch.expand)


@dataclass
class LatencyProfile:
    """Measured seconds of the network and of each kernel branch, and the per-channel costs derived."""

    network_s: float                                   # end to end, at the widths it was measured at
    branch_s: dict[str, float]                         # per branch key, at ``branch_width``
    branch_width: dict[str, int]
    fixed_s: float = field(init=False)                 # stem, fuse sums/upsampling, head conv, classifier

    def __post_init__(self) -> None:
        self.fixed_s = max(0.0, self.network_s - sum(self.branch_s.values()))

    def per_channel_s(self, key: str) -> float:
        """Average cost of one channel of a branch (seconds / width)."""
        return self.branch_s[key] / self.branch_width[key]

    def predict_s(self, model: HRNet) -> float:
        """Predicted end-to-end seconds of ``model`` (possibly shrunk) from the per-channel costs."""
        total = self.fixed_s
        for name, block in model.named_blocks():
            for branch in block.branches:
                key = branch_key(name, branch.kernel)
                total += self.per_channel_s(key) * branch.hidden
        return total

    def to_tensor(self, keys: list[str]) -> torch.Tensor:
        return torch.tensor([self.network_s] + [self.branch_s[k] for k in keys], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, keys: list[str], widths: dict[str, int]) -> "LatencyProfile":
        values = t.tolist()
        return cls(values[0], dict(zip(keys, values[1:])), {k: widths[k] for k in keys})


def _latency_copy(model: HRNet, device: torch.device) -> HRNet:
    return copy.deepcopy(model).to(device).eval()


@torch.no_grad()
def measure_branches(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer) -> dict[str, float]:
    """Forward seconds of every kernel branch at its current width (each distinct op timed once)."""
    device = timer.device
    shapes = block_input_shapes(model, image_size)
    net = _latency_copy(model, device)
    cache: dict[tuple, float] = {}
    out: dict[str, float] = {}
    with cpu_threads(cfg.threads):
        for name, block in net.named_blocks():
            c, h, w = shapes[name]
            x = torch.randn(cfg.batch_size, c, h, w, device=device)
            for i, branch in enumerate(block.branches):
                sig = op_signature(block, i, shapes[name])
                if sig not in cache:
                    cache[sig] = timer(lambda: branch(x)).median_s
                out[branch_key(name, branch.kernel)] = cache[sig]
    return out


@torch.no_grad()
def measure_network(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer) -> float:
    """End-to-end forward seconds of ``model`` at ``latency.batch_size`` on the target device."""
    net = _latency_copy(model, timer.device)
    x = torch.randn(cfg.batch_size, model.spec.image_channels, image_size, image_size, device=timer.device)
    with cpu_threads(cfg.threads):
        return timer(lambda: net(x)).median_s


def branch_widths(model: HRNet) -> dict[str, int]:
    return {branch_key(name, b.kernel): b.hidden for name, block in model.named_blocks() for b in block.branches}


def profile_on_rank0(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer | None = None) -> LatencyProfile:
    """Rank 0 measures the network and its branches; every rank returns the same profile.

    The other ranks wait at a barrier while rank 0 times, so they do not compete for the device.
    Works without a process group (single process) as well.
    """
    widths = branch_widths(model)
    keys = list(widths)
    ctx_rank0 = not distributed.is_initialized() or distributed.rank() == 0
    if ctx_rank0:
        timer = timer or make_timer(cfg)
        branch_s = measure_branches(model, image_size, cfg, timer)
        packed = LatencyProfile(measure_network(model, image_size, cfg, timer), branch_s, widths).to_tensor(keys)
    else:
        packed = torch.zeros(len(keys) + 1, dtype=torch.float64)
    distributed.barrier()
    distributed.broadcast_(packed, src=0)
    return LatencyProfile.from_tensor(packed, keys, widths)


def measure_network_on_rank0(model: nn.Module, image_size: int, cfg: LatencyConfig,
                             timer: Timer | None = None) -> float:
    """End-to-end seconds measured by rank 0 and broadcast to all ranks."""
    packed = torch.zeros(1, dtype=torch.float64)
    if not distributed.is_initialized() or distributed.rank() == 0:
        packed[0] = measure_network(model, image_size, cfg, timer or make_timer(cfg))
    distributed.barrier()
    return distributed.broadcast_(packed, src=0).item()
