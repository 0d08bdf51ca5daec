"""A corpus of bad inputs a hostile new user might try, against train, summary, profile and report.

Every case must end with exit code 2 and exactly one line on stderr that names the key or the file, no
traceback, and leave every file it could touch (the finished run directory it points at, the input files)
byte for byte as it was. The run directory holds a finished run, so a case that wrote anything would show.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from dist_hrnas import profile, report, summary, train
from dist_hrnas.checkpoint import CHECKPOINT_FORMAT
from dist_hrnas.config import load_config
from dist_hrnas.models import build_model, export_arch
from tests.conftest import CONFIGS, PYTHON, SEARCH, SMALL, TINY_MODEL

DIGITS = str(CONFIGS / "digits.yaml")


@dataclass
class Case:
    id: str
    cli: str                  # train | summary | profile | report
    args: list[str]           # "{run}" = the finished run directory, "{tmp}" = the case's scratch directory
    needle: str               # what the one line must name (the key or the file)
    prep: Callable[[Path], None] | None = field(default=None)


def _arch(tmp: Path, edit: Callable[[dict], None], name: str = "arch.yaml") -> None:
    arch = export_arch(build_model(load_config(DIGITS, TINY_MODEL).model))
    edit(arch)
    (tmp / name).write_text(yaml.safe_dump(arch, sort_keys=False))


def _set_block(key: str, value: object) -> Callable[[Path], None]:
    return lambda tmp: _arch(tmp, lambda a: a["blocks"][0].__setitem__(key, value))


def _lut(entry: object) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        table = {"fingerprint": {"device_name": "x"}, "ops": {"op_a": {"median_s": 1e-4, "spread_s": 0.0},
                                                             "op_b": entry}}
        (tmp / "lut.json").write_text(json.dumps({"format": 1, "tables": {"abc": table}}))
    return write


def _text(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(data)


def _ckpt(obj: object) -> Callable[[Path], None]:
    return lambda tmp: torch.save(obj, tmp / "ckpt.pt")


def _bad_pickle(tmp: Path) -> None:
    (tmp / "evil.pt").write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x0b\x00\x00\x00touch PWNEDq\x01\x85q\x02Rq\x03.")


class _Opaque:
    pass


def _config(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text("train:\n  epochs: 1\n")


# One override each (against the small digits run): every section, every kind of range.
BAD_VALUES = [
    "model.num_classes=0", "model.num_classes=-1", "model.image_channels=0", "model.input_stride=3",
    "model.input_channel=[8]", "model.input_channel=[0,8]", "model.stages=[]", "model.stages=[[0,[],[]]]",
    "model.stages=[[1,[1]]]", "model.stages=[[1,[-1],[8]]]", "model.stages=[[1,[1],[0]]]",
    "model.stages=[[2,[1],[8]]]", "model.kernel_sizes=[4]", "model.kernel_sizes=[]", "model.kernel_sizes=[-3]",
    "model.kernel_sizes=[0]", "model.kernel_sizes=[3.5]", "model.expand_ratio=0", "model.expand_ratio=-1",
    "model.expand_ratio=.nan", "model.expand_ratio=.inf", "model.head_channels=[16]", "model.head_channels=[0,32]",
    "model.last_channel=-5", "model.last_channel=0", "model.active_fn=gelu", "model.bn_momentum=2",
    "model.bn_momentum=-0.1", "model.bn_eps=0", "model.dropout=1", "model.dropout=-0.5", "model.num_classes=abc",
    "data.name=cifar", "data.image_size=0", "data.image_size=1", "data.image_size=-4", "data.val_fraction=0",
    "data.val_fraction=1.5", "data.split_seed=-1", "data.synthetic_train_size=0", "data.synthetic_classes=1",
    "data.synthetic_channels=0", "data.num_workers=-1", "data.augment=maybe",
    "train.epochs=0", "train.epochs=-1", "train.epochs=2.5", "train.batch_size_per_rank=0", "train.optimizer=adam",
    "train.lr=0", "train.lr=-0.1", "train.lr=.nan", "train.lr_base_batch=-1", "train.lr_schedule=step",
    "train.warmup_epochs=-1", "train.exp_gamma=0", "train.exp_gamma=1.5", "train.exp_decay_epochs=0",
    "train.momentum=1", "train.momentum=-0.1", "train.rmsprop_alpha=1", "train.rmsprop_eps=0",
    "train.adamw_betas=[0.9]", "train.adamw_betas=[0.9,1.0]", "train.adamw_betas=[0.9,0.999,0.5]",
    "train.weight_decay=-1e-4", "train.label_smoothing=5", "train.label_smoothing=-0.1", "train.ema_decay=1",
    "train.eval_every=0", "train.log_every=0", "train.max_steps_per_epoch=-1", "train.seed=-1",
    "train.grad_accum_steps=0", "train.grad_accum_steps=5", "train.eval_bn_calibration_steps=-1",
    "train.grad_clip_norm=-1", "train.bf16=maybe",
    "prune.penalty=flops", "prune.rho=-1", "prune.epoch_free=-1", "prune.epoch_warmup=-1", "prune.threshold=-0.1",
    "prune.shrink_delta_seconds=-1", "prune.bn_calibration_steps=-1", "prune.round_to=0",
    "prune.target_latency_ms=0", "prune.target_latency_ms=-1", "prune.target_ratio=1.5", "prune.target_ratio=0",
    "prune.schedule=step", "prune.epoch_target=-1", "prune.budget_tolerance=1", "prune.controller_kp=-1",
    "prune.controller_ki=-1", "prune.rho_max_factor=0.5", "prune.measure_share=1.5",
    "prune.measure_share=-0.1",
    "latency.device=tpu", "latency.device=cuda:x", "latency.batch_size=0", "latency.threads=0", "latency.warmup=-1",
    "latency.repeats=0", "latency.network_repeats=0", "latency.candidate_repeats=0", "latency.cost=max",
    "latency.width_step=0",
    "latency.flush_cache_mb=-1", "latency.max_samples=1", "latency.backend=tensorrt", "latency.lut_device=auto",
    "dist.backend=mpi", "dist.engine=fsdp", "dist.timeout_s=0", "checkpoint.resume=always",
    "checkpoint.every_epochs=-1", "train.epoch=2", "foo.bar=1", "train.epochs", "epochs=2",
]


def _needle(override: str) -> str:
    key = override.split("=")[0]
    return {"foo.bar": "foo.bar", "train.epochs": "train.epochs", "epochs": "epochs"}.get(key, key)


DEEPSPEED = ["dist.engine=deepspeed"]
TRAIN = ["--config", DIGITS, *SMALL, "log.run_dir={run}", "checkpoint.resume=never"]
SEARCHING = ["prune.penalty=seconds", "latency.lut={tmp}/lut.json"]

CASES: list[Case] = [Case(f"train:{o}", "train", [*TRAIN, o], _needle(o)) for o in BAD_VALUES] + [
    # cross-key checks
    Case("both-budgets", "train", [*TRAIN, "prune.target_latency_ms=1", "prune.target_ratio=0.5"], "prune.target"),
    Case("budget-without-search", "train", [*TRAIN, "prune.target_ratio=0.5"], "prune.penalty"),
    Case("budget-rho-0", "train", [*TRAIN, "prune.penalty=seconds", "prune.target_ratio=0.5", "prune.rho=0"],
         "prune.rho"),
    Case("warmup-before-free", "train", [*TRAIN, "prune.epoch_free=2", "prune.epoch_warmup=1"], "prune.epoch_warmup"),
    Case("accum-divides", "train", [*TRAIN, "train.batch_size_per_rank=10", "train.grad_accum_steps=4"],
         "train.grad_accum_steps"),
    Case("image-too-small", "train", [*TRAIN, "data.image_size=2"], "data.image_size"),
    Case("lut-device-no-lut", "train", [*TRAIN, "latency.lut_device=mycpu"], "latency.lut_device"),
    # DeepSpeed settings, checked against DeepSpeed's own keys and schema at any world size
    Case("ds-zero-stag", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={zero_stag: 2}"], "zero_stag"),
    Case("ds-zero-3", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={zero_stage: 3}"], "zero_stage=3"),
    Case("ds-zero-opt-typo", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={zero_optimization: {stag: 1}}"],
         "zero_optimization.stag"),
    Case("ds-zero-disagree", "train",
         [*TRAIN, *DEEPSPEED, "dist.deepspeed={zero_stage: 1, zero_optimization: {stage: 2}}"], "zero_stage"),
    Case("ds-optimizer", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={optimizer: {type: Adam}}"], "optimizer"),
    Case("ds-clipping", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={gradient_clipping: 1.0}"],
         "gradient_clipping"),
    Case("ds-fp16", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={fp16: {enabled: true}}"], "fp16"),
    Case("ds-file-missing", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={config: {tmp}/nope.json}"], "nope.json"),
    Case("ds-file-not-json", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={config: {tmp}/ds.json}"], "ds.json",
         _text("ds.json", b"{zero")),
    Case("ds-file-typo", "train", [*TRAIN, *DEEPSPEED, "dist.deepspeed={config: {tmp}/ds.json}"], "zero_optimisation",
         _text("ds.json", b'{"zero_optimisation": {"stage": 1}}')),
    # config files
    Case("config-missing", "train", ["--config", "{tmp}/none.yaml", "log.run_dir={run}"], "none.yaml"),
    Case("config-not-utf8", "train", ["--config", "{tmp}/latin.yaml", "log.run_dir={run}"], "latin.yaml",
         _text("latin.yaml", "train:\n  epochs: 2 # d\xe9j\xe0\n".encode("latin-1"))),
    Case("config-yaml-error", "train", ["--config", "{tmp}/bad.yaml", "log.run_dir={run}"], "bad.yaml",
         _text("bad.yaml", b"train:\n  epochs: [1,\n")),
    Case("config-a-list", "train", ["--config", "{tmp}/list.yaml", "log.run_dir={run}"], "list.yaml",
         _text("list.yaml", b"- 1\n- 2\n")),
    Case("config-section-scalar", "train", ["--config", "{tmp}/sec.yaml", "log.run_dir={run}"], "train",
         _text("sec.yaml", b"train: 3\n")),
    # architecture files
    Case("arch-missing", "train", [*TRAIN, "model.arch={tmp}/none.yaml"], "none.yaml"),
    Case("arch-not-utf8", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "arch.yaml",
         _text("arch.yaml", b"format: \xff\xfe\n")),
    Case("arch-yaml-error", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "arch.yaml",
         _text("arch.yaml", b"blocks: [\n")),
    Case("arch-no-format", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "arch.yaml",
         lambda tmp: _arch(tmp, lambda a: a.pop("format"))),
    Case("arch-width-abc", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "abc", _set_block("widths", ["abc"] * 2)),
    Case("arch-width-2.7", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "2.7", _set_block("widths", [2.7, 4])),
    Case("arch-width-0", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "width 0", _set_block("widths", [0, 4])),
    Case("arch-kernel--3", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "-3", _set_block("kernel_sizes", [-3, 5])),
    Case("arch-kernel-4", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "kernel size 4",
         _set_block("kernel_sizes", [4, 5])),
    Case("arch-unpaired", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "pair up", _set_block("widths", [8])),
    Case("arch-stride-str", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "stride", _set_block("stride", "one")),
    Case("arch-no-blocks", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "blocks",
         lambda tmp: _arch(tmp, lambda a: a.pop("blocks"))),
    Case("arch-bad-model", "train", [*TRAIN, "model.arch={tmp}/arch.yaml"], "model.kernel_sizes",
         lambda tmp: _arch(tmp, lambda a: a["model"].__setitem__("kernel_sizes", [4]))),
    # latency LUT files: every entry checked before any timing
    Case("lut-string-entry", "train", [*TRAIN, *SEARCHING], "op_b", _lut("fast")),
    Case("lut-no-median", "train", [*TRAIN, *SEARCHING], "median_s", _lut({"spread_s": 0.0})),
    Case("lut-negative", "train", [*TRAIN, *SEARCHING], "median_s", _lut({"median_s": -4e-3, "spread_s": 0.0})),
    Case("lut-zero", "train", [*TRAIN, *SEARCHING], "median_s", _lut({"median_s": 0, "spread_s": 0.0})),
    Case("lut-nan", "train", [*TRAIN, *SEARCHING], "median_s", _lut({"median_s": float("nan"), "spread_s": 0.0})),
    Case("lut-neg-spread", "train", [*TRAIN, *SEARCHING], "spread_s", _lut({"median_s": 1e-3, "spread_s": -1})),
    Case("lut-not-json", "train", [*TRAIN, *SEARCHING], "lut.json", _text("lut.json", b"{")),
    Case("lut-not-utf8", "train", [*TRAIN, *SEARCHING], "lut.json", _text("lut.json", b"\xff\xfe{}")),
    Case("lut-format", "train", [*TRAIN, *SEARCHING], "lut.json", _text("lut.json", b'{"format": 7, "tables": {}}')),
    Case("lut-device-missing-file", "train", [*TRAIN, *SEARCHING, "latency.lut_device=auto"], "lut.json"),
    Case("lut-is-dir", "train", [*TRAIN, "prune.penalty=seconds", "latency.lut={tmp}"], "latency.lut"),
    # output paths
    Case("run-dir-under-file", "train", [*TRAIN, "log.run_dir={tmp}/cfg.yaml/run"], "log.run_dir", _config),
    Case("run-dir-is-file", "train", [*TRAIN, "log.run_dir={tmp}/cfg.yaml"], "log.run_dir", _config),
    # the run directory's checkpoint (resume=auto)
    Case("resume-other-optimizer", "train", [*TRAIN, "checkpoint.resume=auto", "train.optimizer=adamw"],
         "train.optimizer"),
    Case("resume-other-model", "train", [*TRAIN, "checkpoint.resume=auto", "model.last_channel=64"],
         "model.last_channel"),
    Case("resume-budget-run-as-macs", "train", [*TRAIN, "checkpoint.resume=auto", "prune.penalty=macs"],
         "prune.penalty"),
    # summary
    *[Case(f"summary:{o}", "summary", ["--config", DIGITS, *TINY_MODEL, o], o.split("=")[0])
      for o in ("model.kernel_sizes=[4]", "model.stages=[]", "model.last_channel=-5", "model.dropout=2")],
    Case("summary-arch-2.7", "summary", ["--config", DIGITS, "model.arch={tmp}/arch.yaml"], "2.7",
         _set_block("widths", [2.7, 4])),
    Case("summary-config-not-utf8", "summary", ["--config", "{tmp}/latin.yaml"], "latin.yaml",
         _text("latin.yaml", b"model:\n  dropout: 0.1 # \xe9\n")),
    # profile: the output path and the LUT are checked before profiling
    Case("profile-out-under-file", "profile", ["--config", DIGITS, *TINY_MODEL, "--out", "{tmp}/cfg.yaml/lut.json",
                                               "--no-progress"], "cfg.yaml", _config),
    Case("profile-out-is-dir", "profile", ["--config", DIGITS, *TINY_MODEL, "--out", "{tmp}", "--no-progress"],
         "latency.lut"),
    Case("profile-out-bad-lut", "profile", ["--config", DIGITS, *TINY_MODEL, "--out", "{tmp}/lut.json",
                                            "--no-progress"], "lut.json", _lut([1, 2])),
    Case("profile-bad-device", "profile", ["--config", DIGITS, "--device", "gpu", "--out", "{tmp}/l.json"],
         "latency.device"),
    Case("profile-bad-arch", "profile", ["--config", DIGITS, "model.arch={tmp}/arch.yaml", "--out", "{tmp}/l.json",
                                         "--no-progress"], "abc", _set_block("widths", ["abc", 4])),
    # report
    Case("report-missing", "report", ["{tmp}/nowhere"], "nowhere"),
    Case("report-a-file", "report", ["{tmp}/cfg.yaml"], "cfg.yaml", _config),
    Case("report-no-search", "report", ["{run}", "--no-measure"], "searched_arch.yaml"),
    Case("report-out-under-file", "report", ["{run}", "--out", "{tmp}/cfg.yaml/r.md"], "cfg.yaml", _config),
]

CLIS = {"train": train.main, "summary": summary.main, "profile": profile.main, "report": report.main}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (and every directory, empty ones too) with a hash of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished small run (config, summary, checkpoint, TensorBoard events) that every case copies."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(["--config", DIGITS, *SMALL, f"log.run_dir={run}"]) == 0
    return run


def _fill(args: list[str], run: Path, tmp: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in args]


def assert_one_clear_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, finished_run, tmp_path, capsys):
    run, scratch = tmp_path / "run", tmp_path / "in"
    shutil.copytree(finished_run, run)
    scratch.mkdir()
    if case.prep:
        case.prep(scratch)
    before = tree_digest(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        CLIS[case.cli](_fill(case.args, run, scratch))
    assert exc.value.code == 2
    assert_one_clear_line(capsys.readouterr().err, case.needle.replace("{tmp}", str(scratch)))
    assert tree_digest(tmp_path) == before


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 120
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.cli for c in CASES} == set(CLIS)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "unsafe-pickle", "unsafe-torch-save", "incomplete"])
def test_a_bad_checkpoint_says_what_it_is_and_changes_nothing(kind, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    if kind == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"weights": torch.ones(2)}, last)
    elif kind == "unsafe-pickle":
        _bad_pickle(run / "checkpoints")
        (run / "checkpoints" / "evil.pt").replace(last)
    elif kind == "unsafe-torch-save":
        torch.save({"format": CHECKPOINT_FORMAT, "x": _Opaque()}, last)
    else:
        torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, last)
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", DIGITS, *SMALL, f"log.run_dir={run}"])
    assert exc.value.code == 2
    expected = {"truncated": "truncated or corrupt", "foreign": "not a dist_hrnas checkpoint",
                "unsafe-pickle": "unsafe content", "unsafe-torch-save": "unsafe content",
                "incomplete": "not a dist_hrnas training checkpoint"}[kind]
    err = capsys.readouterr().err
    assert_one_clear_line(err, str(last))
    assert expected in err, err
    assert kind not in ("unsafe-pickle", "unsafe-torch-save") or "nothing in it was executed" in err
    assert tree_digest(tmp_path) == before
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("cli,args,needle", [
    ("train", ["--config", DIGITS, "train.label_smoothing=5"], "train.label_smoothing"),
    ("summary", ["--config", DIGITS, "model.kernel_sizes=[4]"], "model.kernel_sizes"),
    ("profile", ["--config", DIGITS, "--out", "/dev/null/lut.json"], "/dev/null"),
])
def test_the_command_line_gives_exit_code_2_and_one_line(cli, args, needle, python_env, tmp_path):
    proc = subprocess.run([PYTHON, "-m", f"dist_hrnas.{cli}", *args], capture_output=True, text=True,
                          env=python_env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_line(proc.stderr, needle)
    assert not list(tmp_path.iterdir())  # no runs/ directory, no stray file


def test_a_target_below_the_smallest_network_is_refused_before_the_run_directory_is_touched(
        finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", DIGITS, *SEARCH, f"log.run_dir={run}", "checkpoint.resume=never",
                    "prune.target_latency_ms=0.0001", "latency.clean_process=false"])
    assert exc.value.code == 2
    assert_one_clear_line(capsys.readouterr().err, "prune.target_latency_ms=0.0001")
    assert tree_digest(tmp_path) == before
