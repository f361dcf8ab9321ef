"""Rollout–update overlap (rollout.overlap): the rollouts of step k+1 come from the weights before
step k's update (one step of policy lag, documented in opd/overlap.py), and the importance ratio
π_θ/μ sees exactly that lag: 1 when the policy did not move, ≠ 1 when it did."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

import opd.step as step_module
from opd.assemble import build_components
from opd.config import load_config
from opd.rollout import completion_forward

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=8", "train.threads=1", "train.steps=4", "method=thinking-machines",
    "route2.is_correction=ratio",
]


def _log_ratios(model, rollouts) -> torch.Tensor:
    """log π_model(y_t) − log μ(y_t) on the completion tokens, recomputed here."""
    with torch.no_grad():
        logits = completion_forward(model, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                    rollouts.completion_ids_BT, rollouts.completion_mask_BT)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, rollouts.completion_ids_BT[..., None]).squeeze(-1)
    mask = rollouts.completion_mask_BT.bool()
    return (logp - rollouts.behaviour_logprobs_BT)[mask]


def _run(tmp_path, *overrides):
    """Run 4 steps; per step: the weights before it, its batch, its metrics."""
    cfg = load_config(None, [*SMOKE, *overrides])
    parts = build_components(cfg, tmp_path, Accelerator(cpu=True))
    seen = []
    original = step_module.accumulate_gradients

    def spy(model, objective, batch, **kwargs):
        seen.append(batch.rollouts)
        return original(model, objective, batch, **kwargs)

    step_module.accumulate_gradients = spy
    try:
        weights, metrics = [], []
        for k in range(cfg.train.steps):
            weights.append(copy.deepcopy(parts.student).eval())
            metrics.append(step_module.train_step(parts, k))
    finally:
        step_module.accumulate_gradients = original
        parts.close()
    return weights, seen, metrics


@pytest.mark.parametrize("overlap", [False, True])
def test_the_documented_lag_and_its_importance_ratios(tmp_path, overlap):
    weights, batches, metrics = _run(tmp_path, f"rollout.overlap={str(overlap).lower()}", "train.lr=3e-3")
    lag = [int(m.get("policy_lag", 0)) for m in metrics]
    assert lag == ([0, 1, 1, 1] if overlap else [0, 0, 0, 0])
    # the diagnostics show the lag: the ratio statistics move away from 1 only on lagged steps
    for m, lagged in zip(metrics, lag, strict=True):
        assert (abs(m["diag/is_ratio_max"] - 1.0) > 1e-4) == bool(lagged), m["diag/is_ratio_max"]
    for k, rollouts in enumerate(batches):
        sampler = weights[k - lag[k]]  # θ_{k-1} with overlap (after the first step), θ_k without
        # μ is the sampling weights' distribution: recomputing with them gives ratio 1 (fp32 noise only)
        assert _log_ratios(sampler, rollouts).abs().max() < 1e-5, k
        # the ratio the update uses, π_{θ_k}/μ, is 1 without lag and clearly not 1 with it
        moved = _log_ratios(weights[k], rollouts).abs().max()
        if lag[k]:
            assert moved > 1e-3, (k, float(moved))
        else:
            assert moved < 1e-5, (k, float(moved))


def test_no_lag_correction_is_needed_when_the_policy_does_not_move(tmp_path):
    """lr = 0: the weights never change, so even the lagged batches have ratio 1."""
    weights, batches, metrics = _run(tmp_path, "rollout.overlap=true", "train.lr=1e-30")
    assert [int(m["policy_lag"]) for m in metrics] == [0, 1, 1, 1]
    for k, rollouts in enumerate(batches):
        assert _log_ratios(weights[k], rollouts).abs().max() < 1e-5
    # and what the diagnostics report for the update is that ratio
    assert all(abs(m["diag/is_ratio_mean"] - 1.0) < 1e-4 and abs(m["diag/is_ratio_max"] - 1.0) < 1e-4
               for m in metrics)


def test_overlap_rejects_what_reads_the_live_student():
    from opd.config import ConfigError

    with pytest.raises(ConfigError, match="teacher_mix"):
        load_config(None, ["rollout.overlap=true", "rollout.teacher_mix=0.2"])
    with pytest.raises(ConfigError, match="self_mode"):
        load_config(None, ["rollout.overlap=true", "teacher.model=self", "teacher.self_mode=live",
                           "teacher.use_context=true"])
