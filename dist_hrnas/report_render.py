"""Rendering for :mod:`dist_hrnas.report`: the text and markdown tables, and the schedule PNG.

The PNG's top panel: predicted seconds pruned against step (``prune/seconds_pruned``, plus the planned schedule
``schedule/seconds_pruned_planned`` when the run logged one). Bottom panel: predicted latency
(``prune/latency_ms_predicted``) and the latency measured after each shrink (``prune/latency_ms_measured``).
"""
from __future__ import annotations

from pathlib import Path

from dist_hrnas.errors import UserError
from dist_hrnas.fileio import atomic_write
from dist_hrnas.names import Tags

Series = list[tuple[int, float]]

TAG_PRUNED, TAG_PLANNED = Tags.SECONDS_PRUNED, Tags.PLANNED_PRUNED
TAG_PREDICTED, TAG_MEASURED = Tags.LATENCY_PREDICTED, Tags.LATENCY_MEASURED
SCHEDULE_TAGS = (TAG_PRUNED, TAG_PLANNED, TAG_PREDICTED, TAG_MEASURED)


def read_schedule(tb_dir: Path) -> dict[str, Series]:
    """The schedule series in the TensorBoard event files under ``tb_dir`` ({} when there are none)."""
    if not tb_dir.is_dir():
        return {}
    # Imported here: tensorboard's event reader takes a second to import and is only needed for the plot.
    from dist_hrnas.metrics import read_scalars

    scalars = read_scalars(tb_dir)
    return {tag: scalars[tag] for tag in SCHEDULE_TAGS if scalars.get(tag)}


def schedule_from_shrinks(shrinks: list[dict], supernet_predicted_ms: float | None) -> dict[str, Series]:
    """A coarser schedule (one point per shrink) for runs logged without TensorBoard (log.tensorboard=false)."""
    out: dict[str, Series] = {}
    if not shrinks:
        return out
    out[TAG_PREDICTED] = [(int(r["step"]), float(r["latency_ms_predicted_after"])) for r in shrinks]
    out[TAG_MEASURED] = [(int(r["step"]), float(r["latency_ms_measured_after"])) for r in shrinks]
    if supernet_predicted_ms is not None:  # the supernet, before anything was pruned, starts both curves
        out[TAG_PREDICTED].insert(0, (0, supernet_predicted_ms))
        out[TAG_PRUNED] = [(step, (supernet_predicted_ms - ms) / 1e3) for step, ms in out[TAG_PREDICTED]]
    return out


