"""Config loading: every error kind is one clear line with exit code 2; dotted overrides; round trip."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from dist_hrnas import train
from dist_hrnas.config import Config, ConfigError, describe_fields, load_config, save_config
from tests.conftest import CONFIGS, PYTHON


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_key_names_closest_valid_key(capsys):
    line = _error_line(capsys, ["--config", str(CONFIGS / "digits.yaml"), "train.epoch=3"])
    assert "train.epoch" in line and "did you mean train.epochs" in line


def test_unknown_key_in_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_sise_per_rank: 8\n")
    line = _error_line(capsys, ["--config", str(path)])
    assert "train.batch_sise_per_rank" in line and "train.batch_size_per_rank" in line


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key trian.*train\."):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type_names_key_expected_type_and_value(capsys):
    line = _error_line(capsys, ["--config", str(CONFIGS / "digits.yaml"), "train.epochs=three"])
    assert "train.epochs" in line and "expected int" in line and "'three'" in line


def test_wrong_type_inside_list():
    with pytest.raises(ConfigError, match=r"model\.kernel_sizes\[1\]: expected int, got 'x'"):
        load_config(None, ["model.kernel_sizes=[3, x]"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.epochs: expected int, got True"):
        load_config(None, ["train.epochs=true"])


def test_missing_file_names_path(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = _error_line(capsys, ["--config", str(missing)])
    assert str(missing) in line and "not found" in line


def test_yaml_syntax_error_names_path_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  num_classes: 10\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    line = _error_line(capsys, ["--config", str(path)])
    assert f"{path}:" in line and "YAML syntax error" in line
    lineno = int(line.split(f"{path}:")[1].split(":")[0])
    assert 4 <= lineno <= 5


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_invalid_choice_is_reported():
    with pytest.raises(ConfigError, match="prune.penalty: 'flops' is not one of seconds, macs, equal, none"):
        load_config(None, ["prune.penalty=flops"])


def test_cli_error_has_no_traceback(tmp_path, python_env):
    proc = subprocess.run([PYTHON, "-m", "dist_hrnas.train", "--config", str(CONFIGS / "digits.yaml"),
                           "data.nmae=digits"], capture_output=True, text=True, cwd=tmp_path, env=python_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key data.nmae; did you mean data.name?"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists(), "a config error must not create a run directory"


def test_dotted_overrides_of_nested_keys_and_lists():
    cfg = load_config(CONFIGS / "digits.yaml", [
        "train.epochs=7",
        "model.kernel_sizes=[3, 5]",          # a whole list
        "model.input_channel.1=8",            # one list item
        "model.stages.1.2.0=20",              # an item of a list inside a list
        "dist.deepspeed.zero_stage=2",        # a key inside a dict field
        "dist.deepspeed.optimizer.lr=0.5",    # a dict level that does not exist yet
        "latency.lut=/tmp/lut.json",
        "prune.rho=1e-4",                     # a float written in YAML's exponent form
    ])
    assert cfg.train.epochs == 7
    assert cfg.model.kernel_sizes == [3, 5]
    assert cfg.model.input_channel == [16, 8]
    assert cfg.model.stages[1] == [2, [1, 1], [20, 32]]
    assert cfg.dist.deepspeed == {"zero_stage": 2, "optimizer": {"lr": 0.5}}
    assert cfg.latency.lut == "/tmp/lut.json"
    assert cfg.prune.rho == pytest.approx(1e-4)
    assert cfg.name == "digits"


def test_override_list_index_out_of_range():
    with pytest.raises(ConfigError, match=r"model.input_channel.5: index 5 out of range"):
        load_config(None, ["model.input_channel.5=8"])


def test_int_accepted_for_float_field():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "hrnas_imagenet.yaml", ["train.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() | {"name": "x"} == cfg.to_dict() | {"name": "x"}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 3


def test_public_keys_exist():
    keys = describe_fields()
    for key in ("train.epochs", "log.run_dir", "model.arch", "data.name", "data.root", "prune.penalty",
                "prune.rho", "latency.device", "latency.lut", "dist.engine", "dist.backend", "dist.timeout_s",
                "checkpoint.resume", "checkpoint.every_epochs", "train.batch_size_per_rank", "train.eval_every"):
        assert f"  {key} (" in keys, key


def test_every_field_is_documented():
    for line in describe_fields().splitlines():
        if line.startswith("  "):
            assert not line.rstrip().endswith(":"), f"undocumented: {line}"


def test_shipped_configs_load():
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert isinstance(load_config(path), Config)
