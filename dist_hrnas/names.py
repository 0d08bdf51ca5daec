"""Names that scripts and users rely on (a public contract): run-directory files and TensorBoard tags.

Defined here only; every module that writes or reads one of them takes it from here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFiles:
    """Every file of one run directory, by what it holds."""

    root: Path

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    SHRINKS = "shrinks.jsonl"
    ARCH = "searched_arch.yaml"
    SCHEDULE_PNG = "report_schedule.png"
    TENSORBOARD = "tb"
    CHECKPOINTS = "checkpoints"
    LAST_CHECKPOINT = "last.pt"
    PREVIOUS = "previous"
    EXPORT = "export"  # what python -m dist_hrnas.export writes by default (see ExportFiles)
    # what a fresh run in the same directory moves under previous/ (never overwrites)
    OUTPUTS = (CONFIG, SUMMARY, SHRINKS, ARCH, SCHEDULE_PNG, TENSORBOARD, CHECKPOINTS, EXPORT)

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def shrinks(self) -> Path:
        return self.root / self.SHRINKS

    @property
    def arch(self) -> Path:
        return self.root / self.ARCH

    @property
    def schedule_png(self) -> Path:
        return self.root / self.SCHEDULE_PNG

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def last_checkpoint(self) -> Path:
        return self.root / self.CHECKPOINTS / self.LAST_CHECKPOINT

    @property
    def export_dir(self) -> Path:
        return self.root / self.EXPORT

    def archive(self) -> Path | None:
        """Move an earlier run's outputs into ``previous/<time>/`` so a fresh run neither appends to its
        ``shrinks.jsonl`` and TensorBoard events nor overwrites its checkpoint. Returns where they went."""
        found = [self.root / name for name in self.OUTPUTS if (self.root / name).exists()]
        if not found:
            return None
        dest = self.root / self.PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while dest.exists():
            dest, suffix = dest.with_name(f"{dest.name.split('.')[0]}.{suffix}"), suffix + 1
        dest.mkdir(parents=True)
        for path in found:
            path.rename(dest / path.name)
        return dest


@dataclass(frozen=True)
class ExportFiles:
    """What ``python -m dist_hrnas.export`` writes into its output directory (``RUN_DIR/export`` by default)."""

    root: Path

    ONNX = "model.onnx"
    TORCHSCRIPT = "model.ts"
    JSON = "export.json"

    @property
    def onnx(self) -> Path:
        return self.root / self.ONNX

    @property
    def torchscript(self) -> Path:
        return self.root / self.TORCHSCRIPT

    @property
    def json(self) -> Path:
        return self.root / self.JSON


class Tags:
    """TensorBoard scalar, histogram and text tags."""

    TRAIN_LOSS = "train/loss"
    TRAIN_LR = "train/lr"
    TRAIN_SAMPLES_PER_S = "train/samples_per_s"
    TRAIN_STEP_TIME_S = "train/step_time_s"
    TRAIN_BN_L1 = "train/bn_l1_loss"
    VAL_TOP1 = "val/top1"
    VAL_LOSS = "val/loss"
    WORLD_SIZE = "dist/world_size"
    BN_SCALES = "bn_scale/all"
    RHO = "prune/rho"
    SECONDS_PRUNED = "prune/seconds_pruned"
    LATENCY_PREDICTED = "prune/latency_ms_predicted"
    CHANNELS_ALIVE = "prune/channels_alive"
    SHRINK = "prune/shrink"
    SHRINK_REFUSED = "prune/shrink_refused"
    # a measured decision that cut nothing: its fastest timed candidate and the network now, in the same rounds
    REFUSED_CANDIDATE_MS = "prune/refused_candidate_ms"
    REFUSED_NOW_MS = "prune/refused_network_now_ms"
    LATENCY_MEASURED = "prune/latency_ms_measured"  # one point per shrink
    LATENCY_SUPERNET_MEASURED = "prune/latency_ms_supernet_measured"
    LATENCY_PREDICTED_NET = "prune/latency_ms_predicted_net"
    LATENCY_ERROR_PCT = "prune/latency_error_pct"
    ARCHITECTURE = "prune/architecture"
    PLANNED_PRUNED = "schedule/seconds_pruned_planned"
    ACTUAL_PRUNED = "schedule/seconds_pruned_actual"
    TARGET_LATENCY = "schedule/target_latency_ms"
    SCHEDULE_MEASURED = "schedule/latency_ms_measured"
    SCHEDULE_RHO = "schedule/rho"
