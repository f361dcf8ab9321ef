"""Writing a shipped checkpoint folder (package data under ``opd/assets/``): the model, its tokenizer
and an ``opd_card.json`` that records how it was made, replaced atomically and world-readable."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["save_shipped_checkpoint"]


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
