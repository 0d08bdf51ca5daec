"""How well the latency model predicts reality on this machine (CPU). Prints one JSON object.

Per config (``configs/digits.yaml`` and ``configs/hrnas_imagenet.yaml``): build the LUT (branch curves +
fixed part), then for the supernet and ``--levels`` random shrinks (every branch keeps a random share of its
channels, some none) compare the predicted end-to-end latency (fixed part + each branch's curve at its width)
with the measured one (each network in a fresh process, as a search does with latency.clean_process, timed in
groups with the supernet in the same rounds, as the calibration networks are). The model is the one a search
builds (``profile_on_rank0``: per-op sum calibrated on the supernet and ``latency.calibration_networks`` sampled
sub-networks); the random shrinks here are held out of that fit. ``error_pct`` judges a prediction by the network's
own figure; ``referenced_error_pct`` by its ratio to the supernet beside it times the supernet figure the model
was fitted to (the model's error apart from how the machine's speed moved since the fit);
``calibration_held_out_*``: each calibration network predicted by a fit without it (leave one out).
The shrinks come on ``latency.width_step`` (the headline), at any width (``any_width_*``) and on each branch's own
channel grid (``branch_grid_*``: the widths ``prune.round_to: auto`` keeps a default search on).
``ops_within_10pct``: re-time ``--ops`` LUT entries and count those within +-10% of their LUT value.

``--trajectory``: run real digits searches (a rho run and a 0.5 budget run at batch 32, a rho run at batch 1) and
re-time every shrink's network afterwards (bench/retime.py: fresh processes, interleaved rounds; ``--retime-passes``
times, the mean is the figure); report the error of each shrink's prediction against that figure (``trajectory``)
and how far the passes disagree (``retiming_repeatability_*_pct``: a perfect prediction is off by that much), and
each search's start figure of the supernet over its re-timing (``supernet_start_over_retimed_range``: how far the
machine's speed moved between the two, which every absolute error carries), and the searches' own figures of
their shrinks' networks against the re-timing (``run_measured_vs_retimed_*_pct``: a model that predicts the
search's own figures exactly is off by that much).

Usage: ``python bench/latency_accuracy.py [--configs digits imagenet] [--levels 4] [--ops 40] [--trajectory]
[--retime-passes 2] [--out FILE]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench.retime import retimed_run  # noqa: E402
from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.latency import CleanProcessTimer, Timed, cpu_threads, make_timer, profile_on_rank0  # noqa: E402
from dist_hrnas.latency.curve import branch_key  # noqa: E402
from dist_hrnas.latency.measure import op_at_width, plan_branches  # noqa: E402
from dist_hrnas.latency.networks import CALIBRATION_GROUP, referenced_figures  # noqa: E402
from dist_hrnas.latency.timing import runner  # noqa: E402
from dist_hrnas.models import build_model, export_arch, model_from_arch  # noqa: E402
from dist_hrnas.search.surgery import shrink_model  # noqa: E402

CONFIGS = {"digits": (ROOT / "configs" / "digits.yaml", []),
           # batch 1 at 224px: latency mode, what the CPU figures use
           "imagenet": (ROOT / "configs" / "hrnas_imagenet.yaml", ["latency.batch_size=1"])}


def random_shrink(model, rng: random.Random, level: float, align: int, profile=None):
    """Every branch keeps about ``level`` of its channels (uniform in [level/2, 1.5 level]), rounded to a
    multiple of ``align`` (what ``prune.round_to`` guarantees; 1 = any width; 0 = each branch's own grid from
    ``profile``, what ``prune.round_to: auto`` keeps a default search on); some lose all."""
    masks = {}
    for name, block in model.named_blocks():
        block_masks = []
        for branch in block.branches:
            step = profile.grid(branch_key(name, branch.kernel)) if profile is not None else align
            share = min(1.0, rng.uniform(level / 2, 1.5 * level))
            n = round(share * branch.hidden / step) * step
            keep = torch.zeros(branch.hidden, dtype=torch.bool)
            keep[torch.randperm(branch.hidden, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
                 [:n]] = True
            block_masks.append(keep)
        masks[name] = block_masks
    shrink_model(model, masks)
    return model


@torch.no_grad()
def op_repeatability(model, cfg, timer, curves: dict, n_ops: int, rng: random.Random) -> tuple[float, float]:
    """Share of re-timed ops within +-10% of their LUT value, and the median ratio re-timed / LUT (whether the
    misses are noise or a shift)."""
    plans = plan_branches(model, cfg.data.image_size, cfg.latency)
    samples = {(sig): (p, w) for p in plans for w, sig in p.samples}
    lut_value = {sig: s for p in plans for (w, sig), (_, s) in zip(p.samples, curves[p.key])}
    chosen = rng.sample(sorted(samples), min(n_ops, len(samples)))
    ratios = []
    with cpu_threads(cfg.latency.threads):
        for sig in chosen:
            plan, width = samples[sig]
            c, h, w = plan.in_shape
            x = torch.randn(cfg.latency.batch_size, c, h, w)
            run = runner(op_at_width(plan.block, plan.kernel, width), x, cfg.latency, timer.device)
            again = timer(Timed(run, "op", width)).median_s
            ratios.append(again / lut_value[sig])
    return sum(abs(r - 1) <= 0.1 for r in ratios) / len(ratios), statistics.median(ratios)


def bench_config(name: str, levels: int, n_ops: int, seed: int) -> dict:
    path, extra = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(path, [*extra, f"latency.lut={tmp}/lut.json"])
        model = build_model(cfg.model)
        timer = make_timer(cfg.latency)
        # Networks are timed as a search times them (latency.clean_process): each in a fresh child process, so
        # this process stays as it was when it built the LUT (it re-times ops at the end).
        network_s = CleanProcessTimer(cfg.latency, cfg.data.image_size)
        start = time.perf_counter()
        # what a search does at its start: the LUT, the supernet and the calibration networks, the fit
        profile = profile_on_rank0(model, cfg.data.image_size, cfg.latency, timer, network_timer=network_s)
        build_s = time.perf_counter() - start
    curves = profile.curves
    rng = random.Random(seed)
    shares = [0.8 - 0.6 * i / max(1, levels - 1) for i in range(levels)]  # 0.8 .. 0.2 of the channels
    cases = [(s, cfg.latency.width_step) for s in shares] + [(s, 1) for s in shares]
    # Measured: each shrunk architecture (what searched_arch.yaml holds), built afresh in a clean process and
    # timed in groups with the supernet in the same rounds, as the calibration networks were
    nets = [model_from_arch(export_arch(random_shrink(build_model(cfg.model), rng, share, align)))
            for share, align in cases]
    # and on each branch's own grid (align 0; drawn after the others, so those stay as they were)
    cases += [(s, 0) for s in shares]
    nets += [model_from_arch(export_arch(random_shrink(build_model(cfg.model), rng, share, 0, profile)))
             for share in shares]
    ratios, supernet_s = referenced_figures(nets, model, cfg.data.image_size, cfg.latency, timer, network_s)
    group = [supernet_s[i // CALIBRATION_GROUP] for i in range(len(nets))]
    rows = [_row(1.0, 1, model, profile, statistics.median(supernet_s), profile.network_s)]
    rows += [_row(share, align, net, profile, ratio * ref, ratio * profile.network_s)
             for (share, align), net, ratio, ref in zip(cases, nets, ratios, group)]
    # Headline: supernet + shrinks to aligned widths (sampled by the curves; prune.round_to=width_step keeps
    # a search on them). Any-width shrinks are reported apart: between samples the curve interpolates.
    errors = [abs(r["error_pct"]) for r in rows if r["align"] > 1 or r["keep"] == 1.0]
    free = [abs(r["error_pct"]) for r in rows if r["align"] == 1 and r["keep"] < 1.0]
    shrunk = [abs(r["error_pct"]) for r in rows if r["align"] > 1]
    ops_only = [abs(r["ops_only_error_pct"]) for r in rows if r["align"] > 1 or r["keep"] == 1.0]
    # the same shrinks against their ratio to the supernet timed beside them, times the supernet figure the
    # model was fitted to: the model's error apart from how the machine's speed moved since the fit
    referenced = [abs(r["referenced_error_pct"]) for r in rows if r["align"] > 1]
    free_referenced = [abs(r["referenced_error_pct"]) for r in rows if r["align"] == 1 and r["keep"] < 1.0]
    own_grid = [r for r in rows if r["align"] == 0]
    loo = [abs(e) for e in profile.calibration.held_out_errors_pct()]
    within, ratio = op_repeatability(model, cfg, timer, curves, n_ops, rng)
    return {"median_abs_error_pct": round(statistics.median(errors), 2), "max_abs_error_pct": round(max(errors), 2),
            "ops_within_10pct": round(within, 3), "ops_median_retimed_over_lut": round(ratio, 3),
            "shrunk_median_abs_error_pct": round(statistics.median(shrunk), 2),
            "shrunk_referenced_median_abs_error_pct": round(statistics.median(referenced), 2),
            "shrunk_referenced_max_abs_error_pct": round(max(referenced), 2),
            "any_width_referenced_median_abs_error_pct": round(statistics.median(free_referenced), 2),
            "calibration_held_out_median_abs_error_pct": round(statistics.median(loo), 2) if loo else None,
            "calibration_held_out_max_abs_error_pct": round(max(loo), 2) if loo else None,
            "supernet_ms_per_group": [round(x * 1e3, 3) for x in supernet_s],
            "ops_only_median_abs_error_pct": round(statistics.median(ops_only), 2),
            "calibration_coef": {k: round(v, 4) for k, v in profile.calibration.coef.items()},
            "calibration_fit_errors_pct": [round(e, 2) for e in profile.calibration.errors_pct()],
            # on each branch's own grid: the networks a default search (prune.round_to: auto) visits
            "branch_grid_median_abs_error_pct": round(statistics.median(abs(r["error_pct"]) for r in own_grid), 2),
            "branch_grid_max_abs_error_pct": round(max(abs(r["error_pct"]) for r in own_grid), 2),
            "branch_grid_referenced_median_abs_error_pct": round(statistics.median(
                abs(r["referenced_error_pct"]) for r in own_grid), 2),
            "any_width_median_abs_error_pct": round(statistics.median(free), 2),
            "any_width_max_abs_error_pct": round(max(free), 2),
            "lut_build_s": round(build_s, 1), "batch_size": cfg.latency.batch_size, "image_size": cfg.data.image_size,
            "cost": cfg.latency.cost, "repeats": cfg.latency.repeats, "levels": rows}


def _row(share: float, align: int, net, profile, measured: float, referenced: float) -> dict:
    """One held-out network: its prediction against its own figure and against its referenced one."""
    predicted = profile.predict_s(net)
    ops_only = sum(profile.parts(net).values())
    return {"keep": round(share, 3), "align": align, "channels": sum(sum(b.widths) for _, b in net.named_blocks()),
            "predicted_ms": round(predicted * 1e3, 3), "measured_ms": round(measured * 1e3, 3),
            "error_pct": round(100 * (predicted - measured) / measured, 2),
            "referenced_ms": round(referenced * 1e3, 3),
            "referenced_error_pct": round(100 * (predicted - referenced) / referenced, 2),
            "ops_only_error_pct": round(100 * (ops_only - measured) / measured, 2)}


# The three searches of the trajectory (a rho run and a 0.5 budget run at batch 32, a rho run at batch 1), and the
# other budgets whose landing is checked the same way (re-timed afterwards in fresh processes).
TRAJECTORY_RUNS = {"rho_b32": ["latency.batch_size=32"],
                   "budget0.5_b32": ["latency.batch_size=32", "prune.target_ratio=0.5"],
                   "rho_b1": ["latency.batch_size=1"]}
BUDGET_RUNS = {"budget0.7_b32": ["latency.batch_size=32", "prune.target_ratio=0.7"],
               "budget0.35_b32": ["latency.batch_size=32", "prune.target_ratio=0.35"],
               "budget0.7_b1": ["latency.batch_size=1", "prune.target_ratio=0.7"]}


def trajectory(work: Path, passes: int = 2) -> dict:
    """Three real digits searches; every shrink's prediction against its network re-timed afterwards (the mean of
    ``passes`` re-timings; how far they disagree is reported as the truth's own noise)."""
    import subprocess

    out, errors, unseen, budgets, repeat, relative, levels, own = {}, [], [], {}, [], [], [], []
    # training may use every core (its speed is not what is measured); timing stays at latency.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    for name, extra in {**TRAJECTORY_RUNS, **BUDGET_RUNS}.items():
        run_dir = work / name
        if not (run_dir / "summary.json").exists():
            cmd = [sys.executable, "-m", "dist_hrnas.train", "--config", str(ROOT / "configs" / "digits.yaml"),
                   *extra, "log.progress=false", "checkpoint.resume=never", f"log.run_dir={run_dir}",
                   f"latency.lut={work / 'lut.json'}"]  # one LUT: ops and calibration networks timed once
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        retimed = retimed_run(run_dir, passes)
        repeat += retimed.get("repeatability_pct", [])
        if "supernet_start_over_retimed" in retimed:
            levels.append(retimed["supernet_start_over_retimed"])
        summary = json.loads((run_dir / "summary.json").read_text())
        retimed["summary"] = {k: summary.get(k) for k in ("val_top1", "shrinks", "latency_ms_supernet",
                                                          "latency_ms_searched", "target_latency_ms", "wall_time_s",
                                                          "candidate_timing_s", "candidate_networks_timed")}
        if name in TRAJECTORY_RUNS:
            errors += [abs(r["error_pct"]) for r in retimed["shrinks"]]
            unseen += [abs(r["error_pct_before_refit"]) for r in retimed["shrinks"] if "error_pct_before_refit" in r]
            relative += [abs(r["error_vs_supernet_pct"]) for r in retimed["shrinks"] if "error_vs_supernet_pct" in r]
            own += [100 * abs(r["run_measured_ms_after"] / r["retimed_ms_after"] - 1) for r in retimed["shrinks"]
                    if r.get("run_measured_ms_after")]
        if summary.get("target_latency_ms") and retimed["shrinks"]:
            final = retimed["shrinks"][-1]["retimed_ms_after"]
            ratio = float(dict(a.split("=") for a in extra)["prune.target_ratio"])
            retimed_ratio = final / retimed["supernet_retimed_ms"]  # the supernet timed in the same rounds
            budgets[name] = {"target_ms": summary["target_latency_ms"], "retimed_final_ms": final,
                             "vs_target_pct": round(100 * (final / summary["target_latency_ms"] - 1), 2),
                             "run_reported_vs_target_pct": summary.get("latency_vs_target_pct"),
                             # what the user asked for: the searched network / the supernet, re-timed together
                             "target_ratio": ratio, "retimed_ratio": round(retimed_ratio, 4),
                             "vs_target_ratio_pct": round(100 * (retimed_ratio / ratio - 1), 2),
                             # each re-timing pass's own ratio: how far the truth the landing is judged by moves
                             **({"retimed_ratio_passes": [round(f / s, 4) for f, s in zip(
                                 retimed["shrinks"][-1]["retimed_ms_after_passes"],
                                 retimed["supernet_retimed_ms_passes"])]} if passes > 1 else {})}
        out[name] = retimed
    out["median_abs_error_pct"] = round(statistics.median(errors), 2) if errors else None
    out["max_abs_error_pct"] = round(max(errors), 2) if errors else None
    # the same, out of sample: each prediction made before its shrink's own figure joined the calibration
    out["median_abs_error_pct_before_refit"] = round(statistics.median(unseen), 2) if unseen else None
    out["max_abs_error_pct_before_refit"] = round(max(unseen), 2) if unseen else None
    # the same as shares of each side's own supernet figure (bench/retime.py: error_vs_supernet_pct)
    out["median_abs_error_vs_supernet_pct"] = round(statistics.median(relative), 2) if relative else None
    out["max_abs_error_vs_supernet_pct"] = round(max(relative), 2) if relative else None
    out["shrinks"] = len(errors)
    if repeat:  # every network of every search: the re-timings' disagreement, the floor any prediction is judged at
        out["retiming_repeatability_median_pct"] = round(statistics.median(repeat), 2)
        out["retiming_repeatability_max_pct"] = round(max(repeat), 2)
    if own:  # the search's own figure of each network against its re-timing: the machine's move, not the model's
        out["run_measured_vs_retimed_median_pct"] = round(statistics.median(own), 2)
        out["run_measured_vs_retimed_max_pct"] = round(max(own), 2)
    if levels:  # each search's start figure of the supernet over its re-timing: the machine's move in between
        out["supernet_start_over_retimed_range"] = [min(levels), max(levels)]
    out["budgets"] = budgets
    out["shrinks_raising_measured_latency"] = sum(r["raises_latency"] for k, v in out.items() if isinstance(v, dict)
                                                  and "shrinks" in v for r in v["shrinks"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configs whose LUT and held-out sub-networks to check (none: --trajectory only)")
    parser.add_argument("--levels", type=int, default=4, help="random shrink levels besides the supernet")
    parser.add_argument("--ops", type=int, default=40, help="LUT ops re-timed for ops_within_10pct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--trajectory", action="store_true", help="also run and re-time three digits searches")
    parser.add_argument("--retime-passes", type=int, default=2,
                        help="re-time every search's networks this many times; their mean is the truth")
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "tmp" / "trajectory"))
    args = parser.parse_args()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "cores": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}}
    for name in args.configs:
        result[name] = bench_config(name, args.levels, args.ops, args.seed)
    if args.trajectory:
        result["trajectory"] = trajectory(Path(args.work), args.retime_passes)
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)  # other jobs inflate timings
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
