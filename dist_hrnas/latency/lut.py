"""The latency lookup table (LUT): measured op timings cached in a JSON file, per device fingerprint.

File layout (``format`` 1)::

    {"format": 1,
     "tables": {"<fingerprint id>": {"fingerprint": {...},
                                     "ops": {"<op signature>": {"median_s": float, "spread_s": float}},
                                     "calibrations": {"<supernet network key>": {"points": [...], "coef": {...}}}}}}

Whole networks (the supernet, the calibration's sampled sub-networks) are ops too, under ``network_<hash>``;
``calibrations`` keeps the fit made from them (latency/calibration.py), so a LUT built on the deployment device
carries its own calibration.

A fingerprint says what the numbers are valid for (device name, backend, torch version, dtype, threads,
batch size, ``memory_format: channels_last`` when ops are timed in that format); one file may hold tables of
several devices, and writing one never drops another's entries.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import warnings
from pathlib import Path

import torch

from dist_hrnas.config import LatencyConfig
from dist_hrnas.errors import UserError
from dist_hrnas.fileio import atomic_write_json, writable_file_problem

FORMAT = 1
MACHINE_KEYS = ("device_name", "torch", "onnxruntime")  # the machine and its software, not the latency settings


class LutMismatchWarning(UserWarning):
    """The LUT holds no table for this device fingerprint: its entries are not used, the ops are re-measured."""


def _cpu_name() -> str:
    """The CPU model (what decides CPU latency); /proc/cpuinfo on Linux, platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def fingerprint_settings(cfg: LatencyConfig) -> dict:
    """The fingerprint without its machine keys (:data:`MACHINE_KEYS`): what a remote table must match."""
    fp = {"device_type": "cuda" if cfg.device.startswith("cuda") else "cpu", "backend": cfg.backend,
          "dtype": "float32", "threads": cfg.threads, "batch_size": cfg.batch_size,
          "flush_cache_mb": cfg.flush_cache_mb}
    if cfg.backend == "torch" and cfg.timed_channels_last:  # absent = the default format (LUTs from before it)
        fp["memory_format"] = "channels_last"
    if cfg.form != "eager":
        # BN folded or not changes every op's seconds. Absent = eager, which is what tables written before
        # latency.form existed hold, so they stay valid for latency.form=eager.
        fp["form"] = cfg.form
    return fp


def fingerprint(cfg: LatencyConfig, device: torch.device) -> dict:
    """Everything that changes an op's measured seconds apart from the op itself."""
    fp = {**fingerprint_settings(cfg), "device_type": device.type, "device_name": device_name(device),
          "torch": torch.__version__.split("+")[0]}
    if cfg.backend == "onnxruntime":
        import onnxruntime  # only reached when the backend is selected (an optional dependency)
        fp["onnxruntime"] = onnxruntime.__version__
    return fp


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _differences(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} in the file vs {b.get(k)!r} here" for k in keys if a.get(k) != b.get(k))


def read_lut_file(path: Path) -> dict:
    """The file's content (empty layout when it does not exist); a clear error when it is not a LUT."""
    if not path.exists():
        return {"format": FORMAT, "tables": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"latency LUT {path} is corrupt ({err}): delete it or rebuild it with "
                        f"python -m dist_hrnas.profile") from None
    ok = (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("tables"), dict)
          and all(isinstance(t, dict) and isinstance(t.get("fingerprint"), dict) and isinstance(t.get("ops"), dict)
                  for t in data["tables"].values()))
    if not ok:
        raise UserError(f"latency LUT {path} is corrupt (not a format-{FORMAT} dist_hrnas LUT): delete it or "
                        f"rebuild it with python -m dist_hrnas.profile")
    for table in data["tables"].values():
        for sig, entry in table["ops"].items():
            problem = _entry_problem(entry)
            if problem:
                raise UserError(f"latency LUT {path}: op {str(sig)[:80]} {problem}: delete the entry (or the file) "
                                f"and re-measure with python -m dist_hrnas.profile")
    return data


