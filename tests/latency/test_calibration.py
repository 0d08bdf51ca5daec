"""Whole-network calibration, settled end-to-end figures, the channel grid read from a curve, and shrinks
measured before they cut."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from dist_hrnas.config import load_config
from dist_hrnas.latency.calibration import Calibration, sample_arch_widths
from dist_hrnas.latency.curve import curve_grid
from dist_hrnas.latency.networks import BusyDeviceWarning
from dist_hrnas.latency.rounds import interleaved, settled
from dist_hrnas.models import as_network, build_model
from tests.conftest import CONFIGS, SEARCH

TRUE = {"fixed": 0.8, "join": 1.0, "res:8x8": 1.3, "res:4x4": 0.6}


def _networks(n: int, seed: int = 0) -> list[tuple[dict, float]]:
    """Synthetic networks: per-op sums split into parts, and what a device with the TRUE coefficients measures."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = {"fixed": 2e-3, "join": rng.uniform(1e-4, 5e-4), "res:8x8": rng.uniform(0, 8e-3),
                 "res:4x4": rng.uniform(0, 4e-3)}
        out.append((parts, sum(TRUE[k] * v for k, v in parts.items())))
    return out


def _fitted(points: list[tuple[dict, float]]) -> Calibration:
    cal = Calibration()
    for parts, measured in points:
        cal.add(parts, measured, "sample")
    return cal.fit()


def test_the_fit_recovers_known_coefficients_and_predicts_held_out_networks():
    cal = _fitted(_networks(30))
    for k, v in TRUE.items():
        assert cal.coef[k] == pytest.approx(v, abs=0.06), k
    held_out = _networks(20, seed=1)
    errors = [abs(cal.predict(p) / m - 1) for p, m in held_out]
    assert max(errors) < 0.02
    assert Calibration.from_state_dict(cal.state_dict()).coef == cal.coef


def test_one_inflated_figure_does_not_move_later_predictions():
    points = _networks(25)
    clean = _fitted(points)
    parts, measured = points[7]
    disturbed = _fitted(points[:7] + [(parts, 1.5 * measured)] + points[8:])
    assert disturbed.dropped == 1                                   # left out as an outlier
    for p, _ in _networks(20, seed=2):
        assert disturbed.predict(p) == pytest.approx(clean.predict(p), rel=0.02)


def test_leave_one_out_errors_are_small_on_a_clean_device_and_name_a_disturbed_point():
    points = _networks(25)
    assert max(abs(e) for e in _fitted(points).held_out_errors_pct()) < 2.0
    parts, measured = points[7]
    errors = _fitted(points[:7] + [(parts, 1.5 * measured)] + points[8:]).held_out_errors_pct()
    assert errors[7] == pytest.approx(100 * (1 / 1.5 - 1), abs=2.0)   # the rest predict its true figure
    assert max(abs(e) for i, e in enumerate(errors) if i != 7) < 2.0


def test_too_few_points_leave_the_plain_sum():
    cal = _fitted(_networks(3))
    assert not cal.fitted and cal.predict({"fixed": 1.0, "res:8x8": 2.0}) == 3.0


def test_sampled_networks_span_full_to_near_empty_on_and_off_the_grid():
    widths = {f"b{i}": [64, 64, 64] for i in range(6)}
    samples = sample_arch_widths(widths, 24, grid=16)
    totals = [sum(sum(w) for w in s.values()) for s in samples]
    assert len(samples) == 24 and totals[0] > 0.75 * 18 * 64 and totals[-1] < 0.3 * 18 * 64
    assert any(w == 0 for s in samples for ws in s.values() for w in ws)              # whole branches removed
    on_grid = [all(w % 16 == 0 for ws in s.values() for w in ws) for s in samples]
    assert all(on_grid[0::2]) and not all(on_grid[1::2])                             # every other one on the grid


