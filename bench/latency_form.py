"""latency.form=deployed vs eager: how much faster the networks run with every BN folded into its conv.

For the supernet of ``--config`` and each searched architecture given (``--arch``, a searched_arch.yaml), time the
whole network end to end in both forms, each figure in a fresh process (``CleanProcessTimer``, as the search and
the export time networks), the two forms interleaved over ``--rounds`` rounds (machine drift hits both alike; the
fastest round counts). Also the latency model's ops-only sum (branches + joins + fixed part from a fresh LUT, no
context part) in both forms, so the README can say how much of the difference the per-op LUT sees.

Usage (about 5 minutes for digits at batch 32 with 5 rounds on a quiet machine)::

    python bench/latency_form.py --config configs/digits.yaml --arch runs/digits/searched_arch.yaml \\
        [--rounds 5] [--out bench/results/latency_form.json] [section.key=value ...]

``--quick``: one round, few repeats (checks that it runs; the figures mean nothing).
Prints one JSON object: per network ``{eager_ms, deployed_ms, deployed_vs_eager_pct, ops_only_eager_ms,
ops_only_deployed_ms}`` plus the latency settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dist_hrnas.config import load_config  # noqa: E402
from dist_hrnas.fileio import atomic_write_json  # noqa: E402
from dist_hrnas.latency import CleanProcessTimer, LatencyTable, branch_key, make_timer  # noqa: E402
from dist_hrnas.latency.measure import lut_profile  # noqa: E402
from dist_hrnas.models import build_model, load_arch_file, model_from_arch  # noqa: E402

FORMS = ("eager", "deployed")


def ops_only_ms(model, image_size: int, cfg) -> float:
    """Fixed part + every branch at its width + every block's join, timed op by op (no LUT file, no context)."""
    curves, fixed_s, joins = lut_profile(model, image_size, cfg, make_timer(cfg), table=LatencyTable({}))
    branches = 0.0
    for name, block in model.named_blocks():
        for branch in block.branches:
            points = dict(curves[branch_key(name, branch.kernel)])
            branches += points[float(branch.hidden)]
    return 1e3 * (fixed_s + branches + sum(j[-1] for j in joins.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--arch", action="append", default=[], help="a searched_arch.yaml (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="one round, few repeats: checks that it runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quick = ["latency.warmup=1", "latency.repeats=2", "latency.network_repeats=2"] if args.quick else []
    cfg = load_config(args.config, [*quick, *args.overrides])
    rounds = 1 if args.quick else args.rounds
    nets = {"supernet": build_model(cfg.model)}
    nets |= {path: model_from_arch(load_arch_file(path), source=path) for path in args.arch}
    lat = {form: dataclasses.replace(cfg.latency, form=form, lut="", lut_device="") for form in FORMS}
    timers = {form: CleanProcessTimer(lat[form], cfg.data.image_size) for form in FORMS}
    best = {(name, form): math.inf for name in nets for form in FORMS}
    for r in range(rounds):
        for name, model in nets.items():
            for form in (FORMS if r % 2 == 0 else FORMS[::-1]):  # alternate which form goes first
                best[name, form] = min(best[name, form], timers[form](model))
    out = {"config": args.config, "image_size": cfg.data.image_size, "batch_size": cfg.latency.batch_size,
           "threads": cfg.latency.threads, "device": cfg.latency.device, "backend": cfg.latency.backend,
           "rounds": rounds, "quick": args.quick, "networks": {}}
    for name, model in nets.items():
        eager, deployed = 1e3 * best[name, "eager"], 1e3 * best[name, "deployed"]
        out["networks"][name] = {
            "eager_ms": round(eager, 4), "deployed_ms": round(deployed, 4),
            "deployed_vs_eager_pct": round(100 * (deployed / eager - 1), 2),
            **{f"ops_only_{form}_ms": round(ops_only_ms(model, cfg.data.image_size, lat[form]), 4) for form in FORMS}}
    if args.out:
        atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
