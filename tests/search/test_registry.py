"""Penalty normalisation, rho schedule, masks and the shrink trigger."""
from __future__ import annotations

import math

import pytest
import torch

from dist_hrnas.config import PruneConfig, load_config
from dist_hrnas.latency import LatencyProfile, branch_key, branch_widths
from dist_hrnas.models import build_model, count_macs
from dist_hrnas.optim import ModelEma
from dist_hrnas.search.registry import PruneRegistry, normalised_penalties, rho_at, should_shrink
from tests.conftest import CONFIGS


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS / "digits.yaml").model)


def fake_profile(model) -> LatencyProfile:
    """Branch seconds that grow with kernel size and shrink with depth: unequal per-channel costs."""
    widths = branch_widths(model)
    seconds = {k: (1 + i % 5) * 1e-4 * (1 + int(k.rsplit(":k", 1)[1]) / 7) for i, k in enumerate(widths)}
    return LatencyProfile(sum(seconds.values()) + 2e-3, seconds, widths)


def registry(model, mode: str, **kw) -> PruneRegistry:
    cfg = PruneConfig(penalty=mode, **kw)
    return PruneRegistry.build(cfg, model, count_macs(model, 1, 32), fake_profile(model))


@pytest.mark.parametrize("mode", ["seconds", "macs", "equal"])
def test_penalties_are_normalised_so_the_average_channel_costs_one(model, mode):
    reg = registry(model, mode)
    entries = list(reg.entries.values())
    weighted_mean = sum(e.penalty * e.width for e in entries) / sum(e.width for e in entries)
    assert weighted_mean == pytest.approx(1.0)
    cost = {"seconds": lambda e: e.seconds_per_channel, "macs": lambda e: e.macs_per_channel,
            "equal": lambda e: 1.0}[mode]
    a, b = entries[0], entries[-1]
    assert a.penalty / b.penalty == pytest.approx(cost(a) / cost(b))
    if mode == "equal":
        assert all(e.penalty == 1.0 for e in entries)
    else:
        assert len({round(e.penalty, 9) for e in entries}) > 1


def test_seconds_and_macs_penalties_differ_and_use_their_own_unit(model):
    s, m = registry(model, "seconds"), registry(model, "macs")
    key = branch_key("head.down.1", 7)
    assert s.entries[key].seconds_per_channel == pytest.approx(fake_profile(model).per_channel_s(key))
    assert m.entries[key].macs_per_channel == pytest.approx(
        sum(v for k, v in count_macs(model, 1, 32).items() if k.startswith("head.down.1.branches.2.")) / 256)
    assert [e.penalty for e in s.entries.values()] != pytest.approx([e.penalty for e in m.entries.values()])


def test_normaliser_formula():
    assert normalised_penalties([1.0, 3.0], [10, 30]) == pytest.approx([1 / 2.5, 3 / 2.5])


def test_skip_first_non_expanding_block():
    cfg = load_config(CONFIGS / "digits.yaml", ["model.expand_ratio=1"])
    net = build_model(cfg.model)
    first = net.named_blocks()[0][0]
    assert not any(e.block == first for e in registry(net, "seconds", skip_expand1=True).entries.values())
    assert any(e.block == first for e in registry(net, "seconds", skip_expand1=False).entries.values())


def test_rho_schedule_linear_warmup():
    cfg = PruneConfig(rho=0.1, epoch_free=1, epoch_warmup=3)
    assert rho_at(cfg, 0.5) == 0.0
    assert rho_at(cfg, 1.0) == 0.0
    assert rho_at(cfg, 2.0) == pytest.approx(0.05)
    assert rho_at(cfg, 2.5) == pytest.approx(0.075)
    assert rho_at(cfg, 3.0) == pytest.approx(0.1) and rho_at(cfg, 40) == pytest.approx(0.1)
    per_epoch = PruneConfig(rho=0.1, epoch_free=1, epoch_warmup=3, stepwise=False)
    assert rho_at(per_epoch, 2.9) == pytest.approx(0.05)
    assert rho_at(PruneConfig(rho=0.1), 0.0) == pytest.approx(0.1)  # no warm-up configured
    assert rho_at(PruneConfig(rho=0.1, penalty="none"), 5.0) == 0.0


def test_l1_loss_is_penalty_weighted_sum_of_abs_scales(model):
    reg = registry(model, "seconds")
    pairs = reg.bns(model)
    for _, bn in pairs:
        torch.nn.init.uniform_(bn.weight, -1, 1)
    expected = sum(e.penalty * bn.weight.abs().sum().item() for e, bn in pairs)
    assert reg.l1_loss(pairs).item() == pytest.approx(expected, rel=1e-5)


