"""Arguments shared by the commands that read a run's configuration (``distill``, ``doctor``)."""

from __future__ import annotations

import argparse

__all__ = ["add_config_arguments"]


def add_config_arguments(parser: argparse.ArgumentParser, *, config_help: str, overrides_example: str) -> None:
    """The positional ``config`` (a YAML file, optional) and the dotted ``overrides`` after it."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
