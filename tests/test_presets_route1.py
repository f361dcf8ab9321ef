"""Route-1 presets (distributional losses) against their papers' formulas written here by hand.

Each ``hand_*`` returns ``(value, surrogate)``: the loss value the paper defines and the expression whose
autograd gradient w.r.t. the student's logits is the paper's gradient (the same expression here: route 1
back-propagates its divergence directly). Reductions: opd's token mean divides by every valid token of the
batch; gates drop tokens from the numerator only.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_presets_common import SPECIALS, Batch, assert_matches, at, entropy, kl, lsm, total, where0


def _n(b: Batch) -> torch.Tensor:
    return b.mask.sum()


def _mix_logp(a_logp, b_logp, w):
    """``log(w·p_a + (1 − w)·p_b)``."""
    return torch.log(w * a_logp.exp() + (1 - w) * b_logp.exp())


def hand_gkd(b: Batch):
    """GKD (arXiv 2306.13649): generalized JSD with β = 0.5 over the full vocabulary, every row."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    M = _mix_logp(Tl, S, 0.5)
    jsd = 0.5 * kl(Tl, M) + 0.5 * kl(S, M)
    loss = total(jsd, b.mask) / _n(b)
    return loss, loss


def hand_reverse_kl(b: Batch):
    """OPSD (arXiv 2601.18734) and SDPO (arXiv 2601.20802): KL(π_S ‖ sg π_T) at every state."""
    loss = total(kl(lsm(b.s_logits), lsm(b.t_logits)), b.mask) / _n(b)
    return loss, loss


def hand_sft_teacher(b: Batch):
    """Sequence-level KD: −log π_S(y_t) on teacher samples, mean over their tokens."""
    off = ~b.on[:, None] & b.mask
    loss = total(-at(lsm(b.s_logits), b.ids), off) / off.sum()
    return loss, loss


def hand_fu_topk(b: Batch):
    """Fu et al. (arXiv 2603.25562): RKL renormalised on the teacher's top-32; special tokens but EOS masked."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    top = Tl.topk(32, dim=-1).indices
    s_k, t_k = S.gather(-1, top), Tl.gather(-1, top)
    s_k, t_k = s_k - s_k.logsumexp(-1, keepdim=True), t_k - t_k.logsumexp(-1, keepdim=True)
    keep = b.mask & ~torch.isin(b.ids, torch.tensor([i for i in SPECIALS if i != 2]))
    loss = total(kl(s_k, t_k), keep) / _n(b)
    return loss, loss


def hand_distillm(b: Batch):
    """DistiLLM (arXiv 2402.03898): skew reverse KL KL(π_S ‖ (1−α)π_T + απ_S), α = 0.1."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    loss = total(kl(S, _mix_logp(Tl, S, 0.9)), b.mask) / _n(b)
    return loss, loss


