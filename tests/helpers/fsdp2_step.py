"""One optimizer step's gradients with the student sharded by torch FSDP2 (``fully_shard``) on
CPU/gloo — the sharded path that accelerate routes only on GPUs (on a machine without GPUs its
``distributed_type`` is MULTI_CPU, i.e. DDP). Every parameter use, the LM head of the chunked
route-1 path included, happens inside :class:`opd.step.PolicyModule`'s forward, so sharding
computes the same gradient as one process.

    python tests/helpers/fsdp2_step.py OUT [chunked]                       # reference, 1 process
    torchrun --nproc_per_node 2 tests/helpers/fsdp2_step.py OUT [chunked]  # 2 processes, sharded
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

from opd.collect import collect_rollouts
from opd.assemble import build_components
from opd.config.load import load_config
from opd.sharding import gathered
from opd.step import StepBatch, accumulate_gradients, token_counts

OVERRIDES = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher",
    "data.digits=2", "rollout.prompts_per_step=12", "rollout.samples_per_prompt=2",
    "route1.divergence=rkl", "route2.coef=0.5", "route2.credit=return_to_go", "route2.is_correction=ratio",
    "train.micro_batch_size=4",
]


def main(out: str, chunked: bool) -> None:
    torch.set_num_threads(1)
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=True)  # MULTI_CPU under torchrun: the process group, not the sharding
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg = load_config(None, [*OVERRIDES, *(["route1.chunk_size=8"] if chunked else [])])
    if sharded:  # shard before accelerate sees the model: build unprepared, then fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        original = accelerator.prepare
        accelerator.prepare = lambda *objs: objs  # type: ignore[method-assign]
        parts = build_components(cfg, Path(tempfile.mkdtemp(prefix=f"opd-fsdp-{rank}-")), accelerator)
        accelerator.prepare = original  # type: ignore[method-assign]
        for layer in parts.student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(parts.model, mesh=mesh)
    else:
        parts = build_components(cfg, Path(tempfile.mkdtemp(prefix="opd-fsdp-ref-")), accelerator)
    assert parts.chunked == chunked
    examples = parts.task.train_examples(0, cfg.rollout.prompts_per_step, cfg.seed)
    torch.manual_seed(1234)  # the same global batch on every process
    with gathered(accelerator, parts.model), torch.no_grad():  # opd's decode loop reads the full weights
        rollouts = collect_rollouts(cfg, examples, parts.engine, parts.tokenizer)
        feedback = parts.teacher.score(rollouts, access=parts.access, topk=cfg.teacher.topk)
    # decoding inside the gathered block runs no collective: each process samples a batch of its own
    # (different lengths, different numbers of forwards) without hanging
    with gathered(accelerator, parts.model), torch.no_grad():
        torch.manual_seed(rank)
        own = parts.task.train_examples(rank + 1, 3 + 2 * rank, cfg.seed)
        collect_rollouts(cfg, own, parts.engine, parts.tokenizer)
    per_rank = rollouts.batch_size // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))
    local, local_fb = rollouts.select(rows), feedback.select(rows)
    batch = StepBatch(rollouts=local, feedback=local_fb, reference=None, outcome_rewards_B=None,
                      counts=token_counts(parts.objective, local, world))
    parts.model.train()
    accumulate_gradients(parts.model, parts.objective, batch, micro_batch_size=cfg.train.micro_batch_size,
                         group_size=cfg.rollout.samples_per_prompt, chunked=chunked, accelerator=accelerator)
    grads = {}
    for name, p in parts.student.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # a DTensor shard: gather the whole gradient
            g = g.full_tensor()
        grads[name] = g.detach().clone()
    kinds = {type(p).__name__ for p in parts.student.parameters()}
    if rank == 0:
        torch.save({"world_size": world, "grads": grads, "param_types": sorted(kinds)}, out)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], chunked=len(sys.argv) > 2 and sys.argv[2] == "chunked")
