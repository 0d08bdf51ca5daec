"""Nothing lost, nothing hangs: resume only a matching run, never overwrite a finished one, and every rank
ends within 30 s of a failure on any one of them, whatever dist.timeout_s is."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from dist_hrnas import train
from dist_hrnas.errors import UserError
from dist_hrnas.parallel import comm
from dist_hrnas.start import RESUMABLE_KEYS, config_differences
from tests.conftest import CONFIGS, PYTHON, SEARCH, SMALL
from tests.multirank import run_ranks
from tests.test_bad_input import assert_one_clear_line, tree_digest

DIGITS = str(CONFIGS / "digits.yaml")


def test_resume_with_another_config_is_refused_and_the_finished_run_is_only_ever_moved(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--config", DIGITS, *SMALL, f"log.run_dir={run}"]
    assert train.main(argv) == 0
    finished = tree_digest(run)
    old_summary = (run / "summary.json").read_bytes()

    # the same run again: finished, reported as it is, nothing rewritten (not even TensorBoard)
    assert train.main(argv) == 0
    assert tree_digest(run) == finished

    # another config on the default checkpoint.resume=auto: one line naming the keys and the two ways on
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main([*argv, "train.optimizer=adamw", "prune.penalty=macs"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert_one_clear_line(err, "train.optimizer: 'sgd' in the run, 'adamw' now")
    assert "prune.penalty" in err and "checkpoint.resume=never" in err and "log.run_dir" in err
    assert tree_digest(run) == finished

    # the first way on: a fresh run here keeps the old one under previous/, byte for byte
    assert train.main([*argv, "train.optimizer=adamw", "checkpoint.resume=never"]) == 0
    (previous,) = (run / "previous").iterdir()
    assert (previous / "summary.json").read_bytes() == old_summary
    assert tree_digest(previous) == finished


def test_keys_on_the_allow_list_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    argv = ["--config", DIGITS, *SMALL, f"log.run_dir={run}"]
    assert train.main(argv) == 0
    # more epochs, other logging: the run goes on from its checkpoint
    assert train.main([*argv, "train.epochs=3", "train.log_every=2", "log.tensorboard=false",
                       "dist.timeout_s=99"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 * 3
    assert not (run / "previous").exists()


def test_config_differences_ignore_only_the_allow_list():
    base = {"train": {"epochs": 2, "lr": 0.1, "log_every": 1}, "log": {"run_dir": "a"}, "dist": {"deepspeed": {}},
            "name": "x"}
    new = {"train": {"epochs": 9, "lr": 0.2, "log_every": 5}, "log": {"run_dir": "b"},
           "dist": {"deepspeed": {"zero_stage": 1}}, "name": "y"}
    assert config_differences(base, new) == ["train.lr: 0.1 in the run, 0.2 now"]
    assert "train.epochs" in RESUMABLE_KEYS and "log.*" in RESUMABLE_KEYS and "dist.*" in RESUMABLE_KEYS


def _rank0_bug(rank: int) -> str:
    def work() -> str:
        return str(1 / 0) if rank == 0 else "never"

    started = time.monotonic()
    try:
        comm.on_rank0(work, "the test's rank-0 work")
    except (ZeroDivisionError, UserError) as err:
        return f"{type(err).__name__}|{err}|{time.monotonic() - started:.1f}"
    return "no error"


def test_a_failure_on_rank0_alone_stops_every_rank_with_the_same_line():
    results = run_ranks(_rank0_bug)
    assert [r[0] for r in results] == ["ok", "ok"]
    kind0, _, _ = results[0][1].split("|")
    kind1, line1, seconds = results[1][1].split("|")
    assert kind0 == "ZeroDivisionError" and kind1 == "UserError"  # rank 0 keeps its traceback
    assert line1.startswith("the test's rank-0 work failed on rank 0 (ZeroDivisionError")
    assert float(seconds) < 30


def _rank0_works_long(rank: int, fail: bool) -> str:
    """Rank 0 works alone for 3 s, longer than the job's 1 s collective timeout (as a LUT build outlasts the
    default 300 s), then succeeds or fails; every rank must see its result, not a timeout."""
    def work() -> str:
        time.sleep(3.0)
        if fail:
            raise UserError("latency.lut: the test's LUT is broken")
        return "rank 0's result"

    try:
        value = comm.on_rank0(work, "the test's long rank-0 work")
        return "error: none" if fail else str(comm.broadcast_object(value))
    except UserError as err:
        return f"error: {err}"


@pytest.mark.parametrize("fail", [False, True])
def test_rank0_working_alone_longer_than_the_collective_timeout_ends_well(fail):
    results = run_ranks(_rank0_works_long, fail, comm_timeout_s=1)
    expected = "error: latency.lut: the test's LUT is broken" if fail else "rank 0's result"
    assert results == [("ok", expected), ("ok", expected)]


def _joined(rank: int) -> int:
    return comm.world_size()


def test_a_rank0_that_starts_later_than_the_collective_timeout_is_still_joined():
    """Joining waits for the slowest rank to start; ``dist.timeout_s`` bounds a hung collective, not a start."""
    assert run_ranks(_joined, comm_timeout_s=1, rank0_late_s=3.0) == [("ok", 2), ("ok", 2)]


def _torchrun(tmp_path: Path, python_env: dict, extra: list[str]) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dist_hrnas.train",
           "--config", DIGITS, *extra, f"log.run_dir={tmp_path / 'run'}", "dist.timeout_s=3600"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=python_env,
                            cwd=tmp_path)


def _collect(proc: subprocess.Popen) -> tuple[list[tuple[float, str]], threading.Thread]:
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def _other_device_lut(path: Path) -> None:
    table = {"fingerprint": {"device_type": "cpu", "device_name": "a machine elsewhere"},
             "ops": {"op": {"median_s": 1e-3, "spread_s": 0.0}}}
    path.write_text(json.dumps({"format": 1, "tables": {"elsewhere": table}}))


def _wrong_shape_lut(path: Path) -> None:  # the hang: valid JSON, a string where an entry belongs
    table = {"fingerprint": {"device_name": "x"}, "ops": {"op": "fast"}}
    path.write_text(json.dumps({"format": 1, "tables": {"x": table}}))


@pytest.mark.slow
@pytest.mark.parametrize("make_lut, needle", [(_other_device_lut, "built for another device"),
                                              (_wrong_shape_lut, "is str, not {median_s, spread_s}")])
def test_a_rank0_failure_under_torchrun_ends_every_rank_within_30_s(tmp_path, python_env, make_lut, needle):
    lut = tmp_path / "lut.json"
    make_lut(lut)
    proc = _torchrun(tmp_path, python_env, [*SEARCH, f"latency.lut={lut}", "latency.lut_strict=true"])
    lines, reader = _collect(proc)
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()
    reader.join(timeout=10)
    ended = time.monotonic()
    errors = [(t, line) for t, line in lines if line.startswith("error: ") and needle in line]
    assert proc.returncode != 0
    assert len(errors) == 2, "\n".join(line for _, line in lines)[-4000:]  # the same line on both ranks
    assert errors[0][1] == errors[1][1]
    assert ended - errors[0][0] < 30
    assert not (tmp_path / "run").exists()  # nothing written before the failure


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_within_30_s(tmp_path, python_env):
    proc = _torchrun(tmp_path, python_env, [*SEARCH, "train.epochs=50", "train.max_steps_per_epoch=6",
                                            "checkpoint.every_epochs=1", "latency.clean_process=false"])
    lines, reader = _collect(proc)
    try:
        ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
        deadline = time.time() + 300
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), "\n".join(line for _, line in lines)[-4000:]
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "dist_hrnas.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].kill()  # SIGKILL one rank mid-run
        killed = time.monotonic()
        proc.wait(timeout=120)
        assert time.monotonic() - killed < 30
    finally:
        proc.kill()
    assert proc.returncode != 0
