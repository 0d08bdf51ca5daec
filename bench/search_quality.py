"""Does a search driven by measured seconds find networks faster on the device than HR-NAS's MACs search?

Digits, this CPU as the target, two targets (batch 32 = throughput, batch 1 = latency). Modes: ``seconds``
(``latency.cost=average``, the seed's rule), ``seconds_launch`` (``latency.cost=fixed_plus_marginal``, the
default since this benchmark), ``macs`` and ``equal``; every (target, mode) runs

- a rho sweep (``--rhos``, light to heavy pruning) and
- budget-matched searches (``target_ratio`` 0.5 and 0.3 at batch 32; the tightest the supernet allows at batch 1:
  the measured floor, every prunable branch removed, plus 5 %),

each with ``--seeds`` seeds (``train.seed``: init, data order, dropout; the validation split stays). Every final
network is re-timed afterwards with the supernet and the floor, each figure in a fresh process, all of a target
in the same interleaved rounds (bench/retime.py's harness), so a slow spell falls on all of them. Reported per
target: each mode's Pareto front through the per-rho means (error bars = standard errors over seeds), the
latency ratio of each seconds mode to ``macs`` at the best top-1 both fronts reach with a bootstrap 90 %
interval over seeds (bench/quality_stats.py), and the budget-matched accuracy table. Shrinks that made a network
slower are counted on seed 0's rho runs (every shrink re-timed, before against after).

Writes ``bench/results/search_quality.json`` and ``bench/results/search_quality_<target>.png``; prints the JSON.
Runs whose ``summary.json`` exists under ``--work`` are reused, so an interrupted run continues; so are a target's
re-timed figures (``retimed_<target>.json``) while its runs are the same.
Usage: ``python bench/search_quality.py [--quick] [--seeds N] [--rhos a,b,c,d] [--epochs N] [--modes ...]
[--targets throughput,latency] [--parts rho,budget] [--retime-passes N]``
(full: 3 seeds x 4 modes x (4 rhos + budgets) x 2 targets, several hours here; ``--quick``: 1 seed, 2 rhos).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.quality_stats import Cell, bootstrap_ratio, cell_means, matched_ratio, pareto, summarise_cell  # noqa: E402
from bench.retime import retimed_run  # noqa: E402
from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.fileio import atomic_write_json  # noqa: E402
from dist_hrnas.latency import CleanProcessTimer  # noqa: E402
from dist_hrnas.models import build_model, export_arch, load_arch_file, model_from_arch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "digits.yaml"
MODES = {"seconds": ["prune.penalty=seconds", "latency.cost=average"],
         "seconds_launch": ["prune.penalty=seconds", "latency.cost=fixed_plus_marginal"],
         "macs": ["prune.penalty=macs"],
         "equal": ["prune.penalty=equal"]}
SECONDS_MODES = ("seconds", "seconds_launch")
TARGETS = {"throughput": 32, "latency": 1}
HEADLINE = "throughput"
BUDGETS = {"throughput": [0.5, 0.3], "latency": ["tightest"]}
FLOOR_MARGIN = 0.05   # the tightest batch-1 budget: the measured floor's ratio plus this, on a 0.05 grid
RHOS = "0.01,0.02,0.04,0.08"


def run_search(overrides: list[str], batch: int, epochs: int, run_dir: Path, lut: Path) -> dict:
    """One single-process search; its summary.json (reused when the run already finished)."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "dist_hrnas.train", "--config", str(CONFIG), *overrides,
               f"latency.batch_size={batch}", f"train.epochs={epochs}", "log.progress=false",
               "checkpoint.resume=never", f"log.run_dir={run_dir}", f"latency.lut={lut}",
               # every final network is re-timed afterwards with all the others (bench_target): the run's own
               # re-timing of its supernet and final (about a fifth of a digits run here) would be thrown away
               "latency.retime_final=false"]
        # training may use every core (its speed is not compared); the timing itself runs at latency.threads
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"search {' '.join(overrides)} (batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def floor_arch(batch: int) -> tuple[dict, dict]:
    """(the supernet's architecture, the same with every prunable branch removed: what no search goes below)."""
    cfg = load_config(CONFIG, [f"latency.batch_size={batch}"])
    supernet = export_arch(build_model(cfg.model))
    floor, skipped = copy.deepcopy(supernet), False
    for block, entry in zip(build_model(cfg.model).named_blocks(), floor["blocks"]):
        if cfg.prune.skip_expand1 and not block[1].expand and not skipped:
            skipped = True  # the first non-expanding block is never pruned (prune.skip_expand1)
            continue
        entry["kernel_sizes"], entry["widths"] = [], []
    return supernet, floor


