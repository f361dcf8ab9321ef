"""One optimizer step's gradients on a fixed global batch, single- or multi-process, through
accelerate's objects (the prepared PolicyModule, ``no_sync`` between micro-batches,
``accelerator.backward``).

Run directly for the single-process reference, or under
``accelerate launch --multi_gpu --num_processes 2 tests/helpers/ddp_step.py OUT`` (gloo on a
machine without GPUs) for data parallelism: every process builds the same global rollout batch
(same seed), keeps its own contiguous shard, normalises with the global token counts — exactly
what ``opd.step.train_step`` does. Rank 0 saves ``{name: grad}`` to ``OUT``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from opd.collect import collect_rollouts
from opd.assemble import build_components
from opd.config.load import load_config
from opd.step import StepBatch, accumulate_gradients, token_counts

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
    parts = build_components(cfg, Path(tempfile.mkdtemp(prefix=f"opd-ddp-{rank}-")), accelerator)
    examples = parts.task.train_examples(0, cfg.rollout.prompts_per_step, cfg.seed)
    torch.manual_seed(1234)  # the same global batch on every process
    with torch.no_grad():
        rollouts = collect_rollouts(cfg, examples, parts.engine, parts.tokenizer)
        feedback = parts.teacher.score(rollouts, access=parts.access, topk=cfg.teacher.topk)
    per_rank = rollouts.batch_size // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))
    local, local_fb = rollouts.select(rows), feedback.select(rows)
    batch = StepBatch(rollouts=local, feedback=local_fb, reference=None, outcome_rewards_B=None,
                      counts=token_counts(parts.objective, local, world))
    parts.model.train()
    accumulate_gradients(parts.model, parts.objective, batch, micro_batch_size=cfg.train.micro_batch_size,
                         group_size=cfg.rollout.samples_per_prompt, chunked=False, accelerator=accelerator)
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in parts.student.named_parameters()}
        torch.save({"world_size": world, "grads": grads, "wrapper": type(parts.model).__name__}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
