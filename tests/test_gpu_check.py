"""bench/gpu_check.py on a machine without a GPU: one line and exit 0; a failing or hanging step is recorded (its
whole process tree ended) and the check goes on; --simulate-cpu runs every step end to end and writes the JSON."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.gpu_check import SIMULATE, check, run_command
from tests.conftest import PYTHON, ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
STEPS = {"search_ddp", "search_deepspeed_zero2_bf16", "profile_batch1", "profile_batch2", "throughput",
         "onnxruntime_cuda"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path, python_env):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([PYTHON, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=python_env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1 and "CUDA is not available" in proc.stdout
    assert not out.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:                   # a zombie is dead too (waiting to be reaped)
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_hanging_step_is_ended_with_its_children_and_a_failing_one_is_recorded(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = [PYTHON, "-c", "import subprocess, sys, time; "
                          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                          f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('waiting', flush=True); "
                          "time.sleep(600)"]
    result = run_command(hang, 5, tmp_path / "hang.log")
    assert result["ok"] is False and result["rc"] is None
    assert result["error"].startswith("timed out after 5 s") and "waiting" in result["error"]
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:     # killed with its process group, reaped by init
        time.sleep(0.2)
    assert not _alive(child), "the step's grandchild outlived the timeout (it would hold the GPU)"
    failed = run_command([PYTHON, "-c", "import sys; print('bad input'); sys.exit(3)"], 30, tmp_path / "fail.log")
    assert failed["ok"] is False and failed["rc"] == 3 and "exit code 3" in failed["error"]
    assert "bad input" in failed["error"] and "-c" in failed["command"]


def test_steps_past_the_budget_are_recorded_as_skipped(tmp_path):
    results = check(SIMULATE, tmp_path, budget_s=0)
    assert set(results) == STEPS
    assert all(r["ok"] is False and "budget" in r["error"] for r in results.values())


@pytest.mark.slow
def test_simulate_cpu_runs_every_step_and_writes_the_json(tmp_path, python_env):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([PYTHON, str(SCRIPT), "--simulate-cpu", "--out", str(out), "--work", str(tmp_path / "work"),
                           "--budget-s", "1500"], capture_output=True, text=True, env=python_env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report                 # printed and written: the same object
    assert {"mode", "machine", "budget_s", "wall_s", "ok", "steps"} <= set(report)
    steps = report["steps"]
    assert report["mode"] == "simulate-cpu" and set(steps) == STEPS
    failed = {name: s.get("error", "")[-1500:] for name, s in steps.items() if s["ok"] is False}
    assert not failed and report["ok"], failed
    for name in ("search_ddp", "search_deepspeed_zero2_bf16"):
        search = steps[name]
        assert search["shrinks"] >= 1 and search["rank_hashes_agree"] and search["world_size"] == 1
        assert search["params_searched"] < search["params"] and search["latency_device"] == "cpu"
    for batch in (1, 2):
        profile = steps[f"profile_batch{batch}"]
        assert profile["profile"]["ops_timed"] > 0 and profile["profile"]["latency_ms_measured"] > 0
        networks = profile["networks"]
        assert [n["network"] for n in networks] == ["supernet"] + [f"shrunk_keep_{s}" for s in (0.8, 0.6, 0.4, 0.2)]
        # the prediction carries the supernet's context part, which timing noise on a loaded CPU can make negative
        assert all(math.isfinite(n["predicted_ms"]) and n["measured_ms"] > 0 for n in networks)
        assert networks[0]["channels"] > networks[1]["channels"] > networks[-1]["channels"]
    run = steps["throughput"]
    assert (run["engine"], run["backend"], run["world_size"]) == ("DDPEngine", "gloo", 1)   # dist.always_group
    assert run["samples_per_s_plain"] > 0 and run["search_overhead_ratio"] > 0
    assert run["shrink"]["params_after"] < run["shrink"]["params_before"]
    assert {"broadcast_masks_s", "surgery_s", "hash_check_s", "rebuild_s", "shrink_s"} <= set(run["shrink"])
    onnx = steps["onnxruntime_cuda"]
    assert onnx["profile"]["backend"] == "onnxruntime" if onnx["ok"] else "not installed" in onnx["skipped"]
    assert "torch" in report["machine"] and sys.version.startswith(report["machine"]["python"])
