"""Budget arithmetic: the planned schedule, the rho controller in closed loop, fitting masks to the target."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dist_hrnas.search.budget import BranchChannels, BudgetSteer, PrunedSecondsPlan, RhoController, fit_masks_to_budget
from dist_hrnas.config import PruneConfig


@pytest.mark.parametrize("shape", ["linear", "cosine", "exp"])
def test_plan_starts_at_zero_ends_at_the_budget_and_never_falls(shape):
    plan = PrunedSecondsPlan(total_s=0.04, epoch_free=1.0, epoch_target=5.0, shape=shape)
    values = [plan.planned_s(e / 10) for e in range(0, 81)]
    assert values[0] == plan.planned_s(1.0) == 0.0
    assert plan.planned_s(5.0) == pytest.approx(0.04) and plan.planned_s(8.0) == pytest.approx(0.04)
    assert all(b >= a for a, b in zip(values, values[1:]))
    mid = plan.planned_s(3.0) / 0.04
    assert mid == pytest.approx({"linear": 0.5, "cosine": 0.5}.get(shape, mid))
    if shape == "exp":
        assert mid > 0.75  # front-loaded


def test_plan_rejects_an_unknown_shape():
    with pytest.raises(ValueError, match="linear"):
        PrunedSecondsPlan(1.0, 0, 1, "square").planned_s(0.5)


def _closed_loop(controller: RhoController, plan: PrunedSecondsPlan, gain: float, steps: int = 400) -> list[float]:
    """A toy plant: the pruning rate is proportional to rho (seconds per epoch = gain * rho)."""
    actual, gaps = 0.0, []
    dt = plan.epoch_target / steps
    for i in range(steps):
        epoch = i * dt
        rho = controller.update(plan.planned_s(epoch), actual, plan.total_s, dt)
        actual += gain * rho * dt
        gaps.append((plan.planned_s(epoch + dt) - actual) / plan.total_s)
    return gaps


@pytest.mark.parametrize("gain", [0.125, 0.5, 2.0, 8.0])
def test_controller_makes_the_pruned_seconds_follow_the_plan_whatever_the_plant_gain(gain):
    """rho0 is right for gain 0.5 only (0.25 s per epoch needed); 4x and 16x off, feedback closes the gap."""
    plan = PrunedSecondsPlan(total_s=1.0, epoch_free=0.0, epoch_target=4.0)
    gaps = _closed_loop(RhoController(rho0=0.5, kp=10.0, ki=20.0, max_factor=100.0), plan, gain)
    assert abs(gaps[-1]) < 0.01 and max(abs(g) for g in gaps[len(gaps) // 2:]) < 0.06
    if gain != 0.5:
        open_loop = _closed_loop(RhoController(rho0=0.5, kp=0.0, ki=0.0, max_factor=100.0), plan, gain)
        assert abs(open_loop[-1]) > 0.5


def test_controller_is_clipped_and_stops_at_zero_when_finished():
    c = RhoController(rho0=1e-3, kp=10.0, ki=10.0, max_factor=10.0)
    for _ in range(100):
        rho = c.update(planned_s=1.0, actual_s=0.0, total_s=1.0, dt_epochs=1.0)
    assert rho == pytest.approx(1e-2)
    assert c.integral <= math.log(10.0) / 10.0 + 1.0  # anti-windup kept the integral bounded
    c.finish()
    assert c.update(1.0, 0.0, 1.0, 1.0) == 0.0 and c.rho == 0.0
    restored = RhoController(1e-3, 10.0, 10.0, 10.0)
    restored.load_state_dict(c.state_dict())
    assert restored.done and restored.update(1.0, 0.0, 1.0, 1.0) == 0.0


def _branches() -> tuple[dict, list[BranchChannels]]:
    a = BranchChannels("a", 0, torch.tensor([0.5, 0.4, 0.3, 0.2]), seconds_per_channel=1.0)
    b = BranchChannels("b", 0, torch.tensor([0.9, 0.1, 0.05, 0.6]), seconds_per_channel=2.0)
    masks = {"a": [torch.tensor([True, False, False, False])], "b": [torch.tensor([True, False, False, True])]}
    return masks, [a, b]


def test_dead_channels_that_undershoot_are_revived_best_value_per_second_first():
    masks, branches = _branches()
    # 20 s network; the masks would remove 3 x 1 s + 2 x 2 s = 7 s -> 13 s; target 16.5 s, 5% tolerance
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=16.5, tolerance=0.05, force=False)
    # candidates by |gamma| per second: a1 0.4, a2 0.3, a3 0.2, b1 0.05, b2 0.025 -> a1, a2, a3 fit (16 s)
    assert fit.revived == 3 and fit.latency_s_after == pytest.approx(16.0)
    assert masks["a"][0].all() and masks["b"][0].tolist() == [True, False, False, True]
    assert 16.5 * 0.95 <= fit.latency_s_after <= 16.5


def test_within_tolerance_nothing_changes_and_over_target_only_force_removes():
    masks, branches = _branches()
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=13.5, tolerance=0.05, force=False)
    assert fit.revived == fit.removed == 0 and fit.latency_s_after == pytest.approx(13.0)
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=10.0, tolerance=0.05, force=False)
    assert fit.removed == 0 and fit.latency_s_after == pytest.approx(13.0)
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=10.0, tolerance=0.05, force=True)
    # live: a0 0.5/s, b0 0.45/s, b3 0.3/s -> remove b3 (11 s); at most half of the live channels go per shrink
    assert fit.removed == 1 and fit.latency_s_after == pytest.approx(11.0)
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=10.0, tolerance=0.05, force=True)
    assert fit.removed == 1 and fit.latency_s_after == pytest.approx(9.0)  # the next shrink: b0 -> 9 s
    assert masks["b"][0].tolist() == [False, False, False, False] and masks["a"][0].tolist()[0]


def test_fit_follows_a_ceiling_above_the_target_mid_search():
    masks, branches = _branches()
    # the plan says 18 s by now (final target 10 s): the dead channels would run ahead of it to 13 s, so the
    # most valuable ones come back: a1, a2, a3 (1 s each, 0.4/0.3/0.2 per s), then b1 (2 s, 0.05 per s) -> 18 s
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=10.0, tolerance=0.05, force=True,
                              ceiling_s=18.0)
    assert fit.revived == 4 and fit.removed == 0 and fit.latency_s_after == pytest.approx(18.0)
    masks = {"a": [torch.ones(4, dtype=torch.bool)], "b": [torch.ones(4, dtype=torch.bool)]}
    fit = fit_masks_to_budget(masks, branches, current_s=20.0, target_s=10.0, tolerance=0.05, force=True,
                              ceiling_s=17.0)
    # live by |gamma| per second: b2 0.025, b1 0.05 -> 16 s <= 17 s
    assert fit.removed == 2 and fit.latency_s_after == pytest.approx(16.0)
    assert masks["b"][0].tolist() == [True, False, False, True]


def _with_launch_overhead(branches: list[BranchChannels], overhead_s: float):
    """A latency model where a branch costs its channels plus a launch overhead while any channel is alive."""
    def predict(masks: dict) -> float:
        return sum(float(masks[b.block][b.index].sum()) * b.seconds_per_channel +
                   (overhead_s if bool(masks[b.block][b.index].any()) else 0.0) for b in branches)
    return predict


def test_fit_judges_how_many_channels_by_the_whole_network_prediction():
    a = BranchChannels("a", 0, torch.tensor([0.01, 0.02]), seconds_per_channel=1.0)
    b = BranchChannels("b", 0, torch.tensor([0.5, 0.6, 0.7, 0.8]), seconds_per_channel=1.0)
    masks = {"a": [torch.ones(2, dtype=torch.bool)], "b": [torch.ones(4, dtype=torch.bool)]}
    predict = _with_launch_overhead([a, b], overhead_s=3.0)
    assert predict(masks) == 12.0
    # by the per-channel sum, 3 channels must go to reach 9 s; but emptying branch a also drops its 3 s launch
    # overhead, so a's 2 channels already take the network to 7 s: the fit stops there
    fit = fit_masks_to_budget(masks, [a, b], current_s=12.0, target_s=9.0, tolerance=0.5, force=True,
                              predict=predict)
    assert fit.removed == 2 and fit.latency_s_after == pytest.approx(7.0)
    assert not masks["a"][0].any() and masks["b"][0].all()


def test_the_last_fit_aims_inside_the_band_under_the_target():
    prune = PruneConfig(target_ratio=0.5, budget_tolerance=0.05, epoch_target=4.0)
    steer = BudgetSteer(prune, epochs=8, supernet_measured_s=100.0, supernet_predicted_s=100.0,
                        smallest_predicted_s=1.0, where="cpu")
    branches = [BranchChannels("a", 0, torch.linspace(0.01, 1.0, 100), seconds_per_channel=1.0)]
    masks = {"a": [torch.arange(100) >= 40]}  # the 40 lowest |gamma| are dead already: 60 s
    fit = steer.fit(masks, branches, current_predicted_s=100.0, epoch=8.0, last_epoch=True)
    # measured = predicted here: the last shrink aims at target * (1 - 0.3 tolerance) = 49.25 s, not at 50 s,
    # so timing noise of a percent or two still ends inside [47.5, 50]
    assert fit.latency_s_after == pytest.approx(49.0)  # whole channels: the first width at or under 49.25
    mid = steer.fit({"a": [torch.ones(100, dtype=torch.bool)]}, branches, 100.0, epoch=2.0, last_epoch=False)
    assert mid.latency_s_after == pytest.approx(74.0)  # halfway through the plan: halfway to 49.25 s

    # after a shrink measured 60 -> 55 s for 20 -> 15 predicted seconds (slope 1, ratio 3.67): the next shrink is
    # sized with the ratio, the steeper of the two, so it removes (55 - 49.25) / 3.67 = 1.57 predicted seconds
    steer.observe(predicted_s=20.0, measured_s=60.0)
    steer.observe(predicted_s=15.0, measured_s=55.0)
    assert not steer.done and steer.slope() == pytest.approx(55.0 / 15.0)
    assert steer.predicted_for(49.25) == pytest.approx(15.0 - 5.75 / (55.0 / 15.0))
    # 55 s is within two tolerances of the 50 s target: the fit takes half of that gap, approaching from above
    close = steer.fit({"a": [torch.ones(100, dtype=torch.bool)]}, branches, 15.0, epoch=8.0, last_epoch=True,
                      predict=lambda m: 15.0 - 0.02 * float((~m["a"][0]).sum()))
    assert close.latency_s_after == pytest.approx(15.0 - 0.5 * 5.75 / (55.0 / 15.0), abs=0.02)
    steer.observe(predicted_s=14.0, measured_s=49.0)   # slope 6 between the last two: steeper, capped at 2x ratio
    assert steer.done and steer.slope() == pytest.approx(min(6.0, 2 * 49.0 / 14.0))


# ---- the budget in a real (small) search

def _budget_search(run_dir, *extra: str) -> dict:
    from dist_hrnas import train
    from tests.conftest import CONFIGS, SEARCH

    argv = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "prune.threshold=1e-3", "prune.rho=0.02",
            "train.epochs=4", "train.max_steps_per_epoch=5", "latency.repeats=7", *extra, f"log.run_dir={run_dir}"]
    assert train.main(argv) == 0
    return json.loads((run_dir / "summary.json").read_text())


def test_a_budget_search_lands_at_or_under_the_target_and_logs_the_schedule(tmp_path):
    from dist_hrnas.metrics import read_scalars, read_tags

    # a wider timed batch keeps the tiny network's measurements steady; the plan ends at epoch 2 of 4 so the
    # budget is met (and frozen) before the end
    summary = _budget_search(tmp_path, "prune.target_ratio=0.7", "prune.epoch_target=2", "latency.batch_size=16")
    target = summary["target_latency_ms"]
    assert target == pytest.approx(0.7 * summary["latency_ms_supernet"], rel=1e-3)
    assert summary["budget_met"] and summary["latency_ms_searched"] <= target
    assert summary["latency_vs_target_pct"] == pytest.approx(100 * (summary["latency_ms_searched"] / target - 1),
                                                             abs=0.01)
    scalars = read_scalars(tmp_path / "tb")
    for tag in ("schedule/seconds_pruned_planned", "schedule/seconds_pruned_actual", "schedule/latency_ms_measured",
                "schedule/target_latency_ms", "schedule/rho"):
        assert tag in scalars, tag
    planned = [v for _, v in scalars["schedule/seconds_pruned_planned"]]
    assert planned[0] < planned[-1] and all(b >= a - 1e-12 for a, b in zip(planned, planned[1:]))
    assert len(scalars["schedule/latency_ms_measured"]) == summary["shrinks"]
    assert "custom_scalars__config__" in read_tags(tmp_path / "tb")["tensors"]
    layout = json.loads((tmp_path / "tb" / "custom_scalars_layout.json").read_text())
    assert layout["schedule"]["pruned seconds: planned vs actual"] == [
        "Multiline", ["schedule/seconds_pruned_planned", "schedule/seconds_pruned_actual"]]
    shrinks = [json.loads(line) for line in (tmp_path / "shrinks.jsonl").read_text().splitlines()]
    assert shrinks[-1]["budget_met"] and shrinks[-1]["target_latency_ms"] == pytest.approx(target, rel=1e-3)
    met_at = min(r["step"] for r in shrinks if r["budget_met"])
    assert all(v == 0.0 for step, v in scalars["schedule/rho"] if step > met_at)  # budget met: no more penalty


@pytest.mark.parametrize("budget, needle", [
    ("prune.target_latency_ms=100000", "the supernet already runs in"),
    ("prune.target_ratio=0.001", "below the smallest network this supernet can shrink to"),
])
def test_impossible_budgets_stop_before_training_with_one_line(tmp_path, capsys, budget, needle):
    with pytest.raises(SystemExit) as exc:
        _budget_search(tmp_path, budget)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and budget.split("=")[0] in err[0]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("budget, needle", [
    ("prune.target_latency_ms=0", "must be > 0 ms"),
    ("prune.target_latency_ms=-5", "must be > 0 ms"),
    ("prune.target_ratio=0", "between 0 and 1"),
])
def test_zero_or_negative_budgets_are_config_errors(budget, needle):
    from dist_hrnas.config import ConfigError, load_config
    from tests.conftest import CONFIGS

    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / "digits.yaml", [budget])


def test_a_shrink_the_latency_model_predicts_slower_is_refused(tmp_path):
    """Monotonic shrinking: on a staircase where half the width runs slower than all of it, that branch keeps
    its channels; with nothing else to remove, the shrink is refused."""
    from dist_hrnas.config import load_config
    from dist_hrnas.metrics import read_scalars, make_writer
    from dist_hrnas.models import build_model
    from dist_hrnas.parallel.comm import DistContext
    from dist_hrnas.parallel.rewrap import build_state
    from dist_hrnas.search import Search, after_eval
    from dist_hrnas.search.masks import predict_after_masks
    from tests.conftest import CONFIGS, SEARCH

    cfg = load_config(CONFIGS / "digits.yaml", [*SEARCH, "prune.threshold=1e-3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    search = Search(cfg, model, 16, tmp_path)
    entry, bn = search.pairs[0]
    width = entry.width
    search.profile.curves[entry.key] = [[width / 2, 1.0], [float(width), 0.5]]  # the dip: narrower is slower
    search.predicted_now_s = search.profile.predict_s(model)
    with torch.no_grad():
        bn.weight[width // 2:] = 0.0                                           # half the channels dead
    masks = search.registry.masks(model)
    assert predict_after_masks(search.profile, model, masks) > search.predicted_now_s
    writer = make_writer(tmp_path, True, True)
    state = build_state(cfg, DistContext(), model, 0.1, 10, None, step=3)
    engine = state.engine
    shrunk = after_eval(search, state, DistContext(), False, 0, lambda: [], writer)
    writer.close()
    assert not shrunk and search.shrinks == [] and entry.width == width
    assert state.engine is engine  # nothing was re-wrapped
    assert read_scalars(tmp_path / "tb")["prune/shrink_refused"] == [(3, 1.0)]
    assert bool(bn.weight[: width // 2].ne(0).all())


def test_dead_channels_a_few_percent_under_the_aim_are_revived():
    steer = BudgetSteer(PruneConfig(target_ratio=0.5, budget_tolerance=0.05, epoch_target=4.0), epochs=8,
                        supernet_measured_s=100.0, supernet_predicted_s=100.0, smallest_predicted_s=1.0, where="cpu")
    branches = [BranchChannels("a", 0, torch.linspace(0.01, 1.0, 100), seconds_per_channel=1.0)]
    # the L1 term zeroed 53 channels: 47 s, 4.6 % under the 49.25 s aim (inside a 5 % band, so the old fit kept
    # it); the shrink lands within 1.5 % under the aim instead, with the best of the dead channels back
    fit = steer.fit({"a": [torch.arange(100) >= 53]}, branches, current_predicted_s=100.0, epoch=8.0,
                    last_epoch=True)
    assert fit.revived == 2 and fit.latency_s_after == pytest.approx(49.0)
