"""The code that trains the checkpoints shipped with opd (package data under ``opd/assets/``, found by
:mod:`opd.tasks.assets` as ``builtin:<family>/<name>``). One command regenerates a family,
deterministically (fixed seeds and thread count)::

    opd make-checkpoints arith                 # opd/assets/arith/{teacher,student,smoke_teacher,smoke_student}
    opd make-checkpoints cases --only fork     # opd/assets/<case>/{teacher,student}
    opd make-checkpoints chat                  # opd/assets/arith_chat/{teacher,student}
    opd make-checkpoints arith_bpe             # opd/assets/arith_bpe/teacher (cross-tokenizer demo)

* :mod:`opd.shipped.arith`, :mod:`opd.shipped.cases`, :mod:`opd.shipped.chat`,
  :mod:`opd.shipped.arith_bpe` — one family each: its phases and its ``main(argv)``;
* :mod:`opd.shipped.sft` — the supervised loop the families share; :mod:`opd.shipped.options` — their
  shared command-line options; :mod:`opd.shipped.save` — writing a checkpoint folder with its card.

It sits on the top floor beside the commands: it trains with the rollout engine and the evaluator,
and nothing below imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["FAMILIES", "main"]

#: The checkpoint families and what each regenerates.
FAMILIES: dict[str, str] = {
    "arith": "the arith teacher, student and smoke pair (opd/assets/arith)",
    "cases": "the case-study pairs fork, route, modes, long (opd/assets/<case>)",
    "chat": "the arith_chat teacher and student (opd/assets/arith_chat)",
    "arith_bpe": "the arith teacher with its own BPE tokenizer (opd/assets/arith_bpe)",
}

USAGE = ("usage: opd make-checkpoints FAMILY [options]   (opd make-checkpoints FAMILY --help for its options)\n"
         "families:\n" + "".join(f"  {name:<10} {what}\n" for name, what in FAMILIES.items()))


def family_main(family: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv)`` of ``family`` (imported on use: each pulls in torch and the trainers).

    Raises:
        ValueError: unknown family (the message lists them).
    """
    if family == "arith":
        from opd.shipped.arith import main
    elif family == "cases":
        from opd.shipped.cases import main
    elif family == "chat":
        from opd.shipped.chat import main
    elif family == "arith_bpe":
        from opd.shipped.arith_bpe import main
    else:
        raise ValueError(f"unknown checkpoint family {family!r}; choose one of {', '.join(FAMILIES)}")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """``opd make-checkpoints FAMILY [options]``: train and save one family; its exit status (2 for a
    missing or unknown family, with the usage on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not argv or argv[0] not in FAMILIES:
        given = f"unknown family {argv[0]!r}\n" if argv else "name a family\n"
        print(f"error: {given}{USAGE}", end="", file=sys.stderr)
        return 2
    return family_main(argv[0])(argv[1:])
