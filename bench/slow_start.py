"""A search whose supernet figure is taken in a slow spell, judged afterwards: does its model follow the machine?

Each run is a rho digits search at batch 1 (``configs/digits.yaml``, one LUT for all runs) started while a memory
hog (a numpy loop over two arrays of ``--hog-mb`` MB each, on the other core) slows the machine; the hog is stopped
the moment the search logs its supernet figure, so the search trains and shrinks in a quiet machine with its start
figure read slow: the case of benchmark runs *AP* and *AQ*, whose start figures read 7-9 % over their re-timing
(``search.decide.start_level``). Afterwards every shrink's network is re-timed (bench/retime.py: fresh processes,
interleaved rounds) against the search's prediction. The hog's effect varies run to run (on this box 8 MB arrays
slowed the figure by 0-16 %); each run reports how far its start figure read over the re-timing. ``--code`` runs
another checkout's search (an A/B: the same LUT, one box). Nothing else may run while it does. Prints one JSON
object.

Usage: ``python bench/slow_start.py --lut LUT [--runs 3] [--code DIR] [--hog-mb 8] [--work DIR] [--out F]``
(build the LUT with ``python -m dist_hrnas.profile --config configs/digits.yaml --device cpu --out LUT``)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.retime import retimed_run  # noqa: E402

HOG = ("import numpy as np, sys\n"
       "n = int(sys.argv[1]) * 2 ** 17  # float64s in that many MB\n"
       "a, b = np.ones(n), np.ones(n)\n"
       "while True:\n"
       "    np.add(a, b, out=a)\n")
STARTED = "ms on"  # train.start_search logs "... supernet X ms on DEVICE (batch N)" once the figure is taken


def one_search(code: Path, run_dir: Path, lut: str, hog_mb: int) -> dict:
    """One search started under the hog; the hog stopped at its supernet figure; its shrinks re-timed."""
    shutil.rmtree(run_dir, ignore_errors=True)
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(hog_mb)])
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(code),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dist_hrnas.train", "--config", str(code / "configs" / "digits.yaml"),
           "latency.batch_size=1", "log.progress=false", "checkpoint.resume=never", f"log.run_dir={run_dir}",
           f"latency.lut={lut}"]
    search = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in search.stdout:
            if STARTED in line:
                break
    finally:
        hog.kill()
        hog.wait()
    search.stdout.read()
    if search.wait() != 0:
        raise SystemExit(f"the search in {run_dir} failed (rc {search.returncode}); run it by hand: {' '.join(cmd)}")
    retimed = retimed_run(run_dir)
    errors = [r["error_pct"] for r in retimed["shrinks"]]
    records = [json.loads(line) for line in (run_dir / "shrinks.jsonl").read_text().splitlines()]
    return {"run_dir": str(run_dir), "supernet_start_over_retimed": retimed.get("supernet_start_over_retimed"),
            "start_level": next((r["latency_start_level"] for r in records if "latency_start_level" in r), None),
            "errors_pct": errors,
            "median_abs_error_pct": round(statistics.median(abs(e) for e in errors), 2) if errors else None,
            "max_abs_error_pct": round(max(abs(e) for e in errors), 2) if errors else None,
            "shrinks_raising_measured_latency": sum(r["raises_latency"] for r in retimed["shrinks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lut", required=True, help="a LUT built on this machine (python -m dist_hrnas.profile)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose search runs (default: this one)")
    parser.add_argument("--hog-mb", type=int, default=8, help="MB per array of the memory hog")
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "tmp" / "slow_start"))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not Path(args.lut).is_file():
        raise SystemExit(f"--lut {args.lut}: no such file; build one with python -m dist_hrnas.profile "
                         f"--config configs/digits.yaml --device cpu --out {args.lut}")
    runs = [one_search(Path(args.code).resolve(), Path(args.work) / f"run{i}", args.lut, args.hog_mb)
            for i in range(args.runs)]
    slow = [r for r in runs if (r["supernet_start_over_retimed"] or 0) > 1.05]  # the hog took: a start read slow
    out = {"code": str(Path(args.code).resolve()), "hog_mb": args.hog_mb, "runs": runs,
           "slow_start_runs": len(slow),
           "slow_start_median_abs_error_pct": round(statistics.median(
               abs(e) for r in slow for e in r["errors_pct"]), 2) if slow else None}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
