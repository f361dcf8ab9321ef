"""Shared fixed batch and torch primitives for the preset formula tests (tests/test_presets_route*.py).

Every preset's objective, built from its config exactly as ``opd distill`` builds it, is called on one
fixed small batch; the test files write each paper's formula by hand (plain torch, no ``opd.math``)
and compare the loss value and the autograd gradient w.r.t. the student's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.config.load import load_config
from opd.objective import Objective, StudentOutputs
from opd.tasks.base import Example
from opd.types import Feedback, Rollouts

B, T, V = 4, 5, 160
LENGTHS = (5, 5, 4, 3)
EOS, SPECIALS = 2, (0, 1, 2)
OUTCOME = (1.0, 0.0, 1.0, 1.0)  # verifier rewards: group 0 = rows 0, 1 (mixed), group 1 = rows 2, 3 (both right)


@dataclass
class Batch:
    s_logits: Tensor  # [B, T, V] float32 leaf (requires grad)
    t_logits: Tensor
    ref_logits: Tensor
    ids: Tensor  # [B, T] long
    mask: Tensor  # [B, T] bool
    on: Tensor  # [B] bool: rows the student sampled
    mu: Tensor  # [B, T] behaviour log-probs (0 on off-policy rows and padding)
    cont: Tensor  # [B, T] value-head output leaf (requires grad)
    outcome: Tensor  # [B]
    group: Tensor  # [B]
    topk: int

    @property
    def on_mask(self) -> Tensor:
        return self.on[:, None] & self.mask


def lsm(x: Tensor) -> Tensor:
    return torch.log_softmax(x.float(), dim=-1)


def at(x_BTV: Tensor, ids_BT: Tensor) -> Tensor:
    return x_BTV.gather(-1, ids_BT[..., None])[..., 0]


def where0(m: Tensor, x: Tensor) -> Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype))


def total(x: Tensor, m: Tensor) -> Tensor:
    return where0(m, x).sum()


def kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``Σ_v p (log p − log q)`` over the last dim (finite inputs)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def make_batch(name: str, cfg, *, mu: str = "on", seed: int = 11) -> Batch:
    """The fixed batch for preset ``name``: on/off-policy rows follow ``rollout.on_policy_fraction``;
    ``mu`` = ``on`` (μ = π_S), ``noise`` (μ ≠ π_S: a stale or mismatched sampler) or ``mix``
    (μ = α·π_T + (1 − α)·π_S with α = ``rollout.teacher_mix``)."""
    g = torch.Generator().manual_seed(seed)
    # teacher logits at two sharpness levels: some states certain (entropy < 1 nat), some not
    scale = torch.where(torch.rand(B, T, 1, generator=g) < 0.4, 9.0, 1.5)
    t_logits = torch.randn(B, T, V, generator=g) * scale
    s_logits = (torch.randn(B, T, V, generator=g) * 3.0).requires_grad_(True)
    ref_logits = torch.randn(B, T, V, generator=g) * 2.0
    # sampled from the student, as rollouts are: many sampled tokens are likely ones (trust regions bind)
    ids = torch.multinomial(torch.softmax(s_logits.detach(), -1).reshape(-1, V), 1, generator=g).reshape(B, T)
    ids[0, 1], ids[1, 0], ids[2, 2] = 0, 1, EOS  # special tokens, and an EOS that is never masked
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    frac = cfg.rollout.on_policy_fraction
    on = torch.tensor([True, True, frac >= 1, frac >= 1]) if frac > 0 else torch.zeros(B, dtype=torch.bool)
    with torch.no_grad():
        s_lp = at(lsm(s_logits), ids)
        if mu == "on":
            mu_BT = s_lp.clone()
        elif mu == "noise":  # log-ratios spread over ±2.5: some ratios leave [0.2, 5] and the PPO band
            mu_BT = s_lp + torch.linspace(-2.5, 2.5, B * T)[torch.randperm(B * T, generator=g)].reshape(B, T)
        else:
            a = cfg.rollout.teacher_mix
            mu_BT = torch.log(a * at(lsm(t_logits), ids).exp() + (1 - a) * s_lp.exp())
        mu_BT = torch.where(on[:, None] & mask, mu_BT, torch.zeros(()))
    return Batch(s_logits=s_logits, t_logits=t_logits, ref_logits=ref_logits, ids=ids, mask=mask, on=on, mu=mu_BT,
                 cont=torch.randn(B, T, generator=g).requires_grad_(True), outcome=torch.tensor(OUTCOME),
                 group=torch.tensor([0, 0, 1, 1]), topk=min(cfg.teacher.topk, V))


def preset_config(name: str, *overrides: str):
    return load_config(None, [f"method={name}", *overrides])


def run_objective(name: str, batch: Batch, *overrides: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss, ∂loss/∂student logits, ∂loss/∂value head)`` of preset ``name``'s objective on ``batch``."""
    cfg = preset_config(name, *overrides)
    obj = Objective.from_config(cfg, eos_id=EOS, special_ids=SPECIALS, diagnostics=False)
    t_lp = lsm(batch.t_logits)
    topk_lp, topk_ids = t_lp.topk(batch.topk, dim=-1)
    pad0 = lambda x: torch.where(batch.mask, x, torch.zeros(()))  # noqa: E731 (what a teacher returns on padding)
    fb = Feedback(access="full", sampled_logprobs_BT=pad0(at(t_lp, batch.ids)), topk_ids_BTK=topk_ids,
                  topk_logprobs_BTK=topk_lp, logits_BTV=batch.t_logits)
    ref = Feedback(access="full", sampled_logprobs_BT=pad0(at(lsm(batch.ref_logits), batch.ids)),
                   logits_BTV=batch.ref_logits)
    rollouts = Rollouts(
        prompt_ids_BP=torch.ones(B, 2, dtype=torch.long), prompt_mask_BP=torch.ones(B, 2, dtype=torch.long),
        completion_ids_BT=batch.ids, completion_mask_BT=batch.mask, behaviour_logprobs_BT=batch.mu,
        truncated_B=torch.zeros(B, dtype=torch.bool), on_policy_B=batch.on, group_index_B=batch.group,
        examples=tuple(Example(prompt="x") for _ in range(B)),
    )
    s = batch.s_logits.detach().clone().requires_grad_(True)
    c = batch.cont.detach().clone().requires_grad_(True)
    out = obj(StudentOutputs(logits_BTV=s, continuation_BT=c), fb, rollouts, reference=ref,
              outcome_rewards_B=batch.outcome if obj.needs_outcome_rewards else None)
    out.loss.backward()
    return out.loss.detach(), s.grad, c.grad


