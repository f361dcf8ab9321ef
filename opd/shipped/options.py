"""The command line every checkpoint family shares: ``--out``, ``--seed``, ``--threads``, the run's
settings (thread count, quiet ``save_pretrained``) and the command recorded in each card."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

__all__ = ["apply_options", "family_parser"]


def family_parser(family: str, description: str, *, out: Path, threads: int) -> argparse.ArgumentParser:
    """``opd make-checkpoints <family>``'s parser with the shared options; ``out`` is the default
    output folder, ``threads`` the default torch CPU thread count (it changes the numerics)."""
    parser = argparse.ArgumentParser(prog=f"opd make-checkpoints {family}", description=description)
    parser.add_argument("--out", type=Path, default=out, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every phase (default: 0)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads (default: {threads}; changes the numerics)")
    return parser


def apply_options(parser: argparse.ArgumentParser, args: argparse.Namespace, family: str, argv: Sequence[str]) -> str:
    """Apply the parsed shared options (``--threads`` must be >= 1) and return the command line that
    the cards record: ``opd make-checkpoints <family> <argv>``."""
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's one-shard bars
    return " ".join(["opd make-checkpoints", family, *argv])
