"""Shared fixtures: a clean process-group and environment state around every test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


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
