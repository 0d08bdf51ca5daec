"""Architecture descriptions: what ``model.arch`` loads, what the search exports, what checkpoints store.

An architecture is plain data (YAML/JSON friendly, no pickled objects)::

    format: dist_hrnas.arch/v1
    model: {<every ModelConfig key but arch>}
    blocks:
      - {name: stages.0.fuse.paths.0_0, in: 24, out: 24, stride: 1, kernel_sizes: [3, 5, 7], widths: [96, 96, 96]}
      ...

``model`` fixes the macro structure (stages, resolutions, channels); ``blocks`` lists every atomic
block by module path with its kernel branches and hidden widths, which is all the search changes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from dist_hrnas.config import ConfigError, ModelConfig, build_config, yaml_load
from dist_hrnas.errors import UserError
from dist_hrnas.fileio import atomic_write_text
from dist_hrnas.models.hrnet import HRNet

ARCH_FORMAT = "dist_hrnas.arch/v1"


def export_arch(model: HRNet) -> dict:
    """The architecture of ``model`` as it is now (after any shrink)."""
    spec = dataclasses.asdict(model.spec)
    spec.pop("arch", None)
    blocks = [{"name": name, "in": b.in_channels, "out": b.out_channels, "stride": b.stride,
               "kernel_sizes": b.kernel_sizes, "widths": b.widths} for name, b in model.named_blocks()]
    return {"format": ARCH_FORMAT, "model": spec, "blocks": blocks}


def _bad(source: str, why: str) -> UserError:
    return UserError(f"{source}: not a valid architecture description: {why} "
                     f"(expected a searched_arch.yaml written by dist_hrnas)")


def model_from_arch(arch: dict, source: str = "architecture") -> HRNet:
    """Rebuild the network an architecture description describes (fresh weights)."""
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT:
        raise _bad(source, f"missing 'format: {ARCH_FORMAT}'")
    try:
        spec = build_config({"model": arch.get("model") or {}}).model
    except ConfigError as err:
        raise _bad(source, str(err)) from None
    if spec.arch:
        raise _bad(source, "model.arch must not be set inside an architecture file")
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    declared: dict[str, tuple[int, int, int]] = {}
    for i, entry in enumerate(arch.get("blocks") or []):
        try:
            name, kernels, widths = entry["name"], list(entry["kernel_sizes"]), list(entry["widths"])
            declared[name] = (int(entry["in"]), int(entry["out"]), int(entry["stride"]))
        except (KeyError, TypeError, ValueError):
            raise _bad(source, f"blocks[{i}] needs name, in, out, stride, kernel_sizes, widths") from None
        if len(kernels) != len(widths) or any(int(w) < 1 for w in widths) or any(int(k) % 2 == 0 for k in kernels):
            raise _bad(source, f"block {name}: kernel_sizes {kernels} and widths {widths} must pair up, "
                               f"with odd kernels and widths >= 1")
        shapes[name] = ([int(k) for k in kernels], [int(w) for w in widths])
    try:
        model = HRNet(spec, shapes)
    except KeyError as err:
        raise _bad(source, err.args[0]) from None
    for name, block in model.named_blocks():
        if name not in declared:
            raise _bad(source, f"block {name} is missing")
        if declared[name] != (block.in_channels, block.out_channels, block.stride):
            raise _bad(source, f"block {name} is in/out/stride {declared[name]} but the model section "
                               f"makes it {(block.in_channels, block.out_channels, block.stride)}")
    return model


def load_arch_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"architecture file not found: {p} (model.arch must name a searched_arch.yaml)")
    try:
        return yaml_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{p}: YAML syntax error in architecture file: {str(err).splitlines()[0]}") from None


def save_arch_file(arch: dict, path: str | os.PathLike) -> None:
    """Write atomically so a crash never leaves a half-written architecture behind."""
    atomic_write_text(Path(path), yaml.safe_dump(arch, sort_keys=False, default_flow_style=None))


def build_model(spec: ModelConfig) -> HRNet:
    """The supernet of ``spec``, or the network of the file ``spec.arch`` names."""
    if spec.arch:
        return model_from_arch(load_arch_file(spec.arch), source=spec.arch)
    return HRNet(spec)
