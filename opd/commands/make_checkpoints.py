"""``opd make-checkpoints``: regenerate the shipped arith checkpoints (own options)."""

from __future__ import annotations

NAME = "make-checkpoints"
HELP = "regenerate the shipped arith checkpoints (opd make-checkpoints --help)"
RAW_ARGV = True


def run(argv: list[str]) -> int:
    from opd.tasks.arith_checkpoints import main

    return main(argv)
