"""One finished search, judged afterwards: every shrink's network re-timed (bench/retime.py: fresh processes,
interleaved rounds) against the search's prediction, and its final latency model on ``N`` sub-networks held out of
its calibration (another sampling seed). Prints one JSON object.

Usage: ``python bench/trajectory_quick.py RUN_DIR N`` (the quick form of ``latency_accuracy.py --trajectory``)
"""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

from bench.retime import retimed_run, retime
from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.config import load_config
from dist_hrnas.latency import LatencyProfile
from dist_hrnas.latency.calibration import sample_arch_widths
from dist_hrnas.latency.networks import arch_with_widths
from dist_hrnas.models import build_model, export_arch, model_from_arch


def main():
    run = Path(sys.argv[1])
    out = {"trajectory": retimed_run(run)}
    rows = out["trajectory"]["shrinks"]
    out["trajectory_median_abs_error_pct"] = round(statistics.median(abs(r["error_pct"]) for r in rows), 2)
    out["trajectory_max_abs_error_pct"] = round(max(abs(r["error_pct"]) for r in rows), 2)
    out["shrinks_raising_measured_latency"] = sum(r["raises_latency"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    out["summary"] = {k: summary.get(k) for k in ("val_top1", "shrinks", "latency_ms_supernet", "latency_ms_searched",
                                                  "wall_time_s", "candidate_timing_s", "candidate_networks_timed")}
    if summary.get("wall_time_s"):
        out["candidate_timing_share"] = round(summary["candidate_timing_s"] / summary["wall_time_s"], 3)
    cfg = load_config(run / "config.yaml")
    state = load_checkpoint(run / "checkpoints" / "last.pt")["search"]
    profile = LatencyProfile.from_state_dict(state["profile"], cfg.latency.cost)
    supernet = export_arch(build_model(cfg.model))
    held = sample_arch_widths({b["name"]: b["widths"] for b in supernet["blocks"]}, int(sys.argv[2]), cfg.latency.width_step,
                              seed=7)  # another seed: none of these is in the fit
    archs = [arch_with_widths(supernet, w) for w in held]
    ms = retime(run, archs)
    errs = []
    for a, m in zip(archs, ms):
        p = profile.predict_s(model_from_arch(a)) * 1e3
        errs.append(round(100 * (p - m) / m, 2))
    out["held_out_errors_pct"] = errs
    out["held_out_median_abs_error_pct"] = round(statistics.median(abs(e) for e in errs), 2)
    out["calibration_coef"] = profile.calibration.coef
    out["calibration_points"] = len(profile.calibration.points)
    print(json.dumps(out, indent=1))

if __name__ == '__main__':
    main()
