"""``opd methods``: every method preset with the variables it sets and its sources."""

from __future__ import annotations

import argparse

NAME = "methods"
HELP = "list the method presets and the variables each sets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from opd.config.docs import format_methods

    print(format_methods())
    return 0
