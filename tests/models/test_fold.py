"""BatchNorm folding: no BN left, eval outputs unchanged (also after a shrink and with blocks left without branches)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_hrnas.config import load_config
from dist_hrnas.models import build_model
from dist_hrnas.models.fold import batchnorms, fold_bn
from dist_hrnas.search.surgery import shrink_model
from tests.conftest import CONFIGS

TOL = 1e-4  # max abs logit difference the export promises


def _trained_like(*overrides: str, seed: int = 0) -> nn.Module:
    """The digits supernet with running statistics and BN affine parameters far from their initial values."""
    torch.manual_seed(seed)
    model = build_model(load_config(CONFIGS / "digits.yaml", list(overrides)).model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 32, 32))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _max_diff(model: nn.Module, folded: nn.Module, batch: int = 6) -> float:
    x = torch.randn(batch, 1, 32, 32)
    with torch.no_grad():
        return (model(x) - folded(x)).abs().max().item()


@pytest.mark.parametrize("overrides", [[], ["model.expand_ratio=1"]], ids=["expand", "no-expand"])
def test_folding_the_supernet_leaves_no_batchnorm_and_the_same_outputs(overrides):
    model = _trained_like(*overrides)
    assert batchnorms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model)
    assert batchnorms(folded) == []
    assert _max_diff(model, folded) <= TOL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_folding_after_a_shrink_with_removed_channels_branches_and_a_block_left_without_branches():
    model = _trained_like()
    blocks = dict(model.named_blocks())
    masks = {}
    for i, (name, block) in enumerate(blocks.items()):
        per_branch = []
        for j, branch in enumerate(block.branches):
            keep = torch.rand(branch.hidden, generator=torch.Generator().manual_seed(i * 10 + j)) > 0.4
            per_branch.append(keep)
        masks[name] = per_branch
    emptied = "stages.2.parallel.branches.1.0"
    masks[emptied] = [torch.zeros(b.hidden, dtype=torch.bool) for b in blocks[emptied].branches]
    one_branch = "head.down.0"
    masks[one_branch][0] = torch.zeros(blocks[one_branch].branches[0].hidden, dtype=torch.bool)
    shrink_model(model, masks)
    model.eval()
    assert blocks[emptied].pw_bn is None and len(blocks[emptied].branches) == 0
    assert blocks[one_branch].kernel_sizes == [5, 7]  # the kernel-3 branch is gone
    assert any(0 < w < 64 for _, b in model.named_blocks() for w in b.widths)
    folded = fold_bn(model)
    assert batchnorms(folded) == []
    assert _max_diff(model, folded) <= TOL


def test_the_block_bn_goes_into_every_project_conv_and_its_shift_into_one_bias():
    model = _trained_like()
    block = dict(fold_bn(model).named_blocks())["stages.0.fuse.paths.0_0"]
    biases = [b.project.bias is not None for b in block.branches]
    assert biases == [True] + [False] * (len(biases) - 1)
    assert isinstance(block.pw_bn, nn.Identity)
