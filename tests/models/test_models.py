"""The HR-NAS search space: exact reference size, architecture files, the summary CLI."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dist_hrnas.config import load_config
from dist_hrnas.errors import UserError
from dist_hrnas.models import (AtomicBlock, build_model, count_params, export_arch, load_arch_file,
                               model_from_arch, save_arch_file)
from dist_hrnas.summary import summarize
from tests.conftest import CONFIGS, PYTHON

# The original HR-NAS ImageNet supernet at 224x224 (../shared/hrnas-method.md).
REFERENCE_PARAMS = 13_243_868
REFERENCE_MACS = 2_422_799_760


@pytest.fixture(scope="module")
def digits_cfg():
    return load_config(CONFIGS / "digits.yaml")


def test_imagenet_supernet_matches_reference_and_runs_at_224(python_env):
    proc = subprocess.run([PYTHON, "-m", "dist_hrnas.summary", "--config", str(CONFIGS / "hrnas_imagenet.yaml"),
                           "--json"], capture_output=True, text=True, env=python_env, check=True)
    summary = json.loads(proc.stdout)
    assert abs(summary["params"] / REFERENCE_PARAMS - 1) < 0.005
    assert abs(summary["macs"] / REFERENCE_MACS - 1) < 0.005
    assert summary["blocks"] == 67 and summary["branches"] == 201
    assert summary["hidden_channels"] == sum(sum(b["widths"]) for b in summary["per_block"])
    model = build_model(load_config(CONFIGS / "hrnas_imagenet.yaml").model).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_summary_table_lists_blocks(digits_cfg, python_env):
    proc = subprocess.run([PYTHON, "-m", "dist_hrnas.summary", "--config", str(CONFIGS / "digits.yaml"),
                           "model.kernel_sizes=[3,5]"], capture_output=True, text=True, env=python_env, check=True)
    assert "stages.0.fuse.paths.0_0" in proc.stdout and "head.down.1" in proc.stdout
    assert "3,5 " in proc.stdout and "total:" in proc.stdout


def test_block_exposes_branches_and_depthwise_bns(digits_cfg):
    model = build_model(digits_cfg.model)
    name, block = model.named_blocks()[0]
    assert block.kernel_sizes == [3, 5, 7] and block.widths == [64, 64, 64]
    bns = block.depthwise_bns()
    assert [bn.num_features for bn in bns] == block.widths
    assert all(bn is br.dw_bn for bn, br in zip(bns, block.branches))
    assert block.branches[1].dw_conv.kernel_size == (5, 5)


def test_arch_round_trip_rebuilds_same_network(tmp_path, digits_cfg):
    model = build_model(digits_cfg.model)
    save_arch_file(export_arch(model), tmp_path / "arch.yaml")
    again = model_from_arch(load_arch_file(tmp_path / "arch.yaml"))
    assert count_params(again) == count_params(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _narrowed_arch(digits_cfg) -> dict:
    arch = export_arch(build_model(digits_cfg.model))
    blocks = {b["name"]: b for b in arch["blocks"]}
    blocks["stages.1.parallel.branches.1.0"].update(kernel_sizes=[5], widths=[7])       # one branch
    blocks["stages.2.fuse.paths.0_1"].update(kernel_sizes=[], widths=[])                # no branch, projection
    blocks["stages.2.parallel.branches.0.0"].update(kernel_sizes=[], widths=[])         # no branch, identity
    blocks["head.down.0"].update(kernel_sizes=[3, 7], widths=[10, 3])
    return arch


def test_build_from_arch_file_with_one_branch_and_no_branch(tmp_path, digits_cfg, python_env):
    path = tmp_path / "searched_arch.yaml"
    save_arch_file(_narrowed_arch(digits_cfg), path)
    cfg = load_config(CONFIGS / "digits.yaml", [f"model.arch={path}"])
    model = build_model(cfg.model)
    blocks = dict(model.named_blocks())
    one = blocks["stages.1.parallel.branches.1.0"]
    assert one.kernel_sizes == [5] and one.widths == [7] and one.branches[0].dw_conv.kernel_size == (5, 5)
    for name in ("stages.2.fuse.paths.0_1", "stages.2.parallel.branches.0.0"):
        empty: AtomicBlock = blocks[name]
        assert empty.kernel_sizes == [] and empty.pw_bn is None and len(empty.branches) == 0
    assert blocks["stages.2.fuse.paths.0_1"].shortcut is not None
    assert blocks["stages.2.parallel.branches.0.0"].shortcut is None
    assert blocks["head.down.0"].widths == [10, 3]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    supernet = build_model(load_config(CONFIGS / "digits.yaml").model)
    assert count_params(model) < count_params(supernet)
    # The summary CLI reads the same file.
    proc = subprocess.run([PYTHON, "-m", "dist_hrnas.summary", "--config", str(CONFIGS / "digits.yaml"),
                           f"model.arch={path}", "--json"], capture_output=True, text=True, env=python_env,
                          check=True)
    summary = json.loads(proc.stdout)
    assert summary["params"] == count_params(model)
    assert summary["branches"] == 57 - 2 - 3 - 3 - 1  # one-branch, two empty blocks, 3 -> 2
    assert summary == summarize(model, 32) | {"per_block": summary["per_block"]}


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("format"), "missing 'format"),
    (lambda a: a["blocks"].pop(0), "block stages.0.fuse.paths.0_0 is missing"),
    (lambda a: a["blocks"][0].update(out=99), "in/out/stride"),
    (lambda a: a["blocks"].append({**a["blocks"][0], "name": "stages.9.x"}), "no atomic block named stages.9.x"),
    (lambda a: a["blocks"][1].update(widths=[4, 0, 4]), "widths >= 1"),
    (lambda a: a["model"].update(stagez=[]), "model.stagez"),
])
def test_bad_arch_file_is_a_clear_error(tmp_path, digits_cfg, mutate, message):
    arch = export_arch(build_model(digits_cfg.model))
    mutate(arch)
    path = tmp_path / "bad.yaml"
    save_arch_file(arch, path)
    with pytest.raises(UserError, match=message) as exc:
        build_model(load_config(None, [f"model.arch={path}"]).model)
    assert str(path) in str(exc.value)


def test_missing_arch_file_names_path(tmp_path):
    with pytest.raises(UserError, match=f"architecture file not found: {tmp_path / 'x.yaml'}"):
        build_model(load_config(None, [f"model.arch={tmp_path / 'x.yaml'}"]).model)
