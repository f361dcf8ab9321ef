"""``opd config-help [SECTION]``: every option with its type, default, range and meaning."""

from __future__ import annotations

import argparse

NAME = "config-help"
HELP = "document every config option"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", nargs="?", help="one section only (e.g. route2)")


def run(args: argparse.Namespace) -> int:
    from opd.config.docs import format_config_help

    print(format_config_help(args.section))
    return 0
