"""Re-time a finished search's networks afterwards: the supernet and the network after every shrink, rebuilt
from the run's files, each figure in a fresh process (one per network per round), interleaved in rounds so a
slow spell of the machine falls on all of them. Shared by bench/latency_accuracy.py (--trajectory) and
bench/search_quality.py; judge a search by these figures, never by its own."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from dist_hrnas.config import load_config
from dist_hrnas.latency import CleanProcessTimer
from dist_hrnas.models import build_model, export_arch, model_from_arch
from dist_hrnas.names import RunFiles


def shrink_archs(run_dir: Path) -> tuple[dict, list[tuple[dict, dict]]]:
    """(the supernet's architecture, [(shrinks.jsonl record, architecture after that shrink), ...])."""
    files = RunFiles(Path(run_dir))
    cfg = load_config(files.config)
    supernet = export_arch(build_model(cfg.model))
    out = []
    records = files.shrinks.read_text().splitlines() if files.shrinks.exists() else []
    for line in records:
        rec = json.loads(line)
        arch = copy.deepcopy(supernet)
        for entry in arch["blocks"]:
            entry["kernel_sizes"] = rec["kernel_sizes"][entry["name"]]
            entry["widths"] = rec["widths"][entry["name"]]
        out.append((rec, arch))
    return supernet, out


def retime(run_dir: Path, archs: list[dict]) -> list[float]:
    """Milliseconds of each architecture on this CPU at the run's latency settings (its config.yaml)."""
    cfg = load_config(RunFiles(Path(run_dir)).config)
    latency = dataclasses.replace(cfg.latency, clean_process=True, lut="", lut_device="")
    timer = CleanProcessTimer(latency, cfg.data.image_size)
    return [s * 1e3 for s, _ in timer.compare([model_from_arch(a) for a in archs])]


def retimed_run(run_dir: Path, passes: int = 1) -> dict:
    """The run's shrinks with their re-timed figures, before and after each, and the prediction's error. With
    ``passes`` > 1 every network is re-timed that many times (each pass its own fresh processes and rounds) and
    its figure is the passes' mean: two back-to-back passes of one search's networks differed by up to 8.5 % here
    (a spell of the machine lasting a whole pass), so one pass is a noisy truth to judge a prediction by. The
    passes' figures are kept (``*_passes``) and their disagreement is the truth's own noise (repeatability)."""
    supernet, shrinks = shrink_archs(run_dir)
    archs = [supernet] + [a for _, a in shrinks]
    each = [retime(run_dir, archs) for _ in range(passes)]
    ms = [sum(p[i] for p in each) / passes for i in range(len(archs))]
    summary = Path(run_dir) / "summary.json"
    run_supernet = json.loads(summary.read_text()).get("latency_ms_supernet") if summary.exists() else None
    rows = []
    for i, (rec, _) in enumerate(shrinks):
        predicted, after, before = rec["latency_ms_predicted_after"], ms[i + 1], ms[i]
        rows.append({"step": rec["step"], "retimed_ms_before": round(before, 3), "retimed_ms_after": round(after, 3),
                     "run_measured_ms_after": rec["latency_ms_measured_after"], "predicted_ms_after": predicted,
                     "error_pct": round(100 * (predicted - after) / after, 2),
                     # before the shrink's own figure joined the fit (runs from before the key: absent)
                     **({"error_pct_before_refit": round(100 * (rec["latency_ms_predicted_after_before_refit"] - after)
                                                         / after, 2)}
                        if "latency_ms_predicted_after_before_refit" in rec else {}),
                     # the prediction as a share of the run's supernet figure against the re-timed share of the
                     # supernet re-timed beside it: the model's error apart from the machine's speed between the
                     # run and the re-timing
                     **({"error_vs_supernet_pct": round(100 * ((predicted / run_supernet) / (after / ms[0]) - 1), 2)}
                        if run_supernet else {}),
                     "raises_latency": after > 1.02 * before,
                     **({"retimed_ms_after_passes": [round(p[i + 1], 3) for p in each]} if passes > 1 else {})})
    return {"run_dir": str(run_dir), "supernet_retimed_ms": round(ms[0], 3), "shrinks": rows,
            # the run's start figure of the supernet over its re-timing: how far the machine's speed moved between
            # them, which every absolute error above carries (error_vs_supernet_pct takes it out)
            **({"supernet_start_over_retimed": round(run_supernet / ms[0], 4)} if run_supernet else {}),
            **({"supernet_retimed_ms_passes": [round(p[0], 3) for p in each],
                "repeatability_pct": [round(100 * abs(max(f) / min(f) - 1), 2) for f in zip(*each)]}
               if passes > 1 else {})}
