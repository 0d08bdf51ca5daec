"""The search around the training loop: latency profile, L1 penalty, shrink decisions and shrinks.

:class:`Search` owns the prune registry and the latency profile. The training loop asks it for the
penalty each step and calls :meth:`Search.after_eval` after each validation; a shrink is
mask (rank 0) -> broadcast -> identical surgery on every rank (model, EMA, optimizer state, registry)
-> BN re-calibration -> end-to-end latency (rank 0) -> ``shrinks.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch import nn

from dist_hrnas import distributed
from dist_hrnas.budget import BudgetSteer, branch_channels, full_masks
from dist_hrnas.clean_timing import start_network_timer
from dist_hrnas.config import Config
from dist_hrnas.latency import (LatencyProfile, Timer, branch_key, measure_network_on_rank0,
                                profile_on_rank0)
from dist_hrnas.metrics import NullWriter
from dist_hrnas.errors import ConsistencyError
from dist_hrnas.fileio import atomic_write_text
from dist_hrnas.models import HRNet, count_macs, export_arch
from dist_hrnas.prune import PruneRegistry, rho_at, should_shrink
from dist_hrnas.surgery import ShrinkResult, shrink_model


@dataclass
class ShrinkRecord:
    """One line of ``shrinks.jsonl``."""

    step: int
    epoch: int
    channels_removed: int
    widths: dict[str, list[int]]
    kernel_sizes: dict[str, list[int]]
    latency_ms_predicted_before: float
    latency_ms_predicted_after: float
    latency_ms_measured_after: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return json.dumps(data | self.extra)


def flatten_masks(model: HRNet, masks: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """All branches' keep-masks in model order as one bool tensor (blocks without a mask: all kept)."""
    parts = []
    for name, block in model.named_blocks():
        given = masks.get(name)
        for i, branch in enumerate(block.branches):
            parts.append(given[i] if given is not None else torch.ones(branch.hidden, dtype=torch.bool))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def unflatten_masks(model: HRNet, flat: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inverse of :func:`flatten_masks`; keeps only blocks where something is dropped."""
    out, offset = {}, 0
    for name, block in model.named_blocks():
        block_masks = []
        for branch in block.branches:
            block_masks.append(flat[offset:offset + branch.hidden].clone())
            offset += branch.hidden
        if any(not bool(m.all()) for m in block_masks):
            out[name] = block_masks
    return out


def broadcast_masks(model: HRNet, masks: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Rank 0's masks on every rank, as one flat bool tensor (sizes follow from the shared architecture)."""
    flat = flatten_masks(model, masks).to(torch.uint8)
    distributed.broadcast_(flat, src=0)
    return unflatten_masks(model, flat.bool())


def model_hashes(model: HRNet) -> tuple[str, str]:
    """(architecture hash, parameter-and-buffer hash) of the model as it is now."""
    arch = hashlib.sha256(json.dumps(export_arch(model), sort_keys=True).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return arch, h.hexdigest()[:16]


def check_same_on_all_ranks(model: HRNet, step: int) -> tuple[str, list[str]]:
    """All-gather every rank's hashes after surgery; every rank raises together if any differs."""
    arch, params = model_hashes(model)
    gathered = distributed.all_gather_object((arch, params))
    if len(set(gathered)) > 1:
        ref = gathered[0]
        bad = [r for r, g in enumerate(gathered) if g != ref]
        what = "architecture" if len({g[0] for g in gathered}) > 1 else "parameters"
        raise ConsistencyError(f"ranks disagree after the shrink at step {step}: {what} of rank(s) {bad} differ "
                               f"from rank 0 (hashes {[g[0] + '/' + g[1] for g in gathered]}); aborting all ranks")
    return arch, [g[1] for g in gathered]


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable, steps: int, device: torch.device) -> None:
    """Re-estimate BN running statistics as a plain average over ``steps`` training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for i, (images, _labels) in enumerate(batches):
        if i >= steps:
            break
        model(images.to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)


def error_pct(predicted: float, measured: float) -> float:
    """Signed error of the prediction, in % of the measurement."""
    return 100.0 * (predicted - measured) / measured if measured > 0 else 0.0


def predict_after_masks(profile: LatencyProfile, model: HRNet, masks: dict[str, list[torch.Tensor]]) -> float:
    """Predicted seconds of ``model`` shrunk by ``masks``, without building it (same widths surgery gives)."""
    blocks = []
    for name, block in model.named_blocks():
        given = masks.get(name)
        kept = [SimpleNamespace(kernel=b.kernel, hidden=int(given[i].sum()) if given is not None else b.hidden)
                for i, b in enumerate(block.branches)]
        blocks.append((name, SimpleNamespace(branches=[b for b in kept if b.hidden > 0])))
    return profile.predict_s(SimpleNamespace(named_blocks=lambda: blocks))


# A branch keeps its channels only when its curve says the narrower width is clearly slower: curve samples
# carry timing noise, and a stricter rule would block most small shrinks on a busy machine.
SLOWER_MARGIN = 1.02


def keep_branches_that_would_slow_down(profile: LatencyProfile, model: HRNet,
                                       masks: dict[str, list[torch.Tensor]]) -> int:
    """Keep every channel of a branch whose curve says the narrower width runs slower (a staircase step):
    removing them would cost accuracy for nothing. Edits ``masks``; returns how many branches were kept."""
    kept = 0
    for name, block in model.named_blocks():
        for i, branch in enumerate(block.branches):
            mask = masks.get(name, [None] * (i + 1))[i]
            if mask is None or bool(mask.all()) or not bool(mask.any()):
                continue  # nothing removed, or the whole branch goes (then its cost and join go too)
            key = branch_key(name, branch.kernel)
            if profile.curve_s(key, int(mask.sum())) > SLOWER_MARGIN * profile.curve_s(key, branch.hidden):
                masks[name][i] = torch.ones_like(mask)
                kept += 1
    return kept


def smallest_predicted_s(profile: LatencyProfile, model: HRNet, registry: PruneRegistry) -> float:
    """Predicted seconds with every prunable branch removed: no search can go below this."""
    masks = {name: [torch.full((b.hidden,), branch_key(name, b.kernel) not in registry.entries)
                    for b in block.branches] for name, block in model.named_blocks()}
    return predict_after_masks(profile, model, masks)


# At the last epoch a budget search shrinks again while the measured latency is above the target. Each
# corrective shrink is sized on the safe side (see BudgetSteer), so it may take a few.
LAST_EPOCH_ATTEMPTS = 5

SCHEDULE_LAYOUT = {"schedule": {
    "pruned seconds: planned vs actual": ("Multiline", ["schedule/seconds_pruned_planned",
                                                        "schedule/seconds_pruned_actual"]),
    "latency ms: target, measured at shrinks, predicted": ("Multiline", ["schedule/target_latency_ms",
                                                                         "schedule/latency_ms_measured",
                                                                         "prune/latency_ms_predicted"]),
    "rho": ("Multiline", ["schedule/rho"])}}


class Search:
    """Search state for one run; identical on every rank (rank 0 measures and decides, others receive)."""

    def __init__(self, cfg: Config, model: HRNet, image_size: int, run_dir: Path, timer: Timer | None = None,
                 saved: dict | None = None):
        """Measure (rank 0) and build the registry, or restore both from a checkpoint's ``saved`` state."""
        self.cfg, self.image_size, self.run_dir, self.timer = cfg, image_size, run_dir, timer
        self.enabled = cfg.prune.penalty != "none"
        # A run that times for real (no injected timer) times whole networks in clean processes.
        self.network_timer = start_network_timer(cfg.latency, image_size) if timer is None else None
        if saved is None:
            self.profile = profile_on_rank0(model, image_size, cfg.latency, timer, progress=cfg.log.progress,
                                            network_timer=self.network_timer)
            macs = count_macs(model, model.spec.image_channels, image_size)
            self.registry = PruneRegistry.build(cfg.prune, model, macs, self.profile)
            self.latency_ms_supernet = self.profile.network_s * 1e3
            self.supernet_predicted_s = self.profile.predict_s(model)
            self.latency_ms_measured = self.latency_ms_supernet
            self.shrinks: list[dict] = []
        else:
            self.profile = LatencyProfile.from_state_dict(saved["profile"], cfg.latency.cost)
            self.registry = PruneRegistry.from_state_dict(cfg.prune, saved["registry"])
            self.latency_ms_supernet = saved["latency_ms_supernet"]
            self.supernet_predicted_s = saved["supernet_predicted_s"]
            self.latency_ms_measured = saved["latency_ms_measured"]
            self.shrinks = list(saved["shrinks"])
        self.pairs = self.registry.bns(model)
        self._start_logged = saved is not None  # a resumed run logged its start already
        self.predicted_now_s = self.profile.predict_s(model)
        self.budget: BudgetSteer | None = None
        if self.enabled and cfg.prune.has_budget:
            self.budget = BudgetSteer(cfg.prune, cfg.train.epochs, self.latency_ms_supernet / 1e3,
                                      self.supernet_predicted_s,
                                      smallest_predicted_s(self.profile, model, self.registry),
                                      where=f"{cfg.latency.device} at batch {cfg.latency.batch_size}")
            if saved is not None and saved.get("budget"):
                self.budget.load_state_dict(saved["budget"])

    def state_dict(self) -> dict:
        """Plain data for the checkpoint (resuming measures nothing)."""
        return {"profile": self.profile.state_dict(),
                "registry": self.registry.state_dict(), "latency_ms_supernet": self.latency_ms_supernet,
                "supernet_predicted_s": self.supernet_predicted_s, "latency_ms_measured": self.latency_ms_measured,
                "shrinks": list(self.shrinks), "budget": self.budget.state_dict() if self.budget else None}

    def rewrite_shrink_log(self) -> None:
        """Make ``shrinks.jsonl`` hold exactly the shrinks this state knows (used when resuming)."""
        atomic_write_text(self.run_dir / "shrinks.jsonl", "".join(json.dumps(r) + "\n" for r in self.shrinks))

    # ---- per step
    def rho(self, epoch_float: float) -> float:
        """rho for this step: the warm-up schedule, or with a budget the controller's (the same on every rank:
        it only reads the scales, which data parallelism keeps identical, and rank 0's profile)."""
        if not self.enabled:
            return 0.0
        if self.budget is None:
            return rho_at(self.cfg.prune, epoch_float)
        return self.budget.rho(epoch_float, self.seconds_pruned_now())

    @torch.no_grad()
    def seconds_pruned_now(self) -> float:
        """Predicted seconds gone since the supernet: removed by shrinks plus dead right now."""
        thr = self.cfg.prune.threshold
        dead_s = sum(int((bn.weight.abs() <= thr).sum()) * e.seconds_per_channel for e, bn in self.pairs)
        return self.supernet_predicted_s - (self.predicted_now_s - dead_s)

    def penalty(self, rho: float) -> torch.Tensor | None:
        """rho * sum_b penalty_b * sum |gamma_b|, or None when there is nothing to add."""
        if not self.enabled or rho == 0.0 or not self.pairs:
            return None
        return rho * self.registry.l1_loss(self.pairs)

    def predicted_ms(self, model: HRNet) -> float:
        return self.profile.predict_s(model) * 1e3

    def log(self, writer: NullWriter, model: HRNet, step: int, rho: float, l1: float) -> None:
        """Pruned-seconds schedule and registry scalars (masks computed from the current scales)."""
        if not self.enabled:
            return
        if not self._start_logged:  # prediction vs reality for the supernet, once (the tags' first point)
            self._start_logged = True
            # Own tag: prune/latency_ms_measured keeps exactly one point per shrink.
            writer.scalar("prune/latency_ms_supernet_measured", self.latency_ms_supernet, 0)
            writer.scalar("prune/latency_ms_predicted_net", self.supernet_predicted_s * 1e3, 0)
            writer.scalar("prune/latency_error_pct",
                          error_pct(self.supernet_predicted_s * 1e3, self.latency_ms_supernet), 0)
            if self.budget is not None:
                writer.custom_scalars(SCHEDULE_LAYOUT)
        dead_s = self.registry.pruned_seconds(model, self.registry.masks(model))
        now_ms = self.predicted_now_s * 1e3 - dead_s * 1e3  # cached: it only changes at a shrink
        writer.scalar("train/bn_l1_loss", l1, step)
        writer.scalar("prune/rho", rho, step)
        writer.scalar("prune/seconds_pruned", self.supernet_predicted_s - now_ms / 1e3, step)
        writer.scalar("prune/latency_ms_predicted", now_ms, step)
        writer.scalar("prune/channels_alive", self.registry.channels_alive(self.pairs), step)
        if self.budget is not None:
            writer.scalar("schedule/seconds_pruned_planned", self.budget.plan.planned_s(self.budget.last_epoch), step)
            writer.scalar("schedule/seconds_pruned_actual", self.supernet_predicted_s - now_ms / 1e3, step)
            writer.scalar("schedule/target_latency_ms", self.budget.target_s * 1e3, step)
            writer.scalar("schedule/rho", rho, step)

    # ---- per evaluation
    def after_eval(self, model: HRNet, ema_model: HRNet | None, last_epoch: bool, step: int, epoch: int,
                   rebuild: Callable[[ShrinkResult, dict[str, torch.nn.Parameter]], None],
                   calibration_batches: Callable[[], Iterable], writer: NullWriter) -> bool:
        """Decide (rank 0) and, if due, shrink on every rank. Returns whether a shrink happened.

        ``rebuild(result, old_params)`` rebuilds the optimizer (carrying sliced state), scheduler and
        wrapper around the shrunk model: the training loop owns those. With a budget, masks are fitted to the
        target first, nothing shrinks once it is met, and at the last epoch corrective shrinks follow (at most
        ``LAST_EPOCH_ATTEMPTS`` in all) while the measured latency is still above it.
        """
        if not self.enabled or (self.budget is not None and self.budget.done):
            return False
        writer.histogram("bn_scale/all", torch.cat([bn.weight.detach().abs().cpu() for _, bn in self.pairs])
                         if self.pairs else torch.zeros(1), step)
        distributed.sync_bn_buffers_(model)
        masks = self.registry.masks(model, ema_model, ema_only=last_epoch and ema_model is not None)
        shrunk = False
        for attempt in range(LAST_EPOCH_ATTEMPTS if self.budget is not None and last_epoch else 1):
            if self.budget is not None:
                masks = full_masks(model, masks)
                self.budget.fit(masks, branch_channels(model, self.pairs), self.predicted_now_s, epoch + 1.0,
                                last_epoch, predict=lambda m: predict_after_masks(self.profile, model, m))
            masks = broadcast_masks(model, masks)  # rank 0's decision everywhere (drops all-kept blocks)
            if keep_branches_that_would_slow_down(self.profile, model, masks):
                writer.scalar("prune/shrink_refused", 1, step)
            dead = sum(int((~m).sum()) for ms in masks.values() for m in ms)
            if not should_shrink(self.cfg.prune, self.registry.pruned_seconds(model, masks), dead, last_epoch):
                break
            if predict_after_masks(self.profile, model, masks) >= self.predicted_now_s:
                # the latency model says this shrink would not make the network faster (a staircase step):
                # keep the channels, the penalty goes on and a later shrink takes more
                writer.scalar("prune/shrink_refused", 2, step)
                break
            self._shrink(model, ema_model, masks, dead, step, epoch, rebuild, calibration_batches, writer)
            shrunk = True
            if self.budget is None or self.budget.done or not last_epoch:
                break
            masks = {}  # still above the target at the end: fit the whole network again, forced
        return shrunk

    def _end_to_end_ms(self, model: HRNet) -> float:
        """The network's latency on the target: measured (rank 0), or when the target is another machine
        (``latency.lut_device``) the supernet's figure from there scaled by the latency model."""
        if self.cfg.latency.lut_device:
            return self.latency_ms_supernet * self.predicted_now_s / self.supernet_predicted_s
        return measure_network_on_rank0(model, self.image_size, self.cfg.latency, self.timer,
                                        self.network_timer) * 1e3

    def _shrink(self, model: HRNet, ema_model: HRNet | None, masks: dict[str, list[torch.Tensor]], dead: int,
                step: int, epoch: int, rebuild: Callable[[ShrinkResult, dict[str, torch.nn.Parameter]], None],
                calibration_batches: Callable[[], Iterable], writer: NullWriter) -> None:
        """Surgery on every rank, consistency check, rebuild, BN re-calibration, rank-0 measurement, records."""
        before_ms = self.predicted_now_s * 1e3
        old_params = dict(model.named_parameters())
        result = shrink_model(model, masks)
        if ema_model is not None:
            shrink_model(ema_model, masks)
        arch_hash, rank_hashes = check_same_on_all_ranks(model, step)
        self.registry.update_after_shrink(model, self.profile)
        self.pairs = self.registry.bns(model)
        self.predicted_now_s = self.profile.predict_s(model)
        rebuild(result, old_params)
        if self.cfg.prune.bn_calibration_steps:
            calibrate_bn(model, calibration_batches(), self.cfg.prune.bn_calibration_steps,
                         next(model.parameters()).device)
            distributed.sync_bn_buffers_(model)  # each rank calibrated on its own shard
        measured_before_ms = self.latency_ms_measured
        self.latency_ms_measured = self._end_to_end_ms(model)
        remeasured = self.latency_ms_measured > measured_before_ms and not self.cfg.latency.lut_device
        if remeasured:  # the shrink removed predicted seconds: a slower figure is most likely timing noise
            self.latency_ms_measured = min(self.latency_ms_measured, self._end_to_end_ms(model))
        after_ms = self.predicted_now_s * 1e3
        extra = {"latency_error_pct_after": round(error_pct(after_ms, self.latency_ms_measured), 3),
                 "arch_hash": arch_hash, "rank_hashes": rank_hashes, "remeasured": remeasured}
        if self.budget is not None:
            self.budget.observe(self.predicted_now_s, self.latency_ms_measured / 1e3)
            extra |= {"target_latency_ms": round(self.budget.target_s * 1e3, 4), "budget_met": self.budget.done}
            writer.scalar("schedule/latency_ms_measured", self.latency_ms_measured, step)
        blocks = model.named_blocks()
        record = ShrinkRecord(step=step, epoch=epoch + 1, channels_removed=dead,
                              widths={n: b.widths for n, b in blocks}, kernel_sizes={n: b.kernel_sizes for n, b in blocks},
                              latency_ms_predicted_before=round(before_ms, 4),
                              latency_ms_predicted_after=round(after_ms, 4),
                              latency_ms_measured_after=round(self.latency_ms_measured, 4), extra=extra)
        self.shrinks.append(json.loads(record.to_json()))
        writer.scalar("prune/shrink", len(self.shrinks), step)
        writer.scalar("prune/latency_ms_measured", self.latency_ms_measured, step)
        writer.scalar("prune/latency_ms_predicted_net", after_ms, step)
        writer.scalar("prune/latency_error_pct", extra["latency_error_pct_after"], step)
        if distributed.rank() == 0:
            with open(self.run_dir / "shrinks.jsonl", "a") as f:
                f.write(record.to_json() + "\n")
