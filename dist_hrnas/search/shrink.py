"""A shrink, as one pipeline run by every rank after an evaluation:

    decide (rank 0's masks, :class:`~dist_hrnas.search.driver.Search`) -> broadcast -> surgery (model, EMA,
    registry) -> agree (all-gathered hashes) -> re-wrap (optimizer state carried, new engine) -> BN
    re-calibration -> measure end to end (rank 0) -> log (``shrinks.jsonl``, TensorBoard).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from dist_hrnas.errors import ConsistencyError
from dist_hrnas.metrics import NullWriter
from dist_hrnas.models import HRNet, export_arch
from dist_hrnas.models.bn import calibrate_bn
from dist_hrnas.names import Tags
from dist_hrnas.parallel import comm
from dist_hrnas.parallel.rewrap import TrainState, rewrap
from dist_hrnas.search import board
from dist_hrnas.search.decide import Decision
from dist_hrnas.search.driver import Search
from dist_hrnas.search.masks import dead_channels
from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model


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

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


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
    gathered = comm.all_gather_object((arch, params))
    if len(set(gathered)) > 1:
        ref = gathered[0]
        bad = [r for r, g in enumerate(gathered) if g != ref]
        what = "architecture" if len({g[0] for g in gathered}) > 1 else "parameters"
        raise ConsistencyError(f"ranks disagree after the shrink at step {step}: {what} of rank(s) {bad} differ "
                               f"from rank 0 (hashes {[g[0] + '/' + g[1] for g in gathered]}); aborting all ranks")
    return arch, [g[1] for g in gathered]


def after_eval(search: Search, state: TrainState, ctx: comm.DistContext, last_epoch: bool, epoch: int,
               calibration_batches: Callable[[], Iterable], writer: NullWriter) -> bool:
    """Decide (rank 0, measuring candidates when the target is this machine) and, if due, shrink on every rank.
    Returns whether a shrink happened.

    With a budget nothing shrinks once it is met, and at the last epoch corrective shrinks follow (at most
    ``Search.attempts``) while the measured latency is still above it.
    """
    if not search.active:
        return False
    model, ema_model = state.model, state.ema.module if state.ema else None
    board.log_scales(search, writer, state.step)
    comm.sync_bn_buffers_(model)
    masks = search.proposed_masks(model, ema_model, last_epoch)
    shrunk = False
    for _ in range(search.attempts(last_epoch)):
        decision = search.decide(model, masks, epoch, last_epoch)
        for code in decision.refusals:
            writer.scalar(Tags.SHRINK_REFUSED, code, state.step)
        if not decision.due:
            board.log_refusal(writer, decision, state.step)
            search.measured_without_cut(decision)
            break
        shrink(search, state, ctx, decision, epoch, calibration_batches, writer)
        shrunk = True
        if search.budget is None or search.budget.done or not last_epoch:
            break
        masks = {}  # still above the target at the end: fit the whole network again
    return shrunk


def shrink(search: Search, state: TrainState, ctx: comm.DistContext, decision: Decision, epoch: int,
           calibration_batches: Callable[[], Iterable], writer: NullWriter) -> dict:
    """Surgery -> agree -> re-wrap -> BN re-calibration -> measure -> log, on every rank. Returns the record."""
    model, ema_model, masks = state.model, state.ema.module if state.ema else None, decision.masks
    before_ms = search.predicted_now_s * 1e3
    old_params = dict(model.named_parameters())
    result = shrink_model(model, masks)
    if ema_model is not None:
        shrink_model(ema_model, masks)
    arch_hash, rank_hashes = check_same_on_all_ranks(model, state.step)
    # the model's prediction before this shrink's measurements join its fit: the out-of-sample figure
    unseen_ms = search.profile.predict_s(model) * 1e3
    search.after_surgery(model, decision.probes, decision.level)
    rewrap(state, search.cfg, ctx, lambda old, new: carry_optimizer_state(old, old_params, new, model, result))
    if search.cfg.prune.bn_calibration_steps:
        calibrate_bn(model, calibration_batches(), search.cfg.prune.bn_calibration_steps,
                     next(model.parameters()).device)
        comm.sync_bn_buffers_(model)  # each rank calibrated on its own shard
    measured_ms, remeasured = _measure(search, model, decision)
    after_ms = search.predicted_now_s * 1e3
    extra = {"latency_error_pct_after": round(board.error_pct(after_ms, measured_ms), 3),
             "arch_hash": arch_hash, "rank_hashes": rank_hashes, "remeasured": remeasured,
             "measured_before_cut": decision.measured_s is not None,
             "latency_ms_predicted_after_before_refit": round(unseen_ms, 4)}
    if decision.before_s is not None:  # the network before this shrink, re-timed in the same rounds
        extra["latency_ms_measured_before"] = round(decision.before_s * 1e3, 4)
    if len(decision.probes) > 1:  # a landing that timed several candidates: each one's figure, in timing order
        extra["candidates_measured_ms"] = [round(seconds * 1e3, 4) for _, seconds in decision.probes]
        if decision.probes_before_s:  # ... and the network now's figure beside each (what stopped the probes)
            extra["network_now_measured_ms"] = [round(seconds * 1e3, 4) for seconds in decision.probes_before_s]
    if decision.scale != 1.0:  # figures in the units of the start's supernet figure (search.decide._timed)
        extra["latency_scale_to_start"] = round(decision.scale, 5)
    if decision.level != 1.0:  # the calibration's start points moved to this comparison's level (units.start_level)
        extra["latency_start_level"] = round(decision.level, 5)
    if search.budget is not None:
        search.budget.observe(search.predicted_now_s, measured_ms / 1e3)
        extra |= {"target_latency_ms": round(search.budget.target_s * 1e3, 4), "budget_met": search.budget.done}
    blocks = model.named_blocks()
    record = ShrinkRecord(step=state.step, epoch=epoch + 1, channels_removed=dead_channels(masks),
                          widths={n: b.widths for n, b in blocks}, kernel_sizes={n: b.kernel_sizes for n, b in blocks},
                          latency_ms_predicted_before=round(before_ms, 4), latency_ms_predicted_after=round(after_ms, 4),
                          latency_ms_measured_after=round(measured_ms, 4), extra=extra).to_dict()
    search.shrinks.append(record)
    board.log_shrink(writer, record, len(search.shrinks), search.budget is not None)
    def append() -> None:
        with open(search.files.shrinks, "a") as f:
            f.write(json.dumps(record) + "\n")

    comm.on_rank0(append, f"appending to {search.files.shrinks}")  # a failed write stops every rank
    return record


def _measure(search: Search, model: HRNet, decision: Decision) -> tuple[float, bool]:
    """(end-to-end ms after the shrink, whether it was measured twice); also kept in ``search``. A network measured
    before the cut is not timed again: latency depends on the architecture only."""
    if decision.measured_s is not None:
        search.latency_ms_measured = decision.measured_s * 1e3
        return search.latency_ms_measured, False
    before_ms = search.latency_ms_measured
    measured_ms = search.end_to_end_ms(model)
    remeasured = measured_ms > before_ms and not search.cfg.latency.lut_device
    if remeasured:  # the shrink removed predicted seconds: a slower figure is most likely timing noise
        measured_ms = min(measured_ms, search.end_to_end_ms(model))
    search.latency_ms_measured = measured_ms
    return measured_ms, remeasured
