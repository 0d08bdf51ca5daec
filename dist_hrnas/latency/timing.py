"""How to time on the target device: the timer, its hygiene (warm-up, median, thread count, allocator),
and the refusing timer of a run whose target is another machine. What to time lives in :mod:`dist_hrnas.latency`.
"""
from __future__ import annotations

import ctypes
import dataclasses
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from dist_hrnas.config import LatencyConfig
from dist_hrnas.errors import UserError
from dist_hrnas.models.fold import fold_bn
from dist_hrnas.models.layout import memory_format, to_format


def target_device(cfg: LatencyConfig) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"latency.device={cfg.device} but CUDA is not available here: use latency.device=cpu "
                            f"or profile on the target machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"latency.device={cfg.device} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def runner(module: nn.Module, x: torch.Tensor, cfg: LatencyConfig, device: torch.device) -> Callable[[], object]:
    """``module`` on ``x`` as the target runs it (``latency.form``, ``latency.backend``, memory format): what
    every op, join and network timing calls."""
    if cfg.form == "deployed":  # time what is deployed: every BN folded into its conv, as the export writes it
        module = fold_bn(module)
    if cfg.backend == "onnxruntime":
        from dist_hrnas.latency.onnx_backend import onnx_callable  # optional dependency, imported only when chosen
        return onnx_callable(module, x, cfg.threads, device)
    # the format the network runs in (latency.channels_last): the one place ops, joins and networks get it
    fmt = memory_format(cfg.timed_channels_last)
    module, x = module.to(device, memory_format=fmt).eval(), to_format(x, fmt)
    return lambda: module(x)


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


def steady_cpu_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process (once); returns whether they are fixed.

    By default glibc serves big blocks (activations of a batch) with fresh mmap()s until a large free raises
    its threshold, so the same forward pass ran up to 1.7x slower early in a process (page faults on every
    call) than after a training step: timings depended on what the process had done before, not on the
    network. With fixed thresholds blocks up to 32 MiB come from the heap and freed memory stays there.
    """
    global _ALLOCATOR_FIXED
    if _ALLOCATOR_FIXED is None:
        _ALLOCATOR_FIXED = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _ALLOCATOR_FIXED = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and
                                    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to fix
                pass
    return _ALLOCATOR_FIXED


_ALLOCATOR_FIXED: bool | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


class Timer:
    """Times a callable: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    With ``flush_mb`` > 0, that much memory is written (untimed) before every call of a single op: an op run
    over and over on its own keeps its weights and input in the cache, which it never has inside a network
    (the ops between two of its calls evict them), so warm-cache op timings summed short of the network.
    Whole networks (``Timed(..., "network")``) are their own context and are timed without it.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter, flush_mb: float = 0.0):
        self.device, self.warmup, self.repeats, self.clock = device, warmup, repeats, clock
        if device.type == "cpu":
            steady_cpu_allocator()
        # float32 elements of the eviction buffer, allocated on first use (a timer that only times networks
        # never needs it)
        self.flush_numel = int(flush_mb * (1 << 20)) // 4
        self._flush_buffer: torch.Tensor | None = None
        self.calls = 0  # how many callables were timed (tests assert who measured)
        self.counts: dict[str, int] = {}  # per kind of callable (op, fixed, network; see Timed)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _evict(self) -> None:
        """Write the eviction buffer (cache lines of whatever ran before now hold it, not the op's data)."""
        if self._flush_buffer is None:
            self._flush_buffer = torch.zeros(self.flush_numel, device=self.device)
        self._flush_buffer.add_(1.0)
        self._sync()

    def __call__(self, fn: Callable[[], object], repeats: int | None = None) -> Timing:
        """Time ``fn``; ``repeats`` overrides the timer's count for this call."""
        self.calls += 1
        what = getattr(fn, "what", "")
        self.counts[what] = self.counts.get(what, 0) + 1
        evict = self._evict if self.flush_numel > 0 and what != "network" else None
        for _ in range(self.warmup):
            if evict:
                evict()
            fn()
        self._sync()
        samples = []
        for _ in range(repeats or self.repeats):
            if evict:
                evict()
            start = self.clock()
            fn()
            self._sync()
            samples.append(self.clock() - start)
        return Timing(statistics.median(samples), max(samples) - min(samples))


class NoTiming(Timer):
    """The timer of a run whose target is another machine (``latency.lut_device``): every figure must come from
    the LUT, so being asked to time something means the LUT lacks it."""

    def __init__(self, cfg: LatencyConfig):
        super().__init__(target_device(cfg), 0, 1)
        self.cfg = cfg

    def __call__(self, fn: Callable[[], object], repeats: int | None = None) -> Timing:
        what = {"op": "a kernel branch", "fixed": "the fixed part", "join": "a block join",
                "network": "the whole network"}.get(getattr(fn, "what", ""), "an op")
        raise UserError(f"latency.lut_device={self.cfg.lut_device}: latency LUT {self.cfg.lut} has no timing of "
                        f"{what} of this network; run python -m dist_hrnas.profile with this config on that device "
                        f"(same latency.* settings) to complete it")


def make_timer(cfg: LatencyConfig) -> Timer:
    """The timer for ``latency.device``, or one that refuses to time when the target is another machine."""
    if cfg.lut_device:
        return NoTiming(cfg)
    return Timer(target_device(cfg), cfg.warmup, cfg.repeats, flush_mb=cfg.flush_cache_mb)



# A shrink's candidate is timed against the network now in fresh processes, whose first forward pass runs ~30 %
# slow (oneDNN creates its kernels) and whose second already runs at speed here: two untimed runs suffice.
CANDIDATE_WARMUP = 2


def candidate_settings(cfg: LatencyConfig) -> LatencyConfig:
    """The settings a shrink's candidate comparison is timed with: ``latency.candidate_repeats`` runs per round
    after at most CANDIDATE_WARMUP untimed ones (the comparison is a ratio taken in the same rounds)."""
    return dataclasses.replace(cfg, network_repeats=cfg.candidate_repeats, warmup=min(cfg.warmup, CANDIDATE_WARMUP))


class Timed:
    """A callable to time, labelled so tests (and fake timers) can tell ops from whole networks."""

    def __init__(self, fn: Callable[[], object], what: str, width: int = 0):
        self.fn, self.what, self.width = fn, what, width

    def __call__(self) -> object:
        return self.fn()