def test_the_group_term_pushes_a_branchs_scales_together_by_its_fixed_seconds(model):
    reg = registry(model, "seconds")
    (entry, bn), (other, _) = reg.bns(model)[:2]
    entry.fixed_s, reg.join_s = 2e-4, {}
    reg.renormalise()
    entries = list(reg.entries.values())
    channels = sum(e.width for e in entries)
    normaliser = sum(e.width * e.seconds_per_channel for e in entries) / channels + 2e-4 / channels
    assert entry.group_penalty == pytest.approx(2e-4 / (normaliser * math.sqrt(entry.width)))
    assert entry.penalty == pytest.approx(entry.seconds_per_channel / normaliser)
    assert other.group_penalty == 0.0
    # equal scales everywhere: the whole penalty is one per channel, as without the group term (rho keeps its meaning)
    pairs = reg.bns(model)
    with torch.no_grad():
        for _, b in pairs:
            b.weight.fill_(1.0)
    assert reg.l1_loss(pairs).item() == pytest.approx(channels, rel=1e-5)
    gamma = torch.linspace(-1.0, 2.0, entry.width)
    with torch.no_grad():
        bn.weight.copy_(gamma)
    bn.weight.grad = None
    reg.l1_loss([(entry, bn)]).backward()
    expected = entry.penalty * gamma.sign() + entry.group_penalty * gamma / gamma.norm()
    assert torch.allclose(bn.weight.grad, expected, atol=1e-6)
    # equal scales: the group term charges the fixed seconds as if spread over the channels (rho keeps its meaning)
    with torch.no_grad():
        bn.weight.fill_(0.5)
    group = reg.l1_loss([(entry, bn)]) - entry.penalty * bn.weight.abs().sum()
    assert group.item() == pytest.approx(2e-4 / normaliser * 0.5, rel=1e-5)
    with torch.no_grad():                # a branch whose scales are all zero: a finite (zero) group gradient
        bn.weight.zero_()
    bn.weight.grad = None
    reg.l1_loss([(entry, bn)]).backward()
    assert torch.isfinite(bn.weight.grad).all()


def test_a_block_join_adds_a_group_term_over_all_its_branches(model):
    reg = registry(model, "seconds")
    pairs = reg.bns(model)
    block = pairs[0][0].block
    reg.join_s = {block: 3e-4}
    reg.renormalise()
    in_block = [(e, bn) for e, bn in pairs if e.block == block]
    scales = torch.cat([bn.weight.detach() for _, bn in in_block])
    l1 = sum(e.penalty * bn.weight.detach().abs().sum() for e, bn in in_block)
    assert reg.l1_loss(in_block).item() == pytest.approx((l1 + reg.join_penalty[block] * scales.norm()).item(), rel=1e-5)
    masks = {block: [torch.zeros(bn.weight.numel(), dtype=torch.bool) for _, bn in in_block]}
    channels = sum(e.width * e.seconds_per_channel for e, _ in in_block)
    assert reg.pruned_seconds(model, masks) == pytest.approx(channels + 3e-4)   # emptied: its join goes too


def test_masks_keep_a_channel_if_gamma_or_ema_gamma_is_alive_and_ema_alone_at_the_end(model):
    reg = registry(model, "seconds", threshold=1e-3)
    ema = ModelEma(model, 0.9)
    name, block = model.named_blocks()[3]
    ema_block = dict(ema.module.named_blocks())[name]
    with torch.no_grad():
        block.branches[0].dw_bn.weight[:4] = 0.0       # dead in the model ...
        ema_block.branches[0].dw_bn.weight[:2] = 0.0   # ... and channels 0-1 dead in the EMA too
        ema_block.branches[1].dw_bn.weight[5] = 0.0    # dead in the EMA only
    masks = reg.masks(model, ema.module)
    assert list(masks) == [name]
    assert (~masks[name][0]).nonzero().flatten().tolist() == [0, 1]
    assert bool(masks[name][1].all())
    final = reg.masks(model, ema.module, ema_only=True)
    assert (~final[name][0]).nonzero().flatten().tolist() == [0, 1]
    assert (~final[name][1]).nonzero().flatten().tolist() == [5]
    no_ema = reg.masks(model)
    assert (~no_ema[name][0]).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert reg.pruned_seconds(model, no_ema) == pytest.approx(
        4 * reg.entries[branch_key(name, block.branches[0].kernel)].seconds_per_channel)


def test_shrink_trigger():
    cfg = PruneConfig(shrink_delta_seconds=1e-3)
    assert not should_shrink(cfg, 5e-4, dead_channels=3, last_epoch=False)
    assert should_shrink(cfg, 1e-3, dead_channels=3, last_epoch=False)
    assert should_shrink(cfg, 1e-6, dead_channels=1, last_epoch=True)
    assert not should_shrink(cfg, 0.0, dead_channels=0, last_epoch=True)
    assert not should_shrink(PruneConfig(penalty="none"), 1.0, dead_channels=9, last_epoch=True)


def test_a_budget_ranks_channels_by_worth_per_unit_of_its_own_penalty(model):
    """The same scales, ranked for each penalty: per second for ``seconds``, per MAC for ``macs`` (HR-NAS's
    ranking held to a measured budget), plain |gamma| for ``equal``."""
    from dist_hrnas.search.ranking import branch_channels, ranked_channels

    torch.manual_seed(1)
    with torch.no_grad():
        for _, block in model.named_blocks():
            for branch in block.branches:
                branch.dw_bn.weight.uniform_(0.1, 1.0)
    orders = {}
    for mode, unit in (("seconds", lambda e: e.seconds_per_channel), ("macs", lambda e: e.macs_per_channel),
                       ("equal", lambda e: 1.0)):
        pairs = registry(model, mode).bns(model)
        channels = branch_channels(model, pairs, mode)
        assert [b.cost_per_channel for b in channels] == pytest.approx([unit(e) for e, _ in pairs])
        ranked = ranked_channels(channels)
        expected = sorted(float(bn.weight[c].detach().abs()) / unit(e) for e, bn in pairs for c in range(e.width))
        assert [score for score, _, _ in ranked] == pytest.approx(expected)  # least worth per unit first
        orders[mode] = [(b.block, b.index, c) for _, b, c in ranked]
    assert len({tuple(order) for order in orders.values()}) == 3  # each unit cuts in its own order
