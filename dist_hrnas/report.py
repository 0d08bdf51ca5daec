"""``python -m dist_hrnas.report RUN_DIR [--format text|markdown|json] [--out FILE] [--no-measure]``.

What a finished search run found: per atomic block the kernel branches and hidden widths before (the
supernet of ``config.yaml``) -> after (``searched_arch.yaml``), the predicted latency contribution (the
search's latency profile in ``checkpoints/last.pt``), the measured latency contribution (each block timed
here at the run's ``latency.batch_size``), MACs and parameters; then the totals (``summary.json``) and the
shrink history (``shrinks.jsonl``). The pruned-seconds schedule is drawn into ``RUN_DIR/report_schedule.png``.

``--format json`` prints one object with these keys (latencies in milliseconds; ``null`` = not available)::

    format            "dist_hrnas.report/v1"
    run               {run_dir, penalty, image_size, latency_device, latency_batch_size, latency_threads,
                       measured_on (device the blocks were timed on, null with --no-measure), epochs, steps}
    blocks            [{name, in, out, stride, kernel_sizes_before, kernel_sizes_after, widths_before,
                        widths_after, params_before, params_after, macs_before, macs_after,
                        latency_ms_predicted_before, latency_ms_predicted_after,
                        latency_ms_measured_before, latency_ms_measured_after}, ...]   (model order)
    totals            {params_before, params_after, macs_before, macs_after, branches_before, branches_after,
                       hidden_channels_before, hidden_channels_after,
                       latency_ms_predicted_before, latency_ms_predicted_after,   (whole network, latency model)
                       latency_ms_predicted_fixed    (the part no shrink changes: stem, shortcuts, fuse, head),
                       latency_ms_predicted_context  (the supernet offset; 0 with a whole-network calibration),
                       latency_ms_measured_before, latency_ms_measured_after,     (end to end, during the search)
                       latency_ms_blocks_measured_before, latency_ms_blocks_measured_after,  (sums of the rows)
                       val_top1, shrinks}
    shrinks           the records of shrinks.jsonl as written (step, epoch, channels_removed, widths,
                      kernel_sizes, latency_ms_predicted_before/after, latency_ms_measured_after, arch_hash,
                      rank_hashes), in order
    schedule_png      path of the schedule plot, or null when there was nothing to plot

The predicted contribution of a block is the drop in ``LatencyProfile.predict_s`` when that block loses all
its branches, so the report follows whatever cost model :mod:`dist_hrnas.latency` implements.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dist_hrnas.checkpoint import load_checkpoint
from dist_hrnas.config import Config, LatencyConfig, load_config
from dist_hrnas.errors import UserError, exits_cleanly_on_user_error
from dist_hrnas.fileio import atomic_write_text, writable_file_problem
from dist_hrnas.names import RunFiles
from dist_hrnas.latency import (LatencyProfile, Timer, block_input_shapes, cpu_threads,
                                target_device)
from dist_hrnas.models import (AtomicBlock, HRNet, build_model, count_macs, count_params, load_arch_file,
                               model_from_arch)
from dist_hrnas.models.counting import macs_under
from dist_hrnas.models.layout import memory_format, to_format
from dist_hrnas.models.fold import fold_bn
from dist_hrnas.report_render import (format_markdown, format_text, plot_schedule, read_schedule,
                                      schedule_from_shrinks)

REPORT_FORMAT = "dist_hrnas.report/v1"
SHRINK_KEYS = ("step", "epoch", "channels_removed", "widths", "latency_ms_predicted_before",
               "latency_ms_predicted_after", "latency_ms_measured_after")
_RUN_HINT = "pass the log.run_dir of a finished search run, e.g. runs/digits"


@dataclass
class Run:
    """Everything the report reads from a run directory."""

    run_dir: Path
    cfg: Config
    summary: dict
    supernet: HRNet
    searched: HRNet
    profile: LatencyProfile | None          # None when the checkpoint holds no search state
    supernet_predicted_s: float | None
    shrinks: list[dict]


# ---------------------------------------------------------------- reading
def read_shrinks(path: Path) -> list[dict]:
    """The records of ``shrinks.jsonl`` ([] when the run never shrank and so never created it)."""
    if not path.is_file():
        return []
    records = []
    fix = "delete or repair that line (the run's checkpoints/last.pt keeps the full history; resuming rewrites it)"
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({err.msg}): {fix}") from None
        missing = [k for k in SHRINK_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise UserError(f"{path}: line {lineno} is not a shrink record (no {missing[0]!r}): {fix}")
        records.append(record)
    return records


def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err.msg} at line {err.lineno}): rerun the search or restore the "
                        f"file") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a dist_hrnas summary (not a JSON object): rerun the search")
    return summary


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read and check a run directory; any problem is a one-line :class:`UserError` naming the file."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"run directory not found: {d} ({_RUN_HINT})")
    files = RunFiles(d)
    for path in (files.config, files.summary):
        if not path.is_file():
            why = "the run has not finished (wait for it, or resume it)" if path == files.summary \
                else "not a run directory"
            raise UserError(f"{d} has no {path.name}: {why}; {_RUN_HINT}")
    arch_path = files.arch
    if not arch_path.is_file():
        raise UserError(f"{d} has no {RunFiles.ARCH}: not a search run (prune.penalty=none); "
                        f"rerun with prune.penalty=seconds to get something to report")
    try:
        cfg = load_config(files.config)
    except UserError as err:
        msg = str(err)  # name the file: a config error alone does not say which run it came from
        raise UserError(msg if str(files.config) in msg else f"{files.config}: {msg}") from None
    summary = _read_summary(files.summary)
    supernet = build_model(cfg.model)
    searched = model_from_arch(load_arch_file(arch_path), source=str(arch_path))
    before, after = [n for n, _ in supernet.named_blocks()], [n for n, _ in searched.named_blocks()]
    if before != after:
        raise UserError(f"{arch_path} does not match {files.config} (different atomic blocks): "
                        f"the two files come from different runs")
    profile, supernet_predicted_s = None, None
    ckpt = files.last_checkpoint
    if ckpt.is_file():
        try:
            state = load_checkpoint(ckpt).get("search")
        except UserError as err:
            # The loader's own advice (checkpoint.resume=never) is about training, not about this report.
            reason = str(err).removesuffix(": delete it or set checkpoint.resume=never")
            raise UserError(f"{reason}; the report reads the search's latency profile from it: restore the file "
                            f"or rerun the search") from None
        if state:
            profile = LatencyProfile.from_state_dict(state["profile"], cfg.latency.cost)
            supernet_predicted_s = float(state["supernet_predicted_s"])
    if profile is None:
        print(f"note: {ckpt} holds no search state: predicted latencies are left out", file=sys.stderr)
    shrinks = read_shrinks(files.shrinks)
    if summary.get("shrinks") not in (None, len(shrinks)):
        print(f"note: {files.summary} counts {summary['shrinks']} shrinks but {files.shrinks} holds "
              f"{len(shrinks)}: the shrink history below is incomplete", file=sys.stderr)
    return Run(d, cfg, summary, supernet, searched, profile, supernet_predicted_s, shrinks)


# ---------------------------------------------------------------- per-block figures
@contextmanager
def _without_branches(block: AtomicBlock) -> Iterator[None]:
    kept = block.branches
    block.branches = nn.ModuleList()
    try:
        yield
    finally:
        block.branches = kept


def predicted_block_s(profile: LatencyProfile, model: HRNet, source: str) -> dict[str, float]:
    """Predicted seconds each block's kernel branches add to ``model``, from the search's latency model.

    The drop in ``predict_s`` when the block loses its branches: the figures come from LatencyProfile itself,
    not from a second copy of its cost rule, so they follow the latency model as it evolves.
    """
    try:
        total = profile.predict_s(model)
        out = {}
        for name, block in model.named_blocks():
            with _without_branches(block):
                out[name] = total - profile.predict_s(model)
        return out
    except KeyError as err:
        raise UserError(f"{source}: its latency profile has no branch {err.args[0]}: the checkpoint and "
                        f"searched_arch.yaml come from different runs") from None


def measure_device(cfg: LatencyConfig) -> torch.device:
    """The run's target device when it is usable here, else the CPU (the report still says which)."""
    try:
        return target_device(cfg)
    except UserError:
        print(f"note: latency.device={cfg.device} is not available here: timing blocks on the CPU", file=sys.stderr)
        return torch.device("cpu")


