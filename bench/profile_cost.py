"""What building the latency LUT for the ImageNet supernet costs on this CPU: cold (empty LUT) and cached (every
entry present: nothing is timed). Prints one JSON object.

Usage: ``python bench/profile_cost.py [--config configs/hrnas_imagenet.yaml] [section.key=value ...]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.latency import make_timer, read_lut_file  # noqa: E402
from dist_hrnas.latency.measure import lut_profile  # noqa: E402
from dist_hrnas.models import build_model  # noqa: E402


def build_once(cfg, model) -> tuple[float, int]:
    """Wall seconds of one LUT build (plan, look-ups, timing what is missing, save) and how many ops it timed."""
    timer = make_timer(cfg.latency)
    start = time.perf_counter()
    lut_profile(model, cfg.data.image_size, cfg.latency, timer)
    return time.perf_counter() - start, timer.counts.get("op", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "hrnas_imagenet.yaml"))
    parser.add_argument("overrides", nargs="*", help="e.g. latency.repeats=15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lut = Path(tmp) / "lut.json"
        cfg = load_config(args.config, ["latency.batch_size=1", *args.overrides, f"latency.lut={lut}"])
        model = build_model(cfg.model)
        cold_s, cold_ops = build_once(cfg, model)
        cached_s, cached_ops = build_once(cfg, model)
        entries = sum(len(t["ops"]) for t in read_lut_file(lut)["tables"].values())
        size = lut.stat().st_size
    branches = sum(len(b.branches) for _, b in model.named_blocks())
    print(json.dumps({"config": Path(args.config).name, "device": cfg.latency.device, "backend": cfg.latency.backend,
                      "batch_size": cfg.latency.batch_size, "image_size": cfg.data.image_size,
                      "threads": cfg.latency.threads, "warmup": cfg.latency.warmup, "repeats": cfg.latency.repeats,
                      "cost": cfg.latency.cost, "branches": branches, "lut_entries": entries, "lut_bytes": size,
                      "cold_s": round(cold_s, 2), "cold_ops_timed": cold_ops,
                      "cached_s": round(cached_s, 3), "cached_ops_timed": cached_ops,
                      "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)}, indent=2))


if __name__ == "__main__":
    main()