def _xy(series: Series) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def plot_schedule(series: dict[str, Series], path: Path, title: str,
                  supernet_measured_ms: float | None = None) -> None:
    """Draw ``series`` (keyed by TensorBoard tag) into the PNG ``path``, written atomically.

    ``supernet_measured_ms`` starts the measured curve at step 0: the search measures only after shrinks.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines that run searches
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.0), constrained_layout=True)
    try:
        if TAG_PRUNED in series:
            x, y = _xy(series[TAG_PRUNED])
            top.plot(x, [v * 1e3 for v in y], label="predicted seconds pruned", color="tab:blue")
        if TAG_PLANNED in series:
            x, y = _xy(series[TAG_PLANNED])
            top.plot(x, [v * 1e3 for v in y], label="planned", color="tab:gray", linestyle="--")
        top.set_ylabel("pruned [ms]")
        top.set_title(title)
        if TAG_PREDICTED in series:
            x, y = _xy(series[TAG_PREDICTED])
            bottom.plot(x, y, label="predicted", color="tab:orange")
        measured = list(series.get(TAG_MEASURED, []))
        if supernet_measured_ms is not None:
            measured.insert(0, (0, supernet_measured_ms))
        if measured:
            x, y = _xy(measured)
            bottom.plot(x, y, label="measured (supernet, then after each shrink)", color="tab:red", marker="o",
                        linestyle=":")
        bottom.set_ylabel("network latency [ms]")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize="small")
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        except OSError as err:
            raise UserError(f"cannot write {path} ({err.strerror or err}): make {path.parent} writable") from None
    finally:
        plt.close(fig)



# ---------------------------------------------------------------- tables
def _num(v: float | int | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pair(a: float | int | None, b: float | int | None, fmt: str, arrow: str) -> str:
    if a is None and b is None:
        return "-"
    return f"{_num(a, fmt)} {arrow} {_num(b, fmt)}"


def _ints(xs: list[int]) -> str:
    return ",".join(map(str, xs)) or "-"  # "-": no branch left, only the shortcut


def _change(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or not a:
        return ""
    return f"{(b / a - 1) * 100:+.1f}%"


def _sum(rows: list[dict], key: str) -> float | int | None:
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else round(sum(values), 4)


def _block_rows(report: dict, arrow: str) -> list[list[str]]:
    rows = []
    for r in report["blocks"]:
        rows.append([r["name"], f"{r['in']}->{r['out']}/{r['stride']}",
                     f"{_ints(r['kernel_sizes_before'])} {arrow} {_ints(r['kernel_sizes_after'])}",
                     f"{_ints(r['widths_before'])} {arrow} {_ints(r['widths_after'])}",
                     _pair(r["latency_ms_predicted_before"], r["latency_ms_predicted_after"], ".3f", arrow),
                     _pair(r["latency_ms_measured_before"], r["latency_ms_measured_after"], ".3f", arrow),
                     _pair(r["macs_before"], r["macs_after"], ",", arrow)])
    # The blocks' sum; the rest of the network (stem, fuse sums, head conv, classifier) is in the totals.
    b = report["blocks"]
    rows.append(["all atomic blocks", "", "", "",
                 _pair(_sum(b, "latency_ms_predicted_before"), _sum(b, "latency_ms_predicted_after"), ".3f", arrow),
                 _pair(_sum(b, "latency_ms_measured_before"), _sum(b, "latency_ms_measured_after"), ".3f", arrow),
                 _pair(_sum(b, "macs_before"), _sum(b, "macs_after"), ",", arrow)])
    return rows


BLOCK_HEADERS = ["block", "in->out/stride", "kernels", "widths", "predicted ms", "measured ms", "MACs"]
BLOCK_ALIGN = "llllrrr"


def _total_rows(t: dict) -> list[list[str]]:
    def row(label: str, key: str, fmt: str) -> list[str]:
        a, b = t[f"{key}_before"], t[f"{key}_after"]
        return [label, _num(a, fmt), _num(b, fmt), _change(a, b)]

    return [row("parameters", "params", ","), row("MACs", "macs", ","),
            row("kernel branches", "branches", ","), row("hidden channels", "hidden_channels", ","),
            row("latency predicted, ms (latency model)", "latency_ms_predicted", ".3f"),
            [" of which fixed (stem, shortcuts, fuse, head)", _num(t["latency_ms_predicted_fixed"], ".3f"),
             _num(t["latency_ms_predicted_fixed"], ".3f"), ""],
            [" of which context (supernet offset; 0 with a whole-network calibration)",
             _num(t.get("latency_ms_predicted_context"), ".3f"), _num(t.get("latency_ms_predicted_context"), ".3f"),
             ""],
            row("latency measured, ms (end to end, in the search)", "latency_ms_measured", ".3f"),
            row("atomic blocks measured here, ms (sum)", "latency_ms_blocks_measured", ".3f")]


TOTAL_HEADERS = ["", "before (supernet)", "after (searched)", "change"]
TOTAL_ALIGN = "lrrr"


def _shrink_rows(report: dict, arrow: str) -> list[list[str]]:
    rows = []
    for i, r in enumerate(report["shrinks"], 1):
        left = sum(sum(w) for w in r["widths"].values())
        rows.append([str(i), str(r["step"]), str(r["epoch"]), f"{r['channels_removed']:,}", f"{left:,}",
                     _pair(r["latency_ms_predicted_before"], r["latency_ms_predicted_after"], ".3f", arrow),
                     _num(r["latency_ms_measured_after"], ".3f"), str(r.get("arch_hash", "-"))])
    return rows


SHRINK_HEADERS = ["#", "step", "epoch", "channels removed", "channels left", "predicted ms", "measured ms after",
                  "arch hash"]
SHRINK_ALIGN = "rrrrrrrl"


def _text_table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(headers), "-" * len(line(headers))] + [line(r) for r in rows]


def _md_table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(map(esc, r)) + " |" for r in ([headers, sep] + rows)]


def _headline(report: dict) -> str:
    run, t = report["run"], report["totals"]
    top1 = "-" if t["val_top1"] is None else f"{t['val_top1'] * 100:.2f}%"
    timed = f"blocks timed on {run['measured_on']}" if run["measured_on"] else "blocks not timed (--no-measure)"
    return (f"penalty {run['penalty']}; {run['epochs']} epochs, {run['steps']} steps; val top1 {top1}; "
            f"latency target {run['latency_device']} at batch {run['latency_batch_size']}, "
            f"{run['latency_threads']} thread(s), {run['image_size']}px input; {timed}")


def format_text(report: dict) -> str:
    """Plain-text tables for a terminal."""
    out = [f"Search report: {report['run']['run_dir']}", _headline(report), "",
           "Blocks (before = supernet -> after = searched network; latency contributions in ms)"]
    out += _text_table(BLOCK_HEADERS, _block_rows(report, "->"), BLOCK_ALIGN)
    out += ["", "Totals"] + _text_table(TOTAL_HEADERS, _total_rows(report["totals"]), TOTAL_ALIGN)
    out += ["", f"Shrinks ({len(report['shrinks'])})"]
    out += _text_table(SHRINK_HEADERS, _shrink_rows(report, "->"), SHRINK_ALIGN) if report["shrinks"] \
        else ["none: the search removed no channel"]
    png = report["schedule_png"]
    out += ["", f"Schedule plot: {png}" if png else "Schedule plot: none (nothing to plot)"]
    return "\n".join(out)


def format_markdown(report: dict, png_link: str | None) -> str:
    """GitHub-flavoured markdown; ``png_link`` is the schedule PNG as the document should reference it."""
    out = [f"## Search report: `{report['run']['run_dir']}`", "", _headline(report), "",
           "### Blocks", "", "Before = supernet → after = searched network; latency contributions in ms.", ""]
    out += _md_table(BLOCK_HEADERS, _block_rows(report, "→"), BLOCK_ALIGN)
    out += ["", "### Totals", ""] + _md_table(TOTAL_HEADERS, _total_rows(report["totals"]), TOTAL_ALIGN)
    out += ["", f"### Shrinks ({len(report['shrinks'])})", ""]
    out += _md_table(SHRINK_HEADERS, _shrink_rows(report, "→"), SHRINK_ALIGN) if report["shrinks"] \
        else ["None: the search removed no channel."]
    if png_link:
        out += ["", "### Pruned-seconds schedule", "", f"![pruned-seconds schedule]({png_link})"]
    return "\n".join(out)
