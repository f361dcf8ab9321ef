"""The sharded path: the update's gradient with the student sharded by FSDP2 equals the
single-process gradient of the same global batch, and the accelerate launch configs we ship
resolve to FSDP2 / DeepSpeed ZeRO-3 / DDP for the student we ship.

accelerate routes FSDP and DeepSpeed only on GPUs (on a machine without GPUs its distributed type
is MULTI_CPU, i.e. DDP — tested in test_distill.py); torch's own FSDP2 runs on CPU with gloo, so
the step is checked under real sharding here with ``fully_shard`` applied directly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "helpers" / "fsdp2_step.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo-on-CPU launch below is for machines without GPUs")
def test_fsdp2_sharded_step_equals_the_single_process_step(tmp_path):
    single, sharded = tmp_path / "single.pt", tmp_path / "sharded.pt"
    subprocess.run([sys.executable, str(HELPER), str(single), "chunked"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    torchrun = shutil.which("torchrun")
    assert torchrun is not None, "torchrun (installed with torch) is missing"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", str(HELPER), str(sharded), "chunked"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(sharded)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["param_types"] == ["DTensor"]  # every student parameter was really sharded
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert max(g.abs().max() for g in a["grads"].values()) > 1e-3  # a real gradient, not zeros


@pytest.mark.parametrize("name, kind", [("fsdp2", "FSDP"), ("deepspeed_zero3", "DEEPSPEED"), ("ddp", "MULTI_GPU")])
def test_the_shipped_accelerate_configs_resolve(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    from opd.model_paths import resolve_model_path
    from opd.models import load_model

    cfg = load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.mixed_precision == "bf16"
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        student = load_model(resolve_model_path("builtin:arith/student"))
        wrapped = cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert wrapped in {type(m).__name__ for m in student.modules()}
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3
