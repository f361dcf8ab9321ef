"""Objective assembly: chunked == dense, teacher == student gives zero loss and gradient, padding
does not change the loss, and the terms equal a hand assembly of the math functions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from opd.config.load import load_config
from opd.math.divergences import generalized_jsd
from opd.math.reduce import reduce_tokens
from opd.objective import Objective, StudentOutputs
from opd.tasks.base import Example
from opd.types import Feedback, Rollouts

B, T, H, V = 3, 5, 8, 19


def make_rollouts(mask_BT: torch.Tensor, ids_BT: torch.Tensor) -> Rollouts:
    b = ids_BT.shape[0]
    return Rollouts(
        prompt_ids_BP=torch.ones(b, 2, dtype=torch.long), prompt_mask_BP=torch.ones(b, 2, dtype=torch.long),
        completion_ids_BT=ids_BT, completion_mask_BT=mask_BT,
        behaviour_logprobs_BT=torch.zeros(b, ids_BT.shape[1]), truncated_B=torch.zeros(b, dtype=torch.bool),
        on_policy_B=torch.ones(b, dtype=torch.bool), group_index_B=torch.arange(b),
        examples=tuple(Example(prompt="x") for _ in range(b)),
    )


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=g).float() * 0.5
    t_hidden = torch.randn(B, T, H, generator=g)
    t_weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    t_logits = t_hidden @ t_weight.T
    t_logp = torch.log_softmax(t_logits, -1)
    topk_lp, topk_ids = t_logp.topk(6, dim=-1)
    fb = Feedback(access="full", sampled_logprobs_BT=t_logp.gather(-1, ids[..., None]).squeeze(-1) * mask,
                  topk_ids_BTK=topk_ids, topk_logprobs_BTK=topk_lp, logits_BTV=t_logits)
    fb_hidden = Feedback(access="full", sampled_logprobs_BT=fb.sampled_logprobs_BT, topk_ids_BTK=topk_ids,
                         topk_logprobs_BTK=topk_lp, hidden_BTH=t_hidden, head_weight_VH=t_weight)
    return hidden, weight, fb, fb_hidden, make_rollouts(mask, ids)


def objective(*overrides: str) -> Objective:
    cfg = load_config(None, list(overrides))
    return Objective.from_config(cfg, eos_id=2, special_ids=(0, 1, 2))


def run(obj, hidden, weight, fb, rollouts, chunked):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    if chunked:
        out = obj(StudentOutputs(hidden_BTH=h, head_weight_VH=w), fb, rollouts)
    else:
        out = obj(StudentOutputs(logits_BTV=h @ w.T), fb, rollouts)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("overrides", [
    ("route1.divergence=jsd", "route1.chunk_size=2"),
    ("route1.divergence=rkl", "support.kind=teacher_topk", "support.k=6", "support.norm=tail", "route1.chunk_size=3"),
    ("route1.divergence=fkl", "route2.coef=0.5", "route2.credit=return_to_go", "route1.chunk_size=4",
     "route2.is_correction=none"),
    ("method=vopd", "route1.chunk_size=2", "support.kind=full", "route2.is_correction=none"),
    # shaped divergences (EOPD's gated FKL; verl's floor and clamps) go through autograd per chunk
    ("method=eopd", "route1.chunk_size=2", "route1.fkl_entropy_min=2.5"),
    ("method=verl-fkl-topk", "route1.chunk_size=3", "route1.logprob_floor=-3", "route1.clamp_high=0.5"),
    ("method=verl-k3", "route1.chunk_size=4"),
    # per-row divergences (DistiLLM-2) and a route-2-only objective with position weights (IW-OPD)
    ("method=distillm-2", "route1.chunk_size=2"),
    ("method=iw-opd", "route1.chunk_size=2"),
])
def test_chunked_path_equals_dense_path(batch, overrides):
    hidden, weight, fb, fb_hidden, rollouts = batch
    if "method=distillm-2" in overrides:  # one row of teacher samples
        rollouts = replace(rollouts, on_policy_B=torch.tensor([True, False, True]))
    obj = objective(*overrides)
    dense, gh_d, gw_d = run(obj, hidden, weight, fb, rollouts, chunked=False)
    chunk, gh_c, gw_c = run(obj, hidden, weight, fb_hidden, rollouts, chunked=True)
    torch.testing.assert_close(chunk.loss, dense.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh_c, gh_d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw_c, gw_d, atol=1e-5, rtol=1e-4)


def test_route1_term_equals_hand_assembly(batch):
    hidden, weight, fb, _, rollouts = batch
    out, _, _ = run(objective("route1.divergence=jsd", "route1.beta=0.3", "route1.coef=2.0"),
                    hidden, weight, fb, rollouts, chunked=False)
    s_logp = torch.log_softmax(hidden @ weight.T, -1)
    t_logp = torch.log_softmax(fb.logits_BTV, -1)
    d = generalized_jsd(s_logp, t_logp, beta=0.3)
    expected = 2.0 * reduce_tokens(d, rollouts.completion_mask_BT, "token_mean")
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    ("route1.divergence=rkl",),
    ("route1.divergence=jsd", "support.kind=teacher_topk", "support.k=5", "support.norm=tail"),
    ("method=thinking-machines", "route2.is_correction=none"),
    ("method=vopd", "route2.is_correction=none"),
    ("method=cr-opd", "route2.is_correction=none"),
    ("method=eopd", "route1.fkl_entropy_min=0"),
    ("method=verl-k3",),
    ("method=iw-opd",),
    ("method=nemo-rl-opd",),
    ("method=tip",),
    ("method=distillm-2",),
])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(batch, overrides):
    hidden, weight, _, _, rollouts = batch
    logits = hidden @ weight.T
    t_logp = torch.log_softmax(logits, -1)
    topk_lp, topk_ids = t_logp.topk(8, dim=-1)
    mask = rollouts.completion_mask_BT
    fb = Feedback(access="full", sampled_logprobs_BT=t_logp.gather(-1, rollouts.completion_ids_BT[..., None])[..., 0]
                  * mask, topk_ids_BTK=topk_ids, topk_logprobs_BTK=topk_lp, logits_BTV=logits)
    # sampled by the student itself: μ = π_S (tinker's reward reads the sampler's log-probs)
    rollouts = replace(rollouts, behaviour_logprobs_BT=fb.sampled_logprobs_BT.detach())
    out, gh, gw = run(objective(*overrides), hidden, weight, fb, rollouts, chunked=False)
    assert abs(out.loss.item()) < 1e-6
    assert gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6


def test_padding_does_not_change_the_loss(batch):
    hidden, weight, fb, _, rollouts = batch
    obj = objective("route1.divergence=rkl", "route2.coef=1", "route2.credit=return_to_go",
                    "route2.is_correction=none")
    base, gh, gw = run(obj, hidden, weight, fb, rollouts, chunked=False)
    extra = 3  # append padded positions holding garbage teacher signal
    pad = lambda x, value=0.0: torch.cat([x, torch.full((*x.shape[:1], extra, *x.shape[2:]), value, dtype=x.dtype)], 1)
    r2 = make_rollouts(pad(rollouts.completion_mask_BT, False), pad(rollouts.completion_ids_BT, 0))
    fb2 = Feedback(access="full", sampled_logprobs_BT=pad(fb.sampled_logprobs_BT, float("nan")),
                   topk_ids_BTK=pad(fb.topk_ids_BTK, 0), topk_logprobs_BTK=pad(fb.topk_logprobs_BTK, 0.0),
                   logits_BTV=pad(fb.logits_BTV, float("inf")))
    padded, gh2, gw2 = run(obj, pad(hidden), weight, fb2, r2, chunked=False)
    torch.testing.assert_close(padded.loss, base.loss)
    torch.testing.assert_close(gh2[:, :T], gh)
    assert torch.all(gh2[:, T:] == 0)
    torch.testing.assert_close(gw2, gw)
    # garbage at padding never reaches a per-token statistic (NaN there would raise a false alarm)
    for key, value in padded.token_stats.items():
        if value.is_floating_point() and value.shape[:2] == r2.completion_mask_BT.shape:
            assert torch.isfinite(value[:, T:]).all(), key
    for key in ("teacher_kl", "route1_divergence", "student_entropy"):
        assert torch.all(padded.token_stats[key][:, T:] == 0), key
