"""``python -m dist_hrnas.summary --config FILE [key=value ...] [--json]``: per-block widths, params, MACs."""
from __future__ import annotations

import argparse
import json
import sys

from dist_hrnas.cli import add_config_args, config_from_args
from dist_hrnas.errors import exits_cleanly_on_user_error
from dist_hrnas.models import HRNet, build_model, count_macs, count_params
from dist_hrnas.models.counting import macs_under


def summarize(model: HRNet, image_size: int) -> dict:
    """Totals and one row per atomic block for ``model`` at ``image_size`` x ``image_size``."""
    macs = count_macs(model, model.spec.image_channels, image_size)
    rows = []
    for name, block in model.named_blocks():
        rows.append({"name": name, "in": block.in_channels, "out": block.out_channels, "stride": block.stride,
                     "kernel_sizes": block.kernel_sizes, "widths": block.widths,
                     "params": count_params(block), "macs": macs_under(macs, name)})
    return {
        "params": count_params(model),
        "macs": sum(macs.values()),
        "blocks": len(rows),
        "branches": sum(len(r["widths"]) for r in rows),
        "hidden_channels": sum(sum(r["widths"]) for r in rows),
        "image_size": image_size,
        "per_block": rows,
    }


def format_table(summary: dict) -> str:
    header = f"{'block':<34} {'in->out':>9} {'s':>1} {'kernels':<10} {'widths':<16} {'params':>10} {'MACs':>13}"
    lines = [header, "-" * len(header)]
    for r in summary["per_block"]:
        kernels = ",".join(map(str, r["kernel_sizes"])) or "-"
        widths = ",".join(map(str, r["widths"])) or "- (shortcut)"
        lines.append(f"{r['name']:<34} {str(r['in']) + '->' + str(r['out']):>9} {r['stride']:>1} {kernels:<10} "
                     f"{widths:<16} {r['params']:>10,} {r['macs']:>13,}")
    lines.append("-" * len(header))
    lines.append(f"total: {summary['params']:,} params, {summary['macs']:,} MACs at {summary['image_size']}px; "
                 f"{summary['blocks']} atomic blocks, {summary['branches']} kernel branches, "
                 f"{summary['hidden_channels']:,} hidden channels")
    return "\n".join(lines)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_hrnas.summary", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 0
    summary = summarize(build_model(cfg.model), cfg.data.image_size)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
