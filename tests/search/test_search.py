"""The search end to end: shrinks, outputs, TensorBoard tags, export -> retrain, and the latency harness."""
from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from dist_hrnas import train
from dist_hrnas.config import LatencyConfig, load_config
from dist_hrnas.latency import Timer, block_input_shapes, profile_on_rank0
from dist_hrnas.latency.measure import measure_branches, op_signature
from dist_hrnas.metrics import read_scalars, read_tags
from dist_hrnas.models import build_model, count_params, load_arch_file, model_from_arch
from dist_hrnas.search import Search
from dist_hrnas.search.masks import flatten_masks, unflatten_masks
from tests.conftest import CONFIGS, SEARCH, SMALL


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("search")
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SEARCH, f"log.run_dir={run_dir}"]) == 0
    # the timing children a search keeps between its comparisons end with the run
    assert not multiprocessing.active_children()
    return run_dir


def test_search_shrinks_and_writes_outputs(search_run):
    summary = json.loads((search_run / "summary.json").read_text())
    for key in ("latency_ms_supernet", "latency_ms_searched", "latency_ms_searched_predicted", "params_searched",
                "macs_searched", "shrinks", "penalty", "val_top1", "params", "macs", "world_size"):
        assert key in summary, key
    assert summary["penalty"] == "seconds" and summary["shrinks"] >= 1
    assert summary["params_searched"] < summary["params"] and summary["macs_searched"] < summary["macs"]
    lines = [json.loads(line) for line in (search_run / "shrinks.jsonl").read_text().splitlines()]
    assert len(lines) == summary["shrinks"]
    for rec in lines:
        for key in ("step", "epoch", "widths", "latency_ms_predicted_before", "latency_ms_predicted_after",
                    "latency_ms_measured_after"):
            assert key in rec, key
        # a shrink removes predicted seconds, both figures from the model as it was before the shrink (after
        # it the calibration takes the shrink's measured figure and may move every prediction by the box's noise)
        assert rec["latency_ms_predicted_after_before_refit"] < rec["latency_ms_predicted_before"]
    assert lines[-1]["latency_ms_measured_after"] == pytest.approx(summary["latency_ms_searched"], rel=1e-3)
    # the supernet and the searched network, re-timed together at the end (latency.retime_final)
    retimed = summary["latency_ms_supernet_retimed"] / summary["latency_ms_searched_retimed"]
    assert summary["speedup_retimed"] == pytest.approx(retimed, rel=1e-3) and summary["speedup_retimed"] > 1.0
    arch = load_arch_file(search_run / "searched_arch.yaml")
    assert {b["name"]: b["widths"] for b in arch["blocks"]} == lines[-1]["widths"]
    assert count_params(model_from_arch(arch)) == summary["params_searched"]


def test_search_tensorboard_tags_read_back(search_run):
    scalars = read_scalars(search_run / "tb")
    for tag in ("train/bn_l1_loss", "prune/rho", "prune/seconds_pruned", "prune/latency_ms_predicted",
                "prune/channels_alive", "prune/shrink", "prune/latency_ms_measured", "train/loss", "val/top1"):
        assert tag in scalars, tag
    assert "bn_scale/all" in read_tags(search_run / "tb")["histograms"]
    pruned = [v for _, v in scalars["prune/seconds_pruned"]]
    assert pruned[-1] > 0
    alive = [v for _, v in scalars["prune/channels_alive"]]
    assert alive[-1] < alive[0]


def test_export_then_retrain_has_the_searched_parameter_count(search_run, tmp_path):
    summary = json.loads((search_run / "summary.json").read_text())
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, "train.epochs=1",
                       f"model.arch={search_run / 'searched_arch.yaml'}", "prune.penalty=none",
                       f"log.run_dir={tmp_path}"]) == 0
    retrain = json.loads((tmp_path / "summary.json").read_text())
    assert retrain["params"] == summary["params_searched"]
    assert retrain["macs"] == summary["macs_searched"]
    assert "shrinks" not in retrain


