"""``python -m dist_hrnas.export_check REQUEST.json``: run exported models on a validation split, in this process.

:mod:`dist_hrnas.export` starts this as a separate interpreter, so the check proves what a user's serving
process sees: the files load on their own (onnxruntime, ``torch.jit.load``), without the model classes of the
exporting process. It compares each runtime's logits with PyTorch's (saved by the exporter) and prints one JSON
line: per runtime ``{top1, identical_predictions, max_abs_logit_diff, pid}`` (pid: this process).
A prediction that differs from PyTorch's only where PyTorch's own logits tie (its top two within ``TIE`` of each
other) counts as identical: which of two equal logits wins is float rounding, not a different model (an untrained
net's logits tie often: one such flip in 359 images once failed a tiny search's export at 7e-7 logit difference).

REQUEST.json: ``{"onnx": path|null, "torchscript": path|null, "data": {DataConfig fields},
"reference": path of {"logits", "labels"} (torch.save), "batch_size": int}``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader

from dist_hrnas.config import DataConfig
from dist_hrnas.data import build_datasets

Run = Callable[[torch.Tensor], torch.Tensor]
TIE = 1e-5  # float32 kernels of different runtimes differ by ~1e-6 on these logits; a margin below this is a tie


def _onnx_runs(path: str) -> dict[str, Run]:
    """One runner per onnxruntime execution provider to check: the CPU one, and CUDA where this build has it."""
    import onnxruntime as ort  # the exporter checked it is installed

    options = ort.SessionOptions()
    options.log_severity_level = 3
    wanted = {"onnxruntime": "CPUExecutionProvider", "onnxruntime_cuda": "CUDAExecutionProvider"}
    runs = {}
    for name, provider in wanted.items():
        if provider in ort.get_available_providers():
            session = ort.InferenceSession(path, options, providers=[provider])
            runs[name] = lambda x, s=session: torch.from_numpy(s.run(None, {"x": x.numpy()})[0])
    return runs


def _torchscript_run(path: str) -> Run:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit (torch 2.13): still what deployments load
        module = torch.jit.load(path, map_location="cpu").eval()
    return lambda x: module(x)


@torch.no_grad()
def compare(run: Run, batches: Iterable, ref_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 of ``run`` on ``batches`` and how far its logits are from ``ref_logits`` (PyTorch's, same order)."""
    outs = [run(images.contiguous()).float() for images, _ in batches]
    logits = torch.cat(outs) if outs else torch.zeros_like(ref_logits)
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} where PyTorch gave {tuple(ref_logits.shape)}")
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    # PyTorch's margin between its own choice and the runtime's: ~0 where the runtime only broke a tie otherwise
    margin = ref_logits.gather(1, ref_pred[:, None]) - ref_logits.gather(1, pred[:, None])
    same = (pred == ref_pred) | (margin[:, 0] <= TIE)
    n = max(1, len(labels))
    return {"top1": (pred == labels).sum().item() / n,
            "identical_predictions": same.sum().item() / n,
            "max_abs_logit_diff": (logits - ref_logits).abs().max().item() if len(labels) else 0.0}


def check(request: dict) -> dict:
    ref = torch.load(request["reference"], map_location="cpu", weights_only=True)
    val = build_datasets(DataConfig(**request["data"])).val
    batches = list(DataLoader(val, batch_size=request["batch_size"], shuffle=False))
    runs: dict[str, Run] = {}
    if request.get("onnx"):
        runs |= _onnx_runs(request["onnx"])
    if request.get("torchscript"):
        runs["torchscript"] = _torchscript_run(request["torchscript"])
    # each record names the process that ran it: the proof that the files load without the exporter's state
    results = {name: {**compare(run, batches, ref["logits"], ref["labels"]), "pid": os.getpid()}
               for name, run in runs.items()}
    return {"runtimes": results}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(check(json.loads(Path(args[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
