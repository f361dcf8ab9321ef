"""Regenerate the arith checkpoints shipped in ``opd/assets/arith/`` (teacher, student, smoke pair).

    python scripts/make_arith_checkpoints.py            # all four, a few minutes on 2 CPU cores
    python scripts/make_arith_checkpoints.py --only smoke_teacher smoke_student

Deterministic: fixed seeds and ``torch.set_num_threads(2)``. The training code lives in
:mod:`opd.tasks.arith_checkpoints` so that the installed package can run it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save the checkpoints; ``argv`` as on the command line (``--help`` for options)."""
    from opd.tasks.arith_checkpoints import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