def test_samples_sit_on_each_branchs_own_grid_and_none_repeats_the_supernet_or_another():
    """A branch's grid is its own (the curve's: 16 or 32 channels here); on a coarse grid samples near the
    supernet round back up to it, so a duplicate is drawn again."""
    widths = {f"b{i}": [32, 64] for i in range(3)}
    grids = {f"b{i}": [32, 16] for i in range(3)}
    samples = sample_arch_widths(widths, 12, grids)
    assert all(s[b][0] % 32 == 0 and s[b][1] % 16 == 0 for s in samples[0::2] for b in s)
    keys = [tuple(tuple(s[b]) for b in sorted(s)) for s in samples] + [tuple(tuple(widths[b]) for b in sorted(widths))]
    assert len(set(keys)) == len(keys)                          # 12 networks, none the supernet, none twice
    assert sample_arch_widths(widths, 12, grids) == samples     # deterministic: a LUT finds its samples again
    tiny = sample_arch_widths({"b": [8, 8]}, 4, {"b": [8, 8]})  # on its grid the first can only be the supernet
    assert len({tuple(t["b"]) for t in tiny} | {(8, 8)}) == 5    # so it is drawn off the grid instead


def test_branches_off_their_grid_count_in_their_own_part_and_the_fit_learns_both():
    """A device on which branches off their channel grid run 1.5x what their ops alone say, on-grid ones 1.1x:
    one coefficient per resolution would split the difference; the off-grid part gets its own."""
    truth = {"fixed": 1.0, "join": 1.0, "res:8x8": 1.1, "res:8x8:off": 1.5}
    rng = random.Random(3)
    points = []
    for _ in range(25):
        parts = {"fixed": 2e-3, "join": 3e-4, "res:8x8": rng.uniform(0, 8e-3), "res:8x8:off": rng.uniform(0, 4e-3)}
        points.append((parts, sum(truth[k] * v for k, v in parts.items())))
    cal = _fitted(points)
    assert cal.coef["res:8x8"] == pytest.approx(1.1, abs=0.05)
    assert cal.coef["res:8x8:off"] == pytest.approx(1.5, abs=0.05)
    assert cal.coefficient("res:4x4:off") == 1.0 and cal.coefficient("res:8x8:nothing") == 1.0
    assert Calibration(coef={"res:4x4": 0.7}).coefficient("res:4x4:off") == 0.7  # unseen off part: its resolution's


def test_a_profile_puts_a_branch_off_its_grid_in_its_resolutions_off_grid_part(tmp_path):
    from dist_hrnas.latency.calibration import OFF_GRID
    from dist_hrnas.latency.curve import branch_key
    from dist_hrnas.search.surgery import shrink_model

    search, model = _search(tmp_path)
    profile = search.profile
    name, block = model.named_blocks()[0]
    key = branch_key(name, block.branches[0].kernel)
    grid, width = profile.grid(key), block.branches[0].hidden
    assert grid > 1 and width % grid == 0
    before = profile.parts(model)
    assert not any(k.endswith(OFF_GRID) for k in before)        # the supernet sits on every grid
    shrink_model(model, {name: [torch.arange(w) < (w - 1 if j == 0 else w) for j, w in enumerate(block.widths)]})
    after = profile.parts(model)
    group = profile.groups[name]
    assert after[group + OFF_GRID] == pytest.approx(profile.curve_s(key, width - 1))
    assert after[group] == pytest.approx(before[group] - profile.curve_s(key, width))
    assert profile.scale(key, width - 1) == profile.calibration.coefficient(group + OFF_GRID)


def test_rounds_that_disagree_are_taken_again():
    cfg = load_config(CONFIGS / "digits.yaml", ["latency.network_spread=0.05"]).latency
    figures = iter([1.0, 1.5, 1.02, 1.01, 1.0, 1.03])
    best, spread = settled(lambda: next(figures), cfg)
    assert best == 1.0 and spread == pytest.approx(0.01)  # the first three disagreed by 50 %: three more taken
    calls = []
    out = interleaved([lambda: calls.append("a") or 2.0, lambda: calls.append("b") or 1.0], cfg)
    assert out == [(2.0, 0.0), (1.0, 0.0)] and calls == ["a", "b", "b", "a", "a", "b"]  # alternating who goes first


