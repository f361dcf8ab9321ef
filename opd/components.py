"""The parts of a run, held in one object.

A :class:`Components` holds the student and its tokenizer, the task, the teacher and reference
(both see the *initial* student), the objective, the rollout engine, the prepared training module,
the optimizer and LR schedule, the value head, the monitor and the run log. The loop
(:mod:`opd.train`) and the step (:mod:`opd.step`) take this object and nothing else.
:func:`opd.assemble.build_components` builds it, in one place: adding an engine or a wrapper
touches that function and the component's own module only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.build import (
    build_reference,
    special_token_ids,
)
from opd.config.load import dump_config, with_overrides
from opd.config.schema import Config
from opd.config.validate import resolve_teacher_access
from opd.monitor import Monitor
from opd.objective import Objective
from opd.rollout.engine import RolloutEngine
from opd.rundir import RunFolderLock
from opd.runlog import RunLog
from opd.tasks.base import Task
from opd.teachers import Teacher

__all__ = ["BatchPrefetch", "Components"]


class BatchPrefetch(Protocol):
    """Prepares step batches ahead of the loop (:class:`opd.overlap.Prefetcher`)."""

    def batch(self, step: int) -> tuple[Any, int]:
        """The batch of ``step`` and its policy lag in steps."""
        ...

    def close(self) -> None: ...


@dataclass
class Components:
    """Everything a run's steps read or update (see the module docstring).

    ``cfg``, ``objective``, ``reference``, ``access`` and ``chunked`` may change during a run when
    the monitor applies a stabilization recipe (:meth:`apply_recipe`).
    """

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # the prepared PolicyModule (student + value head) the update runs through
    student: PreTrainedModel  # the student itself: sampling, teachers that read it, saving
    tokenizer: PreTrainedTokenizerBase
    task: Task
    teacher: Teacher
    reference: Teacher | None
    objective: Objective
    engine: RolloutEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    value_head: torch.nn.Module | None
    monitor: Monitor
    log: RunLog
    vocab: int
    access: str
    chunked: bool
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lock: RunFolderLock | None = None  # the run folder's lock, held while the run is live (main process)
    prefetch: BatchPrefetch | None = None  # rollout.overlap: the next step's batch, prepared in the background
    value_source: Any = None  # route2.value=exact_mc/critic, value probe (opd.value_source.ValueSource)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def teacher_model(self) -> torch.nn.Module | None:
        """The in-process teacher network (teacher-mixed and off-policy teacher sampling, eval)."""
        return getattr(self.teacher, "model", None)

    def objective_for(self, cfg: Config) -> Objective:
        return Objective.from_config(cfg, eos_id=self.tokenizer.eos_token_id,
                                     special_ids=special_token_ids(self.tokenizer),
                                     diagnostics=cfg.monitor.diagnostics)

    def apply_recipe(self, overrides: tuple[str, ...]) -> Config:
        """``monitor.*_action=apply``: switch to the config with ``overrides`` — its objective,
        reference and teacher access — keeping the LR schedule's shape around a new peak."""
        new = with_overrides(self.cfg, list(overrides))
        objective = self.objective_for(new)
        if objective.needs_value_head and self.value_head is None:
            raise ValueError("the recipe needs a value head, which this run did not build")
        if self.reference is None:
            self.reference = build_reference(new, self.student, self.tokenizer, self.device)
        if new.train.lr != self.cfg.train.lr:
            for g in self.optimizer.param_groups:
                g["lr"] *= new.train.lr / self.cfg.train.lr
            self.scheduler.base_lrs = [new.train.lr for _ in self.scheduler.base_lrs]
        self.cfg, self.objective = new, objective
        self.chunked = objective.use_chunked(self.vocab)
        self.access = resolve_teacher_access(new)
        if self.main:
            dump_config(new, self.run_dir / "config.applied.yaml")
        self.monitor.cfg = new
        return new

    def close(self) -> None:
        """Release what the run holds: the background sampler, the engine, the log writers, the lock."""
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None
        self.engine.close()
        self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
