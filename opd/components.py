"""The parts of a run, built in one place and held in one object.

:func:`build_components` turns a resolved config into a :class:`Components`: the student and its
tokenizer, the task, the teacher and reference (both see the *initial* student), the objective,
the rollout engine, the optimizer and LR schedule, the value head, the monitor and the run log.
The loop (:mod:`opd.train`) and the step (:mod:`opd.step`) take this object and nothing else, so
adding an engine or a wrapper touches this file and the component's own module only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.build import (
    build_reference,
    build_student,
    build_task,
    build_teacher,
    special_token_ids,
)
from opd.config.load import dump_config, with_overrides
from opd.config.schema import Config
from opd.config.validate import resolve_teacher_access
from opd.monitor import Monitor
from opd.objective import Objective
from opd.overlap import Prefetcher
from opd.rollout.engine import RolloutEngine, build_engine
from opd.rundir import RunFolderLock
from opd.runlog import RunLog
from opd.step import PolicyModule
from opd.tasks.base import Task
from opd.teachers import Teacher

__all__ = ["Components", "build_components", "make_scheduler"]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant / linear-to-zero / cosine-to-zero over ``train.steps``."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    prefetch: Prefetcher | None = None  # rollout.overlap: the next step's batch, prepared in the background

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


def build_components(cfg: Config, run_dir: Path, accelerator: Accelerator, *, echo=None) -> Components:
    """Build every part of a run from ``cfg`` (teacher and reference copies come from the *initial*
    student: build before loading a checkpoint into the student)."""
    device = accelerator.device
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    student, tokenizer = build_student(cfg, device)
    task = build_task(cfg, eos_token=tokenizer.eos_token)
    teacher = build_teacher(cfg, student, tokenizer, device)
    reference = build_reference(cfg, student, tokenizer, device)
    objective = Objective.from_config(cfg, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer),
                                      diagnostics=cfg.monitor.diagnostics)
    vocab = student.get_output_embeddings().weight.shape[0]
    value_head = None
    if objective.needs_value_head:
        value_head = torch.nn.Linear(student.config.hidden_size, 1).to(device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    t = cfg.train
    policy = PolicyModule(student, value_head)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=t.lr,
                                  betas=tuple(t.betas), weight_decay=t.weight_decay)
    # accelerate wraps the module for the launch it runs under (DDP / FSDP / DeepSpeed, autocast) and
    # the optimizer with it; the LR schedule is ours (a function of the step number, never prepared)
    model, optimizer = accelerator.prepare(policy, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = make_scheduler(optimizer, cfg)
    engine = build_engine(cfg, student, tokenizer)
    log = RunLog(run_dir, enabled=main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb)
    parts = Components(
        cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, student=student, tokenizer=tokenizer, task=task,
        teacher=teacher, reference=reference, objective=objective, engine=engine, optimizer=optimizer,
        scheduler=scheduler, value_head=value_head, monitor=None, log=log, vocab=vocab,  # type: ignore[arg-type]
        access=resolve_teacher_access(cfg), chunked=objective.use_chunked(vocab), params=params,
    )
    if cfg.rollout.overlap:
        parts.prefetch = Prefetcher(parts)
    parts.monitor = Monitor(cfg, run_dir, write=main, eos_ids=tokenizer.eos_token_id, echo=echo,
                            apply_fn=parts.apply_recipe)
    return parts
