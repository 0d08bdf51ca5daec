"""A latency LUT "built on another machine", for tests that train with ``latency.lut_device``."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from dist_hrnas import profile as profile_cli
from dist_hrnas.latency.lut import read_lut_file

BOARD = "Edge Board X1"
_BRANCH = re.compile(r"_h(\d+)_k(\d+)_")


def lut_from_another_machine(path: Path, args: list[str], even: bool = False) -> Path:
    """A LUT built here by the profile CLI (``args``: --config and overrides), relabelled as built on BOARD.

    ``even``: replace every timing with a smooth table that depends on the architecture only (a branch costs
    its hidden width times its kernel, every other op a constant, no calibration networks), so a run's shrink
    decisions are the same however loaded this machine was when the LUT was built."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert profile_cli.main([*args, "--device", "cpu", "--out", str(path), "--no-progress"]) == 0
    data = read_lut_file(path)
    (table,) = data["tables"].values()
    table["fingerprint"] |= {"device_name": BOARD, "torch": "0.0.0"}
    if even:
        (supernet,) = table["calibrations"]
        table["ops"] = {key: {"median_s": _even_seconds(key), "spread_s": 0.0} for key in table["ops"]
                        if not key.startswith("network_") or key == supernet}
        table["calibrations"] = {}
    path.write_text(json.dumps({"format": data["format"], "tables": {"another": table}}))
    return path


def _even_seconds(key: str) -> float:
    branch = _BRANCH.search(key)
    if branch:
        return 1e-6 * int(branch.group(1)) * int(branch.group(2))
    if key.startswith("network_"):
        return 5e-3
    return 1e-3 if key.startswith("fixed_") else 2e-5
