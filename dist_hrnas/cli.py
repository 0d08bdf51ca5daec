"""Command-line plumbing shared by the entry points: ``--config FILE [section.key=value ...]``."""
from __future__ import annotations

import argparse

from dist_hrnas.config import Config, describe_fields, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config key, e.g. train.epochs=2 model.kernel_sizes=[3,5]")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")


def config_from_args(args: argparse.Namespace) -> Config | None:
    """The validated config, or None after printing --help-config."""
    if args.help_config:
        print(describe_fields())
        return None
    return load_config(args.config, args.overrides)
