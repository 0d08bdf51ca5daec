"""latency.form: what is timed (BN folded or not) and that it keys the LUT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_hrnas.config import load_config
from dist_hrnas.errors import ConfigError
from dist_hrnas.latency import Timer, profile_on_rank0
from dist_hrnas.latency.lut import LatencyTable, LutMismatchWarning, fingerprint, fingerprint_id, read_lut_file
from dist_hrnas.latency.measure import BlockJoin, op_at_width
from dist_hrnas.latency.timing import runner
from dist_hrnas.models import build_model
from tests.conftest import CONFIGS, SMALL

FAST = ["latency.warmup=0", "latency.repeats=1", "latency.batch_size=2"]
CPU = torch.device("cpu")


def _cfg(*extra: str):
    return load_config(CONFIGS / "digits.yaml", [*SMALL, *FAST, *extra])


def _modules_run(call) -> list[type]:
    """Types of the modules whose forward ran during ``call()``."""
    seen: list[type] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, _a, _o: seen.append(type(m)))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def test_default_is_deployed_and_bad_values_are_a_config_error():
    assert _cfg().latency.form == "deployed"
    with pytest.raises(ConfigError, match="latency.form"):
        _cfg("latency.form=folded")


@pytest.mark.parametrize("form, bn_runs", [("deployed", False), ("eager", True)])
def test_runner_times_ops_joins_and_networks_with_bn_folded_only_when_deployed(form, bn_runs):
    cfg = _cfg(f"latency.form={form}").latency
    model = build_model(_cfg().model).eval()
    block = dict(model.named_blocks())["stages.1.fuse.paths.0_0"]
    x_op, x_net = torch.randn(2, 8, 8, 8), torch.randn(2, 1, 16, 16)
    op = op_at_width(block, 3, 16)
    for module, x in ((op, x_op), (BlockJoin(8, 2, folded=form == "deployed"), x_op), (model, x_net)):
        run = runner(module, x, cfg, CPU)
        ran = _modules_run(run)
        assert ran and (nn.BatchNorm2d in ran) == bn_runs, type(module).__name__
    with torch.no_grad():  # the timed network computes what the model computes
        assert (runner(model, x_net, cfg, CPU)() - model(x_net)).abs().max().item() < 1e-4


def test_form_is_part_of_the_lut_fingerprint(tmp_path):
    deployed, eager = _cfg().latency, _cfg("latency.form=eager").latency
    assert fingerprint(deployed, CPU)["form"] == "deployed"
    assert "form" not in fingerprint(eager, CPU)  # as in tables written before the setting existed (eager)
    assert fingerprint_id(fingerprint(deployed, CPU)) != fingerprint_id(fingerprint(eager, CPU))
    lut = tmp_path / "lut.json"
    model = build_model(_cfg().model)
    profile_on_rank0(model, 16, _cfg(f"latency.lut={lut}", "latency.form=eager").latency, Timer(CPU, 0, 1))
    cfg = _cfg(f"latency.lut={lut}").latency
    with pytest.warns(LutMismatchWarning, match="form: None in the file vs 'deployed' here"):
        table = LatencyTable.open(cfg, CPU)
    assert table.ops == {}  # the eager timings are not used for the deployed form
    timer = Timer(CPU, 0, 1)
    with pytest.warns(LutMismatchWarning):
        profile_on_rank0(model, 16, cfg, timer)
    assert timer.counts["op"] > 0
    forms = sorted(t["fingerprint"].get("form", "eager") for t in read_lut_file(lut)["tables"].values())
    assert forms == ["deployed", "eager"]
