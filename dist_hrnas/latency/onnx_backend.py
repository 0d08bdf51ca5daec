"""The ``onnxruntime`` latency backend: export a module to ONNX and build a callable that runs it in onnxruntime.

Users who deploy with onnxruntime get the latencies of the kernels they ship (fused conv+BN+ReLU, its own
depthwise kernels) rather than PyTorch eager's. Optional dependency: ``pip install -e ".[onnx]"``.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import torch
from torch import nn

from dist_hrnas.errors import UserError


def _onnxruntime():
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError:
        raise UserError("latency.backend=onnxruntime needs onnxruntime and onnx: pip install -e \".[onnx]\"") from None
    return onnxruntime


def providers(device: torch.device) -> list[str]:
    """The CUDA execution provider for a cuda target (when this onnxruntime build has it), else the CPU one."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(f"latency.device={device} with latency.backend=onnxruntime needs onnxruntime-gpu "
                            f"(CUDAExecutionProvider); this build has {available}")
        return ["CUDAExecutionProvider"]
    return ["CPUExecutionProvider"]


OPSET = 17


def export_onnx(module: nn.Module, example: torch.Tensor, f: str | io.BytesIO, dynamic_batch: bool = False) -> None:
    """Write ``module`` (eval mode, on the CPU) as ONNX to ``f``: input ``x``, output ``y``, opset :data:`OPSET`.

    One exporter for the latency backend and for ``python -m dist_hrnas.export``, so the graph a search times is
    the graph a user deploys (``dynamic_batch``: any batch size, as deployed; the timed graphs fix it)."""
    module = module.cpu().eval()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter needs only ``onnx``; the dynamo one would pull in onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example.cpu(),), f, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=OPSET, dynamic_axes=axes)


def onnx_callable(module: nn.Module, example: torch.Tensor, threads: int, device: torch.device) -> Callable[[], object]:
    """Export ``module`` (eval mode) with ``example``'s shape; return a zero-argument call running it in onnxruntime."""
    ort = _onnxruntime()
    buf = io.BytesIO()
    export_onnx(module, example, buf)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # latency.threads, as for the torch backend
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(buf.getvalue(), options, providers=providers(device))
    if device.type == "cuda":
        return _on_device(ort, session, example, device.index or 0)
    feed = {"x": example.cpu().numpy()}
    return lambda: session.run(None, feed)


def _on_device(ort, session, example: torch.Tensor, index: int) -> Callable[[], object]:
    """Input and output bound to GPU memory: ``session.run`` with numpy would time a host-to-device copy of the
    input and a device-to-host copy of the output with every op, which never happen inside a network."""
    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(example.cpu().numpy(), "cuda", index)
    binding.bind_ortvalue_input("x", value)
    binding.bind_output("y", "cuda", index)
    return lambda value=value: session.run_with_iobinding(binding)  # the input stays alive with the callable
