"""Whatever the student's padded positions hold — NaN (fully masked attention rows in some kernels) or
±1e4 — every preset's loss is finite and its loss and gradients equal those of a clean-padding batch
(dense logits, and hidden states through the LM head on the chunked path)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from opd.config.presets import PRESETS
from opd.objective import Objective, StudentOutputs
from opd.tasks.base import Example
from opd.types import Feedback, Rollouts
from tests.test_presets_common import B, EOS, SPECIALS, at, lsm, make_batch, preset_config, run_objective

FILLS = (float("nan"), 1e4, -1e4)


def _filled(x, mask, fill):
    m = mask if x.dim() == mask.dim() else mask[..., None]
    return torch.where(m, x.detach(), torch.full((), fill, dtype=x.dtype)).requires_grad_(True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_garbage_in_padding_changes_nothing_dense(name):
    batch = make_batch(name, preset_config(name))
    assert not batch.mask.all()
    loss0, g0, c0 = run_objective(name, batch)
    assert torch.isfinite(loss0) and torch.isfinite(g0).all()
    assert float(g0[~batch.mask].abs().max()) == 0.0  # padding never receives a gradient
    for fill in FILLS:
        dirty = replace(batch, s_logits=_filled(batch.s_logits, batch.mask, fill),
                        cont=_filled(batch.cont, batch.mask, fill))
        loss, g, c = run_objective(name, dirty)
        assert torch.isfinite(loss), (name, fill)
        assert torch.isfinite(g).all(), (name, fill)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0, msg=f"{name}, fill {fill}: loss")
        torch.testing.assert_close(g, g0, rtol=0, atol=0, msg=f"{name}, fill {fill}: gradient")
        if c0 is not None:
            torch.testing.assert_close(c, c0, rtol=0, atol=0, msg=f"{name}, fill {fill}: value head")


def _head_run(name: str, hidden, weight, batch):
    """The objective on hidden states + LM head (the chunked path where the preset allows it)."""
    cfg = preset_config(name, "route1.chunk_size=3")
    obj = Objective.from_config(cfg, eos_id=EOS, special_ids=SPECIALS, diagnostics=False)
    t_lp = lsm(batch.t_logits)
    topk_lp, topk_ids = t_lp.topk(batch.topk, dim=-1)
    fb = Feedback(access="full", sampled_logprobs_BT=torch.where(batch.mask, at(t_lp, batch.ids), 0.0),
                  topk_ids_BTK=topk_ids, topk_logprobs_BTK=topk_lp, logits_BTV=batch.t_logits)
    ref_lp = torch.where(batch.mask, at(lsm(batch.ref_logits), batch.ids), 0.0)
    ref = Feedback(access="full", sampled_logprobs_BT=ref_lp, logits_BTV=batch.ref_logits)
    rollouts = Rollouts(
        prompt_ids_BP=torch.ones(B, 2, dtype=torch.long), prompt_mask_BP=torch.ones(B, 2, dtype=torch.long),
        completion_ids_BT=batch.ids, completion_mask_BT=batch.mask, behaviour_logprobs_BT=batch.mu,
        truncated_B=torch.zeros(B, dtype=torch.bool), on_policy_B=batch.on, group_index_B=batch.group,
        examples=tuple(Example(prompt="x") for _ in range(B)),
    )
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    chunked = obj.use_chunked(weight.shape[0])
    cont = batch.cont.detach()
    student = (StudentOutputs(hidden_BTH=h, head_weight_VH=w, continuation_BT=cont) if chunked
               else StudentOutputs(logits_BTV=h @ w.T, continuation_BT=cont))
    out = obj(student, fb, rollouts, reference=ref,
              outcome_rewards_B=batch.outcome if obj.needs_outcome_rewards else None)
    out.loss.backward()
    return chunked, out.loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_garbage_in_padded_hidden_states_never_reaches_the_output_head(name):
    """On the chunked path the objective owns the LM head: NaN / ±1e4 hidden states at padding leave the
    head's gradient (and the loss) exactly as with clean padding."""
    batch = make_batch(name, preset_config(name))
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(*batch.ids.shape, 6, generator=g)
    weight = torch.randn(batch.s_logits.shape[-1], 6, generator=g)
    chunked, loss0, gh0, gw0 = _head_run(name, hidden, weight, batch)
    if not chunked:
        pytest.skip(f"{name} needs the student's full distribution: dense path only (covered above)")
    for fill in FILLS:
        chunked, loss, gh, gw = _head_run(name, _filled(hidden, batch.mask, fill), weight, batch)
        assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gh).all(), (name, fill)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        torch.testing.assert_close(gw, gw0, rtol=0, atol=0)
        torch.testing.assert_close(gh, gh0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gkd", "thinking-machines", "distillm-2", "verl-k3", "minillm"])
def test_float64_student_logits_stay_float64(name):
    """The objective's log-softmax is fp32 for fp32/half students and keeps a float64 student float64:
    the loss is computed in float64 and equals the fp32 run's to fp32 precision, as does the gradient."""
    batch = make_batch(name, preset_config(name))
    loss32, g32, _ = run_objective(name, batch)
    loss64, g64, _ = run_objective(name, replace(batch, s_logits=batch.s_logits.detach().double().requires_grad_(True)))
    assert loss64.dtype == g64.dtype == torch.float64  # computed in float64, not cast back from fp32
    torch.testing.assert_close(loss64.float(), loss32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g64.float(), g32, rtol=1e-4, atol=1e-6)
