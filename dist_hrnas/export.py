"""``python -m dist_hrnas.export RUN_DIR [--weights auto|ema|model] [--format onnx|torchscript|all] [--out DIR]
[--rounds N]``: what a run found, as files a deployment runtime loads, checked and timed.

1. Rebuild the run's final network (``searched_arch.yaml`` of a search run, the ``model.arch`` file of a retrain,
   else the config's supernet) and load ``checkpoints/last.pt`` into it: its EMA weights when the run kept an EMA
   (``--weights auto``), else the model's. A checkpoint of another architecture is an error.
2. Fold every BatchNorm into the conv before it (:mod:`dist_hrnas.models.fold`), so the exported graph has none.
3. Write ``model.onnx`` (opset 17, any batch size) and/or ``model.ts`` (traced, frozen TorchScript) to ``--out``
   (default ``RUN_DIR/export``).
4. Verify in a separate interpreter (:mod:`dist_hrnas.export_check`): each runtime on the run's validation split
   against the PyTorch model (unfolded). More than 1e-3 max abs logit difference or under 99.9 % identical
   predictions is exit code 1, naming the numbers (``export.json`` is still written, with ``verified: false``).
5. Time the PyTorch model (BN folded) and the ONNX graph in onnxruntime at the run's ``latency.batch_size`` and
   ``latency.threads``, each figure in a fresh process (:class:`~dist_hrnas.latency.CleanProcessTimer`),
   interleaved over ``--rounds`` rounds (the fastest counts: interference only slows a round down), beside the
   figure the search measured (``latency_ms_searched``).
6. Write ``export.json`` (keys: ``format``, ``run_dir``, ``paths``, ``opset``, ``weights``, ``verified``,
   ``val_top1_pytorch``, ``val_top1_onnxruntime``, ``val_top1_torchscript``, ``identical_predictions``,
   ``max_abs_logit_diff``, ``verification`` (per runtime), ``latency_ms_pytorch``, ``latency_ms_onnxruntime``,
   ``latency_ms_searched``, ``latency_device``, ``latency_batch_size``, ``latency_threads``, ``latency_rounds``,
   ``runtime_versions``; ``null`` = not exported / not timed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.config import Config, LatencyConfig, load_config
from dist_hrnas.data import build_datasets
from dist_hrnas.errors import UserError, exits_cleanly_on_user_error
from dist_hrnas.fileio import atomic_write, atomic_write_json
from dist_hrnas.latency import CleanProcessTimer, target_device
from dist_hrnas.latency.onnx_backend import OPSET, export_onnx
from dist_hrnas.models import HRNet, build_model, export_arch, load_arch_file, model_from_arch
from dist_hrnas.models.fold import batchnorms, fold_bn
from dist_hrnas.names import ExportFiles, RunFiles

EXPORT_FORMAT = "dist_hrnas.export/v1"
MAX_ABS_LOGIT_DIFF = 1e-3  # float32 kernels of different runtimes differ by ~1e-6 on these logits
MIN_IDENTICAL = 0.999
ROUNDS = 3
_RUN_HINT = "pass the log.run_dir of a dist_hrnas.train run, e.g. runs/digits"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class MismatchError(Exception):
    """The exported models do not compute what the PyTorch model computes (exit code 1, not a user error)."""


@dataclass
class Trained:
    """The run's final network with the chosen weights, and where they came from."""

    files: RunFiles
    cfg: Config
    model: HRNet          # eval mode
    weights: str          # "ema" or "model"
    arch_source: Path     # the file its architecture was checked against


def _plain(obj: object) -> object:
    return json.loads(json.dumps(obj))  # tuples (checkpoint) and lists (YAML) compare equal


