"""Writing a shipped checkpoint folder (package data under ``opd/assets/``): the model, its tokenizer
and an ``opd_card.json`` that records how it was made, replaced atomically and world-readable."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["log", "save_shipped_checkpoint", "train_and_save"]


def log(line: str) -> None:
    """A trainer's progress line, printed at once (training runs for minutes)."""
    print(line, flush=True)


def train_and_save(train: Callable[[], tuple[Any, dict[str, Any]]], tokenizer: Any, folder: Path, /,
                   **card: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Run ``train()`` (returns the model and its card), add ``card``'s entries to the card and
    write the checkpoint into ``folder``; returns ``(model, card, bytes on disk)``. A
    ``RuntimeError`` of ``train`` (a checkpoint outside its accepted range) is printed as
    ``error: …`` on stderr and gives None: the caller exits with status 1."""
    try:
        model, made = train()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    made.update(card)
    return model, made, save_shipped_checkpoint(model, tokenizer, made, folder)


def save_shipped_checkpoint(model: Any, tokenizer: Any, card: dict[str, Any], folder: Path) -> int:
    """Write ``model`` + ``tokenizer`` (``save_pretrained``) + ``card`` (with ``bytes_on_disk`` added)
    into ``folder``, replacing it atomically (a temporary sibling renamed when complete); returns the
    bytes on disk of the model and tokenizer files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is package data
        for p in tmp.iterdir():
            p.chmod(0o644)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        (tmp / "opd_card.json").write_text(json.dumps({**card, "bytes_on_disk": size}, indent=2) + "\n")
        (tmp / "opd_card.json").chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return size
