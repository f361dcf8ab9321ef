"""Regenerate the case-study checkpoints shipped in ``opd/assets/<case>/`` (fork, route, modes, long).

    python scripts/make_case_checkpoints.py                       # all cases, teacher then student
    python scripts/make_case_checkpoints.py --only fork --role student

Deterministic: fixed seeds and ``torch.set_num_threads(1)``. The training code lives in
:mod:`opd.tasks.case_checkpoints` so that the installed package can run it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save the checkpoints; ``argv`` as on the command line (``--help`` for options)."""
    from opd.tasks.case_checkpoints import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
