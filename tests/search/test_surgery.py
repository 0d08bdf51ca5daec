"""Compress-by-mask surgery: eval function preserved, widths/branches/blocks removed, state carried over."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_hrnas.config import TrainConfig, load_config
from dist_hrnas.models import build_model, count_params, export_arch, model_from_arch
from dist_hrnas.optim import ModelEma, build_optimizer
from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model
from tests.conftest import CONFIGS

TOL = 1e-5
FUSE = "stages.0.fuse.paths.0_0"              # identity shortcut
STRIDE2 = "stages.2.fuse.paths.1_0"           # stride 2, conv shortcut
PROJ = "stages.2.fuse.paths.0_1"              # stride 1, conv shortcut (32 -> 16)
PARALLEL = "stages.2.parallel.branches.1.0"   # identity shortcut
HEAD = "head.down.0"                          # stride 2, conv shortcut
INCRE = "head.incre.1"


def _model(*overrides: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(load_config(CONFIGS / "digits.yaml", list(overrides)).model)


def _blocks(model) -> dict:
    return dict(model.named_blocks())


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and BN affine parameters, as after some training."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 32, 32))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _zero_gammas(model, plan: dict[str, list]) -> dict[str, list[torch.Tensor]]:
    """plan[block] = per-branch channel selection to kill (an index list, a bool tensor, 'all' or None).

    Sets the chosen dw-BN gammas to exactly 0 and returns the masks gamma != 0 for those blocks."""
    blocks = _blocks(model)
    masks = {}
    with torch.no_grad():
        for name, per_branch in plan.items():
            for bn, kill in zip(blocks[name].depthwise_bns(), per_branch):
                if isinstance(kill, str):
                    bn.weight.zero_()
                elif kill is not None:
                    bn.weight[kill] = 0.0
            masks[name] = [bn.weight != 0 for bn in blocks[name].depthwise_bns()]
    return masks


def _out(model, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _check_params_map(model, old_state: dict, result) -> None:
    """ShrinkResult names every new parameter, and applying its slice to the old value gives the new value."""
    new_params = dict(model.named_parameters())
    assert set(result.params) == set(new_params)
    for name, p in new_params.items():
        where = result.params[name]
        if where.old_name is None:
            continue
        assert torch.equal(where.apply(old_state[where.old_name]), p.detach())


def _prepared(plan, *overrides, seed=0):
    model = _model(*overrides, seed=seed)
    _randomise(model, seed)
    masks = _zero_gammas(model, plan)
    model.eval()
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(123))
    return model, masks, x


PARTIAL = {FUSE: [list(range(0, 64, 3)), list(range(32)), None],
           STRIDE2: [torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.4, [5], list(range(1, 64))],
           HEAD: [list(range(100)), None, list(range(0, 128, 2))],
           PARALLEL: [None, list(range(10, 20)), None]}


def test_partial_channels_removed_keeps_eval_output_and_rebuilds_from_arch():
    model, masks, x = _prepared(PARTIAL)
    ref = _out(model, x)
    assert ref.abs().max() > 0.1
    expected = {name: [int(m.sum()) for m in ms] for name, ms in masks.items()}
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = count_params(model)
    result = shrink_model(model, masks)
    assert (_out(model, x) - ref).abs().max() < TOL
    blocks = _blocks(model)
    for name, widths in expected.items():
        assert blocks[name].widths == widths
        for br, w in zip(blocks[name].branches, widths):
            assert br.dw_conv.groups == w and br.dw_conv.weight.shape == (w, 1, br.kernel, br.kernel)
            assert br.expand_conv.weight.shape[0] == w and br.project.weight.shape[1] == w
            assert br.expand_bn.running_var.shape == (w,) and br.dw_bn.weight.shape == (w,)
    stride2 = blocks[STRIDE2].branches
    assert stride2[0].dw_conv.stride == (2, 2) and stride2[2].dw_conv.padding == (3, 3)
    assert blocks[STRIDE2].widths[2] == 1 and count_params(model) < before
    assert result.removed_branches == [] and result.emptied_blocks == []
    assert all(not t.is_meta for t in model.state_dict().values())
    _check_params_map(model, old_state, result)
    # Slices follow the masks: dw weight rows, project columns; untouched parameters map to themselves.
    keep = masks[FUSE][0]
    where = result.params[f"{FUSE}.branches.0.dw_conv.weight"]
    assert where.dim == 0 and torch.equal(where.index, keep.nonzero().flatten())
    assert result.params[f"{FUSE}.branches.0.project.weight"].dim == 1
    assert result.params[f"{FUSE}.branches.2.project.weight"].dim is None
    assert result.params["classifier.1.weight"].old_name == "classifier.1.weight"
    assert torch.equal(blocks[FUSE].branches[0].dw_bn.running_mean,
                       old_state[f"{FUSE}.branches.0.dw_bn.running_mean"][keep])
    # The shrunk architecture rebuilds the same network, and its weights reproduce the output.
    again = model_from_arch(export_arch(model))
    assert count_params(again) == count_params(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    again.load_state_dict(model.state_dict())
    assert (_out(again, x) - _out(model, x)).abs().max() < 1e-6


def test_non_expanding_blocks_slice_input_index():
    plan = {FUSE: [list(range(0, 16, 2)), None, [3]], STRIDE2: ["all", [0, 1, 2], None]}
    model, masks, x = _prepared(plan, "model.expand_ratio=1")
    ref = _out(model, x)
    result = shrink_model(model, masks)
    assert (_out(model, x) - ref).abs().max() < TOL
    fuse = _blocks(model)[FUSE]
    assert fuse.widths == [8, 16, 15] and not fuse.branches[0].expand
    assert fuse.branches[0].input_index.tolist() == list(range(1, 16, 2))
    assert result.removed_branches == [f"{STRIDE2}:k3"]
    again = model_from_arch(export_arch(model))
    again.load_state_dict(model.state_dict())
    assert (_out(again, x) - _out(model, x)).abs().max() < 1e-6


def test_whole_branch_dropped_renames_later_branches():
    model, masks, x = _prepared({PARALLEL: [None, "all", list(range(7))], HEAD: ["all", None, None]})
    ref = _out(model, x)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = shrink_model(model, masks)
    assert (_out(model, x) - ref).abs().max() < TOL
    blocks = _blocks(model)
    assert blocks[PARALLEL].kernel_sizes == [3, 7] and blocks[PARALLEL].widths == [128, 121]
    assert blocks[HEAD].kernel_sizes == [5, 7]
    assert result.removed_branches == [f"{PARALLEL}:k5", f"{HEAD}:k3"]
    assert f"{PARALLEL}.branches.2.dw_conv.weight" not in result.params
    where = result.params[f"{PARALLEL}.branches.1.dw_conv.weight"]
    assert where.old_name == f"{PARALLEL}.branches.2.dw_conv.weight" and where.index.tolist() == list(range(7, 128))
    assert result.params[f"{HEAD}.branches.0.dw_bn.weight"].old_name == f"{HEAD}.branches.1.dw_bn.weight"
    assert result.params[f"{HEAD}.branches.0.dw_bn.weight"].dim is None
    _check_params_map(model, old_state, result)


@pytest.mark.parametrize("name", [PARALLEL, PROJ])   # identity shortcut, then a 1x1 conv shortcut
def test_whole_block_emptied_becomes_shortcut_plus_bias(name):
    model, masks, x = _prepared({name: ["all", "all", "all"]})
    ref = _out(model, x)
    result = shrink_model(model, masks)
    assert (_out(model, x) - ref).abs().max() < TOL
    block = _blocks(model)[name]
    assert block.pw_bn is None and isinstance(block.bias, nn.Parameter) and block.bias.shape == (block.out_channels,)
    assert block.bias.requires_grad and len(block.branches) == 0
    assert (block.shortcut is None) == (name == PARALLEL)
    assert result.emptied_blocks == [name] and len(result.removed_branches) == 3
    assert result.params[f"{name}.bias"].old_name is None
    assert not any(k.startswith(f"{name}.pw_bn") or k.startswith(f"{name}.branches") for k in result.params)
    again = model_from_arch(export_arch(model))
    again.load_state_dict(model.state_dict())
    assert (_out(again, x) - ref).abs().max() < TOL


def test_fold_moves_pw_bn_running_mean_by_the_removed_constant():
    kill = list(range(0, 64, 2))
    model, masks, x = _prepared({INCRE: [kill, None, None]})
    block = _blocks(model)[INCRE]
    branch = block.branches[0]
    assert (branch.dw_bn.bias[kill] > 0).any()                 # relu(beta) != 0: the removed channels matter
    v = branch.project.weight[:, kill, 0, 0].double() @ torch.relu(branch.dw_bn.bias[kill].double())
    mean_before = block.pw_bn.running_mean.clone()
    ref = _out(model, x)
    shrink_model(model, masks)
    shift = (mean_before - block.pw_bn.running_mean).double()
    assert v.abs().max() > 0.1 and (shift - v).abs().max() < 1e-5
    assert (_out(model, x) - ref).abs().max() < TOL
    with torch.no_grad():                                      # plain slicing (fold undone) changes the output
        block.pw_bn.running_mean.copy_(mean_before)
    assert (_out(model, x) - ref).abs().max() > 1e-3


def _train(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


MIXED = {FUSE: [list(range(0, 64, 3)), "all", None], STRIDE2: [None, list(range(40)), [1, 2]],
         PROJ: ["all", "all", "all"], HEAD: [None, None, list(range(0, 128, 4))]}


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_optimizer_state_is_sliced_and_carried(optimizer):
    cfg = TrainConfig(optimizer=optimizer, momentum=0.9)
    model = _model()
    opt = build_optimizer(model, cfg, 0.01)
    _train(model, opt, 2)
    for group in opt.param_groups:
        group["initial_lr"], group["lr"] = 0.01, 0.0037
    masks = _zero_gammas(model, MIXED)
    old_params = dict(model.named_parameters())
    old_state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                 for n, p in old_params.items()}
    assert all(old_state.values())
    result = shrink_model(model, masks)
    new_opt = build_optimizer(model, cfg, 0.01)
    carry_optimizer_state(opt, old_params, new_opt, model, result)
    assert [g["lr"] for g in new_opt.param_groups] == [0.0037, 0.0037]
    assert [g["initial_lr"] for g in new_opt.param_groups] == [0.01, 0.01]
    keys = {"sgd": {"momentum_buffer"}, "rmsprop": {"step", "square_avg", "momentum_buffer"},
            "adamw": {"step", "exp_avg", "exp_avg_sq"}}[optimizer]
    for name, p in model.named_parameters():
        where = result.params[name]
        if where.old_name is None:
            assert p not in new_opt.state
            continue
        state, old = new_opt.state[p], old_state[where.old_name]
        assert set(state) == set(old) and keys <= set(state)
        for key, value in old.items():
            if torch.is_tensor(value) and value.shape == old_params[where.old_name].shape:
                expected = value if where.dim is None else value.index_select(where.dim, where.index)
                assert torch.equal(state[key], expected) and state[key].shape == p.shape
            else:
                assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
    # Spot check against the mask itself: momentum/moment of a partially pruned dw-BN scale.
    keep = masks[FUSE][0]
    first = {"sgd": "momentum_buffer", "rmsprop": "square_avg", "adamw": "exp_avg"}[optimizer]
    got = new_opt.state[_blocks(model)[FUSE].branches[0].dw_bn.weight][first]
    assert torch.equal(got, old_state[f"{FUSE}.branches.0.dw_bn.weight"][first][keep])
    _train(model, new_opt, 1, seed=1)


def test_ema_copy_shrinks_like_the_model():
    model = _model()
    ema = ModelEma(model, 0.9)
    opt = build_optimizer(model, TrainConfig(), 0.05)
    for step in range(3):
        _train(model, opt, 1, seed=step)
        ema.update(model)
    masks = _zero_gammas(model, MIXED)
    old_ema = {k: v.clone() for k, v in ema.module.state_dict().items()}
    result = shrink_model(model, masks)
    ema_result = shrink_model(ema.module, masks)
    assert result.removed_branches == ema_result.removed_branches and result.emptied_blocks == ema_result.emptied_blocks
    assert {n: (w.old_name, w.dim, None if w.index is None else w.index.tolist()) for n, w in result.params.items()} \
        == {n: (w.old_name, w.dim, None if w.index is None else w.index.tolist()) for n, w in ema_result.params.items()}
    _check_params_map(ema.module, old_ema, ema_result)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in ema.module.state_dict().items()} == shapes
    assert not any(p.requires_grad for p in ema.module.parameters())
    keep = masks[STRIDE2][1]
    assert torch.equal(_blocks(ema.module)[STRIDE2].branches[1].dw_bn.running_var,
                       old_ema[f"{STRIDE2}.branches.1.dw_bn.running_var"][keep])
    ema.update(model)
    assert not ema.module.training


def test_shrink_is_deterministic_and_validates_masks():
    model, masks, x = _prepared(MIXED)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rng = torch.get_rng_state()
    shrink_model(a, masks)
    shrink_model(b, {k: [m.clone() for m in v] for k, v in reversed(list(masks.items()))})
    assert torch.equal(rng, torch.get_rng_state())             # surgery draws no random numbers
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(masks, **{HEAD: [torch.ones(128, dtype=torch.bool), torch.ones(127, dtype=torch.bool),
                                torch.ones(128, dtype=torch.bool)]})
    with pytest.raises(ValueError, match=rf"{HEAD} branch 1"):
        shrink_model(model, bad)
    with pytest.raises(ValueError, match=FUSE):
        shrink_model(model, {FUSE: masks[FUSE][:2]})
    with pytest.raises(ValueError, match="unknown block"):
        shrink_model(model, {"head.nope": []})
    with pytest.raises(ValueError, match="bool"):
        shrink_model(model, {FUSE: [m.long() for m in masks[FUSE]]})
    after = model.state_dict()                                 # a rejected call changes nothing
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_the_candidate_timed_before_the_cut_is_the_network_the_cut_gives():
    """Measure before cut times arch_after_masks(model, masks): it must be exactly what shrink_model leaves."""
    from dist_hrnas.search.masks import arch_after_masks

    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / "digits.yaml").model)
    gen = torch.Generator().manual_seed(3)
    masks = {}
    for i, (name, block) in enumerate(model.named_blocks()):
        kinds = [torch.rand(w, generator=gen) > 0.5 for w in block.widths]   # random channels ...
        if i % 3 == 1:
            kinds[0][:] = False                                               # ... whole branches ...
        if i % 5 == 4:
            kinds = [torch.zeros_like(m) for m in kinds]                      # ... and whole blocks
        masks[name] = kinds
    candidate = arch_after_masks(model, masks)
    shrink_model(model, masks)
    assert export_arch(model) == candidate
