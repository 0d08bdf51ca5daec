"""Whole networks timed in clean child processes (latency.clean_process)."""
from __future__ import annotations

import math
import multiprocessing
import os

import pytest
import torch

from dist_hrnas.latency.clean_process import CleanProcessTimer, _NetworkProcess, start_network_timer
from dist_hrnas.latency.networks import CALIBRATION_GROUP
from dist_hrnas.config import load_config
from dist_hrnas.errors import UserError
from dist_hrnas.models import build_model, export_arch
from dist_hrnas.search import Search
from dist_hrnas.search.surgery import shrink_model
from tests.conftest import CONFIGS, SEARCH


def _cfg(*extra: str):
    return load_config(CONFIGS / "digits.yaml", [*SEARCH, *extra])


def _serve_answers(_arch, cfg_fields, _image_size, conn) -> None:  # a stand-in network child
    conn.send(("ok", 0.0))                                         # built
    while conn.recv():                                             # each round: (its pid, the runs it was told)
        conn.send(("ok", float(os.getpid()) + cfg_fields["network_repeats"] / 100))
    conn.close()


def test_a_comparison_gives_each_network_one_fresh_process_and_its_settings(monkeypatch):
    """Every network of a comparison lives in a new child of its own for all its rounds; the comparison's own
    settings (a shrink's candidate: fewer runs per round) reach every child."""
    import dist_hrnas.latency.clean_process as clean_process
    from dist_hrnas.latency.timing import candidate_settings

    monkeypatch.setattr(clean_process, "_serve_network", _serve_answers)
    cfg = _cfg("latency.network_repeats=9", "latency.candidate_repeats=4", "latency.network_spread=1e9").latency
    timer = CleanProcessTimer(cfg, 16)
    timer._ctx = multiprocessing.get_context("spawn")             # the stand-in lives in this test module
    models = [build_model(_cfg().model)] * 2
    figures = timer.compare(models, rounds=3, retakes=0)
    pids = {int(seconds) for seconds, _ in figures}
    assert len(pids) == 2 and os.getpid() not in pids and all(spread == 0 for _, spread in figures)
    assert all(round(seconds % 1, 2) == 0.09 for seconds, _ in figures)
    again = timer.compare(models, 1, 0, candidate_settings(cfg))
    assert all(round(seconds % 1, 2) == 0.04 for seconds, _ in again) and not pids & {int(s) for s, _ in again}
    assert timer.children == 4 and not multiprocessing.active_children()   # every child has been joined


def test_kept_children_time_a_network_of_the_last_comparison_again_and_no_other(monkeypatch):
    """With keep_children (a search) the next comparison times the network now in the child that timed it last
    (its own child still, running nothing else); every other network, and any other settings, start fresh."""
    import dist_hrnas.latency.clean_process as clean_process
    from dist_hrnas.latency.timing import candidate_settings

    monkeypatch.setattr(clean_process, "_serve_network", _serve_answers)
    cfg = _cfg("latency.network_spread=1e9").latency
    timer = CleanProcessTimer(cfg, 16, keep_children=True)
    timer._ctx = multiprocessing.get_context("spawn")             # the stand-in lives in this test module
    now = build_model(_cfg().model)
    candidate, other = build_model(_cfg().model), build_model(_cfg().model)
    for model, keep in ((candidate, 2), (other, 1)):
        name, block = model.named_blocks()[-1]
        shrink_model(model, {name: [torch.arange(b.hidden) < keep for b in block.branches]})
    first = [int(s) for s, _ in timer.compare([now, candidate], 2, 0)]
    assert len(multiprocessing.active_children()) == 2              # both kept after the comparison
    # the candidate was taken; a search hands over architectures (export_arch's dicts): the same network
    second = [int(s) for s, _ in timer.compare([export_arch(candidate), other], 2, 0)]
    assert second[0] == first[1] and second[1] not in first and timer.children == 3
    third = [int(s) for s, _ in timer.compare([candidate, other], 1, 0, candidate_settings(cfg))]
    assert not set(third) & set(second) and timer.children == 5     # other settings: other children
    same = [int(s) for s, _ in timer.compare([candidate, candidate], 1, 0, candidate_settings(cfg))]
    assert same[0] == third[0] and same[1] != same[0] and len(multiprocessing.active_children()) == 1
    timer.close()
    assert not multiprocessing.active_children()


def test_each_network_is_timed_in_its_own_fresh_process():
    cfg = _cfg()
    model = build_model(cfg.model)
    timer = CleanProcessTimer(cfg.latency, cfg.data.image_size)
    supernet_s = timer(model)
    name, block = model.named_blocks()[-1]
    shrink_model(model, {name: [torch.arange(b.hidden) < 1 for b in block.branches]})
    assert 0 < timer(model) and 0 < supernet_s and timer.calls == 2
    figures = timer.compare([build_model(cfg.model), model], rounds=2, retakes=0)   # the same, side by side
    assert len(figures) == 2 and all(seconds > 0 and spread >= 0 for seconds, spread in figures)
    assert not multiprocessing.active_children()                   # every child has been joined


def test_children_are_new_processes_every_time(monkeypatch):
    import dist_hrnas.latency.clean_process as clean_process

    monkeypatch.setattr(clean_process, "_serve_network", _serve_answers)
    timer = CleanProcessTimer(_cfg("latency.network_spread=1e9").latency, 16)     # pids as seconds: no retakes
    timer._ctx = multiprocessing.get_context("spawn")             # the stand-in lives in this test module
    pids = {int(timer(build_model(_cfg().model))) for _ in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids and not multiprocessing.active_children()


def _exit_3(*_args) -> None:  # a stand-in network child that dies without answering
    os._exit(3)


def test_a_child_that_dies_or_fails_is_an_error_naming_the_setting_not_a_hang(monkeypatch):
    import dist_hrnas.latency.clean_process as clean_process

    timer = CleanProcessTimer(_cfg().latency, 16)
    with pytest.raises(UserError, match="timing the network in a clean process failed: "):
        _NetworkProcess(timer._ctx, {"not": "an architecture"}, timer.cfg_fields, 16)
    monkeypatch.setattr(clean_process, "_serve_network", _exit_3)
    timer._ctx = multiprocessing.get_context("spawn")             # the stand-in lives in this test module
    with pytest.raises(UserError, match=r"exited \(code 3\).*latency.clean_process=false"):
        timer(build_model(_cfg().model))
    assert not multiprocessing.active_children()


def test_a_search_times_the_supernet_in_a_clean_process_unless_told_not_to(tmp_path):
    cfg = _cfg()
    search = Search(cfg, build_model(cfg.model), cfg.data.image_size, tmp_path)
    # the supernet, then the calibration's sampled sub-networks in groups, each group with the supernet, at start
    groups = math.ceil(cfg.latency.calibration_networks / CALIBRATION_GROUP)
    assert search.network_timer is not None and search.network_timer.calls == 1 + groups
    assert search.latency_ms_supernet > 0
    off = _cfg("latency.clean_process=false")
    assert start_network_timer(off.latency, 16) is None
    plain = Search(off, build_model(off.model), off.data.image_size, tmp_path / "b")
    assert plain.network_timer is None and plain.latency_ms_supernet > 0
