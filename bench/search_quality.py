"""Seconds vs MACs vs equal penalty, head to head on digits with this CPU as the target device.

For each latency target (batch 1 = latency, batch 32 = throughput), each ``prune.penalty`` mode and each
``prune.rho``, run the search (same seed, data and epochs), then measure every final network end to end with one
harness in interleaved rounds (median), so machine drift hits all networks alike. Per mode the (latency, top-1)
points form a curve; the latency ratio seconds/macs is read off both curves at the best accuracy both reach
(linear interpolation on each mode's Pareto front).

Writes ``bench/results/search_quality.json`` and ``bench/results/search_quality_<target>.png``; prints the JSON.
Usage: ``python bench/search_quality.py [--epochs N] [--rhos a,b,c] [--rounds N]`` (about 25-30 minutes here)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench.retime import retimed_run  # noqa: E402
from dist_hrnas.config import LatencyConfig  # noqa: E402
from dist_hrnas.latency import Timer, measure_network  # noqa: E402
from dist_hrnas.models import load_arch_file, model_from_arch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODES = ("seconds", "macs", "equal")
TARGETS = {"latency": 1, "throughput": 32}
HEADLINE = "throughput"  # where seconds and MACs disagree on digits (see the README's Results section)


def run_search(mode: str, rho: float, batch: int, epochs: int, run_dir: Path) -> dict:
    """One single-process search; returns its summary.json (reused when the run already finished)."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "dist_hrnas.train", "--config", str(ROOT / "configs" / "digits.yaml"),
               f"prune.penalty={mode}", f"prune.rho={rho}", f"latency.batch_size={batch}", f"train.epochs={epochs}",
               "log.progress=false", "checkpoint.resume=never", f"log.run_dir={run_dir}"]
        # training may use every core (its speed is not what is compared); the timing itself is one thread
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"search {mode} rho={rho} batch={batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def measure_interleaved(arch_files: list[Path], batch: int, rounds: int) -> list[float]:
    """Median end-to-end ms of each network; every round times every network once, in turn."""
    cfg = LatencyConfig(device="cpu", batch_size=batch, threads=1, warmup=3, repeats=10, network_repeats=10)
    timer = Timer(torch.device("cpu"), cfg.warmup, cfg.repeats)
    nets = [model_from_arch(load_arch_file(path), source=str(path)) for path in arch_files]
    samples: list[list[float]] = [[] for _ in nets]
    for _ in range(rounds):
        for i, net in enumerate(nets):
            samples[i].append(measure_network(net, 32, cfg, timer) * 1e3)
    return [statistics.median(s) for s in samples]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(latency, top1) points not beaten by a faster-and-at-least-as-accurate one, by latency."""
    front, best = [], -1.0
    for lat, acc in sorted(points):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def latency_at(front: list[tuple[float, float]], acc: float) -> float:
    """Latency the front needs to reach ``acc`` (linear between neighbouring points)."""
    for (l0, a0), (l1, a1) in zip(front, front[1:]):
        if a0 <= acc <= a1:
            return l0 if a1 == a0 else l0 + (l1 - l0) * (acc - a0) / (a1 - a0)
    if front and acc <= front[0][1]:
        return front[0][0]
    raise ValueError(f"accuracy {acc} is not reached on this curve")


def compare(runs: list[dict]) -> dict:
    fronts = {m: pareto([(r["latency_ms"], r["val_top1"]) for r in runs if r["penalty"] == m]) for m in MODES}
    matched = min(fronts["seconds"][-1][1], fronts["macs"][-1][1])
    ratio = latency_at(fronts["seconds"], matched) / latency_at(fronts["macs"], matched)
    return {"pareto": {m: [list(p) for p in f] for m, f in fronts.items()},
            "latency_ratio_seconds_vs_macs": round(ratio, 4), "matched_val_top1": matched}


def plot(target: str, batch: int, runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in zip(MODES, "osd"):
        pts = sorted((r["latency_ms"], r["val_top1"]) for r in runs if r["penalty"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
    ax.set_xlabel(f"measured latency on CPU, batch {batch} (ms)")
    ax.set_ylabel("validation top-1")
    ax.set_title(f"digits search, {target} target")
    ax.legend(title="prune.penalty")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def count_latency_increases(run_dir: Path) -> tuple[int, int]:
    """Shrinks whose network, re-timed afterwards (fresh processes, interleaved rounds: bench/retime.py), is more
    than 2 % slower than the network before it (the monotonic-shrinking check)."""
    rows = retimed_run(run_dir)["shrinks"]
    return sum(r["raises_latency"] for r in rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rhos", default="0.01,0.03,0.09")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default=str(RESULTS / "tmp" / "search_quality"))
    args = parser.parse_args()
    rhos = [float(r) for r in args.rhos.split(",")]
    started = time.perf_counter()
    result: dict = {"epochs": args.epochs, "rhos": rhos, "targets": {}, "headline_target": HEADLINE}
    rises = total = 0
    for target, batch in TARGETS.items():
        runs = []
        for mode in MODES:
            for rho in rhos:
                run_dir = Path(args.work) / f"{target}_{mode}_{rho}"
                summary = run_search(mode, rho, batch, args.epochs, run_dir)
                r, t = count_latency_increases(run_dir)
                rises, total = rises + r, total + t
                runs.append({"penalty": mode, "rho": rho, "val_top1": summary["val_top1"],
                             "params": summary["params_searched"], "macs": summary["macs_searched"],
                             "shrinks": summary["shrinks"], "run_dir": str(run_dir.relative_to(ROOT)),
                             "arch": run_dir / "searched_arch.yaml"})
        for run, ms in zip(runs, measure_interleaved([r["arch"] for r in runs], batch, args.rounds)):
            run["latency_ms"] = round(ms, 4)
            run["arch"] = str(run["arch"].relative_to(ROOT))
        png = RESULTS / f"search_quality_{target}.png"
        plot(target, batch, runs, png)
        result["targets"][target] = {"latency_batch_size": batch, "runs": runs, **compare(runs),
                                     "plot": str(png.relative_to(ROOT))}
    headline = result["targets"][HEADLINE]
    result["latency_ratio_seconds_vs_macs"] = headline["latency_ratio_seconds_vs_macs"]
    result["matched_val_top1"] = headline["matched_val_top1"]
    result["shrinks_raising_measured_latency"] = {"count": rises, "of": total}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    from dist_hrnas.fileio import atomic_write_json

    atomic_write_json(RESULTS / "search_quality.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
