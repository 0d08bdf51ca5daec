"""Latency profiler: LUT cache and fingerprints, marginal (staircase) cost, round_to, profile CLI, onnxruntime."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from dist_hrnas import profile as profile_cli
from dist_hrnas import train
from dist_hrnas.config import PruneConfig, load_config
from dist_hrnas.errors import ConfigError, UserError
from dist_hrnas.latency import Timed, Timer, Timing, branch_key, curve_value, profile_on_rank0
from dist_hrnas.latency.measure import plan_branches
from dist_hrnas.latency.networks import network_key
from dist_hrnas.latency.rounds import NETWORK_ROUNDS
from dist_hrnas.latency.lut import LutMismatchWarning, read_lut_file
from dist_hrnas.metrics import read_scalars
from dist_hrnas.models import build_model, count_macs
from dist_hrnas.search.registry import PruneRegistry, round_mask
from dist_hrnas.search.surgery import shrink_model
from tests.conftest import CONFIGS, SEARCH, SMALL
from tests.device_lut import lut_from_another_machine
from tests.multirank import run_ranks

# No calibration networks: these tests check the curves and the context part on fake devices whose whole-network
# time does not depend on the branches (a calibration fitted to that would zero every branch).
FAST = ["latency.warmup=0", "latency.repeats=1", "latency.batch_size=2", "latency.network_spread=10",
        "latency.calibration_networks=0"]


def small_cfg(*extra: str):
    return load_config(CONFIGS / "digits.yaml", [*SMALL, *FAST, *extra])


def profile(cfg, timer=None):
    model = build_model(cfg.model)
    timer = timer or Timer(torch.device("cpu"), cfg.latency.warmup, cfg.latency.repeats)
    return model, profile_on_rank0(model, cfg.data.image_size, cfg.latency, timer), timer


def test_lut_is_reused_and_identical_ops_are_timed_once(tmp_path):
    cfg = small_cfg(f"latency.lut={tmp_path / 'lut.json'}")
    model, first, timer = profile(cfg)
    distinct = {sig for p in plan_branches(model, 16, cfg.latency) for _, sig in p.samples}
    n_samples = sum(len(p.samples) for p in plan_branches(model, 16, cfg.latency))
    assert timer.counts["op"] == len(distinct) < n_samples  # the parallel blocks repeat ops
    _, second, again = profile(cfg)
    # only the end-to-end check is timed (its rounds); every op, the fixed part and the block joins come from the LUT
    assert again.counts == {"network": NETWORK_ROUNDS}
    assert second.curves == first.curves and second.fixed_s == first.fixed_s


def test_fingerprint_mismatch_warns_and_remeasures_or_stops_when_strict(tmp_path):
    lut = tmp_path / "lut.json"
    profile(small_cfg(f"latency.lut={lut}"))
    with pytest.warns(LutMismatchWarning, match="batch_size: 2 in the file vs 3 here"):
        _, _, timer = profile(small_cfg(f"latency.lut={lut}", "latency.batch_size=3"))
    assert timer.counts["op"] > 0
    tables = read_lut_file(lut)["tables"]
    assert sorted(t["fingerprint"]["batch_size"] for t in tables.values()) == [2, 3]  # nothing lost
    with pytest.raises(UserError, match=f"latency LUT {lut} was built for another device .*threads: 1 in the file "
                                        f"vs 2 here"):
        profile(small_cfg(f"latency.lut={lut}", "latency.threads=2", "latency.lut_strict=true"))


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "tables": []}', "[1, 2]"])
def test_corrupt_lut_is_a_one_line_error_naming_the_file(tmp_path, capsys, content):
    lut = tmp_path / "bad.json"
    lut.write_text(content)
    with pytest.raises(UserError, match=f"latency LUT {lut} is corrupt"):
        profile(small_cfg(f"latency.lut={lut}"))
    with pytest.raises(SystemExit) as exit_:
        profile_cli.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, *FAST, "--out", str(lut), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and str(lut) in err
    assert lut.read_text() == content  # never overwritten


def _corrupt_lut_rank(rank: int, lut: str) -> str:
    cfg = small_cfg(f"latency.lut={lut}")
    profile(cfg)
    return "no error"


def test_corrupt_lut_stops_every_rank_not_only_rank0(tmp_path):
    lut = tmp_path / "bad.json"
    lut.write_text("{")
    results = run_ranks(_corrupt_lut_rank, str(lut))
    assert [r[0] for r in results] == ["error", "error"]
    assert all("UserError" in r[1] and str(lut) in r[1] for r in results)


STEPS = [1e-4, 1e-4, 4e-4, 4e-4, 2e-4, 2e-4, 2e-4, 2e-4]  # seconds each group of 8 channels adds
BASE = 5e-4                                               # launching the branch's three ops


def staircase(width: int) -> float:
    return BASE + sum(STEPS[:math.ceil(width / 8)])


class StaircaseTimer(Timer):
    """Ops take staircase(width) seconds: what a device running channels in groups of 8 looks like."""

    def __call__(self, fn, repeats=None) -> Timing:
        self.calls += 1
        self.counts[fn.what] = self.counts.get(fn.what, 0) + 1
        return Timing(staircase(fn.width) if fn.what == "op" else 1e-3, 0.0)


def test_fixed_plus_marginal_splits_a_branch_into_its_launch_and_its_step():
    cfg = small_cfg("latency.cost=fixed_plus_marginal", "latency.width_step=8", "prune.penalty=seconds")
    model, prof, _ = profile(cfg, StaircaseTimer(torch.device("cpu"), 0, 1))
    key = branch_key("stages.0.parallel.branches.0.0", 3)
    assert prof.per_channel_s(key) == pytest.approx(STEPS[3] / 8)   # per channel: the step at the width, ...
    assert prof.launch_s(key) == pytest.approx(BASE)                 # ... and what only the last channel takes
    registry = PruneRegistry.build(cfg.prune, model, count_macs(model, 1, 16), prof)
    entry = registry.entries[key]
    assert entry.fixed_s == pytest.approx(BASE) and entry.group_penalty > 0
    assert registry.join_s and all(s >= 0 for s in registry.join_s.values())
    # the whole branch's pruned seconds include its launch; all but one channel do not
    name, block = "stages.0.parallel.branches.0.0", dict(model.named_blocks())["stages.0.parallel.branches.0.0"]
    keep_all = [torch.ones(b.hidden, dtype=torch.bool) for b in block.branches]
    gone = [torch.zeros(b.hidden, dtype=torch.bool) if b.kernel == 3 else m for b, m in zip(block.branches, keep_all)]
    one_left = [m.clone() for m in gone]
    one_left[[b.kernel for b in block.branches].index(3)][0] = True
    whole = registry.pruned_seconds(model, {name: gone}) - registry.pruned_seconds(model, {name: one_left})
    assert whole == pytest.approx(entry.seconds_per_channel + BASE)
    prof.cost = "marginal"                                           # the same curves, no group terms
    plain = PruneRegistry.build(cfg.prune, model, count_macs(model, 1, 16), prof)
    assert all(e.group_penalty == 0 == e.fixed_s for e in plain.entries.values()) and not plain.join_penalty


def test_marginal_cost_is_the_step_at_the_current_width_and_follows_shrinks():
    cfg = small_cfg("latency.cost=marginal", "latency.width_step=8", "prune.penalty=seconds")
    model, prof, _ = profile(cfg, StaircaseTimer(torch.device("cpu"), 0, 1))
    key = branch_key("stages.0.parallel.branches.0.0", 3)
    assert prof.branch_width[key] == 32
    assert prof.per_channel_s(key) == pytest.approx(STEPS[3] / 8)            # the step, ...
    assert prof.per_channel_s(key) != pytest.approx(staircase(32) / 32)      # ... not the average
    assert prof.per_channel_s(key, 24) == pytest.approx(STEPS[2] / 8)
    assert prof.per_channel_s(key, 12) == pytest.approx(STEPS[1] / 8)
    average = profile(small_cfg("latency.cost=average"), StaircaseTimer(torch.device("cpu"), 0, 1))[1]
    assert average.per_channel_s(key) == pytest.approx(staircase(32) / 32)
    # After a shrink to 12 channels the registry's cost is re-read from the curve at the new width.
    registry = PruneRegistry.build(cfg.prune, model, count_macs(model, 1, 16), prof)
    assert registry.entries[key].seconds_per_channel == pytest.approx(STEPS[3] / 8)
    name, block = "stages.0.parallel.branches.0.0", dict(model.named_blocks())["stages.0.parallel.branches.0.0"]
    keep = torch.arange(32) < 12
    shrink_model(model, {name: [keep if b.kernel == 3 else torch.ones(b.hidden, dtype=torch.bool)
                                for b in block.branches]})
    registry.update_after_shrink(model, prof)
    assert registry.entries[key].width == 12
    assert registry.entries[key].seconds_per_channel == pytest.approx(STEPS[1] / 8)
    # Prediction: the curve at each width; 12 channels run as a whole group of 16 on this device, so the
    # prediction is the device's own staircase (linear interpolation from 8 to 16 would say less).
    branches = [b.hidden for _, blk in model.named_blocks() for b in blk.branches]
    joins = sum(1e-3 for _, blk in model.named_blocks() if blk.branches)  # the fake timer's 1 ms per join
    assert 12 in branches
    assert prof.predict_s(model) == pytest.approx(prof.fixed_s + sum(staircase(w) for w in branches) + joins
                                                  + prof.context_s)
    assert prof.curve_s(key, 12) > (staircase(8) + staircase(16)) / 2


def test_curve_value_rounds_a_partial_channel_group_up():
    curve = [[8.0, 1.0], [16.0, 2.0], [32.0, 3.0], [36.0, 4.0]]
    assert curve_value(curve, 12) == pytest.approx(1.5)              # no step: linear between samples
    assert curve_value(curve, 12, step=8) == pytest.approx(2.0)      # 12 runs as 16
    assert curve_value(curve, 17, step=8) == pytest.approx(2.5)     # 24: linear between coarse samples
    assert curve_value(curve, 33, step=8) == pytest.approx(4.0)      # 40 is past the widest sample: 36
    assert curve_value(curve, 16, step=8) == pytest.approx(2.0)      # aligned widths are unchanged
    assert curve_value(curve, 0, step=8) == 0.0


def test_round_mask_keeps_the_largest_scales_in_multiples():
    score = torch.tensor([0.9, 0.0, 0.5, 0.0, 0.7, 0.1, 0.0, 0.3, 0.2, 0.0])
    assert round_mask(score, 3, 4).nonzero().flatten().tolist() == [0, 2, 4, 7]   # 3 alive -> 4 kept
    assert round_mask(score, 6, 4).sum() == 8                                      # 6 -> 8
    capped = round_mask(score, 9, 4)                                               # 12 > 10 wide -> 8
    assert capped.sum() == 8 and bool(capped[[0, 2, 4, 5, 7, 8]].all())
    assert round_mask(score, 0, 4).sum() == 0                                      # the branch may go


def test_round_to_widths_in_registry_masks():
    cfg = small_cfg()
    model = build_model(cfg.model)
    _, prof, _ = profile(cfg, StaircaseTimer(torch.device("cpu"), 0, 1))
    registry = PruneRegistry.build(PruneConfig(round_to=8, threshold=1e-3), model, count_macs(model, 1, 16), prof)
    name, block = model.named_blocks()[1]
    with torch.no_grad():
        block.branches[0].dw_bn.weight[:19] = 0.0    # 13 of 32 alive -> 16 kept
        block.branches[1].dw_bn.weight[:] = 0.0      # none alive -> the branch goes
        block.branches[0].dw_bn.weight[19:22] = 0.5  # the largest three scales survive
    masks = registry.masks(model)
    assert [int(m.sum()) for m in masks[name]] == [16, 0]
    assert bool(masks[name][0][19:].all())
    unrounded = PruneRegistry.build(PruneConfig(round_to=1, threshold=1e-3), model, count_macs(model, 1, 16), prof)
    assert [int(m.sum()) for m in unrounded.masks(model)[name]] == [13, 0]


def test_profile_cli_writes_a_lut_that_training_uses_without_timing_ops(tmp_path, monkeypatch):
    lut = tmp_path / "lut.json"
    args = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=1"]
    out = io.StringIO()
    # Not capsys: train.main below may create the package logger, which keeps the stream it first sees.
    with contextlib.redirect_stdout(out):
        assert profile_cli.main([*args, "--device", "cpu", "--out", str(lut)]) == 0
    printed = json.loads(out.getvalue().strip().splitlines()[-1])
    assert printed["ops_timed"] > 0 and printed["fixed_part_timed"]
    # the supernet and SEARCH's 4 sampled networks, each sample also predicted by a fit without it
    assert printed["calibration_networks"] == 5 and printed["calibration_held_out_max_abs_error_pct"] >= 0
    assert len(read_lut_file(lut)["tables"]) == 1
    timed: list[str] = []
    real_call = Timer.__call__
    monkeypatch.setattr(Timer, "__call__", lambda self, fn, **kw: (timed.append(fn.what), real_call(self, fn, **kw))[1])
    run_dir = tmp_path / "run"
    # Networks timed in this process (not in clean child processes), so that this timer sees every timing; the
    # calibrated model decides the shrink (measuring its candidate could refuse it on a loaded machine, and then
    # there is no shrink to check: measured shrinks have their own tests).
    assert train.main([*args, f"latency.lut={lut}", f"log.run_dir={run_dir}", "latency.clean_process=false",
                       "prune.measure_before_cut=false"]) == 0
    assert set(timed) == {"network"} and len(timed) >= 2  # start + each shrink; no op, fixed part or join
    rec = json.loads((run_dir / "shrinks.jsonl").read_text().splitlines()[-1])
    assert rec["latency_ms_predicted_after"] > 0 and rec["latency_ms_measured_after"] > 0
    assert "latency_error_pct_after" in rec
    scalars = read_scalars(run_dir / "tb")  # prediction vs reality: at the start (step 0) and after each shrink
    assert scalars["prune/latency_ms_supernet_measured"][0][0] == 0
    assert [s for s, _ in scalars["prune/latency_error_pct"]] == [0] + [s for s, _ in scalars["prune/shrink"]]
    assert len(scalars["prune/latency_ms_measured"]) == len(scalars["prune/shrink"])


def test_onnxruntime_backend_builds_a_lut_for_a_small_config(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    lut = tmp_path / "ort.json"
    assert profile_cli.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, *FAST, "--backend", "onnxruntime",
                             "--out", str(lut), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    (table,) = read_lut_file(lut)["tables"].values()
    assert table["fingerprint"]["backend"] == "onnxruntime" and "onnxruntime" in table["fingerprint"]
    assert len(table["ops"]) > printed["ops_timed"] > 0 and all(v["median_s"] > 0 for v in table["ops"].values())
    assert printed["latency_ms_measured"] > 0


def _lut_from_another_machine(tmp_path, args: list[str]) -> Path:
    return lut_from_another_machine(tmp_path / "board.json", args)


def test_training_for_another_machine_times_nothing_here(tmp_path, monkeypatch):
    args = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=1"]
    lut = _lut_from_another_machine(tmp_path, args)
    timed: list[str] = []
    real_call = Timer.__call__
    monkeypatch.setattr(Timer, "__call__", lambda self, fn, **kw: (timed.append(fn.what), real_call(self, fn, **kw))[1])
    run_dir = tmp_path / "run"
    assert train.main([*args, f"latency.lut={lut}", "latency.lut_device=Edge Board X1", f"log.run_dir={run_dir}"]) == 0
    assert timed == []  # not an op, not the network: the target is not this machine
    summary = json.loads((run_dir / "summary.json").read_text())
    (table,) = read_lut_file(lut)["tables"].values()
    cfg = load_config(CONFIGS / "digits.yaml", args[2:])
    network_s = table["ops"][network_key(build_model(cfg.model), cfg.data.image_size)]["median_s"]  # the supernet
    samples = [k for k in table["ops"] if k.startswith("network_")]
    assert len(samples) == 1 + cfg.latency.calibration_networks  # the board's calibration networks came along
    assert summary["latency_source"] == "lut:Edge Board X1"
    assert summary["latency_ms_supernet"] == pytest.approx(network_s * 1e3, rel=1e-4)  # the board's figure
    assert summary["shrinks"] >= 1 and summary["latency_ms_searched"] < summary["latency_ms_supernet"]
    assert not {k for k in summary if k.endswith("_retimed")}  # nothing to re-time here either
    # the file is unchanged: nothing was measured, so nothing was added
    assert list(read_lut_file(lut)["tables"]) == ["another"] and read_lut_file(lut)["tables"]["another"] == table


def test_lut_device_auto_names_the_device_it_resolved_to(tmp_path):
    args = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=1"]
    lut = _lut_from_another_machine(tmp_path, args)
    run_dir = tmp_path / "run"
    assert train.main([*args, f"latency.lut={lut}", "latency.lut_device=auto", f"log.run_dir={run_dir}"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["latency_source"] == "lut:Edge Board X1"


@pytest.mark.parametrize("device, extra, needle", [
    ("Other Board", [], "has no single table for that device"),
    ("auto", ["latency.batch_size=3"], "has no single table for that device at"),
    ("Edge Board X1", ["model.input_channel=[8,16]"], "has no timing of"),
])
def test_a_lut_that_cannot_serve_another_machine_is_one_clear_error(tmp_path, capsys, device, extra, needle):
    args = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=1"]
    lut = _lut_from_another_machine(tmp_path, args)
    with pytest.raises(SystemExit) as exc:
        train.main([*args, *extra, f"latency.lut={lut}", f"latency.lut_device={device}",
                    f"log.run_dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "latency.lut_device" in err[0] and "dist_hrnas.profile" in err[0]


def test_lut_device_needs_a_lut():
    with pytest.raises(ConfigError, match="latency.lut_device: needs latency.lut"):
        small_cfg("latency.lut_device=auto")


def test_cpu_timing_fixes_the_allocator_thresholds_on_glibc():
    import platform

    from dist_hrnas.latency.timing import steady_cpu_allocator

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are a glibc feature")
    Timer(torch.device("cpu"), 0, 1)  # a CPU timer sets them up before timing anything
    assert steady_cpu_allocator() is True and steady_cpu_allocator() is True  # once, then remembered


def test_single_ops_are_timed_after_evicting_the_cache_networks_are_not():
    seen = []  # the eviction buffer's value when the op runs = how many evictions came before it
    timer = Timer(torch.device("cpu"), warmup=2, repeats=3, flush_mb=1.0)
    timer(Timed(lambda: seen.append(timer._flush_buffer[0].item()), "op"))
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]                   # written before every call, warm-up included
    assert timer._flush_buffer.numel() * 4 == 1 << 20          # 1 MiB of float32
    timer(Timed(lambda: seen.append(timer._flush_buffer[0].item()), "network"))
    assert seen[5:] == [5.0] * 5                               # a whole network is its own context
    warm = Timer(torch.device("cpu"), 0, 2)                    # flush_mb=0: warm caches, no buffer
    warm(Timed(lambda: None, "op"))
    assert warm._flush_buffer is None
    with pytest.raises(ConfigError, match="latency.flush_cache_mb"):
        load_config(CONFIGS / "digits.yaml", ["latency.flush_cache_mb=-1"])


def test_prediction_is_calibrated_on_the_supernet_and_keeps_it_through_shrinks_and_checkpoints():
    from dist_hrnas.latency.curve import LatencyProfile

    cfg = small_cfg("latency.width_step=8")
    model, prof, _ = profile(cfg, StaircaseTimer(torch.device("cpu"), 0, 1))  # a network "takes" 1 ms
    assert prof.network_s == pytest.approx(1e-3) and prof.width_step == 8
    assert prof.predict_s(model) == pytest.approx(prof.network_s)              # calibrated on the supernet
    assert prof.context_s == pytest.approx(1e-3 - (prof.predict_s(model) - prof.context_s))
    name, block = model.named_blocks()[0]
    assert set(block.widths) == {32}
    before = prof.predict_s(model)
    shrink_model(model, {name: [torch.arange(32) < 8 for _ in block.branches]})
    drop = len(block.branches) * (staircase(32) - staircase(8))
    assert before - prof.predict_s(model) == pytest.approx(drop)  # the context part stays with the network
    again = LatencyProfile.from_state_dict(prof.state_dict())
    assert (again.context_s, again.width_step) == (prof.context_s, 8)
    assert again.predict_s(model) == pytest.approx(prof.predict_s(model))
