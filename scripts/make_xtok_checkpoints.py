"""Regenerate the cross-tokenizer demo teacher shipped in ``opd/assets/arith_bpe/teacher``.

    python scripts/make_xtok_checkpoints.py            # a few minutes on 2 CPU cores

The arith teacher retrained with its own BPE tokenizer (:mod:`opd.tasks.arith_bpe`). Deterministic:
fixed seeds and ``torch.set_num_threads(2)`` (``--threads``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save the checkpoint; ``argv`` as on the command line (``--help`` for options)."""
    from opd.tasks.arith_bpe import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
