"""Checkpoint and resume across shrinks; non-finite loss; a killed rank under torchrun --max-restarts."""
from __future__ import annotations

import hashlib
import json
import subprocess
import time

import psutil
import pytest
import torch

from dist_hrnas import train
from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.models import export_arch, model_from_arch
from tests.conftest import CONFIGS, PYTHON, SEARCH, SHRINKS

THREE_EPOCHS = [*SEARCH, *SHRINKS, "train.epochs=3", "checkpoint.every_epochs=1"]


class Interrupt(Exception):
    pass


def _fail_at_epoch(monkeypatch, epoch_to_fail: int) -> None:
    """Fault injection: the run dies at the start of ``epoch_to_fail`` (after the previous checkpoint)."""
    real = train.train_one_epoch

    def dying(state, loader, search, cfg, ctx, writer, epoch):
        if epoch == epoch_to_fail:
            raise Interrupt(f"killed at epoch {epoch}")
        return real(state, loader, search, cfg, ctx, writer, epoch)

    monkeypatch.setattr(train, "train_one_epoch", dying)


def test_resume_after_a_shrink_rebuilds_the_architecture_and_continues_at_the_right_step(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = ["--config", str(CONFIGS / "digits.yaml"), *THREE_EPOCHS, f"log.run_dir={run_dir}"]
    _fail_at_epoch(monkeypatch, 2)
    with pytest.raises(Interrupt):
        train.main(args)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert ckpt["search"]["shrinks"], "the test needs a shrink before the interruption"
    shrunk_arch = ckpt["arch"]
    rebuilt = model_from_arch(shrunk_arch)
    rebuilt.load_state_dict(ckpt["model"])
    assert export_arch(rebuilt) == shrunk_arch
    shrinks_before = len(ckpt["search"]["shrinks"])

    monkeypatch.undo()
    seen = {}
    real = train.train_one_epoch

    def spy(state, loader, search, cfg, ctx, writer, epoch):
        seen.setdefault("first", (epoch, state.step, export_arch(state.model)))
        return real(state, loader, search, cfg, ctx, writer, epoch)

    monkeypatch.setattr(train, "train_one_epoch", spy)
    assert train.main(args) == 0
    epoch, step, arch = seen["first"]
    assert (epoch, step) == (2, 8) and arch == shrunk_arch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["shrinks"] >= shrinks_before
    assert len((run_dir / "shrinks.jsonl").read_text().splitlines()) == summary["shrinks"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 3


def test_non_finite_loss_stops_with_step_rank_and_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.pt"
    real = train.forward_backward
    digest = {}

    def poisoned(state, search, cfg, ctx, images, labels, rho, accum):
        loss, l1 = real(state, search, cfg, ctx, images, labels, rho, accum)
        if state.step == 5:  # inside epoch 2, after epoch 1's checkpoint
            digest["before"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
            return loss * float("nan"), l1
        return loss, l1

    monkeypatch.setattr(train, "forward_backward", poisoned)
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(CONFIGS / "digits.yaml"), *THREE_EPOCHS, f"log.run_dir={run_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"non-finite loss at step 5 on rank 0; stopping all ranks; last good checkpoint: {ckpt}" in err[0]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest["before"]


@pytest.mark.slow
def test_killed_rank_under_max_restarts_still_finishes_the_search(tmp_path, python_env):
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           "-m", "dist_hrnas.train", "--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=5",
           "train.max_steps_per_epoch=6", "checkpoint.every_epochs=1", f"log.run_dir={run_dir}"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=python_env,
                             cwd=tmp_path)
    try:
        ckpt = run_dir / "checkpoints" / "last.pt"
        deadline = time.time() + 240
        while not ckpt.exists() and time.time() < deadline and agent.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint appeared"
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "dist_hrnas.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].kill()  # SIGKILL one rank mid-run
        output = agent.communicate(timeout=300)[0]
    finally:
        agent.kill()
    assert agent.returncode == 0, output[-4000:]
    assert "resumed from" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 5 * 6
    arch = model_from_arch(load_checkpoint(ckpt)["arch"])
    assert torch.isfinite(arch(torch.randn(2, 1, 16, 16))).all()


def test_a_fresh_run_in_an_old_run_directory_keeps_the_old_files_apart(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, *SHRINKS, f"log.run_dir={run_dir}"]
    assert train.main(argv) == 0
    first = {name: (run_dir / name).read_bytes() for name in ("shrinks.jsonl", "summary.json")}
    assert train.main([*argv, "checkpoint.resume=never"]) == 0
    (previous,) = list((run_dir / "previous").iterdir())
    assert {name: (previous / name).read_bytes() for name in first} == first
    assert (previous / "checkpoints" / "last.pt").is_file() and (previous / "tb").is_dir()
    shrinks = (run_dir / "shrinks.jsonl").read_text().splitlines()
    assert len(shrinks) == json.loads((run_dir / "summary.json").read_text())["shrinks"]  # not appended
    assert len(list((run_dir / "tb").glob("events.*"))) == 1
