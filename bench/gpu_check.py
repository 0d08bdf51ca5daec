"""One command that proves the GPU path, within about 8 minutes on one GPU. Writes one JSON file and prints it.

Steps (each a subprocess with its own timeout; a failure is recorded and the next step runs, so a short GPU slot
yields as much as possible):

1. ``search_ddp`` / ``search_deepspeed_zero2_bf16``: ``torchrun --nproc_per_node 1`` with nccl
   (``dist.always_group=true``: one process still gets the process group and the engine), a digits search with
   ``latency.device=cuda``, 2 epochs; with DDP, then with DeepSpeed ZeRO-2 and bf16. Checks that shrinks happened
   and that every shrink's ``rank_hashes`` (``shrinks.jsonl``) agree.
2. ``profile_batch1`` / ``profile_batch64``: ``python -m dist_hrnas.profile`` of the ImageNet supernet on cuda,
   then predicted vs measured end to end for the supernet and 4 random shrinks (aligned widths, as
   ``bench/latency_accuracy.py``), the prediction calibrated on the supernet as a search does.
3. ``throughput``: the ImageNet supernet on synthetic 224 px data, bf16, DDP under torchrun with nccl: step time
   of 30 steps after warm-up without and with the search penalty (``search_overhead_ratio``), then the time of one
   shrink (mask broadcast, surgery, hash check, optimizer rebuild and new engine).
4. ``onnxruntime_cuda``: the digits LUT timed with onnxruntime's CUDA provider (skipped without onnxruntime-gpu).

Without CUDA it prints one line and exits 0. ``--simulate-cpu`` runs the same steps at tiny sizes on CPU (gloo,
``latency.device=cpu``) to test the script itself.

Usage: ``python bench/gpu_check.py [--out bench/results/gpu_check.json] [--budget-s 480] [--simulate-cpu]``
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DIGITS = ROOT / "configs" / "digits.yaml"
IMAGENET = ROOT / "configs" / "hrnas_imagenet.yaml"
QUIET = ["log.progress=false", "log.tensorboard=false"]
TAIL = 1500  # characters of a failed command's output kept in the JSON


@dataclass
class Mode:
    """Sizes and devices of one kind of run: the real GPU check, or the same steps shrunk to test it on CPU."""

    name: str
    device: str
    backend: str
    digits: list[str]                 # overrides of the digits search (besides device, backend and engine)
    imagenet: list[str]               # overrides of every ImageNet-supernet run (profile, networks, throughput)
    profile_batches: tuple[int, ...]
    image_size: int                   # ImageNet throughput and profile resolution
    batch: int                        # ImageNet training batch
    steps: int
    warmup: int
    timeouts: dict[str, int] = field(default_factory=dict)


# The digits search must shrink within 2 epochs: rho at full strength from the first step.
# Calibration networks: 8, not the default 24 (each is timed in fresh child processes that initialise CUDA: the
# check proves the path, bench/latency_accuracy.py measures the accuracy).
GPU = Mode("cuda", "cuda", "nccl", ["train.epochs=2", "prune.epoch_warmup=0", "latency.calibration_networks=8"],
           ["latency.calibration_networks=8"], (1, 64), 224, 64, 30, 5,
           {"search_ddp": 150, "search_deepspeed_zero2_bf16": 180, "profile_batch1": 120, "profile_batch64": 150,
            "throughput": 180, "onnxruntime_cuda": 90})
# Tiny everything (the tests' settings that certainly shrink in 8 steps); the ImageNet supernet at 32 px.
SIMULATE = Mode("simulate-cpu", "cpu", "gloo",
                ["train.epochs=2", "train.max_steps_per_epoch=4", "data.image_size=16", "prune.rho=0.1",
                 "prune.threshold=0.9", "prune.epoch_warmup=0", "latency.warmup=1", "latency.repeats=3",
                 "latency.batch_size=4", "prune.bn_calibration_steps=2", "train.eval_bn_calibration_steps=2",
                 "latency.calibration_networks=4", "latency.network_repeats=3", "latency.network_spread=1.0",
                 # the tiny networks' rounds disagree by more than most gains: the model decides, so the check of
                 # the script's steps does not hinge on timing noise (the GPU mode measures before the cut)
                 "prune.measure_before_cut=false"],
                ["latency.warmup=1", "latency.repeats=2", "latency.network_repeats=2", "latency.max_samples=2",
                 "latency.calibration_networks=4", "latency.network_spread=1.0",
                 # the supernet's first two stages: the same code path, a fraction of the CPU time
                 "model.stages=[[1,[1],[24]],[2,[2,2],[18,36]]]", "model.head_channels=[36,72]",
                 "model.last_channel=256"],
                (1, 2), 32, 2, 2, 1,
                {"search_ddp": 300, "search_deepspeed_zero2_bf16": 400, "profile_batch1": 300, "profile_batch2": 300,
                 "throughput": 400, "onnxruntime_cuda": 300})


def run_command(cmd: list[str], timeout_s: float, log: Path) -> dict:
    """Run ``cmd`` from the repository root (output to ``log``); ``ok``, ``rc``, ``wall_s`` and the output's tail.

    The command gets a session of its own, and a timeout ends all of it: killing torchrun alone would leave its
    workers (and a latency child) running on the GPU through the next steps.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
    result = {"ok": rc == 0, "rc": rc, "wall_s": round(time.perf_counter() - start, 2),
              "command": shlex.join(str(c) for c in cmd)}
    if rc != 0:
        text = log.read_text(errors="replace")
        result["error"] = (f"timed out after {timeout_s:.0f} s" if rc is None else f"exit code {rc}") + \
            f"; output tail: {text[-TAIL:]}"
    return result


