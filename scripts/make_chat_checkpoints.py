"""Regenerate the chat demo pair shipped in ``opd/assets/arith_chat/`` (teacher, student).

    python scripts/make_chat_checkpoints.py            # teacher then student; minutes on 2 CPU cores

Multi-turn conversations with tool turns (:mod:`opd.tasks.arith_chat`, :mod:`opd.tasks.chat_checkpoints`). Deterministic:
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
    from opd.tasks.chat_checkpoints import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
