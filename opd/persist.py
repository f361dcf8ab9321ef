"""What a run saves and restores: a step's checkpoint, the final model, and resuming from them.

Built on :mod:`opd.checkpoint` (the on-disk format, atomic writes, fallback to an intact
checkpoint). Unsharded runs (one process, DDP) keep the student's weights and the optimizer state
in plain files, written by the main process. Sharded runs (FSDP, DeepSpeed ZeRO) gather the
student's full weights for the Hugging Face folder (a collective: every process calls these
functions) and keep the sharded optimizer state through ``accelerator.save_state`` /
``load_state``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType

from opd.checkpoint import WRITER_ERRORS, checkpoint_dir, list_checkpoints, load_latest_intact, save_checkpoint
from opd.io import atomic_dir
from opd.lora import apply_student_weights, save_student

if TYPE_CHECKING:
    from opd.components import Components

__all__ = ["is_sharded", "last_checkpoint_step", "restore", "save_final", "save_step"]

_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


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
    t, acc = parts.cfg.train, parts.accelerator
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
        path = save_checkpoint(parts.run_dir, step, parts.student, parts.tokenizer,
                               None if write_sharded is not None else parts.optimizer, parts.scheduler,
                               None if write_sharded is not None else parts.value_head, keep=t.keep_checkpoints,
                               state_dict=weights, write_sharded=write_sharded)
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
    """Load the newest intact checkpoint of ``run_dir`` into the run's parts; returns its step."""
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
    for overrides in parts.monitor.resume(state.step):  # recipes applied before the checkpoint
        parts.apply_recipe(overrides)
    if echo is not None:
        echo(f"opd: resuming {run_dir} from step {state.step} ({ckpt.path.name})")
    return state.step


def last_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest checkpoint folder, -1 when there is none."""
    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else -1
