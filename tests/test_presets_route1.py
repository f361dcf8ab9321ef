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


def hand_distillm_2(b: Batch):
    """DistiLLM-2 (arXiv 2503.07067): SKL on teacher rows, SRKL on student rows, α = 0.1."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    skl = kl(Tl, _mix_logp(Tl, S, 0.1))
    srkl = kl(S, _mix_logp(Tl, S, 0.9))
    on = b.on_mask
    loss = (total(srkl, on) + total(skl, b.mask & ~on)) / _n(b)
    return loss, loss


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
