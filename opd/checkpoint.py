"""Resumable checkpoints — the on-disk format, and what a run saves and restores through it.

A checkpoint is the student in Hugging Face format plus the trainer state.

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

Saving and resuming a run (:func:`save_step`, :func:`save_final`, :func:`restore`): unsharded runs
(one process, DDP) keep the student's weights and the optimizer state in plain files, written by
the main process. Sharded runs (FSDP, DeepSpeed ZeRO) gather the student's full weights for the
Hugging Face folder (a collective: every process calls these functions) and keep the sharded
optimizer state through ``accelerator.save_state`` / ``load_state``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError

from opd.io import atomic_dir
from opd.lora import apply_student_weights, save_student

if TYPE_CHECKING:
    from opd.components import Components

__all__ = ["WRITER_ERRORS", "Checkpoint", "TrainerState", "checkpoint_dir", "is_sharded", "last_checkpoint_step",
           "list_checkpoints", "load_latest_intact", "read_checkpoint", "restore", "save_final", "save_step"]

_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)

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


def _write_checkpoint(parts: Components, step: int, weights: dict[str, torch.Tensor] | None,
                      write_sharded: Callable[[Path], None] | None) -> Path:
    """Write the checkpoint of ``step`` atomically and prune older ones beyond ``train.keep_checkpoints``.

    ``weights``: the student's full weights when its own are sharded (gathered by the caller).
    ``write_sharded(folder)``: writes the sharded optimizer and model state (FSDP / DeepSpeed, through
    ``accelerator.save_state``; the optimizer and value head are then not written here) — the caller
    runs it on every process.

    Raises:
        opd.io.WriteError: the checkpoint could not be written (nothing of it is left behind).
    """
    run_dir, keep = parts.run_dir, parts.cfg.train.keep_checkpoints
    optimizer = None if write_sharded is not None else parts.optimizer
    value_head = None if write_sharded is not None else parts.value_head
    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path, what=f"the checkpoint of step {step}", failures=WRITER_ERRORS) as tmp:
        save_student(parts.student, parts.tokenizer, tmp / "model", merged=False, state_dict=weights)
        if write_sharded is not None:
            write_sharded(tmp / "accelerate")
        torch.save({
            "step": step,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
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


# ---------------------------------------------------------------------------------------------
# saving and resuming a run
def is_sharded(parts: Components) -> bool:
    """Whether accelerate shards the prepared model's parameters across processes."""
    return parts.accelerator.distributed_type in _SHARDED


def _full_student_state(parts: Components) -> dict[str, torch.Tensor] | None:
    """The student's full weights gathered from the shards (collective); None when unsharded."""
    if not is_sharded(parts):
        return None
    state = parts.accelerator.get_state_dict(parts.model)  # PolicyModule keys: student.* / value_head.*
    prefix = "student."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_step(parts: Components, step: int) -> Path | None:
    """Checkpoint of ``step``; every process calls it (the main process writes). Returns the folder
    on the main process.

    Raises:
        opd.io.WriteError: the checkpoint could not be written (the older ones are intact).
    """
    acc = parts.accelerator
    write_sharded: Callable[[Path], None] | None = None
    if is_sharded(parts):
        staging = checkpoint_dir(parts.run_dir, step).with_name(f"step-{step:06d}.accelerate.tmp")
        if parts.main and staging.exists():
            shutil.rmtree(staging)
        acc.wait_for_everyone()
        acc.save_state(str(staging))  # sharded optimizer and model state, every process writes its part
        acc.wait_for_everyone()

        def write_sharded(folder: Path) -> None:
            staging.rename(folder)

    weights = _full_student_state(parts)
    path = None
    if parts.main:
        path = _write_checkpoint(parts, step, weights, write_sharded)
    acc.wait_for_everyone()
    return path


def save_final(parts: Components) -> None:
    """``<run>/final``: the trained student in Hugging Face format, written atomically (every process
    calls it; the main process writes). A LoRA student is written merged (``W + (α/r)·B A``), so
    any HF tool loads ``final/`` without peft."""
    weights = _full_student_state(parts)
    if parts.main:
        with atomic_dir(parts.run_dir / "final", what="the final model", failures=WRITER_ERRORS) as tmp:
            save_student(parts.student, parts.tokenizer, tmp, merged=True, state_dict=weights)
    parts.accelerator.wait_for_everyone()


def restore(parts: Components, run_dir: Path, echo: Callable[[str], None] | None) -> int:
    """Load the newest intact checkpoint of ``run_dir`` into the run's parts; returns its step.

    The recipes the monitor applied before that step are not replayed here: the loop applies
    ``parts.monitor.resume(step)`` again (:func:`opd.assemble.apply_recipe`)."""
    ckpt = load_latest_intact(run_dir, warn=echo, weights=not is_sharded(parts))
    state = ckpt.state
    if is_sharded(parts):
        parts.accelerator.load_state(str(ckpt.path / "accelerate"))
    else:
        apply_student_weights(parts.student, ckpt.weights, ckpt.path)
        parts.optimizer.load_state_dict(state.optimizer)
        if parts.value_head is not None and state.value_head is not None:
            parts.value_head.load_state_dict(state.value_head)
    parts.scheduler.load_state_dict(state.scheduler)
    parts.engine.sync_weights(parts.student)
    parts.log.truncate_after(state.step, warn=echo)
    if echo is not None:
        echo(f"opd: resuming {run_dir} from step {state.step} ({ckpt.path.name})")
    return state.step


def last_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest checkpoint folder, -1 when there is none."""
    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else -1