def retime_ms(archs: list[dict], batch: int) -> list[float]:
    """Each architecture's ms at ``batch``, fresh processes, all in the same interleaved rounds."""
    cfg = load_config(CONFIG, [f"latency.batch_size={batch}"])
    latency = dataclasses.replace(cfg.latency, clean_process=True, lut="", lut_device="")
    timer = CleanProcessTimer(latency, cfg.data.image_size)
    return [s * 1e3 for s, _ in timer.compare([model_from_arch(a) for a in archs])]


def tightest_ratio(batch: int, work: Path) -> float:
    """The tightest budget at ``batch``, measured once per work folder: a second measurement could round to
    another ratio and so name other run folders, and the finished runs would not be reused."""
    cached = work / f"tightest_b{batch}.json"
    if cached.exists():
        return json.loads(cached.read_text())["target_ratio"]
    supernet, floor = floor_arch(batch)
    super_ms, floor_ms = retime_ms([supernet, floor], batch)
    ratio = math.ceil((floor_ms / super_ms + FLOOR_MARGIN) * 20) / 20
    atomic_write_json(cached, {"target_ratio": ratio, "supernet_ms": round(super_ms, 4), "floor_ms": round(floor_ms, 4)})
    return ratio


def target_runs(target: str, batch: int, args, modes: list[str]) -> list[dict]:
    """Every search of one target (run or reused), as rows without their re-timed latency yet."""
    work, rows = Path(args.work), []
    lut = work / f"lut_b{batch}.json"  # ops and calibration networks timed once per target
    budgets = [tightest_ratio(batch, work) if b == "tightest" else b for b in args.budgets[target] if "budget" in args.parts]
    settings = [("rho", r) for r in args.rhos] * ("rho" in args.parts) + [("budget", b) for b in budgets]
    for mode in modes:
        for kind, value in settings:
            for seed in range(args.seeds):
                run_dir = work / f"{target}_{mode}_{kind}{value}_seed{seed}"
                extra = [f"prune.rho={value}"] if kind == "rho" else [f"prune.target_ratio={value}"]
                summary = run_search([*MODES[mode], *extra, f"train.seed={seed}"], batch, args.epochs, run_dir, lut)
                rows.append({"mode": mode, kind: value, "seed": seed, "val_top1": summary["val_top1"],
                             "params": summary["params_searched"], "macs": summary["macs_searched"],
                             "shrinks": summary["shrinks"], "run_dir": os.path.relpath(run_dir, ROOT)})
    return rows


def cells(rows: list[dict], mode: str, kind: str) -> dict[float, Cell]:
    out: dict[float, Cell] = {}
    for r in sorted((r for r in rows if r["mode"] == mode and kind in r), key=lambda r: r["seed"]):
        cell = out.setdefault(r[kind], {"latency_ms": [], "val_top1": []})
        cell["latency_ms"].append(r["latency_ms"])
        cell["val_top1"].append(r["val_top1"])
    return out


def compare_modes(rows: list[dict], modes: list[str], resamples: int) -> dict:
    """Per mode the rho cells and front; each mode's latency ratio to ``macs`` (and seconds_launch's to
    seconds) at matched top-1 with its bootstrap interval."""
    by_mode = {m: cells(rows, m, "rho") for m in modes}
    out: dict = {"cells": {m: [{"rho": rho, **summarise_cell(c)} for rho, c in sorted(cs.items())]
                           for m, cs in by_mode.items()},
                 "pareto": {m: [[round(a, 4), round(b, 5)] for a, b in pareto(cell_means(list(cs.values())))]
                            for m, cs in by_mode.items()}, "ratios": {}}
    pairs = [(m, "macs") for m in modes if m != "macs"] + [("seconds_launch", "seconds")]
    for a, b in pairs:
        if by_mode.get(a) and by_mode.get(b):  # both ran their rho sweep (--parts)
            ca, cb = list(by_mode[a].values()), list(by_mode[b].values())
            ratio, matched = matched_ratio(ca, cb)
            low, high = bootstrap_ratio(ca, cb, resamples)
            out["ratios"][f"{a}_vs_{b}"] = {"ratio": round(ratio, 4), "interval_90": [round(low, 4), round(high, 4)],
                                            "matched_val_top1": round(matched, 5)}
    return out