def arch_difference(found: dict, expected: dict) -> str | None:
    """The first way architecture ``found`` differs from ``expected``, or None when they are the same."""
    found, expected = _plain(found), _plain(expected)
    if found.get("model") != expected.get("model"):
        keys = sorted(k for k in set(found.get("model") or {}) | set(expected.get("model") or {})
                      if (found.get("model") or {}).get(k) != (expected.get("model") or {}).get(k))
        return f"model.{keys[0] if keys else '?'} differs"
    shape = {b.get("name"): (b.get("kernel_sizes"), b.get("widths")) for b in found.get("blocks") or []}
    for block in expected.get("blocks") or []:
        mine = shape.get(block["name"])
        if mine != (block["kernel_sizes"], block["widths"]):
            what = "missing" if mine is None else f"kernels {mine[0]}, widths {mine[1]}"
            return f"block {block['name']}: {what} vs kernels {block['kernel_sizes']}, widths {block['widths']}"
    return None


def final_arch(files: RunFiles, cfg: Config) -> tuple[dict, Path]:
    """The run's final architecture and its file: searched_arch.yaml, the model.arch file, or the supernet.
    Rebuilt and described again, so that it reads exactly as a checkpoint stores it (every model key filled in)."""
    if files.arch.is_file() or cfg.model.arch:
        source = files.arch if files.arch.is_file() else Path(cfg.model.arch)
        return export_arch(model_from_arch(load_arch_file(source), source=str(source))), source
    return export_arch(build_model(cfg.model)), files.config


def load_trained(run_dir: str | os.PathLike, weights: str = "auto") -> Trained:
    """Check the run directory and rebuild its final network with ``weights``; problems are one-line UserErrors."""
    d = Path(run_dir)
    files = RunFiles(d)
    if not d.is_dir() or not files.config.is_file():
        raise UserError(f"{d} is not a run directory (no {RunFiles.CONFIG}): {_RUN_HINT}")
    if not files.last_checkpoint.is_file():
        raise UserError(f"{d} has no checkpoint ({files.last_checkpoint} is missing): let the run write one "
                        f"(checkpoint.every_epochs, and always at the end), or pass another run")
    try:
        cfg = load_config(files.config)
        ckpt = load_checkpoint(files.last_checkpoint)
    except UserError as err:  # name the run; the loader's advice (checkpoint.resume) is about training
        msg = str(err).removesuffix(": delete it or set checkpoint.resume=never")
        raise UserError(msg if str(d) in msg else f"{files.config}: {msg}") from None
    arch, source = final_arch(files, cfg)
    diff = arch_difference(ckpt.get("arch") or {}, arch)
    if diff:
        raise UserError(f"{files.last_checkpoint} holds another architecture than {source} ({diff}): they come from "
                        f"different runs; export the run whose checkpoint holds its final network")
    has_ema = ckpt.get("ema") is not None
    if weights == "ema" and not has_ema:
        raise UserError(f"--weights ema: {files.last_checkpoint} holds no EMA weights (the run had "
                        f"train.ema_decay=0): use --weights model or auto")
    chosen = "ema" if weights == "ema" or (weights == "auto" and has_ema) else "model"
    model = model_from_arch(ckpt["arch"], source=str(files.last_checkpoint))
    try:
        model.load_state_dict(ckpt[chosen])
    except RuntimeError as err:
        raise UserError(f"{files.last_checkpoint}: its {chosen} weights do not fit its architecture "
                        f"({str(err).splitlines()[0]}): the file is damaged; restore it or rerun") from None
    return Trained(files, cfg, model.eval(), chosen, source)


def writable_dir(out: Path) -> Path:
    """``out``, created if needed, once a file could be written in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(f"--out {out} is not a writable directory ({err.strerror or err}): pass a directory "
                        f"you can write to") from None
    return out


def need_onnx() -> None:
    """onnx (the exporter needs it) and onnxruntime (the check and the timing) are optional dependencies."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"--format onnx needs onnx and onnxruntime ({name} is not installed): "
                            f"pip install -e \".[onnx]\", or export TorchScript only with --format torchscript") from None


