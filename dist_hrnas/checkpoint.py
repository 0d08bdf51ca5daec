"""Training checkpoints: plain tensors and containers only, written atomically, loaded with ``weights_only``.

A checkpoint is one ``torch.save`` file holding a dict of tensors, dicts, lists, tuples and
str/int/float/bool/None, so ``torch.load(path, map_location="cpu", weights_only=True)`` reads it without
unpickling any object. :func:`save_checkpoint` refuses anything else *before* it writes, and writes through
a temp file + ``os.replace`` so a crash never leaves a truncated ``last.pt`` nor destroys the previous one.
"""
from __future__ import annotations

import collections
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from dist_hrnas.errors import UserError
from dist_hrnas.fileio import atomic_write
from dist_hrnas.names import RunFiles

CHECKPOINT_FORMAT = "dist_hrnas.checkpoint/v1"

_SCALARS = (str, int, float, bool, type(None))          # bool is an int; listed for clarity
_TENSORS = (torch.Tensor, torch.nn.Parameter)          # exact types: other tensor subclasses are pickled objects
_CONTAINERS = (dict, collections.OrderedDict, list, tuple)  # OrderedDict: what nn.Module.state_dict returns
_FIX = "delete it or set checkpoint.resume=never"


def _type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _check_safe(obj: object, where: str, active: set[int]) -> None:
    """Raise TypeError naming the key path of the first value ``weights_only`` loading would not accept."""
    cls = type(obj)
    if cls in _SCALARS or cls in _TENSORS:
        return
    if cls not in _CONTAINERS:
        raise TypeError(f"{where}: {_type_name(obj)} is not checkpoint-safe "
                        f"(use tensors, dicts, lists, tuples, str, int, float, bool or None)")
    if id(obj) in active:
        raise TypeError(f"{where}: a container that contains itself is not checkpoint-safe")
    active.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) not in _SCALARS:
                raise TypeError(f"{where}: key {key!r} of type {_type_name(key)} is not checkpoint-safe")
            _check_safe(value, f"{where}[{key!r}]", active)
    else:
        for i, value in enumerate(obj):
            _check_safe(value, f"{where}[{i}]", active)
    active.discard(id(obj))


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Validate ``payload`` (plus ``format``) and write it atomically to ``path`` (parent dirs created)."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload: {_type_name(payload)} is not checkpoint-safe (expected a dict)")
    obj = {**payload, "format": CHECKPOINT_FORMAT}
    _check_safe(obj, "payload", set())
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _short(err: BaseException) -> str:
    """One short line out of torch's (often multi-line, often boilerplate) error message."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:  # the real reason follows torch's paragraph about the weights_only default
        text = text.split(marker, 1)[1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line.split(". ", 1)[0].rstrip(".")
    if len(line) > 120:
        line = line[:117] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _pickle_header(p: Path) -> bool:
    """Whether the file starts like a pickle of protocol 2-5 (torch.save files are zip archives)."""
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _load_failure(p: Path, err: Exception) -> str:
    """Say what the file is: unsafe content weights_only refused, a plain pickle, or truncated/corrupt."""
    reason, text = _short(err), str(err)
    found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
    if found:
        return (f"{p} is not a dist_hrnas checkpoint: weights_only loading refused its unsafe content "
                f"(a pickled {found.group(1)}); nothing in it was executed: {_FIX}")
    if "Weights only load failed" in text and _pickle_header(p):
        return (f"{p} is not a dist_hrnas checkpoint: weights_only loading refused it (a plain pickle, not a "
                f"torch.save file; {reason}); nothing in it was executed: {_FIX}")
    return f"checkpoint {p} is truncated or corrupt ({reason}): {_FIX}"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; any problem is a one-line :class:`UserError`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p} (set checkpoint.resume=never to start afresh)")
    if not p.is_file():
        raise UserError(f"checkpoint {p} is not a file: remove it or set checkpoint.resume=never")
    if p.stat().st_size == 0:
        raise UserError(f"checkpoint {p} is truncated or corrupt (empty file): {_FIX}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy files; the one-line error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UserError(f"cannot read checkpoint {p} ({_short(err)}): check its permissions or "
                        f"set checkpoint.resume=never") from None
    except Exception as err:  # zip/pickle/EOF/Runtime/KeyError...: torch reports corruption in many ways
        raise UserError(_load_failure(p, err)) from None
    if not isinstance(obj, dict):
        raise UserError(f"{p} is not a dist_hrnas checkpoint (it holds a {_type_name(obj)}, not a dict): {_FIX}")
    found = obj.get("format")
    if found != CHECKPOINT_FORMAT:
        what = "no 'format' key" if found is None else f"format {str(found)[:60]!r}"
        raise UserError(f"{p} is not a dist_hrnas checkpoint ({what}, expected {CHECKPOINT_FORMAT!r}): {_FIX}")
    return obj


def rng_state() -> dict:
    """This process's python, numpy, torch CPU (and CUDA, when available) RNG states as plain data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only for devices that exist here)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for index in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[index].cpu(), index)


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``run_dir/checkpoints/last.pt`` when it exists, else None."""
    last = RunFiles(Path(run_dir)).last_checkpoint
    return last if last.is_file() else None
