"""prune.measure_share: before the last epoch a shrink's candidates are timed only while the search's candidate
timing is within that share of its wall since it started; the last epoch, and a budget search's shrinks, always
are, but past the share each candidate is compared once, without the retakes that sharpen a figure."""
from __future__ import annotations

import time

import torch

from dist_hrnas.search.decide import DEFERRED_MEASURE_SHARE, decide_by_measurement
from tests.latency.test_calibration import _search
from tests.search.test_budget import Device, _measured_budget_search, even_lut  # noqa: F401 - a fixture


def _spent(search, share_of_wall: float) -> None:
    """As if the search had run 10 s and spent ``share_of_wall`` of them timing candidates."""
    search.started_s = time.perf_counter() - 10.0
    search.candidate_timing_s = 10.0 * share_of_wall


def _channels(model) -> int:
    return sum(b.hidden for _, block in model.named_blocks() for b in block.branches)


def test_a_shrink_before_the_last_epoch_waits_while_the_share_is_spent(tmp_path):
    search, model = _search(tmp_path, "prune.round_to=1", "prune.measure_share=0.05")
    with torch.no_grad():  # every other branch dead: a shrink the model rates far more than 5 % faster
        for _, bn in search.pairs[::2]:
            bn.weight.zero_()
    masks = search.registry.masks(model)
    device = search.network_timer = Device(lambda m: 1e-5 * _channels(m))  # seconds follow the channels
    search.latency_ms_measured = device(model) * 1e3  # the network now's earlier figure: the device's

    _spent(search, 0.06)  # over its 5 %: the shrink waits and nothing is timed
    waited = decide_by_measurement(search, model, masks, epoch=3, last_epoch=False)
    assert not waited.due and waited.refusals == [DEFERRED_MEASURE_SHARE] and device.compared == []

    _spent(search, 0.04)  # under it: timed, and taken (it measures faster)
    taken = decide_by_measurement(search, model, masks, epoch=3, last_epoch=False)
    assert taken.due and taken.refusals == [] and device.compared
    assert taken.measured_s < taken.before_s

    device.compared.clear()
    _spent(search, 0.5)  # the last epoch is timed however much was spent: its shrink has no later evaluation
    last = decide_by_measurement(search, model, masks, epoch=7, last_epoch=True)
    assert last.due and device.compared


def test_past_the_share_the_last_epoch_compares_each_candidate_once(tmp_path):
    """The machine reads 1.3x slower than at the network now's earlier figure (a LEVEL_JUMP): within the share the
    comparison is taken again; past it the one comparison decides, and still takes the faster candidate."""
    search, model = _search(tmp_path, "prune.round_to=1", "prune.measure_share=0.05")
    with torch.no_grad():
        for _, bn in search.pairs[::2]:
            bn.weight.zero_()
    masks = search.registry.masks(model)
    device = search.network_timer = Device(lambda m: 1e-5 * _channels(m))
    search.latency_ms_measured = device(model) * 1e3
    device.slower = 1.3

    _spent(search, 0.0)
    within = decide_by_measurement(search, model, masks, epoch=7, last_epoch=True)
    assert within.due and device.compared == [2, 2] and device.retakes == 1

    device.compared.clear()
    _spent(search, 0.5)
    past = decide_by_measurement(search, model, masks, epoch=7, last_epoch=True)
    assert past.due and device.compared == [2] and device.retakes == 0
    assert past.measured_s == within.measured_s  # the same figures, scaled back to the start's units alike


def test_a_budget_search_times_its_waypoints_whatever_the_share(tmp_path, even_lut):
    """A budget's shrinks follow its plan: held back, its landing would cut at once what the plan spreads."""
    search, model, device = _measured_budget_search(tmp_path, even_lut, lambda p, p0: p)
    assert search.cfg.prune.measure_share == 0.05  # the default
    _spent(search, 0.5)
    waypoint = decide_by_measurement(search, model, {}, epoch=0, last_epoch=False)
    assert device.compared and DEFERRED_MEASURE_SHARE not in waypoint.refusals