def test_a_launch_aware_search_runs_and_checkpoints_its_fixed_costs(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "latency.cost=fixed_plus_marginal",
                       "prune.threshold=1e-3", f"log.run_dir={run_dir}"]) == 0  # most branches live on
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    registry = state["search"]["registry"]
    assert any(e["fixed_s"] > 0 and e["group_penalty"] > 0 for e in registry["entries"])
    assert set(registry["join_s"]) <= {e["block"] for e in registry["entries"]}
    assert read_scalars(run_dir / "tb")["train/bn_l1_loss"][-1][1] > 0


def test_the_end_re_timing_needs_a_shrink_and_its_setting(tmp_path):
    """latency.retime_final=false, or a search that cut nothing: no *_retimed keys, nothing timed for them."""
    cfg = load_config(CONFIGS / "digits.yaml", [*SEARCH, "latency.retime_final=false"])
    model = build_model(cfg.model)
    search = Search(cfg, model, cfg.data.image_size, tmp_path)
    calls = search.network_timer.calls
    assert search.retime_final(model) == {}                 # no shrink yet
    search.shrinks.append({"step": 1})                     # as after a shrink
    assert search.retime_final(model) == {} and search.network_timer.calls == calls


def test_mask_flattening_round_trips():
    model = build_model(load_config(CONFIGS / "digits.yaml").model)
    name, block = model.named_blocks()[2]
    masks = {name: [torch.rand(w) > 0.5 for w in block.widths]}
    flat = flatten_masks(model, masks)
    assert flat.numel() == sum(sum(b.widths) for _, b in model.named_blocks())
    again = unflatten_masks(model, flat)
    assert list(again) == [name] and all(torch.equal(a, b) for a, b in zip(again[name], masks[name]))


class FakeClock:
    """A clock that advances by a fixed amount per reading: timings become exact and deterministic."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_timer_takes_the_median_after_warmup():
    calls = []
    timer = Timer(torch.device("cpu"), warmup=3, repeats=5, clock=FakeClock(0.5))
    timing = timer(lambda: calls.append(1))
    assert len(calls) == 8 and timing.median_s == pytest.approx(0.5) and timing.spread_s == pytest.approx(0.0)


def test_identical_ops_are_measured_once_and_prediction_matches_the_supernet():
    cfg = load_config(CONFIGS / "digits.yaml")
    model = build_model(cfg.model)
    shapes = block_input_shapes(model, 32)
    distinct = {op_signature(b, i, shapes[n]) for n, b in model.named_blocks() for i in range(len(b.branches))}
    timer = Timer(torch.device("cpu"), warmup=0, repeats=1, clock=FakeClock(1e-4))
    curves = measure_branches(model, 32, LatencyConfig(width_step=10**6), timer)  # one sample: the width itself
    assert timer.calls == len(distinct) < len(curves)
    # the plain per-op sum and its context part (no whole-network calibration: tests/latency/test_calibration.py)
    profile = profile_on_rank0(model, 32, LatencyConfig(warmup=0, repeats=2, cost="average", calibration_networks=0))
    # predicted = fixed part (timed on its own) + the branches' LUT seconds + each block's join of its branches
    # + the context part, which calibrates the prediction on the measured supernet
    joins = sum(profile.combine_s[n][len(b.branches) - 1] for n, b in model.named_blocks() if b.branches)
    assert profile.predict_s(model) == pytest.approx(profile.fixed_s + sum(profile.branch_s.values()) + joins
                                                     + profile.context_s)
    assert profile.predict_s(model) == pytest.approx(profile.network_s)
    assert all(v > 0 for v in profile.branch_s.values()) and profile.fixed_s > 0


def test_cuda_latency_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from dist_hrnas.errors import UserError
    from dist_hrnas.latency import target_device
    with pytest.raises(UserError, match="latency.device=cuda but CUDA is not available"):
        target_device(LatencyConfig(device="cuda"))
