"""Building a run's :class:`~opd.components.Components` from a resolved config, in one place.

Order matters: the teacher and the reference copy the *initial* student, so build before loading a
checkpoint into the student; the module and optimizer are prepared by ``accelerate`` for the launch
the process runs under (one process, DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from opd.build import build_reference, build_student, build_task, build_teacher, special_token_ids
from opd.components import Components
from opd.config.schema import Config
from opd.config.validate import resolve_teacher_access
from opd.monitor import Monitor
from opd.objective import Objective
from opd.overlap import Prefetcher
from opd.rollout.engine import build_engine
from opd.runlog import RunLog
from opd.step import PolicyModule
from opd.value_source import build_value_source

__all__ = ["build_components", "make_scheduler"]


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
        value_source=build_value_source(cfg, vocab, device),
    )
    if cfg.rollout.overlap:
        parts.prefetch = Prefetcher(parts)
    parts.monitor = Monitor(cfg, run_dir, write=main, eos_ids=tokenizer.eos_token_id, echo=echo,
                            apply_fn=parts.apply_recipe)
    return parts
