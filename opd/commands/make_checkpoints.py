"""``opd make-checkpoints FAMILY``: regenerate a family of shipped checkpoints (:mod:`opd.shipped`)."""

from __future__ import annotations

NAME = "make-checkpoints"
HELP = "regenerate shipped checkpoints: arith, cases, chat or arith_bpe (opd make-checkpoints --help)"
RAW_ARGV = True


def run(argv: list[str]) -> int:
    from opd.shipped import main

    return main(argv)