def test_candidates_are_compared_in_two_alternating_rounds_and_retaken_while_they_disagree():
    cfg = load_config(CONFIGS / "digits.yaml", ["latency.network_spread=0.05"]).latency
    calls = []
    out = interleaved([lambda: calls.append("now") or 2.0, lambda: calls.append("cand") or 1.0], cfg, rounds=2)
    assert out == [(2.0, 0.0), (1.0, 0.0)] and calls == ["now", "cand", "cand", "now"]  # each once first
    figures = iter([1.3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # the first child ran 30 % slow: two more rounds
    retaken = interleaved([lambda: next(figures), lambda: next(figures)], cfg, rounds=2)
    assert retaken == [(1.0, 0.0), (1.0, 0.0)]
    figures = iter([1.3, 1.0, 1.0, 1.0])  # the same, with no retakes allowed: the disagreement is reported
    capped = interleaved([lambda: next(figures), lambda: next(figures)], cfg, rounds=2, retakes=0)
    assert capped == [(1.0, pytest.approx(0.3)), (1.0, 0.0)]


def test_a_comparison_whose_figures_already_decide_takes_no_retake():
    from dist_hrnas.search.decide import _settled

    cfg = load_config(CONFIGS / "digits.yaml", ["latency.network_spread=0.05"]).latency

    def compare(now: list[float], cand: list[float]) -> tuple[list, int]:
        figures, taken = (iter(now), iter(cand)), []
        out = interleaved([lambda: taken.append(1) or next(figures[0]), lambda: taken.append(1) or next(figures[1])],
                          cfg, rounds=3, retakes=1, decided=_settled)
        return out, len(taken) // 2

    # rounds disagree by 10 %, but the candidate is 40 % faster in every round: clear after two rounds, no third
    out, rounds = compare([1.0, 1.1, 9.0, 9.0, 9.0, 9.0], [0.6, 0.66, 9.0, 9.0, 9.0, 9.0])
    assert rounds == 2 and out[1][0] == 0.6 and _settled(out, 2)
    # every round slower than every round of the network now: refused after two rounds as well
    out, rounds = compare([1.0, 1.1, 9.0, 9.0, 9.0, 9.0], [1.2, 1.1, 9.0, 9.0, 9.0, 9.0])
    assert rounds == 2 and out[1][0] >= out[0][0]
    # 25 % faster at best, but its slower round is not beyond the network's faster one by the gain: a third round
    out, rounds = compare([1.0, 1.1, 1.0, 9.0, 9.0, 9.0], [0.75, 0.825, 0.75, 9.0, 9.0, 9.0])
    assert rounds == 3 and not _settled([(1.0, 0.1), (0.75, 0.1)], 2) and _settled(out)
    # 8 % faster inside 10 % + 10 % of spread: undecided, so the rounds are taken again, and the first retaken
    # round settles it (the fastest three of four agree)
    out, rounds = compare([1.0, 1.1, 1.0, 1.0, 1.0, 1.0], [0.92, 1.012, 0.92, 0.92, 0.92, 0.92])
    assert rounds == 4 and out[1] == (0.92, 0.0) and _settled(out)


@pytest.mark.parametrize("curve, grid", [
    ([[8, 1.0], [16, 1.0], [24, 2.0], [32, 2.0], [40, 3.0], [48, 3.0]], 16),            # steps every 16 channels
    ([[8, 1.0], [16, 2.0], [24, 3.0], [32, 4.0], [40, 5.0], [48, 6.0]], 8),             # linear: the sample step
    ([[8, 1.0], [16, 1.0], [24, 1.0], [32, 1.0], [40, 2.0], [48, 2.0], [56, 2.0], [64, 2.0]], 32),
])
def test_round_to_auto_reads_the_grid_off_the_curve(curve, grid):
    assert curve_grid(curve, 8) == grid


def _search(tmp_path, *extra):
    from dist_hrnas.search import Search

    # prune.measure_share=1: these searches time candidates in their first milliseconds, where any timing is over
    # a share of the wall and would drop the retakes tested here; tests/search/test_measure_share.py sets both
    cfg = load_config(CONFIGS / "digits.yaml", [*SEARCH, "prune.threshold=1e-3", "prune.measure_share=1", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return Search(cfg, model, 16, tmp_path), model


class Device:
    """A target whose seconds follow the architecture: ``cost(widths)`` per network, compared in rounds."""

    def __init__(self, cost, spread: float = 0.0):
        self.cost, self.spread = cost, spread

    def __call__(self, model) -> float:
        return self.cost(model)

    def compare(self, models, rounds=3, retakes=2, settings=None, decided=None):  # the rounds of each figure disagree by ``spread``
        return [(self.cost(as_network(m)), self.spread) for m in models]  # a search hands it architectures


def _widths(model) -> list[int]:
    return [b.hidden for _, block in model.named_blocks() for b in block.branches]


def test_a_candidate_that_measures_slower_is_refused_or_refitted_to_whole_branches(tmp_path):
    from dist_hrnas.search.decide import REFITTED_WHOLE_BRANCHES, REFUSED_MEASURED_SLOWER, decide_by_measurement

    search, model = _search(tmp_path, "prune.round_to=1")
    (e0, bn0), (e1, bn1) = search.pairs[:2]
    with torch.no_grad():
        bn0.weight[: e0.width // 2] = 0.0     # half of one branch ...
        bn1.weight[:] = 0.0                   # ... and all of another
    masks = search.registry.masks(model)
    # a device where any partly cut branch costs more than it did whole (a bad staircase): only a whole branch pays
    assert all(w % e0.width == 0 for w in _widths(model))
    off = lambda m: sum(_widths(m)) % e0.width != 0  # noqa: E731 - the half-cut branch is in it
    search.network_timer = Device(lambda m: 1e-3 * (len(_widths(m)) + 5 * off(m)))
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert decision.due and decision.refusals == [REFITTED_WHOLE_BRANCHES]
    assert all(bool(m.all()) or not bool(m.any()) for ms in decision.masks.values() for m in ms)
    assert decision.measured_s < decision.before_s
    search.network_timer = Device(lambda m: 1e-3 * (100 - len(_widths(m))))       # smaller is slower everywhere
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert not decision.due and decision.refusals == [REFUSED_MEASURED_SLOWER]



@pytest.mark.parametrize("spread, taken", [(0.03, False), (0.01, True)])
def test_a_gain_inside_the_figures_spread_is_refused(tmp_path, spread, taken):
    from dist_hrnas.search.decide import REFUSED_MEASURED_SLOWER, decide_by_measurement

    search, model = _search(tmp_path, "prune.round_to=1")
    with torch.no_grad():
        search.pairs[0][1].weight[:] = 0.0     # one whole branch
    masks = search.registry.masks(model)
    branches = len(_widths(model))
    # 4 % faster without the branch: beyond 2 x 1 % of spread, inside 2 x 3 %
    search.network_timer = Device(lambda m: 1e-3 if len(_widths(m)) == branches else 0.96e-3, spread)
    search.latency_ms_measured = 1.0  # the network now's earlier figure: the device's (no jump to scale back)
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert decision.due == taken and decision.refusals == ([] if taken else [REFUSED_MEASURED_SLOWER])
    if not taken:  # what it timed is kept, and TensorBoard shows it: refused for the spread, not for no gain
        from dist_hrnas.metrics import NullWriter
        from dist_hrnas.names import Tags
        from dist_hrnas.search.board import log_refusal

        class Recorder(NullWriter):
            def __init__(self):
                self.points = {}

            def scalar(self, tag, value, step):
                self.points[tag] = (value, step)

        writer = Recorder()
        log_refusal(writer, decision, 7)
        assert writer.points == {Tags.REFUSED_CANDIDATE_MS: (pytest.approx(0.96), 7),
                                 Tags.REFUSED_NOW_MS: (pytest.approx(1.0), 7)}


class MovingDevice(Device):
    """A Device on which the candidate (any network narrower than the first timed) reads ``moves[k]`` times its
    cost in the k-th comparison: one comparison's ratio moving from the next, as it does at batch 1."""

    def __init__(self, cost, moves: list[float]):
        super().__init__(cost)
        self.moves, self.compared, self.first = moves, 0, None

    def compare(self, models, rounds=3, retakes=2, settings=None, decided=None):
        models = [as_network(m) for m in models]
        self.first, move = self.first or _widths(models[0]), self.moves[min(self.compared, len(self.moves) - 1)]
        self.compared += 1
        return [(self.cost(m) * (1.0 if _widths(m) == self.first else move), 0.0) for m in models]


@pytest.mark.parametrize("moves, comparisons, taken", [
    ([0.96, 1.01, 1.02], 3, False),   # a small gain in one comparison, none in the next two: the median refuses
    ([0.96, 0.97, 1.02], 3, True),    # ... in two of three: taken on the median comparison
    ([0.85, 1.01, 1.02], 1, True),    # a clear gain (over CLEAR_GAIN) decides alone
    ([1.01, 0.90, 0.90], 1, False),   # so does none at all
])
def test_a_cheap_comparison_with_a_small_gain_is_taken_again_and_its_median_decides(tmp_path, monkeypatch,
                                                                                    moves, comparisons, taken):
    from dist_hrnas.search import decide
    from dist_hrnas.search.decide import CLEAR_GAIN, LANDING_COMPARISONS, decide_by_measurement

    search, model = _search(tmp_path, "prune.round_to=1")
    with torch.no_grad():
        search.pairs[0][1].weight[:] = 0.0     # one whole branch
    masks = search.registry.masks(model)
    search.network_timer = MovingDevice(lambda m: 1e-3, moves)
    search.latency_ms_measured = 1.0
    assert 1.0 - CLEAR_GAIN < 0.96 and LANDING_COMPARISONS == 3
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert search.network_timer.compared == comparisons and decision.due == taken
    if taken:
        assert decision.measured_s / decision.before_s == pytest.approx(moves[0] if comparisons == 1 else 0.97)
    monkeypatch.setattr(decide, "LANDING_MEDIAN_S", 0.0)  # a costly comparison (batch 32): one, as it reads
    search.network_timer = MovingDevice(lambda m: 1e-3, moves)
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert search.network_timer.compared == 1 and decision.due == (moves[0] < 0.99)


def test_before_the_last_epoch_a_gain_too_small_to_measure_is_not_timed(tmp_path):
    from dist_hrnas.search.decide import decide_by_measurement

    search, model = _search(tmp_path, "prune.round_to=1")
    with torch.no_grad():
        search.pairs[0][1].weight[:2] = 0.0        # two channels of one branch: far less than 5 % of the network
    masks = search.registry.masks(model)
    timed = []
    search.network_timer = Device(lambda m: timed.append(m) or 1e-3)
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=False)
    assert not decision.due and decision.refusals == [] and timed == []  # not timed: the penalty goes on
    decision = decide_by_measurement(search, model, masks, epoch=0, last_epoch=True)
    assert timed                                                          # the last epoch always measures


class DriftingDevice:
    """A target whose seconds follow the architecture (``seconds(model)``) while the machine's speed moves
    between comparisons (the k-th comparison runs ``slowdowns[k]`` times slower), as it does during a LUT build."""

    def __init__(self, seconds, slowdowns: list[float]):
        self.seconds, self.slowdowns, self.compared = seconds, slowdowns, 0

    def __call__(self, model) -> float:
        return self.compare([model])[0][0]

    def compare(self, models, rounds=3, retakes=2, settings=None, decided=None):
        slowdown = self.slowdowns[self.compared % len(self.slowdowns)]
        self.compared += 1
        return [(slowdown * self.seconds(as_network(m)), 0.0) for m in models]


def test_calibration_networks_are_timed_against_the_supernet_so_a_slow_spell_does_not_tilt_the_fit(tmp_path):
    from dist_hrnas.latency import Timer, profile_on_rank0
    from dist_hrnas.latency.networks import CALIBRATION_GROUP, network_key
    from dist_hrnas.latency.lut import read_lut_file

    cfg = load_config(CONFIGS / "digits.yaml", [*SEARCH, "latency.calibration_networks=12", "latency.repeats=1",
                                                 f"latency.lut={tmp_path / 'lut.json'}"]).latency
    model = build_model(load_config(CONFIGS / "digits.yaml", SEARCH).model)
    seconds = lambda m: 1e-3 * (2 + 0.01 * sum(_widths(m)))  # noqa: E731 - the device's truth
    # the supernet alone, then three groups of samples; the second group falls in a 1.6x spell
    device = DriftingDevice(seconds, [1.0, 1.0, 1.6, 1.0])
    with pytest.warns(BusyDeviceWarning, match=r"spread 60 % \(.*ms on cpu at batch"):  # the user is told
        prof = profile_on_rank0(model, 16, cfg, Timer(torch.device("cpu"), 0, 1), network_timer=device)
    assert device.compared == 1 + 12 // CALIBRATION_GROUP           # the supernet in every group's rounds
    # every sample is its ratio to the supernet timed beside it, times the supernet's median figure (1.0x: the
    # figure before the groups and two of three groups), so all sit at one machine speed
    points = prof.calibration.points
    assert len(points) == 13 and prof.network_s == pytest.approx(seconds(model)) == points[0][1]
    level = [measured / seconds(net) for (_, measured, _), net in zip(points[1:], _sampled(model, prof, cfg))]
    assert level == pytest.approx([1.0] * 12)
    # the LUT keeps the referenced figures
    ops = next(iter(read_lut_file(tmp_path / "lut.json")["tables"].values()))["ops"]
    assert ops[network_key(model, 16)]["median_s"] == pytest.approx(seconds(model))


def test_a_later_run_times_a_few_lut_samples_beside_the_supernet_so_one_slow_figure_does_not_set_its_level(tmp_path):
    from dist_hrnas.latency import Timer, profile_on_rank0
    from dist_hrnas.latency.networks import LEVEL_CHECKS, LEVEL_GROUP, network_key
    from dist_hrnas.latency.lut import read_lut_file

    cfg = load_config(CONFIGS / "digits.yaml", [*SEARCH, "latency.calibration_networks=12", "latency.repeats=1",
                                                 f"latency.lut={tmp_path / 'lut.json'}"]).latency
    model = build_model(load_config(CONFIGS / "digits.yaml", SEARCH).model)
    seconds = lambda m: 1e-3 * (2 + 0.01 * sum(_widths(m)))  # noqa: E731 - the device's truth
    cpu = Timer(torch.device("cpu"), 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BusyDeviceWarning)  # a steady machine: no warning
        profile_on_rank0(model, 16, cfg, cpu, network_timer=DriftingDevice(seconds, [1.0]))  # builds the LUT
    lut = read_lut_file(tmp_path / "lut.json")
    # an hour later the machine runs 1.2x slower, and the run's first supernet figure falls in a 1.6x spell
    later = DriftingDevice(seconds, [1.6, 1.2, 1.2])
    with pytest.warns(BusyDeviceWarning, match="spread 33 %"):
        prof = profile_on_rank0(model, 16, cfg, cpu, network_timer=later)
    assert later.compared == 1 + LEVEL_CHECKS // LEVEL_GROUP  # the supernet, then two groups of LUT samples
    # the supernet's median figure outvotes the slow one, and every LUT sample enters the fit at the run's speed
    assert prof.network_s == pytest.approx(1.2 * seconds(model))
    level = [measured / seconds(net)
             for (_, measured, _), net in zip(prof.calibration.points[1:], _sampled(model, prof, cfg))]
    assert level == pytest.approx([1.2] * 12)
    # the LUT's figures stay at the speed its samples were timed at (the supernet's too), so they stay comparable
    figures = [{k: v["median_s"] for k, v in next(iter(lut_file["tables"].values()))["ops"].items()}
               for lut_file in (lut, read_lut_file(tmp_path / "lut.json"))]
    assert figures[1] == pytest.approx(figures[0]) and figures[1][network_key(model, 16)] == pytest.approx(
        seconds(model))


def _sampled(model, prof, cfg) -> list:
    from dist_hrnas.latency.networks import calibration_networks

    return calibration_networks(model, prof, cfg)
