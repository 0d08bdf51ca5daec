"""The run report CLI on a real (tiny) search run: formats, before -> after, totals, shrinks, PNG, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from dist_hrnas import report, train
from dist_hrnas.config import load_config
from dist_hrnas.models import build_model
from dist_hrnas.names import RunFiles
from tests.conftest import CONFIGS, PYTHON, ROOT, SEARCH, SHRINKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report_run")
    assert train.main(["--config", str(CONFIGS / "digits.yaml"), *SEARCH, *SHRINKS, f"log.run_dir={d}"]) == 0
    assert (d / "shrinks.jsonl").read_text().strip(), "the fixture run must shrink at least once"
    return d


@pytest.fixture(scope="module")
def json_report(run_dir):
    """The JSON report with measuring on (computed once: timing is the slow part)."""
    out = run_dir / "report.json"
    assert report.main([str(run_dir), "--format", "json", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _block_names(run_dir) -> list[str]:
    return [b["name"] for b in yaml.safe_load((run_dir / "searched_arch.yaml").read_text())["blocks"]]


def test_json_blocks_before_after_match_config_and_searched_arch(run_dir, json_report):
    arch = {b["name"]: b for b in yaml.safe_load((run_dir / "searched_arch.yaml").read_text())["blocks"]}
    supernet = dict(build_model(load_config(run_dir / "config.yaml").model).named_blocks())
    rows = json_report["blocks"]
    assert [r["name"] for r in rows] == list(arch) == list(supernet)
    for r in rows:
        assert r["kernel_sizes_before"] == supernet[r["name"]].kernel_sizes
        assert r["widths_before"] == supernet[r["name"]].widths
        assert r["kernel_sizes_after"] == arch[r["name"]]["kernel_sizes"]
        assert r["widths_after"] == arch[r["name"]]["widths"]
        assert r["macs_after"] <= r["macs_before"] and r["params_after"] <= r["params_before"]
        for key in ("latency_ms_predicted_before", "latency_ms_predicted_after", "latency_ms_measured_before",
                    "latency_ms_measured_after"):
            assert r[key] is not None and r[key] >= 0, (r["name"], key)
    assert any(r["widths_after"] != r["widths_before"] for r in rows)
    assert json_report["run"]["measured_on"] == "cpu"


def test_json_totals_match_summary(run_dir, json_report):
    summary = json.loads((run_dir / "summary.json").read_text())
    t = json_report["totals"]
    assert t["params_before"] == summary["params"] and t["params_after"] == summary["params_searched"]
    assert t["macs_before"] == summary["macs"] and t["macs_after"] == summary["macs_searched"]
    assert t["latency_ms_measured_before"] == summary["latency_ms_supernet"]
    assert t["latency_ms_measured_after"] == summary["latency_ms_searched"]
    assert t["latency_ms_predicted_after"] == summary["latency_ms_searched_predicted"]
    assert t["val_top1"] == summary["val_top1"] and t["shrinks"] == summary["shrinks"]
    # The per-block predictions (leave-one-out through LatencyProfile.predict_s) fit inside the whole network.
    for when in ("before", "after"):
        blocks = sum(r[f"latency_ms_predicted_{when}"] for r in json_report["blocks"])
        assert 0 <= blocks <= t[f"latency_ms_predicted_{when}"] + 1e-3
        assert sum(r[f"macs_{when}"] for r in json_report["blocks"]) <= t[f"macs_{when}"]


def test_json_shrink_history_is_shrinks_jsonl(run_dir, json_report):
    lines = [json.loads(line) for line in (run_dir / "shrinks.jsonl").read_text().splitlines() if line.strip()]
    assert json_report["shrinks"] == lines and len(lines) >= 1


def test_schedule_png_is_written(run_dir, json_report):
    png = run_dir / RunFiles.SCHEDULE_PNG
    assert json_report["schedule_png"] == str(png)
    data = png.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_text_and_markdown_list_every_block_and_shrink(run_dir, fmt, capsys):
    assert report.main([str(run_dir), "--format", fmt, "--no-measure"]) == 0
    out = capsys.readouterr().out
    for name in _block_names(run_dir):
        assert name in out
    shrinks = [json.loads(line) for line in (run_dir / "shrinks.jsonl").read_text().splitlines()]
    for rec in shrinks:
        assert rec["arch_hash"] in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['params']:,}" in out and f"{summary['params_searched']:,}" in out
    if fmt == "markdown":
        assert "| block |" in out and "| --- |" in out and "![pruned-seconds schedule](" in out
        arrow = "→"
    else:
        assert "|" not in out
        arrow = "->"
    # widths before -> after, as the config builds them and the search exported them
    arch = yaml.safe_load((run_dir / "searched_arch.yaml").read_text())["blocks"]
    supernet = dict(build_model(load_config(run_dir / "config.yaml").model).named_blocks())
    for b in arch:
        before = ",".join(map(str, supernet[b["name"]].widths)) or "-"
        after = ",".join(map(str, b["widths"])) or "-"
        assert f"{before} {arrow} {after}" in out


def test_no_measure_leaves_measured_out(run_dir, capsys):
    assert report.main([str(run_dir), "--format", "json", "--no-measure"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["run"]["measured_on"] is None
    assert all(r["latency_ms_measured_before"] is None and r["latency_ms_measured_after"] is None
               for r in data["blocks"])
    assert all(r["latency_ms_predicted_before"] is not None for r in data["blocks"])
    assert "timing" not in captured.err


def test_markdown_out_file_links_png_relative_to_it(run_dir, tmp_path):
    out = tmp_path / "docs" / "report.md"
    assert report.main([str(run_dir), "--format", "markdown", "--no-measure", "--out", str(out)]) == 0
    text = out.read_text()
    link = text.split("![pruned-seconds schedule](")[1].split(")")[0]
    assert (out.parent / link).resolve() == (run_dir / RunFiles.SCHEDULE_PNG).resolve()


def test_runs_without_tensorboard_still_get_a_schedule(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tb", RunFiles.SCHEDULE_PNG))
    assert report.main([str(copy), "--no-measure", "--out", str(tmp_path / "r.txt")]) == 0
    assert (copy / RunFiles.SCHEDULE_PNG).read_bytes()[:8] == PNG_MAGIC


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "dist_hrnas.report", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_run_dir_is_one_line_exit_2(tmp_path, python_env):
    missing = tmp_path / "no_such_run"
    proc = _cli([str(missing)], python_env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("remove", ["config.yaml", "summary.json", "searched_arch.yaml"])
def test_not_a_run_dir_exits_2_naming_the_file(run_dir, tmp_path, remove, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / remove).unlink()
    with pytest.raises(SystemExit) as exc:
        report.main([str(copy), "--no-measure"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(copy) in err[0] and remove in err[0]


def test_corrupt_shrinks_line_exits_2_naming_file_and_line(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    n = len((copy / "shrinks.jsonl").read_text().splitlines())
    with open(copy / "shrinks.jsonl", "a") as f:
        f.write('{"step": 99, "epoch"\n')
    with pytest.raises(SystemExit) as exc:
        report.main([str(copy), "--no-measure"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(copy / "shrinks.jsonl") in err[0] and f"line {n + 1}" in err[0]
    assert "delete or repair" in err[0]


def test_corrupt_summary_and_checkpoint_exit_2(run_dir, tmp_path, capsys):
    for name, junk in (("summary.json", "{not json"), ("checkpoints/last.pt", "junk")):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(run_dir, copy)
        (copy / name).write_text(junk)
        with pytest.raises(SystemExit) as exc:
            report.main([str(copy), "--no-measure"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(copy / name) in err[0], err


def test_predicted_blocks_plus_fixed_is_the_profile_prediction(run_dir):
    """Both ways of reading per-block predictions from LatencyProfile agree and add up to predict_s."""
    import types

    run = report.load_run(run_dir)
    for model in (run.supernet, run.searched):
        blocks = report.predicted_block_s(run.profile, model, "test")
        assert sum(blocks.values()) + run.profile.fixed_part_s() + run.profile.context_part_s() == pytest.approx(
            run.profile.predict_s(model))
        only_total = types.SimpleNamespace(predict_s=run.profile.predict_s)  # a profile without per-branch API
        assert report.predicted_block_s(only_total, model, "test") == pytest.approx(blocks)
