"""``python -m dist_hrnas.profile --config FILE --device cpu|cuda[:N] [--backend torch|onnxruntime] --out lut.json
[section.key=value ...]``: build the latency LUT for a config's supernet on this machine.

Run it on the deployment device; then train on the cluster with ``latency.lut=lut.json latency.lut_device=auto``
(and the same ``latency.device``/``backend``/``threads``/``batch_size``): the training run reads every op and the
supernet's end-to-end figure from the LUT and times nothing. On a machine with the same fingerprint,
``latency.lut=lut.json`` alone reuses the ops and still measures the network end to end.
Prints one JSON line: how many ops were measured and reused, the predicted and measured supernet latency.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from dist_hrnas.cli import add_config_args, config_from_args
from dist_hrnas.errors import exits_cleanly_on_user_error
from dist_hrnas.latency import Timer, make_timer, profile_on_rank0
from dist_hrnas.latency.lut import check_lut_file, device_name
from dist_hrnas.models import build_model, model_from_arch, load_arch_file


def build_lut(cfg, progress: bool = True, timer: Timer | None = None) -> dict:
    """Profile ``cfg``'s network into ``cfg.latency.lut``; returns the figures the CLI prints."""
    model = model_from_arch(load_arch_file(cfg.model.arch)) if cfg.model.arch else build_model(cfg.model)
    timer = timer or make_timer(cfg.latency)
    start = time.perf_counter()
    profile = profile_on_rank0(model, cfg.data.image_size, cfg.latency, timer, progress=progress)
    return {"lut": cfg.latency.lut, "device": cfg.latency.device, "device_name": device_name(timer.device),
            "backend": cfg.latency.backend,
            "ops_timed": timer.counts.get("op", 0), "fixed_part_timed": bool(timer.counts.get("fixed")),
            "joins_timed": timer.counts.get("join", 0),
            "branches": len(profile.branch_s), "curve_points": sum(len(c) for c in profile.curves.values()),
            "latency_ms_predicted": round(profile.predict_s(model) * 1e3, 4),
            # the ops alone: the per-op sum before its calibration on whole networks
            "latency_ms_ops_only": round(sum(profile.parts(model).values()) * 1e3, 4),
            "latency_ms_measured": round(profile.network_s * 1e3, 4),
            **calibration_summary(profile),
            "wall_time_s": round(time.perf_counter() - start, 3)}


def calibration_summary(profile) -> dict:
    """How the whole-network calibration fits the networks it was fitted on, and how it predicts each sampled
    one from a fit without it (``calibration_held_out_*``: what to expect on networks it has not seen)."""
    cal = profile.calibration
    errors = sorted(abs(e) for e in cal.errors_pct()) if cal is not None and cal.fitted else []
    held_out = sorted(abs(e) for e in cal.held_out_errors_pct()) if errors else []
    return {"calibration_networks": len(cal.points) if cal is not None else 0,
            "calibration_coef": {k: round(v, 4) for k, v in cal.coef.items()} if errors else {},
            "calibration_median_abs_error_pct": round(errors[len(errors) // 2], 2) if errors else None,
            "calibration_max_abs_error_pct": round(errors[-1], 2) if errors else None,
            "calibration_held_out_median_abs_error_pct": round(held_out[len(held_out) // 2], 2) if held_out else None,
            "calibration_held_out_max_abs_error_pct": round(held_out[-1], 2) if held_out else None}


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--device", help="target device: cpu, cuda or cuda:N (default: latency.device)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), help="default: latency.backend")
    parser.add_argument("--out", help="LUT file to create or extend (default: latency.lut)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for key, value in (("device", args.device), ("backend", args.backend), ("lut", args.out)):
        if value:
            overrides.append(f"latency.{key}={value}")
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "overrides": overrides}))
    if cfg is None:
        return 0
    if not cfg.latency.lut:
        parser.error("--out (or latency.lut) is required")
    check_lut_file(cfg.latency)  # a valid LUT at a writable path, found out before profiling, not after
    print(json.dumps(build_lut(cfg, progress=not args.no_progress)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
