"""Whole networks on the target device: timed end to end (in clean processes when a network timer is given),
compared in interleaved rounds, and the calibration networks that fit the per-op sum to them (what the per-op
sum misses, :mod:`dist_hrnas.latency.calibration`). Per-op timing is :mod:`dist_hrnas.latency.measure`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import warnings
from typing import Callable

import torch
from torch import nn

from dist_hrnas.parallel import comm
from dist_hrnas.config import LatencyConfig
from dist_hrnas.latency.calibration import Calibration, sample_arch_widths
from dist_hrnas.latency.curve import LatencyProfile, branch_key
from dist_hrnas.latency.lut import LatencyTable
from dist_hrnas.latency.rounds import NETWORK_ROUNDS, RETAKES, Figures, interleaved, settled
from dist_hrnas.latency.timing import Timed, Timer, cpu_threads, make_timer, runner
from dist_hrnas.models import HRNet, as_network, export_arch, model_from_arch

# Times a whole network's architecture end to end (clean_timing.CleanProcessTimer: in a fresh process)
NetworkTimer = Callable[[HRNet], float]


def compare_networks(models: list[HRNet | dict], image_size: int, cfg: LatencyConfig, timer: Timer,
                     network_timer: NetworkTimer | None = None, rounds: int = NETWORK_ROUNDS,
                     retakes: int = RETAKES, decided: Callable[[Figures, int], bool] | None = None) -> Figures:
    """:func:`interleaved` figures of ``models`` (networks, or their architectures: export_arch's dicts): in clean
    processes when ``network_timer`` can (architectures are all they need), else here."""
    if network_timer is not None and hasattr(network_timer, "compare"):
        return network_timer.compare(models, rounds, retakes, cfg, decided)
    return interleaved([network_round(as_network(m), image_size, cfg, timer) for m in models], cfg, rounds, retakes,
                       decided)


def network_round(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                  own: bool = False) -> Callable[[], float]:
    """One round of timing ``model`` end to end: the median of ``latency.network_repeats`` forward passes.
    ``own``: the round may use ``model`` itself (a clean process's child built it for this alone), else a copy."""
    net = model if own else copy.deepcopy(model)
    x = torch.randn(cfg.batch_size, model.spec.image_channels, image_size, image_size, device=timer.device)
    run = Timed(runner(net, x, cfg, timer.device), "network")

    @torch.no_grad()
    def take() -> float:
        with cpu_threads(cfg.threads):
            return timer(run, repeats=cfg.network_repeats).median_s
    return take


def measure_network(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer) -> float:
    """End-to-end forward seconds of ``model`` at ``latency.batch_size`` on the target device (in this process)."""
    return settled(network_round(model, image_size, cfg, timer), cfg)[0]


def _time_network(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                  network_timer: NetworkTimer | None) -> float:
    """End-to-end seconds by ``network_timer`` (e.g. in a clean process) when given, else in this process."""
    return network_timer(model) if network_timer is not None else measure_network(model, image_size, cfg, timer)


def network_key(model: HRNet, image_size: int) -> str:
    """LUT signature of one whole network (its exact architecture and resolution)."""
    arch = json.dumps({"arch": export_arch(model), "image_size": image_size}, sort_keys=True)
    return "network_" + hashlib.sha256(arch.encode()).hexdigest()[:16]


def network_on_target(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                      table: LatencyTable, network_timer: NetworkTimer | None = None) -> float:
    """The whole network's seconds on the target: timed here (by ``network_timer`` when given, e.g. in a clean
    process), or with ``latency.lut_device`` read from ``table``. :func:`calibrate`, which settles the supernet's
    figure, keeps it in the LUT."""
    key = network_key(model, image_size)
    if cfg.lut_device and table.get(key) is not None:
        return table.get(key)["median_s"]
    # with lut_device nothing may be timed here: NoTiming explains what the LUT lacks
    return _time_network(model, image_size, cfg, timer, None if cfg.lut_device else network_timer)


def arch_with_widths(arch: dict, widths: dict[str, list[int]]) -> dict:
    """``arch`` with each block's branch widths replaced (a width of 0 removes that branch)."""
    arch = copy.deepcopy(arch)
    for entry in arch["blocks"]:
        new = widths.get(entry["name"], entry["widths"])
        entry["kernel_sizes"] = [k for k, w in zip(entry["kernel_sizes"], new) if w > 0]
        entry["widths"] = [w for w in new if w > 0]
    return arch


# Calibration networks are timed in groups of this many, the supernet in every group's rounds. A LUT build takes
# minutes and this machine's speed moves within them (spells of 1.4-1.9x here), so each sample counts as its ratio
# to the supernet timed beside it, times the supernet's median over all groups: the fit then sees every sample at
# one machine speed, and no single supernet figure sets the level. (One supernet per 4 samples: +25 % figures.)
CALIBRATION_GROUP = 4
# When the LUT already holds the calibration networks (a later run on this machine), this many of them, spread from
# the largest to the smallest, are timed again beside the supernet, in groups of LEVEL_GROUP. Without them such a
# run rested on one supernet figure: a 0.5 budget took its target from a figure read 83.5 ms that re-timed at
# 62.2 ms (benchmark run M), and the LUT's samples, timed in another hour at another machine speed, sat beside
# that figure in one fit. Two groups give three supernet figures, whose median outvotes one disturbed figure, and
# four ratios that put the LUT's samples at this run's machine speed; they cost six network figures at the start.
LEVEL_CHECKS, LEVEL_GROUP = 4, 2
# The supernet's figures at the start (the one before the calibration groups and one per group) further apart than
# this, slowest over fastest, say the machine is busy: a user is warned that every figure the search decides on is
# about that noisy. On the 2-core development VM they spread 2-11 % in steady hours (benchmark runs V-X) and 40 %
# in a busy one (run Y: 39.2-54.8 ms, its re-timing passes 11 % apart at the median, up to 86 %).
BUSY_SPREAD = 0.15


class BusyDeviceWarning(UserWarning):
    """The supernet's figures at the start disagree beyond BUSY_SPREAD: the machine is busy or shared."""


def spread_picks(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, spread evenly from the first to the last (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def referenced_figures(models: list[HRNet], supernet: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                       network_timer: NetworkTimer | None,
                       group: int = CALIBRATION_GROUP) -> tuple[list[float], list[float]]:
    """(each of ``models``' seconds over ``supernet``'s, timed in the same rounds; ``supernet``'s figure in each
    group of ``group`` models)."""
    ratios, supernet_s = [], []
    for start in range(0, len(models), group):
        figures = compare_networks([supernet, *models[start:start + group]], image_size, cfg, timer, network_timer)
        supernet_s.append(figures[0][0])
        ratios += [seconds / figures[0][0] for seconds, _ in figures[1:]]
    return ratios, supernet_s


def calibration_networks(model: HRNet, profile: LatencyProfile, cfg: LatencyConfig) -> list[HRNet]:
    """The ``latency.calibration_networks`` sampled sub-networks of ``model`` (:func:`sample_arch_widths`), every
    other one on each branch's channel grid as its curve gives it (``profile.grid``: the widths
    ``prune.round_to: auto`` keeps a search on; before, on ``latency.width_step``, which no default search visits)."""
    arch = export_arch(model)
    grids = {b["name"]: [profile.grid(branch_key(b["name"], k)) for k in b["kernel_sizes"]] for b in arch["blocks"]}
    samples = sample_arch_widths({b["name"]: b["widths"] for b in arch["blocks"]}, cfg.calibration_networks, grids)
    return [model_from_arch(arch_with_widths(arch, widths)) for widths in samples]


def calibrate(profile: LatencyProfile, model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
              table: LatencyTable, network_timer: NetworkTimer | None) -> Calibration:
    """The supernet and ``latency.calibration_networks`` sampled sub-networks, measured end to end against the
    supernet in the same rounds (:func:`referenced_figures`), and the calibration fitted to them. Samples the LUT
    holds (under their own network keys) are read, and LEVEL_CHECKS of them timed again beside the supernet: their
    ratios now against their LUT figures say at what supernet figure the LUT was timed (its level), and every
    LUT figure enters the fit scaled from that level to this run's. The supernet's figure (``profile.network_s``)
    becomes the median of its own figures (the one taken before and one per group). The LUT keeps every figure
    at its level, so that all its samples stay comparable. With ``latency.lut_device`` only the samples the
    device's LUT holds are used, as they are."""
    nets = calibration_networks(model, profile, cfg)
    cached = [table.get(network_key(net, image_size)) for net in nets]
    fresh = [] if cfg.lut_device else [i for i, hit in enumerate(cached) if hit is None]
    held = [] if cfg.lut_device else [i for i, hit in enumerate(cached) if hit is not None]
    check = [held[j] for j in spread_picks(len(held), LEVEL_CHECKS)]
    ratios, supernet_s = referenced_figures([nets[i] for i in fresh], model, image_size, cfg, timer, network_timer)
    check_ratios, check_s = referenced_figures([nets[i] for i in check], model, image_size, cfg, timer,
                                               network_timer, LEVEL_GROUP)
    ratio_of = dict(zip(fresh + check, ratios + check_ratios))  # sample index -> its seconds over the supernet's
    if ratio_of:
        starts = [profile.network_s, *supernet_s, *check_s]  # the supernet's figures at the start
        warn_if_busy(starts, cfg)
        profile.network_s = statistics.median(starts)
        profile.calibrated(model)
    level_s = (statistics.median(cached[i]["median_s"] / ratio_of[i] for i in check) if check
               else profile.network_s)  # the supernet's figure at the machine speed of the LUT's samples
    if not cfg.lut_device:
        table.put(network_key(model, image_size), level_s, 0.0)
    calibration = Calibration()
    calibration.add(profile.parts(model), profile.network_s, "supernet")
    for i, (net, hit) in enumerate(zip(nets, cached)):
        if i in ratio_of:  # timed now, beside the supernet
            seconds = ratio_of[i] * profile.network_s
            if hit is None:
                table.put(network_key(net, image_size), ratio_of[i] * level_s, 0.0)
        elif hit is not None:
            seconds = hit["median_s"] * profile.network_s / level_s
        else:  # with latency.lut_device: a sample the device's LUT lacks
            continue
        calibration.add(profile.parts(net), seconds, "sample")
    calibration.fit()
    if not cfg.lut_device:  # a device's LUT keeps the device's own fit
        table.put_calibration(network_key(model, image_size), calibration.state_dict())
    table.save()
    return calibration


def warn_if_busy(supernet_s: list[float], cfg: LatencyConfig) -> None:
    """Warn (rank 0 times these) when the supernet's figures at the start spread beyond BUSY_SPREAD."""
    spread = max(supernet_s) / min(supernet_s) - 1.0 if min(supernet_s) > 0 else 0.0
    if spread > BUSY_SPREAD:
        warnings.warn(f"latency: the supernet's {len(supernet_s)} end-to-end figures at the start spread "
                      f"{100 * spread:.0f} % ({1e3 * min(supernet_s):.3f}-{1e3 * max(supernet_s):.3f} ms on "
                      f"{cfg.device} at batch {cfg.batch_size}): the machine is busy, and every figure the search "
                      f"decides on is about that noisy; search on a quiet machine, or profile a quiet one (python -m "
                      f"dist_hrnas.profile) and search with its LUT (latency.lut, latency.lut_device)",
                      BusyDeviceWarning, stacklevel=2)


def measure_network_on_rank0(model: nn.Module, image_size: int, cfg: LatencyConfig,
                             timer: Timer | None = None, network_timer: NetworkTimer | None = None) -> float:
    """End-to-end seconds measured by rank 0 (with ``network_timer`` when given) and broadcast to all ranks."""
    packed = torch.zeros(1, dtype=torch.float64)
    error = None
    if not comm.is_initialized() or comm.rank() == 0:
        try:
            packed[0] = _time_network(model, image_size, cfg, timer or make_timer(cfg), network_timer)
        except Exception as err:  # the other ranks wait in the broadcast: they must hear of it
            error = err
    comm.share_rank0_error(error, "timing the network")
    return comm.broadcast_(packed, src=0).item()
