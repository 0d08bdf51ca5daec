"""What a training run decides before it touches anything: its inputs are valid, its outputs writable, and
whether ``checkpoints/last.pt`` may be continued.

Everything here only reads. A run that stops here leaves its run directory byte for byte as it was, and it
stops before the first expensive step (the latency profile). Every rank decides the same from the same files.

Resuming (``checkpoint.resume=auto``) continues only a run whose saved config matches the new one on every key
that shapes the result; :data:`RESUMABLE_KEYS` may differ (the README lists them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.config import Config
from dist_hrnas.errors import UserError
from dist_hrnas.fileio import writable_dir_problem
from dist_hrnas.latency.lut import check_lut_file
from dist_hrnas.names import RunFiles

# Keys that may change when a run is continued: how long it trains on, how it logs, how the ranks talk,
# checkpointing, and the config file's name. A key ending in ".*" covers its whole section.
RESUMABLE_KEYS = ("train.epochs", "train.log_every", "log.*", "dist.*", "checkpoint.*", "name")

# What every training checkpoint holds (train.checkpoint_payload): a file without one of them is not one.
_CHECKPOINT_KEYS = ("arch", "model", "optimizer", "scheduler", "step", "epoch", "rng", "meta", "config")


@dataclass
class Start:
    """The decision: the checkpoint to continue (or None), and a finished run's summary (nothing to do)."""

    resume: dict | None = None
    finished_summary: dict | None = None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.startswith("dist.deepspeed"):
            out |= _flatten(value, dotted + ".")
        else:
            out[dotted] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def config_differences(saved: dict, new: dict) -> list[str]:
    """``key: saved -> new`` for every key outside :data:`RESUMABLE_KEYS` where the two configs differ."""
    a, b = _flatten(saved), _flatten(new)
    # keys only one side has (added or retired since the checkpoint was written) are not compared
    return [f"{key}: {a[key]!r} in the run, {b[key]!r} now"
            for key in sorted(set(a) & set(b)) if not _resumable(key) and a[key] != b[key]]


def check_outputs_and_inputs(cfg: Config, files: RunFiles) -> None:
    """Files read later (the LUT, the DeepSpeed settings) are valid and the outputs writable; writes nothing."""
    problem = writable_dir_problem(files.root)
    if problem:
        raise UserError(f"log.run_dir: cannot write the run directory {files.root} ({problem}); "
                        f"choose another log.run_dir")
    if files.root.exists() and not files.root.is_dir():
        raise UserError(f"log.run_dir: {files.root} is a file, not a directory; choose another log.run_dir")
    if cfg.prune.penalty != "none":
        check_lut_file(cfg.latency)
    if cfg.dist.engine == "deepspeed" or cfg.dist.deepspeed:
        from dist_hrnas.parallel.deepspeed_engine import check_deepspeed_settings  # imports deepspeed lazily

        check_deepspeed_settings(cfg.dist.deepspeed)


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: the run is continued (re-evaluated) and a good one written
    return summary if isinstance(summary, dict) else None


def decide_start(cfg: Config, files: RunFiles) -> Start:
    """Check everything that can be checked now, then whether to resume; raise one line on any problem."""
    check_outputs_and_inputs(cfg, files)
    last = files.last_checkpoint
    if cfg.checkpoint.resume != "auto" or not last.is_file():
        return Start()
    ckpt = load_checkpoint(last)
    missing = [key for key in _CHECKPOINT_KEYS if key not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"{last} is not a dist_hrnas training checkpoint (no {(missing or ['config'])[0]!r}): "
                        f"delete it or set checkpoint.resume=never")
    diffs = config_differences(ckpt["config"], cfg.to_dict())
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise UserError(f"{files.root} holds a run with another config ({shown}): to continue it use the same "
                        f"settings; to start afresh here set checkpoint.resume=never (the old run is kept under "
                        f"{files.root / RunFiles.PREVIOUS}/), or set another log.run_dir")
    if ckpt["epoch"] >= cfg.train.epochs and files.summary.is_file():
        summary = _read_summary(files.summary)
        if summary is not None:
            return Start(ckpt, summary)
    return Start(ckpt)
