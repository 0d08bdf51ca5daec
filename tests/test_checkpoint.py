"""Checkpoints: weights_only-safe round trips, RNG restore, atomic writes, one-line errors."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_hrnas import checkpoint
from dist_hrnas.checkpoint import (CHECKPOINT_FORMAT, find_resume_checkpoint, load_checkpoint, rng_state,
                                   save_checkpoint, set_rng_state)
from dist_hrnas.config import load_config
from dist_hrnas.errors import UserError
from dist_hrnas.latency import LatencyProfile, branch_widths
from dist_hrnas.models import build_model, count_macs, export_arch, model_from_arch
from dist_hrnas.optim import ModelEma, build_optimizer, build_scheduler
from dist_hrnas.search.registry import PruneRegistry
from tests.conftest import CONFIGS


class Opaque:
    """A pickled custom object: weights_only loading refuses it."""


def assert_same(a, b, where="x"):
    """Deep equality of nested containers, tensors compared exactly (dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


@pytest.fixture(scope="module")
def trained():
    """The digits supernet after a few real AdamW steps, with scheduler, EMA and prune registry."""
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "digits.yaml", ["train.optimizer=adamw", "train.ema_decay=0.9"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train, lr=1e-3)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch=10)
    ema = ModelEma(model, cfg.train.ema_decay)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model)
    widths = branch_widths(model)
    seconds = {k: 1e-4 * (1 + i % 3) for i, k in enumerate(widths)}
    profile = LatencyProfile(sum(seconds.values()) + 1e-3, seconds, widths)
    registry = PruneRegistry.build(cfg.prune, model, count_macs(model, 1, 32), profile)
    search = {"profile": {"network_s": profile.network_s, "branch_s": dict(profile.branch_s),
                          "branch_width": dict(profile.branch_width)},
              "registry": registry.state_dict(), "latency_ms_supernet": 1.5, "supernet_predicted_s": 1.4e-3,
              "latency_ms_measured": 1.2, "shrinks": [{"step": 3, "channels_removed": 12}]}
    payload = {"arch": export_arch(model), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict(), "ema_updates": ema.updates,
               "registry": registry.state_dict(), "search": search, "step": 3, "epoch": 0,
               "rng": rng_state(), "meta": {"params": 1, "macs": 2}, "config": cfg.to_dict()}
    return cfg, model, optimizer, scheduler, registry, payload


def test_realistic_payload_round_trips(tmp_path, trained):
    cfg, model, optimizer, scheduler, registry, payload = trained
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, payload)
    assert "format" not in payload  # the caller's dict is left alone
    loaded = load_checkpoint(path)
    independent = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["format"] == independent["format"] == CHECKPOINT_FORMAT
    for got in (loaded, independent):
        assert_same({**payload, "format": CHECKPOINT_FORMAT}, got, "payload")

    rebuilt = model_from_arch(loaded["arch"], source=str(path))
    rebuilt.load_state_dict(loaded["model"])
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))

    fresh_opt = build_optimizer(rebuilt, cfg.train, lr=1e-3)
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert_same(optimizer.state_dict()["state"], fresh_opt.state_dict()["state"], "optimizer.state")
    assert len(loaded["optimizer"]["state"]) > 0 and "exp_avg" in loaded["optimizer"]["state"][0]
    fresh_sched = build_scheduler(fresh_opt, cfg.train, steps_per_epoch=10, last_step=loaded["step"] - 1)
    fresh_sched.load_state_dict(loaded["scheduler"])
    assert fresh_sched.last_epoch == scheduler.last_epoch == 3
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    # one plain lambda per param group: stored as None (not pickled), rebuilt by build_scheduler on resume
    assert loaded["scheduler"]["lr_lambdas"] == [None] * len(optimizer.param_groups)
    again = PruneRegistry.from_state_dict(cfg.prune, loaded["registry"])
    assert again.state_dict() == registry.state_dict()


def test_rng_state_round_trips(tmp_path):
    random.gauss(0, 1), np.random.normal()  # leave cached gaussians in both states
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    state = load_checkpoint(tmp_path / "rng.pt")["rng"]

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
                torch.rand(3).tolist(), torch.randn(2).tolist())

    first = draw()
    set_rng_state(state)
    assert draw() == first
    set_rng_state(state)
    assert draw() == first


@pytest.mark.parametrize("bad, where", [
    ({"optimizer": {"x": np.zeros(2)}}, "payload['optimizer']['x']: numpy.ndarray"),
    ({"step": np.int64(3)}, "payload['step']: numpy.int64"),
    ({"rng": [torch.Generator()]}, "payload['rng'][0]: torch._C.Generator"),
    ({"device": torch.device("cpu")}, "payload['device']: torch.device"),
    ({"obj": Opaque()}, "payload['obj']: tests.test_checkpoint.Opaque"),
    ({"s": {1, 2}}, "payload['s']: set"),
    ({7.5j: 1}, "payload: key 7.5j"),
])
def test_unsafe_payload_is_refused_before_writing(tmp_path, bad, where):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    good = path.read_bytes()
    with pytest.raises(TypeError) as info:
        save_checkpoint(path, {"step": 2, **bad})
    assert where in str(info.value) and "not checkpoint-safe" in str(info.value)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.pt"]


def test_self_containing_payload_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"payload\['loop'\]\[0\]: a container that contains itself"):
        save_checkpoint(tmp_path / "x.pt", {"loop": loop})
    assert os.listdir(tmp_path) == []


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    good = path.read_bytes()
    real_save = torch.save

    def half_then_die(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(path.parent) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


def _one_line_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and str(path) in message, message
    assert len(message) < 400, message
    return message


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "missing.pt")

    real = tmp_path / "real.pt"
    save_checkpoint(real, {"w": torch.randn(256, 256), "step": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    message = _one_line_error(truncated)
    assert "truncated or corrupt" in message and "checkpoint.resume=never" in message

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "truncated or corrupt" in _one_line_error(empty)

    rng = np.random.default_rng(0)
    for i, junk in enumerate([rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), b"not a checkpoint\n" * 50]):
        garbage = tmp_path / f"garbage{i}.pt"
        garbage.write_bytes(junk)
        assert "truncated or corrupt" in _one_line_error(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    assert "is not a dist_hrnas checkpoint (no 'format' key" in _one_line_error(foreign)
    other = tmp_path / "other.pt"
    torch.save({"format": "someone.else/v3"}, other)
    assert "is not a dist_hrnas checkpoint (format 'someone.else/v3'" in _one_line_error(other)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), tensor_only)
    assert "is not a dist_hrnas checkpoint" in _one_line_error(tensor_only)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "obj": Opaque()}, pickled)
    message = _one_line_error(pickled)
    assert "is not a dist_hrnas checkpoint" in message and "Opaque" in message

    directory = tmp_path / "adir.pt"
    directory.mkdir()
    assert "not a file" in _one_line_error(directory)


def test_find_resume_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    assert find_resume_checkpoint(tmp_path / "does-not-exist") is None
    (tmp_path / "checkpoints").mkdir()
    assert find_resume_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 0})
    assert find_resume_checkpoint(str(tmp_path)) == tmp_path / "checkpoints" / "last.pt"
