"""``opd bias-lab``: exact bias and variance of the temporal-credit estimators (own options)."""

from __future__ import annotations

NAME = "bias-lab"
HELP = "exact bias and variance of the temporal-credit estimators (opd bias-lab --help)"
RAW_ARGV = True


def run(argv: list[str]) -> int:
    from opd.lab.bias_lab import main

    return main(argv)
