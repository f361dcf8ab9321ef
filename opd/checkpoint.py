"""Resumable checkpoints: the student in Hugging Face format plus the trainer state.

Layout of ``<run>/checkpoints/step-000050/``::

    model/              save_pretrained (weights + config + tokenizer): any HF tool loads it;
                        for a LoRA student the adapter only (opd/lora.py), which peft loads
    trainer_state.pt    optimizer, LR scheduler, value head, step

Exact resume needs nothing else: prompts and sampling are seeded from ``(seed, step)``.

A checkpoint is written into ``step-000050.tmp`` and renamed when complete (:func:`opd.io.atomic_dir`),
so a crash or a full disk leaves either the whole checkpoint or none, and the older ones intact.
:func:`load_latest_intact` reads the newest checkpoint that loads completely; a damaged one (a
file truncated or corrupted later) is skipped with a message naming the file, and the next older
one is used.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opd.io import atomic_dir
from opd.lora import save_student

__all__ = ["WRITER_ERRORS", "Checkpoint", "TrainerState", "checkpoint_dir", "list_checkpoints", "load_latest_intact",
           "save_checkpoint"]

STEP_DIR = re.compile(r"^step-(\d+)$")
#: what the serializers raise when a write fails (``torch.save``: ``RuntimeError: [enforce fail at
#: inline_container.cc] unexpected pos`` on a full disk; safetensors: ``SafetensorError``), read as a
#: failed write (:func:`opd.io.writer_failure`) rather than a crash
WRITER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, SafetensorError)


@dataclass(frozen=True)
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    value_head: dict[str, Any] | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read completely into memory (nothing applied yet)."""

    path: Path
    state: TrainerState
    weights: dict[str, torch.Tensor]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any, value_head: torch.nn.Module | None,
                    *, keep: int, state_dict: dict[str, torch.Tensor] | None = None,
                    write_sharded: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint for ``step`` atomically and prune older ones beyond ``keep``.

    ``state_dict``: the student's full weights when ``model``'s own are sharded (gathered by the
    caller). ``write_sharded(folder)``: writes the sharded optimizer state (FSDP / DeepSpeed, through
    ``accelerator.save_state``; then ``optimizer`` is None) — the caller runs it on every process.

    Raises:
        opd.io.WriteError: the checkpoint could not be written (nothing of it is left behind).
    """
    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path, what=f"the checkpoint of step {step}", failures=WRITER_ERRORS) as tmp:
        save_student(model, tokenizer, tmp / "model", merged=False, state_dict=state_dict)
        if write_sharded is not None:
            write_sharded(tmp / "accelerate")
        torch.save({
            "step": step,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "value_head": None if value_head is None else value_head.state_dict(),
        }, tmp / "trainer_state.pt")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints of a run (complete folders: ``trainer_state.pt`` present), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path, *, weights: bool = True) -> Checkpoint:
    """Read ``path`` completely (trainer state and, with ``weights``, the model weights; without,
    the weight files are only checked to be readable safetensors headers).

    Raises:
        ValueError: a file is missing, truncated or corrupt (the message names it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_file = path / "trainer_state.pt"
    try:
        raw = torch.load(state_file, map_location="cpu", weights_only=False)
        state = TrainerState(step=int(raw["step"]), optimizer=raw["optimizer"], scheduler=raw["scheduler"],
                             value_head=raw.get("value_head"))
    except Exception as err:  # noqa: BLE001 — any failure to read means the file is damaged
        raise ValueError(f"{state_file} is damaged ({type(err).__name__}: {err})") from None
    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {path / 'model'}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if weights:
                tensors.update(load_file(str(f)))
            else:
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{f} is damaged ({type(err).__name__}: {err})") from None
    return Checkpoint(path=path, state=state, weights=tensors)


def load_latest_intact(run_dir: Path, *, warn: Callable[[str], None] | None = None,
                       weights: bool = True) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that reads completely; damaged newer ones are reported
    through ``warn`` and skipped.

    Raises:
        FileNotFoundError: the run has no checkpoint, or none of its checkpoints is intact.
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(
            f"no checkpoint under {run_dir / 'checkpoints'}: nothing to resume (a run writes one every "
            "train.checkpoint_every steps, when it is interrupted, and when it stops early)")
    problems = []
    for path in reversed(ckpts):
        try:
            ckpt = read_checkpoint(path, weights=weights)
        except ValueError as err:
            problems.append(str(err))
            if warn is not None:
                warn(f"opd: checkpoint {path.name} cannot be used: {err}; trying the previous one")
            continue
        if problems and warn is not None:
            warn(f"opd: resuming from the newest intact checkpoint, {path.name} (step {ckpt.state.step})")
        return ckpt
    raise FileNotFoundError(f"no intact checkpoint under {run_dir / 'checkpoints'}: " + "; ".join(problems))