def torchrun(args: list[str]) -> list[str]:
    """One process under torchrun (``python -m torch.distributed.run``: works where ``torchrun`` is not on PATH)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def read_search(run_dir: Path) -> dict:
    """What a search run proves: summary figures, shrink count, and whether every shrink's rank hashes agree."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "shrinks.jsonl").read_text().splitlines() if (run_dir / "shrinks.jsonl").exists() else []
    shrinks = [json.loads(line) for line in lines if line.strip()]
    agree = all(len(set(s["rank_hashes"])) == 1 for s in shrinks)
    keys = ("val_top1", "world_size", "steps", "wall_time_s", "latency_ms_supernet", "latency_ms_searched",
            "latency_ms_searched_predicted", "params", "params_searched", "latency_device")
    return {**{k: summary.get(k) for k in keys}, "shrinks": len(shrinks), "rank_hashes_agree": agree,
            "shrink_errors_pct": [s.get("latency_error_pct_after") for s in shrinks],
            "checks_ok": bool(shrinks) and agree and len(shrinks) == summary.get("shrinks")}


def step_search(mode: Mode, work: Path, engine: list[str], timeout_s: float) -> dict:
    run_dir = work / ("search_" + ("deepspeed" if engine else "ddp"))
    cmd = torchrun(["-m", "dist_hrnas.train", "--config", str(DIGITS), *QUIET, *mode.digits,
                    f"latency.device={mode.device}", f"dist.backend={mode.backend}", "dist.always_group=true",
                    "checkpoint.resume=never", f"log.run_dir={run_dir}", *engine])
    result = run_command(cmd, timeout_s, work / f"{run_dir.name}.log")
    if result["ok"]:
        result |= read_search(run_dir)
        result["ok"] = result["checks_ok"]
        if not result["ok"]:
            result["error"] = "no shrink happened, or rank hashes differ (see shrinks.jsonl)"
    return result