@torch.no_grad()
def measure_blocks(model: HRNet, image_size: int, cfg: LatencyConfig, timer: Timer) -> dict[str, float]:
    """Forward seconds of every atomic block on its own, at ``latency.batch_size`` and its input shape."""
    shapes = block_input_shapes(model, image_size)
    fmt = memory_format(cfg.timed_channels_last)  # the format and form the search timed its ops in:
    # BN folded, as deployed, unless latency.form=eager
    net = (fold_bn(model) if cfg.form == "deployed" else model).to(timer.device, memory_format=fmt).eval()
    out = {}
    with cpu_threads(cfg.threads):
        for name, block in net.named_blocks():
            x = to_format(torch.randn(cfg.batch_size, *shapes[name], device=timer.device), fmt)
            out[name] = timer(lambda: block(x)).median_s
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def build_report(run: Run, measure: bool = True) -> dict:
    """The report as plain data (what ``--format json`` prints), measuring the blocks unless told not to."""
    size = run.cfg.data.image_size
    channels = run.supernet.spec.image_channels
    macs = {"before": count_macs(run.supernet, channels, size), "after": count_macs(run.searched, channels, size)}
    models = {"before": run.supernet, "after": run.searched}
    predicted: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    if run.profile is not None:
        src = str(RunFiles(run.run_dir).last_checkpoint)
        predicted = {k: predicted_block_s(run.profile, m, src) for k, m in models.items()}
    measured: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    device = None
    if measure:
        lat = run.cfg.latency
        device = measure_device(lat)
        timer = Timer(device, lat.warmup, lat.repeats)
        n = len(run.supernet.named_blocks())
        print(f"timing {n} blocks of the supernet and of the searched network on {device} at batch "
              f"{lat.batch_size} ({lat.repeats} repeats; --no-measure skips this)", file=sys.stderr)
        measured = {k: measure_blocks(m, size, lat, timer) for k, m in models.items()}

    blocks = []
    after = dict(run.searched.named_blocks())
    for name, b in run.supernet.named_blocks():
        a = after[name]
        row = {"name": name, "in": b.in_channels, "out": b.out_channels, "stride": b.stride,
               "kernel_sizes_before": b.kernel_sizes, "kernel_sizes_after": a.kernel_sizes,
               "widths_before": b.widths, "widths_after": a.widths,
               "params_before": count_params(b), "params_after": count_params(a),
               "macs_before": macs_under(macs["before"], name), "macs_after": macs_under(macs["after"], name)}
        for kind in ("predicted", "measured"):
            for when in ("before", "after"):
                row[f"latency_ms_{kind}_{when}"] = _ms({"predicted": predicted, "measured": measured}[kind][when]
                                                       .get(name))
        blocks.append(row)

    s = run.summary
    totals = {
        "params_before": s.get("params"), "params_after": s.get("params_searched"),
        "macs_before": s.get("macs"), "macs_after": s.get("macs_searched"),
        "branches_before": sum(len(r["widths_before"]) for r in blocks),
        "branches_after": sum(len(r["widths_after"]) for r in blocks),
        "hidden_channels_before": sum(sum(r["widths_before"]) for r in blocks),
        "hidden_channels_after": sum(sum(r["widths_after"]) for r in blocks),
        "latency_ms_predicted_before": _ms(run.supernet_predicted_s),
        "latency_ms_predicted_after": s.get("latency_ms_searched_predicted"),
        # What no shrink changes (stem, shortcuts, fuse sums, head conv, classifier) and, without a fitted
        # whole-network calibration, the supernet's offset: blocks + fixed + context = predicted.
        "latency_ms_predicted_fixed": _ms(run.profile.fixed_part_s()) if run.profile is not None else None,
        "latency_ms_predicted_context": _ms(run.profile.context_part_s()) if run.profile is not None
        else None,
        "latency_ms_measured_before": s.get("latency_ms_supernet"),
        "latency_ms_measured_after": s.get("latency_ms_searched"),
        "latency_ms_blocks_measured_before": _ms(sum(measured["before"].values())) if measure else None,
        "latency_ms_blocks_measured_after": _ms(sum(measured["after"].values())) if measure else None,
        "val_top1": s.get("val_top1"), "shrinks": len(run.shrinks),
    }
    lat = run.cfg.latency
    info = {"run_dir": str(run.run_dir), "penalty": run.cfg.prune.penalty, "image_size": size,
            "latency_device": lat.device, "latency_batch_size": lat.batch_size, "latency_threads": lat.threads,
            "measured_on": str(device) if device is not None else None,
            "epochs": s.get("epochs"), "steps": s.get("steps")}
    return {"format": REPORT_FORMAT, "run": info, "blocks": blocks, "totals": totals, "shrinks": run.shrinks,
            "schedule_png": None}


