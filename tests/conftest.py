"""Shared fixtures: a clean process-group and environment state around every test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Override lists shared by the tests (with configs/digits.yaml).
# A 2-stage digits supernet: every test that trains or profiles stays within a few seconds.
TINY_MODEL = ["model.stages=[[1,[1],[8]],[2,[1,1],[8,16]]]", "model.input_channel=[8,8]", "model.head_channels=[16,32]",
              "model.last_channel=32", "model.kernel_sizes=[3,5]"]
# ...trained for a handful of steps without a search.
SMALL = [*TINY_MODEL, "data.image_size=16", "train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every=1",
         "log.progress=false", "prune.penalty=none"]
# Strong penalty and a high threshold so a 2-epoch, 8-step run certainly shrinks.
SEARCH = [*SMALL, "prune.penalty=seconds", "prune.rho=0.1", "prune.threshold=0.9", "prune.epoch_warmup=0",
          "train.max_steps_per_epoch=4", "latency.warmup=1", "latency.repeats=3", "latency.batch_size=4",
          "prune.bn_calibration_steps=2", "latency.calibration_networks=4"]
# ... and certainly cuts: a test that needs a shrunk run (to report, export or resume it, or to start afresh
# over it) lets the calibrated model decide, since a measured tiny candidate can be refused when the machine is
# busy (it was, twice in full runs of the tests); the measured decisions have tests of their own (tests/search).
SHRINKS = ["prune.measure_before_cut=false"]


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def python_env(tmp_path_factory) -> dict:
    """Environment for subprocesses: one thread each, the package importable, a scratch TMPDIR of their own
    (torchrun and DeepSpeed write temp files; parallel jobs must not share them)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
