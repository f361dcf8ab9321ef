"""Wiring a run: the components built by :mod:`opd.factories` put together into one
:class:`~opd.components.Components`, in one place — and rewired when the monitor applies a recipe.

Order matters: the teacher and the reference copy the *initial* student, so build before loading a
checkpoint into the student; the module and optimizer are prepared by ``accelerate`` for the launch
the process runs under (one process, DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from opd.components import Components
from opd.config.load import dump_config, with_overrides
from opd.config.schema import Config
from opd.config.validate import resolve_teacher_access
from opd.factories import build_reference, build_student, build_task, build_teacher, special_token_ids
from opd.metrics_log import MetricsLog
from opd.monitor import Monitor
from opd.objective import Objective
from opd.overlap import Prefetcher
from opd.rollout.engine import build_engine
from opd.step import PolicyModule
from opd.value_source import build_value_source

__all__ = ["apply_recipe", "build_components", "build_objective", "make_scheduler"]


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


def build_objective(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> Objective:
    """The objective ``cfg`` asks for, with the student tokenizer's EOS and special ids."""
    return Objective.from_config(cfg, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer),
                                 diagnostics=cfg.monitor.diagnostics)


def _value_head(student: torch.nn.Module, device: torch.device) -> torch.nn.Linear:
    """GAE-OPD's value head ``V(s) = w·h + b`` over the student's last hidden state, starting at 0."""
    head = torch.nn.Linear(student.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def build_components(cfg: Config, run_dir: Path, accelerator: Accelerator, *,
                     echo: Callable[[str], None] | None = None) -> Components:
    """Build every part of a run from ``cfg`` (teacher and reference copies come from the *initial*
    student: build before loading a checkpoint into the student)."""
    device = accelerator.device
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    student, tokenizer = build_student(cfg, device)
    task = build_task(cfg, eos_token=tokenizer.eos_token)
    teacher = build_teacher(cfg, student, tokenizer, device)
    reference = build_reference(cfg, student, tokenizer, device)
    objective = build_objective(cfg, tokenizer)
    vocab = student.get_output_embeddings().weight.shape[0]
    value_head = _value_head(student, device) if objective.needs_value_head else None
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
    log = MetricsLog(run_dir, enabled=main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb)
    monitor = Monitor(cfg, run_dir, write=main, eos_ids=tokenizer.eos_token_id, echo=echo)
    parts = Components(
        cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, student=student, tokenizer=tokenizer, task=task,
        teacher=teacher, reference=reference, objective=objective, engine=engine, optimizer=optimizer,
        scheduler=scheduler, value_head=value_head, monitor=monitor, log=log, vocab=vocab,
        access=resolve_teacher_access(cfg), chunked=objective.use_chunked(vocab), params=params,
        value_source=build_value_source(cfg, vocab, device),
    )
    monitor.apply_fn = partial(apply_recipe, parts)  # the monitor's recipes rewire these parts
    if cfg.rollout.overlap:
        parts.prefetch = Prefetcher(parts)
    return parts


def apply_recipe(parts: Components, overrides: tuple[str, ...]) -> Config:
    """``monitor.*_action=apply``: switch ``parts`` to the config with ``overrides`` — its objective,
    reference and teacher access — keeping the LR schedule's shape around a new peak; returns the new
    config.

    Raises:
        ValueError: the recipe needs a value head, which this run did not build.
    """
    new = with_overrides(parts.cfg, list(overrides))
    objective = build_objective(new, parts.tokenizer)
    if objective.needs_value_head and parts.value_head is None:
        raise ValueError("the recipe needs a value head, which this run did not build")
    if parts.reference is None:
        parts.reference = build_reference(new, parts.student, parts.tokenizer, parts.device)
    if new.train.lr != parts.cfg.train.lr:
        for g in parts.optimizer.param_groups:
            g["lr"] *= new.train.lr / parts.cfg.train.lr
        parts.scheduler.base_lrs = [new.train.lr for _ in parts.scheduler.base_lrs]
    parts.cfg, parts.objective = new, objective
    parts.chunked = objective.use_chunked(parts.vocab)
    parts.access = resolve_teacher_access(new)
    if parts.main:
        dump_config(new, parts.run_dir / "config.applied.yaml")
    parts.monitor.cfg = new
    return new