def budget_table(rows: list[dict], modes: list[str], supernet_ms: float) -> dict:
    """Per budget ratio and mode: mean +- se of top-1 and of the re-timed latency, and how it lands."""
    table: dict = {}
    for mode in modes:
        for ratio, cell in cells(rows, mode, "budget").items():
            target_ms = ratio * supernet_ms
            entry = table.setdefault(str(ratio), {"target_ms": round(target_ms, 3)})
            s = summarise_cell(cell)
            entry[mode] = {**s, "vs_target_pct": round(100 * (s["latency_ms"] / target_ms - 1), 2),
                           "of_supernet": round(s["latency_ms"] / supernet_ms, 4)}
    return table


def plot(target: str, batch: int, result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (mode, rows), marker in zip(result["cells"].items(), "osd^v"):
        ax.errorbar([r["latency_ms"] for r in rows], [r["val_top1"] for r in rows], marker=marker, capsize=3,
                    xerr=[r["latency_ms_se"] for r in rows], yerr=[r["val_top1_se"] for r in rows], label=mode)
    for (ratio, entry), marker in zip(result["budgets"].items(), "*PX"):
        for i, mode in enumerate(result["cells"]):
            if entry.get(mode):  # budget runs: the mode's colour, one marker per target_ratio
                cell = entry[mode]
                ax.errorbar(cell["latency_ms"], cell["val_top1"], xerr=cell["latency_ms_se"], yerr=cell["val_top1_se"],
                            marker=marker, ms=9, color=f"C{i}", capsize=2, ls="none", label=f"{mode}, budget {ratio}")
    ax.axvline(result["floor_ms"], color="grey", ls=":", label="floor (no prunable branch)")
    ax.set_xlabel(f"re-timed latency on CPU, batch {batch} (ms)")
    ax.set_ylabel("validation top-1 (mean over seeds)")
    ax.set_title(f"digits search, {target} target (lines: rho; markers: budgets)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def retimed_target(target: str, batch: int, rows: list[dict], work: Path,
                   passes: int = 1) -> tuple[list[list[float]], int, int]:
    """The supernet, the floor and every final network re-timed together (ms, in that order), in at least
    ``passes`` passes (every kept pass is used: more sittings only sharpen the figures), and
    how many of seed 0's rho runs' shrinks made the network slower (of how many). Kept under ``work`` and reused
    while the target's runs are the same ones: a full run spans sessions here, and a pass's figures must come
    from one sitting (its interleaved rounds), so each is taken whole and kept as soon as it is done; asking for
    more passes later adds passes to the kept ones (at batch 1 here one pass put identical networks up to 40 %
    apart, so a second sitting is what tells an effect from a spell of the machine)."""
    cache, run_dirs = work / f"retimed_{target}.json", [r["run_dir"] for r in rows]
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    if kept.get("batch") != batch or kept.get("run_dirs") != run_dirs:
        kept = {}
    if kept and "passes" not in kept:  # kept before there were passes: its one pass
        kept["passes"] = [kept.pop("ms")]
    if not kept:
        rises = total = 0
        for row in rows:  # every shrink re-timed, before against after: seed 0's rho runs
            if "rho" in row and row["seed"] == 0:
                shrinks = retimed_run(ROOT / row["run_dir"])["shrinks"]
                rises, total = rises + sum(s["raises_latency"] for s in shrinks), total + len(shrinks)
        kept = {"batch": batch, "run_dirs": run_dirs, "passes": [], "rises": rises, "total": total}
    if len(kept["passes"]) < passes:
        supernet, floor = floor_arch(batch)
        archs = [supernet, floor] + [load_arch_file(ROOT / d / "searched_arch.yaml") for d in run_dirs]
    while len(kept["passes"]) < passes:
        kept["passes"].append(retime_ms(archs, batch))
        atomic_write_json(cache, kept)
    return kept["passes"], kept["rises"], kept["total"]


def identical_spread(rows: list[dict], supernet_ms: float) -> dict | None:
    """How far the runs that never shrank (the supernet itself) re-timed from the supernet's own figure: the
    resolution of this target's re-timing, since those networks are identical to it."""
    ratios = [r["latency_ms"] / supernet_ms for r in rows if r["shrinks"] == 0]
    if not ratios:
        return None
    return {"count": len(ratios), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
            "mean": round(sum(ratios) / len(ratios), 3)}


def bench_target(target: str, batch: int, args, modes: list[str]) -> tuple[dict, tuple[int, int]]:
    rows = target_runs(target, batch, args, modes)
    passes, rises, total = retimed_target(target, batch, rows, Path(args.work), args.retime_passes)
    ms = [sum(figures) / len(figures) for figures in zip(*passes)]  # each network's mean over the passes
    for i, (row, value) in enumerate(zip(rows, ms[2:])):
        row["latency_ms"] = round(value, 4)
        if len(passes) > 1:
            row["latency_ms_passes"] = [round(p[i + 2], 4) for p in passes]
    result = {"latency_batch_size": batch, "retime_passes": len(passes), "supernet_ms": round(ms[0], 4),
              "floor_ms": round(ms[1], 4), **({"supernet_ms_passes": [round(p[0], 4) for p in passes]}
                                              if len(passes) > 1 else {}),
              "no_shrink_vs_supernet": identical_spread(rows, ms[0]),
              **compare_modes(rows, modes, args.resamples), "budgets": budget_table(rows, modes, ms[0]), "runs": rows}
    out = Path(args.out)
    png = out.with_name(f"{out.stem}_{target}.png")  # the default --out gives search_quality_<target>.png
    plot(target, batch, result, png)
    result["plot"] = os.path.relpath(png, ROOT)
    return result, (rises, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rhos, one budget per target: for iterating")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rhos", default=RHOS)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {list(TARGETS)}")
    parser.add_argument("--parts", default="rho,budget", help="comma-separated subset of rho,budget (the sweep, "
                        "the budget-matched searches): a long run can be taken part by part, runs are reused")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--retime-passes", type=int, default=1, help="re-time every final network at least this many "
                        "times, each pass its own sitting of interleaved rounds; a network's figure is the mean over "
                        "the passes (passes kept under --work are reused and all count, so raising it adds passes)")
    parser.add_argument("--work", default=str(RESULTS / "tmp" / "search_quality"))
    parser.add_argument("--out", default=str(RESULTS / "search_quality.json"))
    args = parser.parse_args()
    args.rhos = [float(r) for r in args.rhos.split(",")]
    args.budgets = dict(BUDGETS)
    if args.quick:
        args.seeds, args.rhos = 1, args.rhos[1:3]
        args.budgets = {"throughput": [0.5], "latency": ["tightest"]}
    modes, targets = [m for m in args.modes.split(",") if m], [t for t in args.targets.split(",") if t]
    args.parts = [p for p in args.parts.split(",") if p]
    for flag, given, known in (("--modes", modes, MODES), ("--targets", targets, TARGETS),
                               ("--parts", args.parts, ("rho", "budget"))):
        if not given or any(g not in known for g in given):
            parser.error(f"{flag}: {given} is not a non-empty subset of {list(known)}")
    if args.retime_passes < 1:
        parser.error(f"--retime-passes: {args.retime_passes} is not a positive count; give 1 or more")
    started = time.perf_counter()
    result: dict = {"epochs": args.epochs, "seeds": args.seeds, "rhos": args.rhos, "modes": {m: MODES[m] for m in modes},
                    "budgets": args.budgets, "parts": args.parts, "targets": {}, "headline_target": HEADLINE}
    rises = total = 0
    for target in targets:
        result["targets"][target], (r, t) = bench_target(target, TARGETS[target], args, modes)
        rises, total = rises + r, total + t
    ratios = result["targets"].get(HEADLINE, {}).get("ratios", {})
    seconds = [m for m in SECONDS_MODES if f"{m}_vs_macs" in ratios]
    if seconds:  # the headline: the best seconds variant against macs at the throughput target
        best = min(seconds, key=lambda m: ratios[f"{m}_vs_macs"]["ratio"])
        result["best_seconds_mode"] = best
        result["latency_ratio_seconds_vs_macs"] = ratios[f"{best}_vs_macs"]["ratio"]
        result["latency_ratio_seconds_vs_macs_interval_90"] = ratios[f"{best}_vs_macs"]["interval_90"]
        result["matched_val_top1"] = ratios[f"{best}_vs_macs"]["matched_val_top1"]
    if "latency" in result["targets"]:
        result["batch1_launch_vs_average"] = result["targets"]["latency"]["ratios"].get("seconds_launch_vs_seconds")
    result["shrinks_raising_measured_latency"] = {"count": rises, "of": total}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
