"""Multi-rank behaviour on CPU with gloo (2 ranks): rank 0 measures, masks agree, mismatches abort, torchrun."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from dist_hrnas.config import LatencyConfig, load_config
from dist_hrnas.latency import Timer, branch_widths, profile_on_rank0
from dist_hrnas.metrics import read_scalars, read_tags
from dist_hrnas.models import build_model
from dist_hrnas.report import read_shrinks
from dist_hrnas.search.masks import broadcast_masks
from dist_hrnas.search.shrink import check_same_on_all_ranks
from dist_hrnas.search.surgery import shrink_model
from tests.conftest import CONFIGS, PYTHON, SEARCH
from tests.device_lut import BOARD, lut_from_another_machine
from tests.multirank import free_port, run_ranks

# Two ranks train at twice the learning rate (digits.yaml scales lr to the global batch): a milder penalty
# over three epochs shrinks more than once (here at epochs 1 and 2, a few hundred channels each), so the engine is rebuilt and checked more than once. These tests are
# about the re-wrap, so they train for another machine (latency.lut_device) whose LUT depends on the architecture
# only (tests/device_lut.py): the calibrated model decides each shrink from the same figures however loaded this
# machine is, so the number of shrinks does not depend on the load (test_torchrun_two_ranks_measured covers the
# measured decision on two ranks). Every dead channel goes (round_to=1: on the channel grid a branch with a few
# dead channels keeps them, and the second shrink may not come).
DIST = [*SEARCH, "train.epochs=3", "prune.rho=0.05", "prune.round_to=1"]


@pytest.fixture(scope="module")
def dist_args(tmp_path_factory) -> list[str]:
    """DIST with the even LUT of another machine (built once for the module)."""
    lut = lut_from_another_machine(tmp_path_factory.mktemp("lut") / "board.json",
                                   ["--config", str(CONFIGS / "digits.yaml"), *DIST], even=True)
    return [*DIST, f"latency.lut={lut}", f"latency.lut_device={BOARD}"]


def _model():
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS / "digits.yaml").model)


def _profile_rank(rank: int) -> tuple[int, list[float], dict]:
    model = _model()
    timer = Timer(torch.device("cpu"), warmup=0, repeats=1)
    cfg = LatencyConfig(warmup=0, repeats=1, network_repeats=3, calibration_networks=4)
    profile = profile_on_rank0(model, 32, cfg, timer)
    return timer.calls, profile.to_tensor(list(branch_widths(model))).tolist(), profile.calibration.state_dict()


def test_only_rank0_calls_the_timer_and_all_ranks_get_its_figures():
    (s0, r0), (s1, r1) = run_ranks(_profile_rank)
    assert s0 == s1 == "ok", (r0, r1)
    (calls0, fig0, cal0), (calls1, fig1, cal1) = r0, r1
    assert calls0 > 0 and calls1 == 0
    assert fig0 == fig1 and cal0 == cal1 and len(cal0["points"]) == 5  # the supernet and 4 sampled networks
    # every timing is positive; fig0[2] is the calibration (measured minus predicted supernet), either sign
    assert all(v > 0 for v in fig0[:2] + fig0[3:]) and math.isfinite(fig0[2])


def _shrink_rank(rank: int, corrupt: bool) -> tuple[str, list[str]]:
    model = _model()
    gen = torch.Generator().manual_seed(100 + rank)  # each rank proposes different masks ...
    masks = {name: [torch.rand(w, generator=gen) > 0.3 for w in block.widths]
             for name, block in model.named_blocks()[:4]}
    masks = broadcast_masks(model, masks)            # ... but rank 0's win everywhere
    if corrupt and rank == 1:
        first = next(iter(masks))
        masks[first][0][0] = ~masks[first][0][0]
    shrink_model(model, masks)
    return check_same_on_all_ranks(model, step=7)


def test_rank0_masks_are_applied_identically_on_every_rank():
    results = run_ranks(_shrink_rank, False)
    assert [s for s, _ in results] == ["ok", "ok"]
    (arch0, hashes0), (arch1, hashes1) = results[0][1], results[1][1]
    assert arch0 == arch1 and hashes0 == hashes1 and len(hashes0) == 2 and hashes0[0] == hashes0[1]


def test_a_corrupted_mask_on_one_rank_aborts_every_rank_with_a_clear_message():
    results = run_ranks(_shrink_rank, True)
    for status, message in results:
        assert status == "error"
        assert message.startswith("ConsistencyError: ranks disagree after the shrink at step 7: architecture of "
                                  "rank(s) [1] differ from rank 0")


def _torchrun(args: list[str], env: dict, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "torch.distributed.run", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def _check_two_rank_run(run_dir) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["shrinks"] >= 2
    for line in (run_dir / "shrinks.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert len(rec["rank_hashes"]) == 2 and rec["rank_hashes"][0] == rec["rank_hashes"][1]
        assert rec["arch_hash"]


@pytest.mark.slow
def test_torchrun_two_ranks_ddp_search(tmp_path, python_env, dist_args):
    run_dir = tmp_path / "run"
    proc = _torchrun(["--standalone", "--nproc_per_node", "2", "-m", "dist_hrnas.train", "--config",
                      str(CONFIGS / "digits.yaml"), *dist_args, f"log.run_dir={run_dir}"], python_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_two_rank_run(run_dir)
    scalars = read_scalars(run_dir / "tb")
    assert scalars["dist/world_size"][0][1] == 2
    shrinks = json.loads((run_dir / "summary.json").read_text())["shrinks"]
    assert len(scalars["prune/shrink"]) == len(scalars["prune/latency_ms_measured"]) == shrinks
    assert all(v > 0 for _, v in scalars["train/step_time_s"] + scalars["train/samples_per_s"])
    assert "prune/architecture/text_summary" in read_tags(run_dir / "tb")["tensors"]
    assert len(list((run_dir / "tb").iterdir())) == 1     # only rank 0 writes events


@pytest.mark.slow
def test_torchrun_two_ranks_measured(tmp_path, python_env):
    """Rank 0 times each candidate before the cut; every rank applies the decision it broadcasts."""
    run_dir = tmp_path / "run"
    proc = _torchrun(["--standalone", "--nproc_per_node", "2", "-m", "dist_hrnas.train", "--config",
                      str(CONFIGS / "digits.yaml"), *SEARCH, f"log.run_dir={run_dir}"], python_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["candidate_networks_timed"] >= 2
    if summary["shrinks"]:  # rank 0 re-timed supernet and searched network at the end, every rank took part
        assert summary["speedup_retimed"] > 0 and summary["latency_ms_searched_retimed"] > 0
    refused = read_scalars(run_dir / "tb").get("prune/shrink_refused", [])
    records = read_shrinks(run_dir / "shrinks.jsonl")  # [] when the run never shrank (then it has no file)
    assert len(records) == summary["shrinks"]
    assert records or refused  # on a loaded box every candidate may measure slower: then each was refused
    for rec in records:  # taken only when it measured faster than the network it replaced, in the same rounds
        assert rec["measured_before_cut"] and rec["rank_hashes"][0] == rec["rank_hashes"][1]
        assert rec["latency_ms_measured_after"] < rec["latency_ms_measured_before"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_torchrun_two_ranks_deepspeed_search(tmp_path, python_env, dist_args, stage):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    proc = _torchrun(["--standalone", "--nproc_per_node", "2", "-m", "dist_hrnas.train", "--config",
                      str(CONFIGS / "digits.yaml"), *dist_args, "dist.engine=deepspeed",
                      f"dist.deepspeed.zero_stage={stage}", f"log.run_dir={run_dir}"], python_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_two_rank_run(run_dir)
    assert f"zero_stage: {stage}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_on_localhost(tmp_path, python_env, dist_args):
    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
           "--rdzv-id", "test-job", "-m", "dist_hrnas.train", "--config", str(CONFIGS / "digits.yaml"), *dist_args,
           f"log.run_dir={run_dir}"]
    nodes = [subprocess.Popen([PYTHON, "-m", "torch.distributed.run", *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=python_env, cwd=tmp_path) for _ in range(2)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        finally:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _check_two_rank_run(run_dir)


def test_always_group_makes_one_process_a_group_with_the_configured_engine(monkeypatch):
    """dist.always_group: one process (one GPU) runs the multi-rank path: a process group and a DDP engine."""
    from dist_hrnas.config import DistConfig
    from dist_hrnas.errors import UserError
    from dist_hrnas.optim import build_optimizer
    from dist_hrnas.parallel import comm
    from dist_hrnas.parallel.engine import DDPEngine, LocalEngine, make_engine

    cfg = load_config(CONFIGS / "digits.yaml", ["dist.always_group=true"])
    model = _model()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="always_group=true but MASTER_ADDR is not set"):
        comm.init_distributed(cfg.dist, training_device="cpu")
    assert isinstance(make_engine(cfg, model, build_optimizer(model, cfg.train, 0.1), comm.init_distributed(
        DistConfig(), training_device="cpu")), LocalEngine)          # the default: no group, the bare module
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    ctx = comm.init_distributed(cfg.dist, training_device="cpu")
    try:
        assert (ctx.world_size, ctx.backend, comm.is_initialized()) == (1, "gloo", True)
        engine = make_engine(cfg, model, build_optimizer(model, cfg.train, 0.1), ctx)
        assert isinstance(engine, DDPEngine)
        engine.release()
    finally:
        comm.shutdown(ctx)