def _entry_problem(entry: object) -> str:
    """Why one op entry is unusable ('' when it is fine): ``{median_s > 0, spread_s >= 0}``, finite numbers."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not {{median_s, spread_s}}"
    for key, low in (("median_s", "> 0"), ("spread_s", ">= 0")):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"has no number {key} (got {value!r})"
        if not math.isfinite(value) or value < 0 or (key == "median_s" and value == 0):
            return f"has {key}={value!r}; it must be a finite number {low} seconds"
    return ""


def check_lut_file(cfg: LatencyConfig) -> None:
    """Before any timing: ``latency.lut`` is a valid LUT (every entry) and, unless only read, can be written."""
    if not cfg.lut:
        return
    path = Path(cfg.lut)
    if not cfg.lut_device:  # measuring here: the new entries are merged into the file afterwards
        problem = writable_file_problem(path)
        if problem:
            raise UserError(f"latency.lut: cannot write the LUT file {path} ({problem}); choose another path")
    elif not path.is_file():
        raise UserError(f"latency.lut: {path} does not exist; latency.lut_device needs the LUT built on that "
                        f"device with python -m dist_hrnas.profile")
    read_lut_file(path)


def lut_device_name(cfg: LatencyConfig) -> str:
    """The device whose table ``latency.lut_device`` uses: its name, or with ``auto`` the name it resolves to."""
    if cfg.lut_device != "auto":
        return cfg.lut_device
    data = read_lut_file(Path(cfg.lut))
    return LatencyTable.remote(cfg, fingerprint_settings(cfg), Path(cfg.lut), data).fp.get("device_name", "?")




class LatencyTable:
    """Op timings for one device fingerprint, backed by ``latency.lut`` (or by memory only when it is empty)."""

    def __init__(self, fp: dict, path: Path | None = None, ops: dict[str, dict] | None = None,
                 calibrations: dict[str, dict] | None = None):
        self.fp, self.path = fp, path
        self.ops: dict[str, dict] = dict(ops or {})
        self.calibrations: dict[str, dict] = dict(calibrations or {})
        self.new: set[str] = set()  # signatures measured in this run (what save() adds)

    @classmethod
    def open(cls, cfg: LatencyConfig, device: torch.device) -> "LatencyTable":
        """This fingerprint's table of ``cfg.lut``; on a fingerprint mismatch warn (or raise when strict)."""
        fp = fingerprint(cfg, device)
        if not cfg.lut:
            return cls(fp)
        path = Path(cfg.lut)
        data = read_lut_file(path)
        if cfg.lut_device:
            return cls.remote(cfg, fp, path, data)
        table = data["tables"].get(fingerprint_id(fp))
        if table is not None:
            return cls(fp, path, table["ops"], table.get("calibrations"))
        if data["tables"]:
            # Name the differences to the closest table: that is usually the setting the user changed.
            others = [t["fingerprint"] for t in data["tables"].values()]
            other = min(others, key=lambda o: sum(o.get(k) != fp.get(k) for k in set(o) | set(fp)))
            what = _differences(other, fp)
            if cfg.lut_strict:
                raise UserError(f"latency LUT {path} was built for another device ({what}): profile this device "
                                f"with python -m dist_hrnas.profile, or set latency.lut_strict=false to re-measure")
            warnings.warn(f"latency LUT {path} has no entries for this device ({what}); re-measuring and adding "
                          f"them (latency.lut_strict=true makes this an error)", LutMismatchWarning, stacklevel=2)
        return cls(fp, path)

    @classmethod
    def remote(cls, cfg: LatencyConfig, fp: dict, path: Path, data: dict) -> "LatencyTable":
        """The table ``latency.lut_device`` names: same latency settings, measured on another machine."""
        # what the op timings depend on besides the machine (its name and software are the machine's own)
        settings = {k: v for k, v in fp.items() if k not in MACHINE_KEYS}
        tables = [t for t in data["tables"].values()
                  if {k: v for k, v in t["fingerprint"].items() if k not in MACHINE_KEYS} == settings]
        names = sorted({t["fingerprint"].get("device_name", "?") for t in tables})
        wanted = [t for t in tables if cfg.lut_device in ("auto", t["fingerprint"].get("device_name"))]
        settings_text = ", ".join(f"{k}={v}" for k, v in settings.items())
        if not wanted or (cfg.lut_device == "auto" and len(wanted) > 1):
            found = f"it has tables for {names}" if names else "it has none for these settings"
            raise UserError(f"latency.lut_device={cfg.lut_device}: latency LUT {path} has no single table for that "
                            f"device at {settings_text} ({found}); set latency.lut_device to one of them, or build "
                            f"one on the device with python -m dist_hrnas.profile and the same latency.* settings")
        table = wanted[0]
        return cls(table["fingerprint"], path, table["ops"], table.get("calibrations"))

    def get(self, sig: str) -> dict | None:
        return self.ops.get(sig)

    def put(self, sig: str, median_s: float, spread_s: float) -> None:
        self.ops[sig] = {"median_s": median_s, "spread_s": spread_s}
        self.new.add(sig)

    def put_calibration(self, supernet_key: str, state: dict) -> None:
        """Keep the calibration fitted for the supernet under ``supernet_key`` (saved with the next save)."""
        self.calibrations[supernet_key] = state
        self.new.add(supernet_key)

    def save(self) -> None:
        """Merge this run's new entries into the file as it is now (other fingerprints untouched), atomically."""
        if self.path is None or not self.new:
            return
        data = read_lut_file(self.path)  # re-read: another process may have added entries meanwhile
        fid = fingerprint_id(self.fp)
        table = data["tables"].setdefault(fid, {"fingerprint": self.fp, "ops": {}})
        table["ops"].update({sig: self.ops[sig] for sig in sorted(self.new) if sig in self.ops})
        fits = {key: self.calibrations[key] for key in sorted(self.new) if key in self.calibrations}
        if fits:
            table.setdefault("calibrations", {}).update(fits)
        atomic_write_json(self.path, data)
        self.new.clear()

