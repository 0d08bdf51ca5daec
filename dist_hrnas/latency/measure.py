"""Latency on the target device: per kernel branch, block join and fixed part, and the profile the search uses
(what to time; how to time it is :mod:`dist_hrnas.latency.timing`, whole networks :mod:`dist_hrnas.latency.networks`).

Only global rank 0 measures (so no other rank disturbs the timing); the others wait and receive the figures
as one broadcast tensor (:func:`profile_on_rank0`). Each branch is timed at several widths (its latency
curve, :mod:`dist_hrnas.latency.curve`); timings are cached per device in the LUT file (:mod:`dist_hrnas.latency.lut`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from dist_hrnas.parallel import comm
from dist_hrnas.config import LatencyConfig
from dist_hrnas.latency.calibration import Calibration
from dist_hrnas.latency.curve import Curve, LatencyProfile, branch_key, curve_value, sample_widths
from dist_hrnas.latency.lut import LatencyTable
from dist_hrnas.latency.networks import NetworkTimer, calibrate, network_on_target
from dist_hrnas.models import AtomicBlock, HRNet, export_arch, model_from_arch
from dist_hrnas.models.blocks import KernelBranch
from dist_hrnas.models.probe import probe_forward
from dist_hrnas.latency.timing import Timed, Timer, cpu_threads, make_timer, runner


def block_input_shapes(model: HRNet, image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) entering each atomic block, from one forward pass at the training resolution."""
    shapes: dict[str, tuple[int, int, int]] = {}
    probe_forward(model, model.spec.image_channels, image_size, lambda: [block.register_forward_pre_hook(
        lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
        for name, block in model.named_blocks()])
    return shapes


def op_signature(block: AtomicBlock, branch_index: int, in_shape: tuple[int, int, int]) -> str:
    """What decides a branch's latency; identical ops anywhere in the network share one measurement."""
    branch = block.branches[branch_index]
    return op_key(block, branch.kernel, branch.hidden, in_shape)


def op_key(block: AtomicBlock, kernel: int, width: int, in_shape: tuple[int, int, int]) -> str:
    """LUT signature of a kernel branch at ``width`` hidden channels (batch size and dtype are in the fingerprint)."""
    return (f"c{block.in_channels}-{block.out_channels}_h{width}_k{kernel}_s{block.stride}_{in_shape[1]}x{in_shape[2]}"
            f"_{'e' if block.expand else 'ne'}_{block.act}")


@dataclass
class BranchPlan:
    """One kernel branch to profile: the widths of its curve and each sample's LUT signature."""

    key: str
    block: AtomicBlock
    kernel: int
    in_shape: tuple[int, int, int]
    samples: list[tuple[int, str]]  # (width, op signature)


def plan_branches(model: HRNet, image_size: int, cfg: LatencyConfig) -> list[BranchPlan]:
    shapes = block_input_shapes(model, image_size)
    plans = []
    for name, block in model.named_blocks():
        for branch in block.branches:
            widths = sample_widths(branch.hidden, cfg)
            plans.append(BranchPlan(branch_key(name, branch.kernel), block, branch.kernel, shapes[name],
                                    [(w, op_key(block, branch.kernel, w, shapes[name])) for w in widths]))
    return plans


def op_at_width(block: AtomicBlock, kernel: int, width: int) -> KernelBranch:
    """A fresh branch of ``width`` channels with the block's geometry: latency does not depend on weight values."""
    return KernelBranch(block.in_channels, block.out_channels, width, kernel, block.stride, block.expand,
                        block.act, block.bn_kwargs).eval()


@torch.no_grad()
def measure_branches(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                     table: LatencyTable | None = None, progress: bool = False) -> dict[str, Curve]:
    """Latency curve of every kernel branch; each distinct op (signature) is timed once, LUT entries reused."""
    table = table or LatencyTable({})
    plans = plan_branches(model, image_size, cfg)
    todo: dict[str, tuple[BranchPlan, int]] = {}
    for plan in plans:
        for width, sig in plan.samples:
            if table.get(sig) is None and sig not in todo:
                todo[sig] = (plan, width)
    with cpu_threads(cfg.threads):
        for sig, (plan, width) in tqdm(todo.items(), desc="latency ops", unit="op", disable=not progress):
            c, h, w = plan.in_shape
            x = torch.randn(cfg.batch_size, c, h, w, device=timer.device)
            run = runner(op_at_width(plan.block, plan.kernel, width), x, cfg, timer.device)
            timing = timer(Timed(run, "op", width))
            table.put(sig, timing.median_s, timing.spread_s)
    return {p.key: [[float(w), table.get(sig)["median_s"]] for w, sig in p.samples] for p in plans}


class BlockJoin(nn.Module):
    """What an atomic block does around its ``n`` branches: sum their outputs, the output BN, add the skip.
    ``folded``: no BN, as deployed (:mod:`dist_hrnas.models.fold` puts it into the branches' project convs)."""

    def __init__(self, channels: int, n: int, folded: bool = False):
        super().__init__()
        self.bn, self.n = nn.Identity() if folded else nn.BatchNorm2d(channels), n

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = y
        for _ in range(self.n - 1):
            out = out + y
        return y + self.bn(out)


def block_output_shapes(model: HRNet, image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) leaving each atomic block."""
    shapes: dict[str, tuple[int, int, int]] = {}
    probe_forward(model, model.spec.image_channels, image_size, lambda: [block.register_forward_hook(
        lambda _m, _a, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, block in model.named_blocks()])
    return shapes


@torch.no_grad()
def measure_joins(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer,
                  table: LatencyTable) -> dict[str, list[float]]:
    """Per block with branches, seconds of joining 1..n of them (LUT signature ``join_c<C>_<H>x<W>_n<n>``)."""
    shapes = block_output_shapes(model, image_size)
    out: dict[str, list[float]] = {}
    with cpu_threads(cfg.threads):
        for name, block in model.named_blocks():
            c, h, w = shapes[name]
            joins = []
            for n in range(1, len(block.branches) + 1):
                sig = f"join_c{c}_{h}x{w}_n{n}"
                if table.get(sig) is None:
                    x = torch.randn(cfg.batch_size, c, h, w, device=timer.device)
                    join = BlockJoin(c, n, folded=cfg.form == "deployed")
                    timing = timer(Timed(runner(join, x, cfg, timer.device), "join"))
                    table.put(sig, timing.median_s, timing.spread_s)
                joins.append(table.get(sig)["median_s"])
            if joins:
                out[name] = joins
    return out


def fixed_part(model: HRNet) -> HRNet:
    """``model`` with every kernel branch removed: what stays whatever the search decides."""
    arch = export_arch(model)
    for entry in arch["blocks"]:
        entry["kernel_sizes"], entry["widths"] = [], []
    return model_from_arch(arch)


def fixed_key(model: HRNet, image_size: int) -> str:
    """LUT signature of the fixed part: the macro structure and resolution (not the branch widths)."""
    arch = export_arch(model)
    shape = {"model": arch["model"], "blocks": [[b["name"], b["in"], b["out"], b["stride"]] for b in arch["blocks"]],
             "image_size": image_size}
    return "fixed_" + hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def measure_fixed(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer, table: LatencyTable) -> float:
    """Seconds of the fixed part, from the LUT or timed once (and added to it)."""
    key = fixed_key(model, image_size)
    if table.get(key) is None:
        net = fixed_part(model)
        x = torch.randn(cfg.batch_size, model.spec.image_channels, image_size, image_size, device=timer.device)
        with cpu_threads(cfg.threads):
            timing = timer(Timed(runner(net, x, cfg, timer.device), "fixed"))
        table.put(key, timing.median_s, timing.spread_s)
    return table.get(key)["median_s"]


def branch_widths(model: HRNet) -> dict[str, int]:
    return {branch_key(name, b.kernel): b.hidden for name, block in model.named_blocks() for b in block.branches}


def lut_profile(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer, progress: bool = False,
                table: LatencyTable | None = None) -> tuple[dict[str, Curve], float, dict[str, list[float]]]:
    """Branch curves, fixed part and block joins from ``latency.lut`` (or ``table``, already opened from it),
    timing (and adding) only what it lacks."""
    table = table or LatencyTable.open(cfg, timer.device)
    curves = measure_branches(model, image_size, cfg, timer, table, progress)
    fixed_s = measure_fixed(model, image_size, cfg, timer, table)
    joins = measure_joins(model, image_size, cfg, timer, table)
    table.save()
    return curves, fixed_s, joins


def block_groups(model: HRNet, image_size: int) -> dict[str, str]:
    """Per block, the part of the calibration its branches count in: their input resolution."""
    return {name: f"res:{h}x{w}" for name, (_c, h, w) in block_input_shapes(model, image_size).items()}


def profile_on_rank0(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer | None = None,
                     progress: bool = False, network_timer: NetworkTimer | None = None) -> LatencyProfile:
    """Rank 0 measures (or reads from ``latency.lut``) the branch curves and the network; every rank returns the
    same profile. With ``latency.lut_device`` every figure comes from the LUT and ``timer`` is not used.

    Only rank 0 touches the LUT file and the device; the other ranks wait in the broadcast, so they neither
    disturb the timing nor race on the file. A user error on rank 0 (corrupt LUT, strict fingerprint mismatch)
    is raised on every rank, so none is left waiting. Works without a process group as well.
    """
    widths = branch_widths(model)
    keys = list(widths)
    samples = {k: sample_widths(w, cfg) for k, w in widths.items()}
    join_counts = {name: len(b.branches) for name, b in model.named_blocks() if b.branches}
    packed = torch.zeros(3 + sum(len(v) for v in samples.values()) + sum(join_counts.values()), dtype=torch.float64)
    groups = block_groups(model, image_size)
    error, calibration = None, None
    if not comm.is_initialized() or comm.rank() == 0:
        try:
            timer = make_timer(cfg) if cfg.lut_device or timer is None else timer
            table = LatencyTable.open(cfg, timer.device)  # once: a fingerprint mismatch warns once
            curves, fixed_s, joins = lut_profile(model, image_size, cfg, timer, progress, table)
            network_s = network_on_target(model, image_size, cfg, timer, table, network_timer)  # reality
            branch_s = {k: curve_value(curves[k], widths[k]) for k in keys}
            profile = LatencyProfile(network_s, branch_s, widths, curves, cfg.cost, fixed_s, joins,
                                     cfg.width_step, groups=groups).calibrated(model)
            calibration = calibrate(profile, model, image_size, cfg, timer, table, network_timer).state_dict()
            packed = profile.to_tensor(keys)  # after the calibration, which settles the supernet's figure
        except Exception as err:  # any failure (not only a UserError): the other ranks wait in the broadcast
            error = err
    comm.share_rank0_error(error, "the latency profile")
    comm.broadcast_(packed, src=0)
    profile = LatencyProfile.from_tensor(packed, keys, widths, samples, cfg.cost, join_counts, cfg.width_step)
    profile.groups = groups
    profile.calibration = Calibration.from_state_dict(comm.broadcast_object(calibration))
    return profile
