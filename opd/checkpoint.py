"""Resumable checkpoints: the student in Hugging Face format plus the trainer state.

Layout of ``<run>/checkpoints/step-000050/``::

    model/              save_pretrained (weights + config + tokenizer): any HF tool loads it
    trainer_state.pt    optimizer, LR scheduler, value head, step

Exact resume needs nothing else: prompts and sampling are seeded from ``(seed, step)``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    value_head: dict[str, Any] | None = None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, value_head: torch.nn.Module | None,
                    *, keep: int) -> Path:
    """Write a checkpoint for ``step`` and prune older ones beyond ``keep``."""
    path = checkpoint_dir(run_dir, step)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "value_head": None if value_head is None else value_head.state_dict(),
    }, tmp / "trainer_state.pt")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a checkpoint is either complete or absent
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(
            f"no checkpoint under {run_dir / 'checkpoints'}; a run writes one every "
            "train.checkpoint_every steps and when it stops (train.stop_after) — nothing to resume"
        )
    return ckpts[-1]


def load_trainer_state(path: Path) -> TrainerState:
    raw = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return TrainerState(step=int(raw["step"]), optimizer=raw["optimizer"], scheduler=raw["scheduler"],
                        value_head=raw.get("value_head"))


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the checkpoint's weights into ``model`` (same architecture) in place."""
    from safetensors.torch import load_file

    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path / 'model'}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are stored once; anything else missing is an error
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
