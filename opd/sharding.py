"""The student's full weights when a sharded run needs them outside the prepared model's forward.

FSDP and DeepSpeed ZeRO-3 keep each process's slice of every parameter; the prepared module's
forward gathers what it needs. Sampling rollouts with opd's own decode loop, evaluating, copying
weights into a sampler and saving call the student *outside* that forward, so they run inside
:func:`gathered`, which materialises the full parameters for the duration of the block (FSDP2:
``unshard()`` / ``reshard()`` on every sharded module; ZeRO-3: ``deepspeed.zero.GatheredParameters``)
and is a no-op for unsharded runs. Every process must enter it together (gathering is a
collective); inside it, each process may run any number of forwards (decoding), or none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

__all__ = ["gathered", "is_sharded"]


def is_sharded(accelerator: Accelerator, model: torch.nn.Module | None = None) -> bool:
    """Whether the run's parameters are sharded across processes (accelerate's FSDP / DeepSpeed, or
    a module sharded with torch's ``fully_shard`` directly)."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return True
    return model is not None and any(hasattr(m, "unshard") and hasattr(m, "reshard") for m in model.modules())


@contextmanager
def gathered(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Full parameters of ``model`` (the prepared module) inside the block (see the module docstring)."""
    fsdp2 = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    if fsdp2:
        # the root must set up its sharded children before any of them runs outside its forward, or
        # each child would take itself for a root; FSDP2 does this in the root's first forward, and
        # offers no public call for it (torch 2.13: FSDPState._lazy_init, idempotent)
        state = fsdp2[0]._get_fsdp_state()
        state._lazy_init()
        for m in fsdp2:
            m.unshard()
            # keep them gathered through every forward of the block: decoding runs a data-dependent
            # number of forwards per process, which must not be collectives
            m.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in fsdp2:
                m.set_reshard_after_forward(True)
                m.reshard()
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    yield