def _distillm_2_released(b: Batch, *, detach: bool = True):
    """DistiLLM-2's released loss: per pair, the token mean of KL(π_T ‖ α·π_T + (1−α)·π_S) over the
    teacher's (chosen) response plus the token mean of KL(π_S ‖ (1−α)·π_T + α·sg(π_S)) over the student's
    (rejected) one, averaged over pairs; α = 0.1. ``detach=False`` differentiates through α·π_S."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    skl = kl(Tl, torch.log(0.1 * Tl.exp() + 0.9 * S.exp()))
    S_mix = S.detach() if detach else S  # the released trainer: student_vocab_logps.detach()
    srkl = kl(S, torch.log(0.9 * Tl.exp() + 0.1 * S_mix.exp()))
    on = b.on_mask
    chosen = [r for r in range(b.mask.shape[0]) if not b.on[r]]
    rejected = [r for r in range(b.mask.shape[0]) if b.on[r]]
    assert len(chosen) == len(rejected) > 0  # the batch pairs teacher and student rows

    def seq_mean(x, m, r):
        return total(x[r], m[r]) / m[r].sum()

    pairs = [seq_mean(skl, b.mask & ~on, c) + seq_mean(srkl, on, r) for c, r in zip(chosen, rejected)]
    return torch.stack(pairs).mean()


def hand_distillm_2(b: Batch):
    """DistiLLM-2 (arXiv 2503.07067) as its released trainer computes it (jongwooko/distillm-2)."""
    loss = _distillm_2_released(b)
    return loss, loss


def test_distillm_2_released_form_differs_from_the_undetached_token_mean():
    """The released gradient and reduction are distinguishable on the fixed batch (else the formula test
    could not tell them apart): detaching α·π_S changes the student rows' gradient, and the pair-summed
    per-sequence mean is about twice opd's earlier single token mean, which is still available."""
    from tests.test_presets_common import make_batch, preset_config, run_objective

    b = make_batch("distillm-2", preset_config("distillm-2"))
    on = b.on_mask
    g_sg = torch.autograd.grad(_distillm_2_released(b), b.s_logits)[0]
    g_full = torch.autograd.grad(_distillm_2_released(b, detach=False), b.s_logits)[0]
    assert float((g_sg - g_full)[on].abs().max()) > 1e-4
    torch.testing.assert_close(g_sg[b.mask & ~on], g_full[b.mask & ~on])  # teacher rows: same skl

    loss_new, _, _ = run_objective("distillm-2", b)
    loss_old, g_old, _ = run_objective("distillm-2", b, "route1.divergence=srkl", "route1.coef=1",
                                       "gates.reduction=token_mean")
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    old = (total(kl(S, torch.log(0.9 * Tl.exp() + 0.1 * S.exp())), on)
           + total(kl(Tl, torch.log(0.1 * Tl.exp() + 0.9 * S.exp())), b.mask & ~on)) / _n(b)
    torch.testing.assert_close(loss_old, old.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_old, torch.autograd.grad(old, b.s_logits)[0], rtol=1e-4, atol=1e-7)
    assert 1.5 < float(loss_new / loss_old) < 2.5


def hand_akl(b: Batch):
    """AKL (arXiv 2404.02657): sort by π_T; head = prefix with cumulative mass ≤ μ (top-1 always);
    gaps with the student detached; w_head·FKL + w_tail·RKL."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    pt, ps = Tl.exp(), S.exp().detach()
    out = torch.zeros(b.mask.shape)
    for i, j in b.mask.nonzero().tolist():
        order = torch.argsort(pt[i, j], descending=True, stable=True)
        cum, head = 0.0, torch.zeros(pt.shape[-1], dtype=torch.bool)
        for rank, v in enumerate(order.tolist()):
            cum += float(pt[i, j, v])
            if rank == 0 or cum <= 0.5:
                head[v] = True
            else:
                break
        gap = (pt[i, j] - ps[i, j]).abs()
        g_head, g_tail = gap[head].sum(), gap[~head].sum()
        w = g_head / (g_head + g_tail)
        out = out.index_put((torch.tensor(i), torch.tensor(j)),
                            w * kl(Tl[i, j], S[i, j]) + (1 - w) * kl(S[i, j], Tl[i, j]))
    loss = out.sum() / _n(b)
    return loss, loss


def hand_tvd(b: Batch):
    """f-DISTILL TVD (arXiv 2307.15190): ½ Σ_v |π_T − π_S| on every row."""
    tvd = 0.5 * (lsm(b.t_logits).exp() - lsm(b.s_logits).exp()).abs().sum(-1)
    loss = total(tvd, b.mask) / _n(b)
    return loss, loss


def hand_eopd(b: Batch):
    """EOPD (arXiv 2603.07079, [INFER] gate): RKL + 1[H(π_T) > 1 nat]·FKL."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    gate = entropy(Tl) > 1.0
    per = kl(S, Tl) + where0(gate, kl(Tl, S))
    loss = total(per, b.mask) / _n(b)
    return loss, loss