def step_profile(mode: Mode, work: Path, batch: int, timeout_s: float) -> dict:
    """The profile CLI at ``batch``, then predicted vs measured for the supernet and 4 shrunk networks."""
    lut = work / "lut.json"
    common = [f"data.image_size={mode.image_size}", *mode.imagenet, f"latency.batch_size={batch}"]
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dist_hrnas.profile", "--config", str(IMAGENET), "--device", mode.device,
           "--out", str(lut), "--no-progress", *common]
    result = run_command(cmd, timeout_s, work / f"profile_b{batch}.log")
    if not result["ok"]:
        return result
    result["profile"] = json.loads((work / f"profile_b{batch}.log").read_text().strip().splitlines()[-1])
    out = work / f"networks_b{batch}.json"
    cmd = [sys.executable, str(Path(__file__)), "--predict", "--device", mode.device, "--lut", str(lut),
           "--result", str(out), *common]
    predicted = run_command(cmd, timeout_s - (time.perf_counter() - start), work / f"networks_b{batch}.log")
    result |= {"ok": predicted["ok"], "wall_s": round(time.perf_counter() - start, 2)}
    if predicted["ok"]:
        result["networks"] = json.loads(out.read_text())
        result["median_abs_error_pct"] = sorted(abs(n["error_pct"]) for n in result["networks"])[
            len(result["networks"]) // 2]
    else:
        result["error"] = "predicted vs measured: " + predicted["error"]
    return result


def step_throughput(mode: Mode, work: Path, timeout_s: float) -> dict:
    out = work / "throughput.json"
    lut = work / "lut.json"
    # the batch-1 LUT of the profile step, when it ran: the search's latency profile then times no op
    cmd = torchrun([str(Path(__file__)), "--throughput", "--device", mode.device, "--result", str(out),
                    "--lut", str(lut) if lut.exists() else "", "--steps", str(mode.steps), "--warmup",
                    str(mode.warmup), f"dist.backend={mode.backend}", f"data.image_size={mode.image_size}",
                    f"train.batch_size_per_rank={mode.batch}", f"train.log_every={max(1, mode.steps // 3)}",
                    *mode.imagenet])
    result = run_command(cmd, timeout_s, work / "throughput.log")
    if result["ok"]:
        result |= json.loads(out.read_text())
    return result


def step_onnxruntime(mode: Mode, work: Path, timeout_s: float) -> dict:
    """The digits LUT timed with onnxruntime on the device (its CUDA provider on a GPU)."""
    try:
        import onnx  # noqa: F401  (the export needs it)
        import onnxruntime
    except ImportError:
        return {"ok": None, "skipped": "onnxruntime or onnx is not installed (pip install -e \".[onnx]\")"}
    if mode.device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return {"ok": None, "skipped": f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                                           f"(pip install onnxruntime-gpu)"}
    cmd = [sys.executable, "-m", "dist_hrnas.profile", "--config", str(DIGITS), "--device", mode.device,
           "--backend", "onnxruntime", "--out", str(work / "lut_onnx.json"), "--no-progress",
           "latency.max_samples=2", "latency.warmup=2", "latency.repeats=5",
           # each calibration network is exported to ONNX and timed in fresh processes: a few prove the path
           "latency.calibration_networks=4", "latency.network_repeats=5"]
    result = run_command(cmd, timeout_s, work / "onnxruntime.log")
    if result["ok"]:
        result["profile"] = json.loads((work / "onnxruntime.log").read_text().strip().splitlines()[-1])
    return result


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                 "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    for package in ("deepspeed", "onnxruntime", "onnxruntime-gpu"):   # not imported: DeepSpeed logs to stdout
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


def check(mode: Mode, work: Path, budget_s: float) -> dict:
    """Every step in order, each within its own timeout and what is left of ``budget_s``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "lut.json").unlink(missing_ok=True)          # a fresh LUT: the profile steps time every op
    deadline = time.perf_counter() + budget_s
    steps = {"search_ddp": lambda t: step_search(mode, work, [], t),
             "search_deepspeed_zero2_bf16": lambda t: step_search(
                 mode, work, ["dist.engine=deepspeed", "dist.deepspeed.zero_stage=2", "train.bf16=true"], t)}
    for batch in mode.profile_batches:
        steps[f"profile_batch{batch}"] = lambda t, b=batch: step_profile(mode, work, b, t)
    steps["throughput"] = lambda t: step_throughput(mode, work, t)
    steps["onnxruntime_cuda"] = lambda t: step_onnxruntime(mode, work, t)
    results = {}
    for name, run in steps.items():
        left = deadline - time.perf_counter()
        if left < 10:
            results[name] = {"ok": False, "error": f"skipped: the {budget_s:.0f} s budget was used up"}
            continue
        print(f"gpu_check: {name} (at most {min(left, mode.timeouts[name]):.0f} s)", file=sys.stderr, flush=True)
        try:
            results[name] = run(min(left, mode.timeouts[name]))
        except Exception as err:  # noqa: BLE001 - a step's own bug is recorded too; the next step still runs
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file (default bench/results/gpu_check.json; with --simulate-cpu "
                                      "bench/results/tmp/gpu_check_simulate.json)")
    parser.add_argument("--work", help="run directories and logs (default bench/results/tmp/gpu_check)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all steps")
    parser.add_argument("--simulate-cpu", action="store_true", help="the same steps at tiny sizes on CPU (gloo)")
    parser.add_argument("--predict", action="store_true", help=argparse.SUPPRESS)     # worker: networks
    parser.add_argument("--throughput", action="store_true", help=argparse.SUPPRESS)  # worker: training
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--lut", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.predict or args.throughput:
        from bench.gpu_check_workers import predict_networks, throughput
        result = predict_networks(args.device, args.lut, overrides) if args.predict else \
            throughput(args.device, args.lut, overrides, args.steps, args.warmup)
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if not args.simulate_cpu and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available on this machine (torch {torch.__version__}); nothing to check. "
              f"Run it on a GPU node, or with --simulate-cpu to exercise the steps on CPU.")
        return 0
    mode = SIMULATE if args.simulate_cpu else GPU
    results_dir = ROOT / "bench" / "results"
    out = Path(args.out or results_dir / ("tmp/gpu_check_simulate.json" if args.simulate_cpu else "gpu_check.json"))
    start = time.perf_counter()
    steps = check(mode, Path(args.work or results_dir / "tmp" / "gpu_check"), args.budget_s)
    report = {"mode": mode.name, "machine": machine(), "budget_s": args.budget_s,
              "wall_s": round(time.perf_counter() - start, 1), "ok": all(s["ok"] is not False for s in steps.values()),
              "steps": steps}
    out.parent.mkdir(parents=True, exist_ok=True)
    from dist_hrnas.fileio import atomic_write_json
    atomic_write_json(out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
