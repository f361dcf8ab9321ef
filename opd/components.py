"""The parts of a run, held in one object.

A :class:`Components` holds the student and its tokenizer, the task, the teacher and reference
(both see the *initial* student), the objective, the rollout engine, the prepared training module,
the optimizer and LR schedule, the value head (and GAE-OPD's external values), the monitor and the run log. The loop
(:mod:`opd.train`) and the step (:mod:`opd.step`) take this object and nothing else.

It is a plain holder: it builds nothing. :func:`opd.assemble.build_components` fills it, in one
place, and :func:`opd.assemble.apply_recipe` swaps its objective, reference and config when the
monitor applies a stabilization recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.config.schema import Config
from opd.metrics_log import MetricsLog
from opd.monitor import Monitor
from opd.objective import Objective
from opd.rollout.engine import RolloutEngine
from opd.run_lock import RunFolderLock
from opd.tasks.base import Task
from opd.teachers import Teacher
from opd.types import Feedback, Rollouts

__all__ = ["BatchPrefetch", "Components", "ExternalValues"]


class BatchPrefetch(Protocol):
    """Prepares step batches ahead of the loop (:class:`opd.overlap.Prefetcher`)."""

    def batch(self, step: int) -> tuple[Any, int]:
        """The batch of ``step`` and its policy lag in steps."""
        ...

    def close(self) -> None: ...


class ExternalValues(Protocol):
    """GAE-OPD values computed with the batch, outside the objective (:class:`opd.value_source.ValueSource`:
    ``route2.value=exact_mc`` / ``critic``, the value probe)."""

    def attach(self, parts: Components, rollouts: Rollouts, feedback: Feedback, step: int) -> Feedback:
        """``feedback`` with the values of this batch (``Feedback.values_BT`` / ``value_probe_BT``)."""
        ...

    def after_step(self, rollouts: Rollouts, feedback: Feedback, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """After the student's update: train what learns from the batch; the step's value metrics."""
        ...


@dataclass
class Components:
    """Everything a run's steps read or update (see the module docstring).

    ``cfg``, ``objective``, ``reference``, ``access`` and ``chunked`` may change during a run when
    the monitor applies a stabilization recipe (:func:`opd.assemble.apply_recipe`).
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
    log: MetricsLog
    vocab: int
    access: str
    chunked: bool
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lock: RunFolderLock | None = None  # the run folder's lock, held while the run is live (main process)
    prefetch: BatchPrefetch | None = None  # rollout.overlap: the next step's batch, prepared in the background
    value_source: ExternalValues | None = None  # route2.value=exact_mc/critic, the value probe (opd/value_source.py)

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
        """The in-process teacher network that may sample with the student's ids (teacher-mixed and
        off-policy teacher sampling); None when there is none (:class:`opd.teachers.Teacher`)."""
        return self.teacher.model

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
