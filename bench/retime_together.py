"""Finished budget searches, however many code versions or work folders they come from, re-timed *together*: the
supernet and every run's searched network in the same interleaved rounds (fresh processes, bench/search_quality's
re-timing), one sitting per pass, so a comparison of two versions is not a comparison of two sittings (a sitting
moves all its ratios together by up to ~5 % here). Each run's re-timed ratio to the supernet against its
``prune.target_ratio``, beside what the run itself read. Prints one JSON object.

Usage: ``python bench/retime_together.py OUT.json PASSES RUN_DIR...`` (list the versions' runs alternately, so
neither sits later in the rounds; passes kept in OUT.json are reused and more are added)
"""
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.search_quality import floor_arch, retime_ms  # noqa: E402
from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.fileio import atomic_write_json  # noqa: E402
from dist_hrnas.models.arch import load_arch_file  # noqa: E402


def _fail(line: str) -> None:
    print(line, file=sys.stderr)
    sys.exit(2)


def main() -> None:
    if len(sys.argv) < 4 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        _fail("usage: python bench/retime_together.py OUT.json PASSES RUN_DIR... (PASSES a count >= 1)")
    out, passes, dirs = Path(sys.argv[1]), int(sys.argv[2]), [Path(d) for d in sys.argv[3:]]
    missing = [str(d) for d in dirs if not (d / "summary.json").exists() or not (d / "searched_arch.yaml").exists()]
    if missing:
        _fail(f"retime_together: not a finished search (no summary.json / searched_arch.yaml): {missing[0]}")
    cfgs = [load_config(d / "config.yaml") for d in dirs]
    batch = {c.latency.batch_size for c in cfgs}
    if len(batch) != 1 or any(c.prune.target_ratio is None for c in cfgs):
        _fail("retime_together: every RUN_DIR must be a prune.target_ratio search, all at one latency.batch_size")
    batch = batch.pop()
    archs = [floor_arch(batch)[0]] + [load_arch_file(d / "searched_arch.yaml") for d in dirs]
    kept = json.loads(out.read_text()) if out.exists() else {}
    figures = kept.get("passes", []) if kept.get("dirs") == [str(d) for d in dirs] else []
    while len(figures) < passes:
        figures.append(retime_ms(archs, batch))
        atomic_write_json(out, {"dirs": [str(d) for d in dirs], "passes": figures})  # each pass kept when done
    rows = []
    for i, (d, cfg) in enumerate(zip(dirs, cfgs)):
        summary = json.loads((d / "summary.json").read_text())
        ratios = [p[i + 1] / p[0] for p in figures]
        rows.append({"run_dir": str(d), "target_ratio": cfg.prune.target_ratio,
                     "run_vs_target_pct": summary.get("latency_vs_target_pct"),
                     "retimed_ratio_passes": [round(r, 4) for r in ratios],
                     "retimed_vs_target_pct": round(100 * (statistics.mean(ratios) / cfg.prune.target_ratio - 1), 2),
                     "val_top1": summary["val_top1"], "candidate_timing_s": summary.get("candidate_timing_s"),
                     "wall_time_s": summary.get("wall_time_s")})
    result = {"batch": batch, "supernet_ms_passes": [round(p[0], 4) for p in figures], "runs": rows,
              "dirs": [str(d) for d in dirs], "passes": figures}
    atomic_write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("dirs", "passes")}, indent=1))


if __name__ == "__main__":
    main()
