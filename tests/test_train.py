"""A real (short) training run: run directory, summary.json, TensorBoard tags read back from event files."""
from __future__ import annotations

import json

import pytest
import yaml

from dist_hrnas import train
from dist_hrnas.config import load_config
from dist_hrnas.errors import UserError
from dist_hrnas.metrics import read_scalars
from dist_hrnas.models import build_model, export_arch, save_arch_file
from tests.conftest import CONFIGS, SMALL



def test_short_run_writes_run_dir_summary_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, f"log.run_dir={run_dir}",
                       "train.ema_decay=0.9"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_top1", "params", "macs", "world_size"):
        assert key in summary
    assert summary["world_size"] == 1 and summary["steps"] == 6 and 0.0 <= summary["val_top1"] <= 1.0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["log"]["run_dir"] == str(run_dir)
    scalars = read_scalars(run_dir / "tb")
    for tag in ("train/loss", "train/lr", "val/top1", "val/loss"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["val/top1"]] == [3, 6]
    assert scalars["val/top1"][-1][1] == pytest.approx(summary["val_top1"])


def test_run_dir_defaults_to_config_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, "train.epochs=1",
                       "log.tensorboard=false"]) == 0
    assert (tmp_path / "runs" / "digits" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "digits" / "tb").exists()


def test_trains_an_architecture_file(tmp_path):
    cfg = load_config(CONFIGS / "digits.yaml", SMALL)
    arch = export_arch(build_model(cfg.model))
    arch["blocks"][0].update(kernel_sizes=[3], widths=[5])
    arch["blocks"][1].update(kernel_sizes=[], widths=[])
    save_arch_file(arch, tmp_path / "arch.yaml")
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, f"model.arch={tmp_path / 'arch.yaml'}",
                       f"log.run_dir={tmp_path / 'run'}", "train.epochs=1"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    from dist_hrnas.models import model_from_arch, count_params
    assert summary["params"] == count_params(model_from_arch(arch))


def test_class_count_mismatch_is_clear(tmp_path):
    cfg = load_config(CONFIGS / "digits.yaml", [*SMALL, "model.num_classes=5", f"log.run_dir={tmp_path}"])
    with pytest.raises(UserError, match="10 classes but the model has 5: set model.num_classes=10"):
        train.run(cfg, train.comm.DistContext())


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
@pytest.mark.parametrize("schedule", ["cosine", "exp"])
def test_optimizers_and_schedules_run(tmp_path, optimizer, schedule):
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SMALL, "train.epochs=1",
                       f"train.optimizer={optimizer}", f"train.lr_schedule={schedule}", "train.warmup_epochs=0.5",
                       "log.tensorboard=false", f"log.run_dir={tmp_path}"]) == 0
