"""``opd report RUN_DIR [RUN_DIR ...]``: the HTML + Markdown report of one run, or a comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "report"
HELP = "write the HTML/Markdown report of one or more runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (several: a side-by-side comparison)")
    parser.add_argument("--out", help="output folder (default: the run folder, or runs/compare-<time>)")


def run(args: argparse.Namespace) -> int:
    from opd.report import write_report

    paths = write_report([Path(p) for p in args.runs], out=Path(args.out) if args.out else None)
    for p in paths:
        print(p)
    return 0