def write_exports(folded: HRNet, example: torch.Tensor, out: ExportFiles, formats: set[str]) -> dict:
    """Write the requested files of the folded network, each atomically; their paths (None = not asked for)."""
    paths: dict[str, str | None] = {"onnx": None, "torchscript": None}
    if "onnx" in formats:
        atomic_write(out.onnx, lambda tmp: export_onnx(folded, example, tmp, dynamic_batch=True))
        paths["onnx"] = str(out.onnx)
    if "torchscript" in formats:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shapes used as sizes: batch stays dynamic
            traced = torch.jit.freeze(torch.jit.trace(folded, example))
            # torch.jit is deprecated in favour of torch.export (torch 2.13), yet it is what C++ and mobile load
            atomic_write(out.torchscript, lambda tmp: torch.jit.save(traced, tmp))
        paths["torchscript"] = str(out.torchscript)
    return paths


@torch.no_grad()
def reference(model: HRNet, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's logits (the unfolded model, eval mode, CPU) and the labels of the run's validation split."""
    loader = DataLoader(build_datasets(cfg.data).val, batch_size=cfg.train.batch_size_per_rank, shuffle=False)
    logits, labels = [], []
    for images, target in loader:
        logits.append(model(images).float())
        labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def verify(paths: dict, cfg: Config, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Run the exported files in a fresh interpreter (:mod:`dist_hrnas.export_check`); its JSON answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_PACKAGE_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="dist_hrnas-export-") as tmp:
        torch.save({"logits": logits, "labels": labels}, Path(tmp) / "reference.pt")
        request = {**paths, "data": dataclasses.asdict(cfg.data), "reference": str(Path(tmp) / "reference.pt"),
                   "batch_size": cfg.train.batch_size_per_rank}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, "-m", "dist_hrnas.export_check", str(Path(tmp) / "request.json")],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MismatchError(f"the exported model does not run in a fresh process: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def judge(checked: dict, top1_pytorch: float) -> tuple[dict, str | None]:
    """export.json's accuracy keys, and what is beyond tolerance (None when every runtime agrees)."""
    runtimes = checked["runtimes"]
    keys = {"val_top1_pytorch": top1_pytorch,
            "val_top1_onnxruntime": runtimes.get("onnxruntime", {}).get("top1"),
            "val_top1_torchscript": runtimes.get("torchscript", {}).get("top1"),
            "identical_predictions": min((r["identical_predictions"] for r in runtimes.values()), default=None),
            "max_abs_logit_diff": max((r["max_abs_logit_diff"] for r in runtimes.values()), default=None)}
    bad = [f"{name}: max abs logit difference {r['max_abs_logit_diff']:.3g} (tolerance {MAX_ABS_LOGIT_DIFF:g}), "
           f"identical predictions {100 * r['identical_predictions']:.2f} % (at least {100 * MIN_IDENTICAL:g} %), "
           f"top-1 {r['top1']:.4f} vs PyTorch {top1_pytorch:.4f}"
           for name, r in runtimes.items()
           if r["max_abs_logit_diff"] > MAX_ABS_LOGIT_DIFF or r["identical_predictions"] < MIN_IDENTICAL]
    return keys, "; ".join(bad) or None


def time_deployed(model: HRNet, cfg: LatencyConfig, image_size: int, onnx: bool, rounds: int) -> dict:
    """Seconds of the PyTorch model (BN folded) and of its ONNX graph in onnxruntime, each in a fresh process,
    interleaved round by round so that the machine's drift hits both alike; the fastest round of each."""
    if rounds <= 0:
        return {}
    if cfg.lut_device:
        print(f"note: the run's target is another machine (latency.lut_device={cfg.lut_device}): not timed here; "
              f"export on that machine to time it", file=sys.stderr)
        return {}
    try:
        target_device(cfg)
    except UserError as err:
        print(f"note: not timed: {err}", file=sys.stderr)
        return {}
    deployed = dataclasses.replace(cfg, form="deployed", lut="", lut_device="")
    timers = {"pytorch": CleanProcessTimer(dataclasses.replace(deployed, backend="torch"), image_size)}
    if onnx:
        timers["onnxruntime"] = CleanProcessTimer(dataclasses.replace(deployed, backend="onnxruntime"), image_size)
    best = {name: math.inf for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = min(best[name], timer(model))
    return {name: round(s * 1e3, 4) for name, s in best.items()}


def searched_latency_ms(files: RunFiles, cfg: Config) -> float | None:
    """The search's measured figure: this run's summary, or (a retrain) that of the run model.arch came from."""
    candidates = [files.summary] + ([Path(cfg.model.arch).parent / RunFiles.SUMMARY] if cfg.model.arch else [])
    for path in candidates:
        try:
            value = json.loads(path.read_text()).get("latency_ms_searched")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return float(value)
    return None


def runtime_versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def export_run(run_dir: str | os.PathLike, weights: str = "auto", fmt: str = "all", out: str | None = None,
               rounds: int = ROUNDS) -> dict:
    """Steps 1-6 of the module doc; returns export.json's content (raises MismatchError after writing it)."""
    formats = {"onnx", "torchscript"} if fmt == "all" else {fmt}
    if "onnx" in formats:
        need_onnx()
    trained = load_trained(run_dir, weights)
    files, cfg = trained.files, trained.cfg
    target = ExportFiles(writable_dir(Path(out) if out else files.export_dir))
    folded = fold_bn(trained.model)
    if batchnorms(folded):
        raise RuntimeError(f"BatchNorm left after folding: {batchnorms(folded)}")  # a bug, not bad input
    example = torch.randn(2, cfg.model.image_channels, cfg.data.image_size, cfg.data.image_size)
    paths = write_exports(folded, example, target, formats)
    logits, labels = reference(trained.model, cfg)
    top1 = (logits.argmax(1) == labels).sum().item() / max(1, len(labels))  # as export_check counts it
    checked = verify(paths, cfg, logits, labels)
    accuracy, bad = judge(checked, top1)
    result = {"format": EXPORT_FORMAT, "run_dir": str(files.root),
              "paths": {**paths, "export_json": str(target.json), "checkpoint": str(files.last_checkpoint),
                        "arch": str(trained.arch_source)},
              "opset": OPSET if paths["onnx"] else None, "weights": trained.weights, "verified": bad is None,
              **accuracy, "verification": checked["runtimes"]}
    lat = {} if bad else time_deployed(trained.model, cfg.latency, cfg.data.image_size, "onnx" in formats, rounds)
    result |= {"latency_ms_pytorch": lat.get("pytorch"), "latency_ms_onnxruntime": lat.get("onnxruntime"),
               "latency_ms_searched": searched_latency_ms(files, cfg), "latency_device": cfg.latency.device,
               "latency_batch_size": cfg.latency.batch_size, "latency_threads": cfg.latency.threads,
               "latency_rounds": rounds, "runtime_versions": runtime_versions()}
    atomic_write_json(target.json, result)
    if bad:
        raise MismatchError(f"the exported model computes something else than PyTorch ({bad}); "
                            f"{target.json} has verified=false")
    return result


def _line(result: dict) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f} ms"

    top1 = " / ".join(f"{k} {result[f'val_top1_{k}']:.4f}" for k in ("pytorch", "onnxruntime", "torchscript")
                      if result[f"val_top1_{k}"] is not None)
    return (f"exported {', '.join(p for p in (result['paths']['onnx'], result['paths']['torchscript']) if p)} "
            f"({result['weights']} weights)\nval top-1 {top1}; identical predictions "
            f"{100 * result['identical_predictions']:.2f} %, max abs logit difference "
            f"{result['max_abs_logit_diff']:.2g}\nlatency (batch {result['latency_batch_size']}, "
            f"{result['latency_threads']} thread(s)): pytorch {ms(result['latency_ms_pytorch'])}, onnxruntime "
            f"{ms(result['latency_ms_onnxruntime'])}, searched {ms(result['latency_ms_searched'])}\n"
            f"details: {result['paths']['export_json']}")


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (log.run_dir of dist_hrnas.train)")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help="auto = the EMA weights when the run kept an EMA, else the model's")
    parser.add_argument("--format", choices=("onnx", "torchscript", "all"), default="all")
    parser.add_argument("--out", help="output directory (default RUN_DIR/export)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"interleaved timing rounds, each figure in a fresh process (default {ROUNDS}; 0 = "
                             f"do not time)")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_dir, args.weights, args.format, args.out, args.rounds)
    except MismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