def hand_grads(value: Tensor, surrogate: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(value, ∂surrogate/∂student logits, ∂surrogate/∂value head)`` of a hand-written formula."""
    grads = torch.autograd.grad(surrogate, [batch.s_logits, batch.cont], allow_unused=True)
    return value.detach(), grads[0], grads[1]


def assert_matches(name: str, hand_fn, *, mu: str = "on", overrides: tuple[str, ...] = ()) -> None:
    """The preset's objective equals ``hand_fn(batch) -> (value, surrogate)`` in value and gradient."""
    batch = make_batch(name, preset_config(name, *overrides), mu=mu)
    loss, g_s, g_c = run_objective(name, batch, *overrides)
    value, surrogate = hand_fn(batch)
    h_loss, h_s, h_c = hand_grads(value, surrogate, batch)
    torch.testing.assert_close(loss, h_loss, rtol=1e-5, atol=1e-6, msg=f"{name}: loss")
    torch.testing.assert_close(g_s, torch.zeros_like(g_s) if h_s is None else h_s, rtol=1e-4, atol=1e-7,
                               msg=f"{name}: gradient")
    if h_c is not None:
        torch.testing.assert_close(g_c, h_c, rtol=1e-4, atol=1e-7, msg=f"{name}: value-head gradient")
    assert float(g_s.abs().max()) > 0, f"{name}: the objective has no gradient on this batch"


def test_fixed_batch_exercises_what_the_formulas_test():
    """The batch is not degenerate: padding, off-policy rows, certain and uncertain teacher states,
    log-probs below verl's −10 floor, and a sampler μ ≠ π_S when asked for."""
    batch = make_batch("gkd", preset_config("gkd"), mu="noise")
    assert batch.mask.sum() == sum(LENGTHS) and not batch.mask.all()
    assert batch.on.tolist() == [True, True, False, False]
    h_t = entropy(lsm(batch.t_logits))[batch.mask]
    assert (h_t < 1.0).any() and (h_t > 1.0).any()
    assert (lsm(batch.t_logits) < -10).any() and (lsm(batch.s_logits.detach()) < -10).any()
    s_lp = at(lsm(batch.s_logits.detach()), batch.ids)
    ratio = (s_lp - batch.mu).exp()[batch.on_mask]
    assert (ratio < 0.2).any() and (ratio > 5).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    diff = (s_lp.exp() - batch.mu.exp())[batch.on_mask]  # DPPO's probability band binds both ways
    assert (diff > 0.2).any() and (diff < -0.2).any()
