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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_block(source: str, i: int, entry: object) -> tuple[str, list[int], list[int], tuple[int, int, int]]:
    """One ``blocks`` entry, type-checked: never converted (a width of 2.7 is an error, not 2)."""
    keys = ("name", "in", "out", "stride", "kernel_sizes", "widths")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise _bad(source, f"blocks[{i}] needs {', '.join(keys)}")
    name = entry["name"]
    if not isinstance(name, str):
        raise _bad(source, f"blocks[{i}].name must be a string, got {name!r}")
    for key in ("in", "out", "stride"):
        if not _is_int(entry[key]) or entry[key] < 1:
            raise _bad(source, f"block {name}: {key} must be a positive integer, got {entry[key]!r}")
    kernels, widths = entry["kernel_sizes"], entry["widths"]
    if not isinstance(kernels, list) or not isinstance(widths, list) or len(kernels) != len(widths):
        raise _bad(source, f"block {name}: kernel_sizes {kernels!r} and widths {widths!r} must be lists that pair up")
    for k in kernels:
        if not _is_int(k) or k < 1 or k % 2 == 0:
            raise _bad(source, f"block {name}: kernel size {k!r} must be an odd positive integer (3, 5, 7, ...)")
    for w in widths:
        if not _is_int(w) or w < 1:
            raise _bad(source, f"block {name}: width {w!r} must be a positive integer (widths >= 1)")
    return name, list(kernels), list(widths), (entry["in"], entry["out"], entry["stride"])


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
    blocks = arch.get("blocks")
    if not isinstance(blocks, list):
        raise _bad(source, f"'blocks' must be a list of blocks, got {type(blocks).__name__}")
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    declared: dict[str, tuple[int, int, int]] = {}
    for i, entry in enumerate(blocks):
        name, kernels, widths, geometry = _check_block(source, i, entry)
        if name in shapes:
            raise _bad(source, f"block {name} is listed twice")
        shapes[name], declared[name] = (kernels, widths), geometry
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


def as_network(network: HRNet | dict) -> HRNet:
    """``network`` itself, or the network its architecture (export_arch's dict) describes (fresh weights)."""
    return network if isinstance(network, HRNet) else model_from_arch(network)


def load_arch_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"architecture file not found: {p} (model.arch must name a searched_arch.yaml)")
    try:
        return yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"architecture file {p} is not UTF-8 text (byte {err.start}): it must be the YAML "
                        f"searched_arch.yaml written by dist_hrnas") from None
    except OSError as err:
        raise UserError(f"cannot read architecture file {p}: {err.strerror}") from None
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
