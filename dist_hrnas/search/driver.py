"""The search's state for one run, and its decisions: the latency profile, the prune registry, rho and the L1
penalty each step, and which channels a shrink takes. Executing a shrink is :mod:`dist_hrnas.search.shrink`.

Identical on every rank: rank 0 measures (the profile is broadcast) and its masks are broadcast before surgery.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from dist_hrnas.config import Config
from dist_hrnas.fileio import atomic_write_text
from dist_hrnas.latency import (LatencyProfile, Timer, make_timer, measure_network_on_rank0, profile_on_rank0,
                                start_network_timer)
from dist_hrnas.latency.calibration import Parts
from dist_hrnas.latency.networks import compare_networks
from dist_hrnas.latency.rounds import Figures
from dist_hrnas.latency.timing import candidate_settings
from dist_hrnas.latency.lut import lut_device_name
from dist_hrnas.models import HRNet, count_macs, count_params, export_arch, model_from_arch
from dist_hrnas.names import RunFiles
from dist_hrnas.parallel import comm
from dist_hrnas.search.budget import BudgetSteer
from dist_hrnas.search.decide import (REFUSED_BRANCH_SLOWER, REFUSED_NETWORK_SLOWER, Decision, decide_by_measurement,
                                      decide_by_model)
from dist_hrnas.search.masks import (Masks, arch_after_masks, dead_channels, keep_branches_that_would_slow_down,
                                     predict_after_masks, smallest_masks, smallest_predicted_s)
from dist_hrnas.search.registry import PruneRegistry, rho_at, should_shrink

# At the last epoch a budget search shrinks again while the measured latency is above the target. Each
# corrective shrink is sized on the safe side (see BudgetSteer), so it may take a few.
LAST_EPOCH_ATTEMPTS = 5



class Search:
    """Search state for one run; identical on every rank (rank 0 measures and decides, others receive)."""

    def __init__(self, cfg: Config, model: HRNet, image_size: int, run_dir: Path, timer: Timer | None = None,
                 saved: dict | None = None):
        """Measure (rank 0) and build the registry, or restore both from a checkpoint's ``saved`` state."""
        self.cfg, self.image_size, self.files, self.timer = cfg, image_size, RunFiles(Path(run_dir)), timer
        self.enabled = cfg.prune.penalty != "none"
        # A run that times for real (no injected timer) times whole networks in clean processes; the children of
        # a shrink's comparison stay until the next one, which times the network now in its child again.
        self.network_timer = start_network_timer(cfg.latency, image_size, keep_children=True) if timer is None \
            else None
        if saved is None:
            self.profile = profile_on_rank0(model, image_size, cfg.latency, timer, progress=cfg.log.progress,
                                            network_timer=self.network_timer)
            macs = count_macs(model, model.spec.image_channels, image_size)
            self.registry = PruneRegistry.build(cfg.prune, model, macs, self.profile)
            self.latency_ms_supernet = self.profile.network_s * 1e3
            self.supernet_predicted_s = self.profile.predict_s(model)
            self.latency_ms_measured = self.latency_ms_supernet
            self.supernet_arch: dict | None = export_arch(model)
            self.shrinks: list[dict] = []
        else:
            self.profile = LatencyProfile.from_state_dict(saved["profile"], cfg.latency.cost)
            self.registry = PruneRegistry.from_state_dict(cfg.prune, saved["registry"])
            self.latency_ms_supernet = saved["latency_ms_supernet"]
            self.supernet_predicted_s = saved["supernet_predicted_s"]
            self.latency_ms_measured = saved["latency_ms_measured"]
            self.supernet_arch = saved.get("supernet_arch")  # absent in checkpoints of earlier versions
            self.shrinks = list(saved["shrinks"])
        self.pairs = self.registry.bns(model)
        self.start_logged = saved is not None  # a resumed run logged its start already
        self.predicted_now_s = self.profile.predict_s(model)
        self.candidate_networks_timed = 0  # end-to-end figures taken to decide shrinks (the overhead benchmark)
        self.candidate_comparisons = 0     # ... in this many comparisons (a budget landing's probes count each)
        self.candidate_timing_s = 0.0
        self.budget: BudgetSteer | None = None
        if self.enabled and cfg.prune.has_budget:
            # the fixed part alone is a floor the latency model's estimate may undercut (a negative context
            # part): no target below it is reachable; a resumed run's budget passed this check at its start
            resumed = saved is not None
            smallest_s = 0.0 if resumed else max(smallest_predicted_s(self.profile, model, self.registry.entries),
                                                 self.profile.fixed_s)
            measure_smallest = None if resumed or cfg.latency.lut_device else lambda: self.smallest_measured_s(model)
            self.budget = BudgetSteer(cfg.prune, cfg.train.epochs, self.latency_ms_supernet / 1e3,
                                      self.supernet_predicted_s, smallest_s,
                                      where=f"{cfg.latency.device} at batch {cfg.latency.batch_size}",
                                      smallest_measured_s=measure_smallest)
            if saved is not None and saved.get("budget"):
                self.budget.load_state_dict(saved["budget"])
        self.started_s = time.perf_counter()  # after the profile: the search's wall that prune.measure_share divides

    def smallest_measured_s(self, model: HRNet) -> float:
        """The smallest network this search can reach from ``model`` (every prunable branch removed), timed end to
        end by rank 0 (in a clean process when it can) and broadcast."""
        floor = model_from_arch(arch_after_masks(model, smallest_masks(model, self.registry.entries)))
        return measure_network_on_rank0(floor, self.image_size, self.cfg.latency, self.timer, self.network_timer)

    def state_dict(self) -> dict:
        """Plain data for the checkpoint (resuming measures nothing)."""
        return {"profile": self.profile.state_dict(),
                "registry": self.registry.state_dict(), "latency_ms_supernet": self.latency_ms_supernet,
                "supernet_predicted_s": self.supernet_predicted_s, "latency_ms_measured": self.latency_ms_measured,
                "supernet_arch": self.supernet_arch,
                "shrinks": list(self.shrinks), "budget": self.budget.state_dict() if self.budget else None}

    def rewrite_shrink_log(self) -> None:
        """Make ``shrinks.jsonl`` hold exactly the shrinks this state knows (used when resuming)."""
        atomic_write_text(self.files.shrinks, "".join(json.dumps(r) + "\n" for r in self.shrinks))

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

    # ---- per evaluation: decisions (executing them is search.shrink)
    @property
    def active(self) -> bool:
        """Whether shrinks may still happen (a met budget ends them)."""
        return self.enabled and not (self.budget is not None and self.budget.done)

    def attempts(self, last_epoch: bool) -> int:
        """How many shrinks one evaluation may make (corrective shrinks at a budget's last epoch)."""
        return LAST_EPOCH_ATTEMPTS if self.budget is not None and last_epoch else 1

    def proposed_masks(self, model: HRNet, ema_model: HRNet | None, last_epoch: bool) -> Masks:
        """Channels whose scale (or EMA scale) is above the threshold; at the last epoch the EMA alone decides."""
        return self.registry.masks(model, ema_model, ema_only=last_epoch and ema_model is not None)

    def decide(self, model: HRNet, masks: Masks, epoch: int, last_epoch: bool) -> Decision:
        """Which channels this shrink takes (rank 0's decision, the same on every rank) and whether it is due.

        When the target is this machine the candidate is measured before any rank cuts (:mod:`search.decide`);
        with ``latency.lut_device`` or ``prune.measure_before_cut=false`` the calibrated latency model decides.
        """
        if self.cfg.latency.lut_device or not self.cfg.prune.measure_before_cut:
            return decide_by_model(self, model, masks, epoch, last_epoch)
        return decide_by_measurement(self, model, masks, epoch, last_epoch)

    def measure_share_spent(self) -> bool:
        """Whether this run has spent more than ``prune.measure_share`` of its wall since the search started timing
        candidates (rank 0's figures: only rank 0 times); a shrink before the last epoch then waits."""
        return self.candidate_timing_s > self.cfg.prune.measure_share * (time.perf_counter() - self.started_s)

    def compare_on_rank0(self, archs: list[dict], rounds: int, retakes: int,
                         decided: Callable[[Figures, int], bool] | None = None) -> Figures:
        """Rank 0 times ``archs`` end to end in the same ``rounds`` (fresh processes unless
        ``latency.clean_process=false``; at most ``retakes`` more sets of rounds while they disagree and
        ``decided`` does not hold): each one's (seconds, spread of its rounds)."""
        start = time.perf_counter()
        cfg = candidate_settings(self.cfg.latency)
        # the architectures themselves: a clean-process timer builds each network in its child only (building
        # them here too cost the search a model build per network timed)
        figures = compare_networks(archs, self.image_size, cfg, self.timer or make_timer(cfg), self.network_timer,
                                   rounds, retakes, decided)
        self.candidate_networks_timed += len(archs)
        self.candidate_comparisons += 1
        self.candidate_timing_s += time.perf_counter() - start
        return figures

    def summary(self, model: HRNet, channels: int, image_size: int) -> dict:
        """The search's part of summary.json (every rank; the end re-timing is rank 0's, broadcast)."""
        cfg = self.cfg
        out = {"penalty": cfg.prune.penalty, "shrinks": len(self.shrinks),
               "latency_ms_supernet": round(self.latency_ms_supernet, 4),
               "latency_ms_searched": round(self.latency_ms_measured, 4),
               # where the latency figures come from: timed on this machine, or another machine's LUT
               "latency_source": f"lut:{lut_device_name(cfg.latency)}" if cfg.latency.lut_device else "measured",
               "latency_ms_searched_predicted": round(self.predicted_ms(model), 4),
               "params_searched": count_params(model),
               "macs_searched": sum(count_macs(model, channels, image_size).values()),
               "latency_device": cfg.latency.device, "latency_batch_size": cfg.latency.batch_size,
               # what deciding shrinks by measurement cost (rank 0, this run): networks timed, seconds
               "candidate_networks_timed": self.candidate_networks_timed,
               "candidate_comparisons": self.candidate_comparisons,
               "candidate_timing_s": round(self.candidate_timing_s, 2), **self.retime_final(model)}
        if self.budget is not None:
            target_ms = self.budget.target_s * 1e3
            out |= {"target_latency_ms": round(target_ms, 4), "budget_met": self.budget.done,
                    "latency_vs_target_pct": round(100 * (self.latency_ms_measured / target_ms - 1), 2)}
        return out

    def retime_final(self, model: HRNet) -> dict:
        """summary.json's ``*_retimed`` keys: the supernet and ``model`` timed again at the end, together in the same
        rounds (rank 0, each in a fresh process; broadcast), so their ratio holds however slow the machine was in
        the minutes the search's own figures were taken. Empty when nothing was cut, when the target is another
        machine, or with ``latency.retime_final=false``."""
        if not (self.cfg.latency.retime_final and self.shrinks and self.supernet_arch is not None) \
                or self.cfg.latency.lut_device:
            return {}

        def on_rank0() -> list[float]:
            archs = [self.supernet_arch, export_arch(model)]  # what a clean-process timer needs (as compare_on_rank0)
            self.close()  # fresh children for both, not the last comparison's
            figures = compare_networks(archs, self.image_size, self.cfg.latency,
                                       self.timer or make_timer(self.cfg.latency), self.network_timer)
            self.close()  # kept as a comparison's children are; nothing is timed after this
            return [seconds for seconds, _ in figures]

        supernet_s, searched_s = comm.broadcast_object(comm.on_rank0(on_rank0, "re-timing the searched network"))
        return {"latency_ms_supernet_retimed": round(supernet_s * 1e3, 4),
                "latency_ms_searched_retimed": round(searched_s * 1e3, 4),
                "speedup_retimed": round(supernet_s / searched_s, 4)}

    def close(self) -> None:
        """End the timing children kept between comparisons (rank 0; nothing to do elsewhere)."""
        if self.network_timer is not None:
            self.network_timer.close()

    def measured_without_cut(self, decision: Decision) -> None:
        """A budget decision that timed the network now and cut nothing: if that figure is at or under the target,
        the budget is met as it stands (a later re-timing of the same architecture came out under it)."""
        if self.budget is not None and decision.before_s is not None and decision.before_s <= self.budget.target_s:
            self.latency_ms_measured = decision.before_s * 1e3
            self.budget.observe(0.0, decision.before_s)  # 0: no prediction, the units stay as they are

    def budget_reference_arch(self) -> dict | None:
        """The supernet, timed beside a budget's candidates when the target is a ratio to it (else None)."""
        if self.budget is None or self.cfg.prune.target_latency_ms is not None:
            return None
        return self.supernet_arch

    def review(self, model: HRNet, masks: Masks, last_epoch: bool) -> tuple[bool, list[int]]:
        """(shrink now?, refusal codes) for ``masks`` by the latency model alone; branches whose narrower width
        would run slower keep their channels (edits ``masks``)."""
        refused = [REFUSED_BRANCH_SLOWER] if keep_branches_that_would_slow_down(self.profile, model, masks) else []
        if not self.due(model, masks, last_epoch):
            return False, refused
        if predict_after_masks(self.profile, model, masks) >= self.predicted_now_s:
            # the latency model says this shrink would not make the network faster (a staircase step):
            # keep the channels, the penalty goes on and a later shrink takes more
            return False, refused + [REFUSED_NETWORK_SLOWER]
        return True, refused

    def due(self, model: HRNet, masks: Masks, last_epoch: bool) -> bool:
        """Dead channels worth ``prune.shrink_delta_seconds`` (or any, at the last epoch)."""
        return should_shrink(self.cfg.prune, self.registry.pruned_seconds(model, masks), dead_channels(masks),
                             last_epoch)

    # ---- after a shrink
    def after_surgery(self, model: HRNet, measured: list[tuple[Parts, float]], level: float = 1.0) -> None:
        """The calibration moves to the measured ``level`` (``search.units.start_level``; every rank, from the
        broadcast decision) and takes the networks measured for this shrink (rank 0 fits, every rank gets its
        coefficients); registry costs, BN pairs and the cached prediction follow the shrunk model."""
        if level != 1.0:
            self.profile.relevel(level)
            self.supernet_predicted_s *= level  # the pruned-seconds schedule stays in the model's units
            if self.budget is not None:
                self.budget.relevel(level)
        for parts, seconds in measured:
            self.profile.refit(parts, seconds, "shrink")
        if self.profile.calibration is not None and (measured or level != 1.0):
            self.profile.calibration.coef = comm.broadcast_object(self.profile.calibration.coef)
        self.registry.update_after_shrink(model, self.profile)
        self.pairs = self.registry.bns(model)
        self.predicted_now_s = self.profile.predict_s(model)

    def end_to_end_ms(self, model: HRNet) -> float:
        """The network's latency on the target: measured (rank 0), or when the target is another machine
        (``latency.lut_device``) the supernet's figure from there scaled by the latency model."""
        if self.cfg.latency.lut_device:
            return self.latency_ms_supernet * self.predicted_now_s / self.supernet_predicted_s
        return measure_network_on_rank0(model, self.image_size, self.cfg.latency, self.timer,
                                        self.network_timer) * 1e3