def hand_verl_fkl_topk(b: Batch):
    """verl compute_forward_kl_topk: FKL on the teacher's top-128, full-vocabulary log-probs clamped at −10,
    no renormalisation, then clamp_min(0) and clamp(±10)."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    top = Tl.topk(128, dim=-1).indices
    s_k, t_k = S.gather(-1, top).clamp(min=-10.0), Tl.gather(-1, top).clamp(min=-10.0)
    per = (t_k.exp() * (t_k - s_k)).sum(-1).clamp(min=0.0).clamp(-10.0, 10.0)
    loss = total(per, b.mask) / _n(b)
    return loss, loss


def _verl_tail(b: Batch, *, floor_tail: bool = False, clamp_low: bool = False):
    """verl's forward KL on the teacher's top-128 with a tail bucket: the top-k log-probs floored at −10,
    one more entry ``log(1 − Σ_topk p)`` per side, *not* floored (the exact complement of the top-k's
    full-vocabulary probabilities), no clamp from below (the value is a true KL), clamp at 10 above.
    ``floor_tail`` / ``clamp_low`` give opd's earlier form (the floor on the bucket too, clamp_min(0))."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    top = Tl.topk(128, dim=-1).indices
    out = torch.ones_like(S, dtype=torch.bool).scatter(-1, top, False)  # the ids off the top-k

    def tail(x):
        return torch.where(out, x, torch.full((), float("-inf"))).logsumexp(-1, keepdim=True)

    s_k, t_k = S.gather(-1, top).clamp(min=-10.0), Tl.gather(-1, top).clamp(min=-10.0)
    s_t, t_t = tail(S), tail(Tl)
    if floor_tail:
        s_t, t_t = s_t.clamp(min=-10.0), t_t.clamp(min=-10.0)
    s_all, t_all = torch.cat([s_k, s_t], -1), torch.cat([t_k, t_t], -1)
    per = (t_all.exp() * (t_all - s_all)).sum(-1)
    per = per.clamp(min=0.0, max=10.0) if clamp_low else per.clamp(max=10.0)
    return total(per, b.mask) / _n(b)


def test_verl_fkl_topk_tail_mode_is_verls():
    """``method=verl-fkl-topk support.norm=tail``: the −10 floor applies to the top-k entries only (the
    bucket keeps its exact mass, ≈ 0 where the teacher's top-k holds nearly everything) and there is
    no clamp at 0 — in value and gradient. The batch has tokens where the teacher's true tail is below
    e^-10, so the earlier form (bucket floored at −10) differs."""
    from tests.test_presets_common import make_batch, preset_config

    assert_matches("verl-fkl-topk", lambda b: (_verl_tail(b), _verl_tail(b)), overrides=("support.norm=tail",))
    b = make_batch("verl-fkl-topk", preset_config("verl-fkl-topk", "support.norm=tail"))
    Tl = lsm(b.t_logits)
    top = Tl.topk(128, dim=-1).indices
    t_tail = torch.where(torch.ones_like(Tl, dtype=torch.bool).scatter(-1, top, False), Tl,
                         torch.full((), float("-inf"))).logsumexp(-1)
    assert int((t_tail[b.mask] < -10).sum()) >= 3
    old = _verl_tail(b, floor_tail=True, clamp_low=True)
    assert abs(float(old - _verl_tail(b))) > 1e-6


def hand_verl_k3(b: Batch):
    """verl low_var_kl as a supervised loss: k3 = e^δ − δ − 1, δ = log π_T(y) − log π_S(y), clamped to ±10."""
    delta = at(lsm(b.t_logits), b.ids) - at(lsm(b.s_logits), b.ids)
    per = (delta.exp() - delta - 1).clamp(-10.0, 10.0)
    loss = total(per, b.mask) / _n(b)
    return loss, loss


HAND = {
    "gkd": hand_gkd, "opsd": hand_reverse_kl, "sdpo": hand_reverse_kl, "sft-teacher": hand_sft_teacher,
    "fu-topk": hand_fu_topk, "distillm": hand_distillm, "distillm-2": hand_distillm_2, "akl": hand_akl,
    "tvd": hand_tvd, "eopd": hand_eopd, "verl-fkl-topk": hand_verl_fkl_topk, "verl-k3": hand_verl_k3,
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_route1_preset_equals_its_formula(name):
    assert_matches(name, HAND[name])


def test_verl_clamps_are_active_on_the_batch():
    """The clamps the verl presets reproduce actually bind on the fixed batch (else the test above could
    not tell them apart from the unclamped losses)."""
    from tests.test_presets_common import make_batch, preset_config

    b = make_batch("verl-k3", preset_config("verl-k3"))
    delta = (at(lsm(b.t_logits), b.ids) - at(lsm(b.s_logits), b.ids))[b.mask]
    assert ((delta.exp() - delta - 1) > 10).any()
    Tl, S = lsm(b.t_logits), lsm(b.s_logits.detach())
    top = Tl.topk(128, dim=-1).indices
    raw = (Tl.gather(-1, top).exp() * (Tl.gather(-1, top) - S.gather(-1, top))).sum(-1)[b.mask]
    assert (raw < 0).any() or (S.gather(-1, top) < -10).any()
