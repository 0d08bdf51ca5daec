"""python -m dist_hrnas.export on real (tiny) runs: files, verification in a separate process, EMA, errors."""
from __future__ import annotations

import json
import os
import shutil
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from dist_hrnas import export, export_check, train
from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.config import load_config
from dist_hrnas.data import build_datasets
from dist_hrnas.models import build_model, export_arch, model_from_arch, save_arch_file
from dist_hrnas.names import ExportFiles, RunFiles
from dist_hrnas.search.surgery import shrink_model
from tests.conftest import CONFIGS, SEARCH, SHRINKS, SMALL

# what the issue lists for export.json (names are a public contract)
ISSUE_KEYS = {"paths", "opset", "weights", "val_top1_pytorch", "val_top1_onnxruntime", "val_top1_torchscript",
              "identical_predictions", "max_abs_logit_diff", "latency_ms_pytorch", "latency_ms_onnxruntime",
              "latency_ms_searched", "runtime_versions"}
DIGITS = str(CONFIGS / "digits.yaml")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_search")
    assert train.main(["--config", DIGITS, *SEARCH, *SHRINKS, f"log.run_dir={d}"]) == 0
    assert (d / RunFiles.SHRINKS).read_text().strip(), "the fixture run must shrink at least once"
    return d


@pytest.fixture(scope="module")
def search_export(search_run):
    """The search run exported in both formats (not timed: the slow test below times one)."""
    assert export.main([str(search_run), "--rounds", "0"]) == 0
    return json.loads(ExportFiles(RunFiles(search_run).export_dir).json.read_text())


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A retrain (model.arch=...) with an EMA, of a network with removed channels, a removed branch and a block
    without branches."""
    root = tmp_path_factory.mktemp("export_ema")
    torch.manual_seed(0)
    model = build_model(load_config(DIGITS, SMALL).model)
    blocks = dict(model.named_blocks())
    masks = {name: [torch.arange(b.hidden) % 3 != 0 for b in block.branches] for name, block in blocks.items()}
    masks["stages.1.parallel.branches.1.0"] = [torch.zeros(b.hidden, dtype=torch.bool)
                                               for b in blocks["stages.1.parallel.branches.1.0"].branches]
    masks["head.down.0"][0][:] = False
    shrink_model(model, masks)
    save_arch_file(export_arch(model), root / "arch.yaml")
    run = root / "run"
    assert train.main(["--config", DIGITS, *SMALL, f"model.arch={root / 'arch.yaml'}", "train.ema_decay=0.9",
                       f"log.run_dir={run}"]) == 0
    return run


def _val_batch(run_dir, n: int = 48) -> torch.Tensor:
    val = build_datasets(load_config(RunFiles(run_dir).config).data).val
    return torch.stack([val[i][0] for i in range(n)])


def test_a_search_run_exports_files_that_compute_what_pytorch_computes(search_run, search_export):
    r = search_export
    assert ISSUE_KEYS <= set(r) and r["verified"] is True and r["weights"] == "model" and r["opset"] >= 17
    for path in (r["paths"]["onnx"], r["paths"]["torchscript"], r["paths"]["export_json"]):
        assert os.path.isfile(path)
    assert r["val_top1_pytorch"] == r["val_top1_onnxruntime"] == r["val_top1_torchscript"]
    assert r["identical_predictions"] >= 0.999 and r["max_abs_logit_diff"] <= 1e-4
    # the summary's figure of the final network, evaluated with the same weights
    summary = json.loads(RunFiles(search_run).summary.read_text())
    assert r["val_top1_pytorch"] == pytest.approx(summary["val_top1"], abs=1e-9)
    assert r["latency_ms_searched"] == summary["latency_ms_searched"]
    assert r["latency_ms_pytorch"] is None and r["latency_rounds"] == 0  # --rounds 0: not timed
    assert r["runtime_versions"]["onnxruntime"] == ort.__version__


def test_verification_ran_in_another_process(search_export):
    assert set(search_export["verification"]) >= {"onnxruntime", "torchscript"}
    pids = {v["pid"] for v in search_export["verification"].values()}
    assert len(pids) == 1 and os.getpid() not in pids  # one fresh interpreter, not this one


def test_the_onnx_graph_has_no_batchnorm_and_takes_any_batch_size(search_export, ema_run):
    assert export.main([str(ema_run), "--format", "onnx", "--rounds", "0"]) == 0
    for path in (search_export["paths"]["onnx"], ExportFiles(RunFiles(ema_run).export_dir).onnx):
        graph = onnx.load(str(path)).graph
        ops = {node.op_type for node in graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension
    session = ort.InferenceSession(str(ExportFiles(RunFiles(ema_run).export_dir).onnx),
                                   providers=["CPUExecutionProvider"])
    for n in (1, 5):
        assert session.run(None, {"x": _val_batch(ema_run, n).numpy()})[0].shape == (n, 10)


def test_a_run_with_an_ema_exports_the_ema_weights(ema_run, tmp_path):
    ckpt = load_checkpoint(RunFiles(ema_run).last_checkpoint)
    nets = {}
    for which in ("ema", "model"):
        nets[which] = model_from_arch(ckpt["arch"])
        nets[which].load_state_dict(ckpt[which])
        nets[which].eval()
    x = _val_batch(ema_run)
    with torch.no_grad():
        want = {which: net(x) for which, net in nets.items()}
    assert (want["ema"] - want["model"]).abs().max().item() > 1e-2  # the two really differ
    out = tmp_path / "auto"
    assert export.main([str(ema_run), "--out", str(out), "--rounds", "0"]) == 0
    r = json.loads(ExportFiles(out).json.read_text())
    assert r["weights"] == "ema" and r["verified"] is True
    assert r["paths"]["arch"].endswith("arch.yaml") and r["latency_ms_searched"] is None  # no search behind it
    got = torch.from_numpy(ort.InferenceSession(str(ExportFiles(out).onnx), providers=["CPUExecutionProvider"])
                           .run(None, {"x": x.numpy()})[0])
    assert (got - want["ema"]).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (torch.jit.load(str(ExportFiles(out).torchscript))(x) - want["ema"]).abs().max().item() <= 1e-4
        # --weights model picks the live weights instead (the same path on, minus the files)
        chosen = export.load_trained(ema_run, "model")
        assert chosen.weights == "model" and (chosen.model(x) - want["model"]).abs().max().item() == 0


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("export", "tb"))
    return dest


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        export.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_not_a_run_directory(tmp_path, capsys):
    assert "not a run directory" in _error([str(tmp_path)], capsys)
    assert "not a run directory" in _error([str(tmp_path / "missing")], capsys)


def test_no_checkpoint(search_run, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(RunFiles(search_run).config, d / RunFiles.CONFIG)
    assert "has no checkpoint" in _error([str(d)], capsys)


def test_a_checkpoint_of_another_architecture(search_run, tmp_path, capsys):
    d = _copy_run(search_run, tmp_path / "run")
    arch = yaml.safe_load(RunFiles(d).arch.read_text())
    arch["blocks"][0]["kernel_sizes"], arch["blocks"][0]["widths"] = [3], [4]
    save_arch_file(arch, RunFiles(d).arch)
    err = _error([str(d)], capsys)
    assert "holds another architecture than" in err and arch["blocks"][0]["name"] in err


def test_an_unwritable_out(search_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "is not a writable directory" in _error([str(search_run), "--out", str(blocker / "sub")], capsys)


def test_ema_weights_asked_of_a_run_without_ema(search_run, capsys):
    assert "holds no EMA weights" in _error([str(search_run), "--weights", "ema"], capsys)


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_onnx_or_onnxruntime_missing_names_the_install(search_run, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` sees when the package is not installed
    err = _error([str(search_run), "--format", "onnx"], capsys)
    assert f"{missing} is not installed" in err and 'pip install -e ".[onnx]"' in err


def test_a_mismatch_beyond_tolerance_is_exit_code_1_naming_the_numbers(search_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "MAX_ABS_LOGIT_DIFF", -1.0)  # any difference (even 0) is now beyond tolerance
    out = tmp_path / "out"
    assert export.main([str(search_run), "--format", "torchscript", "--out", str(out), "--rounds", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "torchscript: max abs logit difference" in err and "identical predictions" in err
    assert json.loads(ExportFiles(out).json.read_text())["verified"] is False


def test_a_runtime_that_only_breaks_pytorchs_ties_otherwise_predicts_identically():
    ref = torch.tensor([[1.0, 1.0 + 5e-7, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.5]])
    labels = torch.tensor([0, 0, 1, 2])
    runtime = ref.clone()
    runtime[0, 0] += 1e-6  # PyTorch's top two tie at float precision: the runtime picks the other one
    runtime[1, 1] += 1.5  # a clear margin overturned: a different prediction
    runtime[3, 0] -= 1e-6  # an exact tie in PyTorch (its argmax: the first), broken the other way
    out = export_check.compare(lambda x: runtime, [(torch.zeros(4, 1), labels)], ref, labels)
    assert out["identical_predictions"] == 3 / 4
    assert out["top1"] == 3 / 4 and out["max_abs_logit_diff"] == pytest.approx(1.5)


@pytest.mark.slow
def test_the_retrain_of_a_search_run_exports_and_is_timed_beside_the_searchs_latency(search_run, tmp_path):
    run = tmp_path / "retrain"
    assert train.main(["--config", DIGITS, *SMALL, f"model.arch={RunFiles(search_run).arch}",
                       f"log.run_dir={run}"]) == 0
    assert export.main([str(run), "--rounds", "1"]) == 0
    r = json.loads(ExportFiles(RunFiles(run).export_dir).json.read_text())
    assert r["verified"] and r["val_top1_pytorch"] == r["val_top1_onnxruntime"] == r["val_top1_torchscript"]
    assert r["latency_ms_searched"] == json.loads(RunFiles(search_run).summary.read_text())["latency_ms_searched"]
    assert r["latency_ms_pytorch"] > 0 and r["latency_ms_onnxruntime"] > 0
