"""What the search shows in TensorBoard: the supernet's figures once, the schedule every log step, one point
per shrink. Tags come from :class:`dist_hrnas.names.Tags`."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dist_hrnas.metrics import NullWriter
from dist_hrnas.models import HRNet
from dist_hrnas.names import Tags

if TYPE_CHECKING:
    from dist_hrnas.search.decide import Decision
    from dist_hrnas.search.driver import Search

SCHEDULE_LAYOUT = {"schedule": {
    "pruned seconds: planned vs actual": ("Multiline", [Tags.PLANNED_PRUNED, Tags.ACTUAL_PRUNED]),
    "latency ms: target, measured at shrinks, predicted": ("Multiline", [Tags.TARGET_LATENCY, Tags.SCHEDULE_MEASURED,
                                                                         Tags.LATENCY_PREDICTED]),
    "rho": ("Multiline", [Tags.SCHEDULE_RHO])}}


def error_pct(predicted: float, measured: float) -> float:
    """Signed error of the prediction, in % of the measurement."""
    return 100.0 * (predicted - measured) / measured if measured > 0 else 0.0


def log_start(search: "Search", writer: NullWriter) -> None:
    """Prediction vs reality for the supernet, once (the first point of those tags)."""
    # Own tag: prune/latency_ms_measured keeps exactly one point per shrink.
    writer.scalar(Tags.LATENCY_SUPERNET_MEASURED, search.latency_ms_supernet, 0)
    writer.scalar(Tags.LATENCY_PREDICTED_NET, search.supernet_predicted_s * 1e3, 0)
    writer.scalar(Tags.LATENCY_ERROR_PCT, error_pct(search.supernet_predicted_s * 1e3, search.latency_ms_supernet), 0)
    if search.budget is not None:
        writer.custom_scalars(SCHEDULE_LAYOUT)


def log_step(search: "Search", writer: NullWriter, model: HRNet, step: int, rho: float, l1: float) -> None:
    """Pruned-seconds schedule and registry scalars (masks computed from the current scales); the supernet's
    figures before the first of them."""
    if not search.start_logged:
        search.start_logged = True
        log_start(search, writer)
    dead_s = search.registry.pruned_seconds(model, search.registry.masks(model))
    now_ms = search.predicted_now_s * 1e3 - dead_s * 1e3  # cached: it only changes at a shrink
    pruned_s = search.supernet_predicted_s - now_ms / 1e3
    writer.scalar(Tags.TRAIN_BN_L1, l1, step)
    writer.scalar(Tags.RHO, rho, step)
    writer.scalar(Tags.SECONDS_PRUNED, pruned_s, step)
    writer.scalar(Tags.LATENCY_PREDICTED, now_ms, step)
    writer.scalar(Tags.CHANNELS_ALIVE, search.registry.channels_alive(search.pairs), step)
    if search.budget is not None:
        writer.scalar(Tags.PLANNED_PRUNED, search.budget.plan.planned_s(search.budget.last_epoch), step)
        writer.scalar(Tags.ACTUAL_PRUNED, pruned_s, step)
        writer.scalar(Tags.TARGET_LATENCY, search.budget.target_s * 1e3, step)
        writer.scalar(Tags.SCHEDULE_RHO, rho, step)


def log_scales(search: "Search", writer: NullWriter, step: int) -> None:
    """Every prunable BN scale's magnitude, as one histogram (what the threshold cuts)."""
    scales = [bn.weight.detach().abs().cpu() for _, bn in search.pairs]
    writer.histogram(Tags.BN_SCALES, torch.cat(scales) if scales else torch.zeros(1), step)


def log_shrink(writer: NullWriter, record: dict, shrinks: int, budget_active: bool) -> None:
    """One point per shrink: its count, the measured and predicted latency after it, the model's error."""
    step = record["step"]
    if budget_active:
        writer.scalar(Tags.SCHEDULE_MEASURED, record["latency_ms_measured_after"], step)
    writer.scalar(Tags.SHRINK, shrinks, step)
    writer.scalar(Tags.LATENCY_MEASURED, record["latency_ms_measured_after"], step)
    writer.scalar(Tags.LATENCY_PREDICTED_NET, record["latency_ms_predicted_after"], step)
    writer.scalar(Tags.LATENCY_ERROR_PCT, record["latency_error_pct_after"], step)


def log_refusal(writer: NullWriter, decision: "Decision", step: int) -> None:
    """A measured decision that cut nothing: the fastest candidate it timed against the network now (a candidate
    about as fast: the cut would not have helped; one far faster: refused for the rounds' spread)."""
    if decision.probes and decision.before_s is not None:
        writer.scalar(Tags.REFUSED_CANDIDATE_MS, min(s for _, s in decision.probes) * 1e3, step)
        writer.scalar(Tags.REFUSED_NOW_MS, decision.before_s * 1e3, step)


def log_architecture(writer: NullWriter, model: HRNet, step: int) -> None:
    """The network as it stands, one table row per atomic block (TensorBoard's Text tab renders it)."""
    rows = ["| block | kernels | widths |", "|---|---|---|"]
    for name, block in model.named_blocks():
        kernels = ", ".join(map(str, block.kernel_sizes)) or "(shortcut only)"
        rows.append(f"| {name} | {kernels} | {', '.join(map(str, block.widths))} |")
    writer.text(Tags.ARCHITECTURE, "\n".join(rows), step)
