"""One optimizer step's gradients on a fixed global batch, single- or multi-process.

Run directly for the single-process reference, or under
``accelerate launch --num_processes 2 --cpu tests/helpers/ddp_step.py OUT`` for data parallelism:
every process builds the same global rollout batch (same seed), keeps its own contiguous shard,
normalises with the global token counts and averages gradients over processes — exactly what
``opd.train.train_step`` does. Rank 0 saves ``{name: grad}`` to ``OUT``.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from opd.build import build_student, build_task, build_teacher, special_token_ids
from opd.collect import collect_rollouts
from opd.config.load import load_config
from opd.config.validate import required_teacher_access
from opd.objective import Objective
from opd.rollout.engine import HFEngine
from opd.step import StepBatch, accumulate_gradients, sync_gradients, token_counts

OVERRIDES = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher",
    "data.digits=2", "rollout.prompts_per_step=12", "rollout.samples_per_prompt=2",
    "route1.divergence=rkl", "route2.coef=0.5", "route2.credit=return_to_go", "route2.is_correction=ratio",
    "train.micro_batch_size=4",
]


def main(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg = load_config(None, OVERRIDES)
    student, tokenizer = build_student(cfg, "cpu")
    task = build_task(cfg, eos_token=tokenizer.eos_token)
    teacher = build_teacher(cfg, student, tokenizer, "cpu")
    objective = Objective.from_config(cfg, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer))
    examples = task.train_examples(0, cfg.rollout.prompts_per_step, cfg.seed)
    torch.manual_seed(1234)  # the same global batch on every process
    with torch.no_grad():
        rollouts = collect_rollouts(cfg, examples, HFEngine(student, tokenizer), tokenizer)
        feedback = teacher.score(rollouts, access=required_teacher_access(cfg), topk=cfg.teacher.topk)
    per_rank = rollouts.batch_size // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))
    local, local_fb = rollouts.select(rows), feedback.select(rows)
    batch = StepBatch(rollouts=local, feedback=local_fb, reference=None, outcome_rewards_B=None,
                      counts=token_counts(objective, local, world))
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    accumulate_gradients(student, objective, batch, micro_batch_size=cfg.train.micro_batch_size,
                         group_size=cfg.rollout.samples_per_prompt, chunked=False)
    sync_gradients(params, world)
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
        torch.save({"world_size": world, "grads": grads}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