def write_schedule_png(run: Run) -> Path | None:
    """Plot the schedule from TensorBoard (or, without it, from shrinks.jsonl) into RUN_DIR/report_schedule.png."""
    series = read_schedule(RunFiles(run.run_dir).tensorboard)
    if not series:
        series = schedule_from_shrinks(run.shrinks, _ms(run.supernet_predicted_s))
    if not series:
        print(f"note: nothing to plot ({RunFiles(run.run_dir).tensorboard} has no prune/* scalars and the run "
              "never shrank)",
              file=sys.stderr)
        return None
    path = RunFiles(run.run_dir).schedule_png
    plot_schedule(series, path, f"{run.run_dir.name}: penalty {run.cfg.prune.penalty}, latency on "
                                f"{run.cfg.latency.device} at batch {run.cfg.latency.batch_size}",
                  supernet_measured_ms=run.summary.get("latency_ms_supernet"))
    return path


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished search run (its log.run_dir)")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    parser.add_argument("--out", metavar="FILE", help="write the report to FILE instead of stdout")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip timing the blocks here (measured per-block latencies are left out)")
    args = parser.parse_args(argv)
    problem = writable_file_problem(args.out) if args.out else ""
    if problem:  # found out before the report is built (and its blocks timed), not after
        raise UserError(f"cannot write {args.out} ({problem}): choose a writable --out")

    run = load_run(args.run_dir)
    report = build_report(run, measure=not args.no_measure)
    png = write_schedule_png(run)
    report["schedule_png"] = str(png) if png else None
    if args.format == "json":
        text = json.dumps(report, indent=2)
    elif args.format == "markdown":
        link = None
        if png is not None:  # relative to where the markdown ends up, so the image shows when rendered
            link = os.path.relpath(png, Path(args.out).resolve().parent) if args.out else str(png)
        text = format_markdown(report, link)
    else:
        text = format_text(report)
    if args.out:
        try:
            atomic_write_text(args.out, text + "\n")
        except OSError as err:
            raise UserError(f"cannot write {args.out} ({err.strerror or err}): choose a writable --out") from None
        print(f"report written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
