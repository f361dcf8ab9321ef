"""Route-2 and hybrid presets against their sources' formulas written here by hand.

Each ``hand_*`` returns ``(value, surrogate)``. For importance-sampling losses (tinker, PPO) the value
is the source's own loss. Sources that write REINFORCE as ``−w·A·log π_S(y)`` (TRL's IW-OPD, NeMo-RL)
define a different *value* with the same gradient as opd's ``−ρ·A`` (``ρ = π_S/μ`` with its gradient):
there the value compared is ``−w·A·sg[ρ]`` and the surrogate the source's form, whose gradient must match.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_presets_common import (
    Batch,
    assert_matches,
    at,
    entropy,
    kl,
    lsm,
    make_batch,
    preset_config,
    run_objective,
    total,
    where0,
)


def _n(b: Batch) -> torch.Tensor:
    return b.mask.sum()


def _lp(b: Batch) -> torch.Tensor:
    return at(lsm(b.s_logits), b.ids)


def _t(b: Batch) -> torch.Tensor:
    return at(lsm(b.t_logits), b.ids)


def _ppo(ratio, adv, eps=0.2):
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def _rows(b: Batch, lengths=True):
    """(row, valid length) pairs."""
    return [(i, int(b.mask[i].sum())) for i in range(b.mask.shape[0])]


def hand_tinker(b: Batch):
    """tinker-cookbook train_on_policy + importance_sampling loss: A = −(log μ − log π_T),
    L = −Σ_tokens (π_S/μ)·A — a sum over tokens and sequences."""
    lp = _lp(b)
    adv = _t(b) - b.mu
    loss = -total((lp - b.mu).exp() * adv, b.on_mask)
    return loss, loss


def hand_vopd(b: Batch):
    """vOPD (arXiv 2605.07865): A = r + sg[RKL_t], full-vocabulary value."""
    lp = _lp(b)
    adv = _t(b) - lp.detach() + kl(lsm(b.s_logits), lsm(b.t_logits)).detach()
    loss = -total((lp - b.mu).exp() * adv, b.on_mask) / _n(b)
    return loss, loss


def _tail_rkl(b: Batch, k: int) -> torch.Tensor:
    """RKL on the teacher's top-k plus one tail bucket (exact tails from both full distributions)."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    top = Tl.topk(k, dim=-1).indices
    inside = torch.zeros_like(S, dtype=torch.bool).scatter_(-1, top, True)
    s_tail = S.masked_fill(inside, -float("inf")).logsumexp(-1, keepdim=True)
    t_tail = Tl.masked_fill(inside, -float("inf")).logsumexp(-1, keepdim=True)
    s_k = torch.cat([S.gather(-1, top), s_tail], -1)
    t_k = torch.cat([Tl.gather(-1, top), t_tail], -1)
    return kl(s_k, t_k)


def hand_gae_opd(b: Batch):
    """GAE-OPD ([INFER], survey arXiv 2606.22793; GAE arXiv 1506.02438): V = −RKL(top-32 + tail) + γU,
    δ_t = r_t + γV_{t+1} − V_t, A_t = Σ (γλ)^l δ_{t+l}, γ = 1, λ = 0.95; + ½·½(V_pred − sg[A + V])²."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    rkl = _tail_rkl(b, 32).detach()
    V = -rkl + b.cont.detach()
    adv = torch.zeros_like(r)
    for i, n in _rows(b):
        run = 0.0
        for t in reversed(range(n)):
            v_next = V[i, t + 1] if t + 1 < n else 0.0
            run = (r[i, t] + v_next - V[i, t]) + 0.95 * run
            adv[i, t] = run
    v_pred = -rkl + b.cont
    target = (adv + V).detach()
    loss = (-total((lp - b.mu).exp() * adv, b.mask) + 0.5 * total(0.5 * (v_pred - target) ** 2, b.mask)) / _n(b)
    return loss, loss


def hand_cr_opd(b: Batch):
    """CR-OPD ([INFER], docs/methods.md §3.4): A = r + sg[RKL(top-16 + tail)]; for A < 0 with candidates
    C = (TopK_T(16) ∩ TopK_S(8)) \\ {y}: L = −A (log π_S(y) − Σ_{v∈C} ρ(v) (log π_S(v) − sg)), ρ ∝ π_T on C;
    else L = −A log π_S(y). The routing term is centred, so the value is −A log π_S(y) everywhere."""
    S, Tl = lsm(b.s_logits), lsm(b.t_logits)
    lp = _lp(b)
    adv = (_t(b) - lp + _tail_rkl(b, 16)).detach()
    t_top = Tl.topk(16, dim=-1).indices
    kth = S.detach().topk(8, dim=-1).values[..., -1:]
    route = torch.zeros_like(lp)
    for i, j in b.mask.nonzero().tolist():
        cand = [v for v in t_top[i, j].tolist() if v != int(b.ids[i, j]) and S[i, j, v] >= kth[i, j, 0]]
        if adv[i, j] < 0 and cand:
            rho = torch.softmax(Tl[i, j, cand], dim=-1)
            s_c = S[i, j, cand]
            route = route.index_put((torch.tensor(i), torch.tensor(j)), (rho * (s_c - s_c.detach())).sum())
    surrogate = -total(adv * (lp - route), b.mask) / _n(b)
    value = -total(adv * lp, b.mask) / _n(b)
    return value, surrogate


def hand_power_opd(b: Batch):
    """PowerOPD ([INFER] form, arXiv 2606.17199): A = ((π_T/π_S)^α − 1)/α, α = 0.5."""
    lp = _lp(b)
    adv = torch.expm1(0.5 * (_t(b) - lp.detach())) / 0.5
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


def hand_exopd(b: Batch):
    """ExOPD (arXiv 2602.12125, [INFER] per-token form): A = λ log π_T + (1−λ) log π_ref − log π_S, λ = 1.25."""
    lp = _lp(b)
    adv = 1.25 * _t(b) + (1 - 1.25) * at(lsm(b.ref_logits), b.ids) - lp.detach()
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


def hand_iw_opd(b: Batch):
    """IW-OPD as TRL's IWOPDTrainer computes it: a = log π_T − log π_S, w = 1 + γ(1 − Σ_{<t}|a| /
    max(Σ|a|, ε)), L = −mean w·a·log π_S(y)  (REINFORCE form; value compared at ρ = 1)."""
    lp = _lp(b)
    a = where0(b.mask, (_t(b) - lp).detach())
    prefix = a.abs().cumsum(1) - a.abs()
    w = 1 + 0.5 * (1 - prefix / a.abs().sum(1, keepdim=True).clamp(min=1e-8))
    value = -total(w * a, b.mask) / _n(b)
    surrogate = -total(w * a * lp, b.mask) / _n(b)
    return value, surrogate


def hand_opdvr(b: Batch):
    """OPDVR (arXiv 2608.24696): r̃ = max(0, r) on verifier-correct rows, −max(0, −r) on the others;
    PPO clip 0.2 (verl's), token mean."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    correct = (b.outcome > 0)[:, None]
    r_gated = torch.where(correct, torch.relu(r), -torch.relu(-r))
    loss = total(_ppo((lp - b.mu).exp(), r_gated), b.mask) / _n(b)
    return loss, loss


def hand_opsa(b: Batch):
    """OPSA (arXiv 2608.31046; DripNowhy/On-Policy-Self-Adaptation opsa.py): the ⌊0.2·N⌋ lowest
    log π_S(y) of the batch (stable order), A = −0.5 − 0.5·(H − H_min)/(H_max − H_min) over them;
    PPO clip 0.2; opd's token mean over all N."""
    lp = _lp(b)
    flat = [(float(lp[i, j].detach()), i, j) for i, j in b.mask.nonzero().tolist()]
    n_sel = max(1, int(0.2 * len(flat)))
    chosen = sorted(range(len(flat)), key=lambda k: (flat[k][0], k))[:n_sel]
    sel = torch.zeros_like(b.mask)
    for k in chosen:
        sel[flat[k][1], flat[k][2]] = True
    h = entropy(lsm(b.s_logits)).detach()
    lo, hi = h[sel].min(), h[sel].max()
    adv = -0.5 - 0.5 * (h - lo) / (hi - lo)
    loss = total(_ppo((lp - b.mu).exp(), adv), sel) / _n(b)
    return loss, loss


def hand_stable_opd(b: Batch):
    """StableOPD ([INFER] coefficients, arXiv 2604.08527): sampled-token OPD on the student's rows
    + 0.1·k3 reference KL on every row + SFT (mean over the golden rows' tokens)."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    delta = at(lsm(b.ref_logits), b.ids) - lp
    k3 = delta.exp() - 1 - delta
    off = b.mask & ~b.on_mask
    loss = (-total((lp - b.mu).exp() * r, b.on_mask) + 0.1 * total(k3, b.mask)) / _n(b) + total(-lp, off) / off.sum()
    return loss, loss


def hand_tip(b: Batch):
    """TIP Q1 ([INFER] quantile form, arXiv 2604.14084): keep tokens whose student entropy is ≥ the
    ⌈0.5·N⌉-th largest of the batch; sampled-token OPD on them, normaliser N."""
    lp = _lp(b)
    h = entropy(lsm(b.s_logits)).detach()
    vals = h[b.mask]
    thr = vals.sort(descending=True).values[int(torch.ceil(torch.tensor(0.5 * vals.numel()))) - 1]
    keep = b.mask & (h >= thr)
    loss = -total((lp - b.mu).exp() * (_t(b) - lp.detach()), keep) / _n(b)
    return loss, loss


def hand_lightning_opd(b: Batch):
    """Lightning OPD ([INFER] update, arXiv 2604.13010): A = log π_T[cached] − log π_S on fixed rows, ρ = 1."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    loss = -total((lp - lp.detach()).exp() * r, b.mask) / _n(b)
    return loss, loss


def hand_nemo_rl(b: Batch):
    """NeMo-RL OPDAdvantageEstimator + ClippedPGLoss (disable_ppo_ratio, icepop [0.2, 5]):
    A = sg[log π_T − log π_S], w = sg[π_S/μ]·1[0.2 ≤ π_S/μ ≤ 5], L = −mean w·A·log π_S(y)."""
    lp = _lp(b)
    adv = (_t(b) - lp).detach()
    ratio = (lp - b.mu).exp().detach()
    band = (ratio >= 0.2) & (ratio <= 5.0)
    value = -total(where0(band, ratio * adv), b.mask) / _n(b)
    surrogate = -total(where0(band, ratio * adv * lp), b.mask) / _n(b)
    return value, surrogate


def hand_prime_rl(b: Batch):
    """prime-rl default_loss_fn: A = adv_tau·(R − mean_g R) + teacher_tau·sg[log π_T − log π_S]; DPPO mask
    from the reward advantage (A_R > 0: drop if π_S − μ > 0.2, else drop if π_S − μ < −0.2);
    L = Σ(−keep·A·π_S/μ + kl_tau·(log π_S − log μ)²) / N."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    reward = b.outcome
    a_r = torch.stack([reward[i] - reward[b.group == b.group[i]].mean() for i in range(len(reward))])[:, None]
    adv = 1.0 * a_r + 0.5 * r
    diff = lp.detach().exp() - b.mu.exp()
    masked = torch.where(a_r > 0, diff > 0.2, diff < -0.2)
    keep = b.mask & ~masked
    loss = (-total((lp - b.mu).exp() * adv, keep) + 1e-3 * total((lp - b.mu) ** 2, b.mask)) / _n(b)
    return loss, loss


def hand_slime(b: Batch):
    """slime apply_opd_kl_to_advantages: Â = A_GRPO − λ(log π_S − log π_T), λ = 1, A_GRPO = (R − mean_g)/
    (std_g + 1e-6) (Bessel std; 0 for a constant group); PPO clip 0.2."""
    lp = _lp(b)
    reward = b.outcome
    a_r = []
    for i in range(len(reward)):
        grp = reward[b.group == b.group[i]]
        a_r.append((reward[i] - grp.mean()) / (grp.std() + 1e-6))
    adv = torch.stack(a_r)[:, None] - 1.0 * (lp - _t(b)).detach()
    loss = total(_ppo((lp - b.mu).exp(), adv), b.mask) / _n(b)
    return loss, loss


def hand_minillm(b: Batch):
    """MiniLLM (arXiv 2306.08543) single-step decomposition: exact RKL_t + PPO-clipped policy gradient with
    the length-normalised return from t+1, A_t = mean_{t'>t} r_t', on teacher-mixed samples (ρ = π_S/mix)."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    adv = torch.zeros_like(r)
    for i, n in _rows(b):
        for t in range(n - 1):
            adv[i, t] = r[i, t + 1:n].mean()
    rkl = kl(lsm(b.s_logits), lsm(b.t_logits))
    loss = (total(rkl, b.mask) + total(_ppo((lp - b.mu).exp(), adv), b.mask)) / _n(b)
    return loss, loss


HAND = {
    "thinking-machines": hand_tinker, "sdft": hand_tinker, "vopd": hand_vopd, "gae-opd": hand_gae_opd,
    "cr-opd": hand_cr_opd, "power-opd": hand_power_opd, "exopd": hand_exopd, "iw-opd": hand_iw_opd,
    "opdvr": hand_opdvr, "opsa": hand_opsa, "stable-opd": hand_stable_opd, "tip": hand_tip,
    "lightning-opd": hand_lightning_opd, "nemo-rl-opd": hand_nemo_rl, "prime-rl-hybrid": hand_prime_rl,
    "slime-opd": hand_slime, "minillm": hand_minillm,
}
# the sampler each formula is checked under: a stale/mismatched one where the source corrects for it
MU = {"thinking-machines": "noise", "sdft": "noise", "nemo-rl-opd": "noise", "prime-rl-hybrid": "noise",
      "slime-opd": "noise", "opdvr": "noise", "opsa": "noise", "minillm": "mix"}


@pytest.mark.parametrize("name", sorted(HAND))
def test_route2_preset_equals_its_formula(name):
    assert_matches(name, HAND[name], mu=MU.get(name, "on"))


def test_thinking_machines_reward_and_reduction_choices_differ_when_the_sampler_is_not_the_student():
    """With μ ≠ π_S, opd's two choices — the sampler's log-probs and a sum (tinker), or the current
    student's log-probs and a token mean — are different updates; the preset is tinker's."""
    name = "thinking-machines"
    b = make_batch(name, preset_config(name), mu="noise")
    tinker_loss, tinker_grad, _ = run_objective(name, b)
    cur_loss, cur_grad, _ = run_objective(name, b, "route2.reward_logprobs=current", "gates.reduction=token_mean")
    n = b.mask.sum()
    assert not torch.allclose(tinker_loss / n, cur_loss, rtol=1e-3)
    assert not torch.allclose(tinker_grad / n, cur_grad, rtol=1e-3, atol=1e-6)
    # the current-student choice is the on-policy estimator: −mean ρ (log π_T − sg log π_S)
    lp = _lp(b)
    hand = -total((lp - b.mu).exp() * (_t(b) - lp.detach()), b.on_mask) / n
    (g,) = torch.autograd.grad(hand, b.s_logits)
    torch.testing.assert_close(cur_loss, hand.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cur_grad, g, rtol=1e-4, atol=1e-7)
    # and the preset is exactly tinker's formula, written here
    assert_matches(name, hand_tinker, mu="noise")


def test_thinking_machines_choices_agree_when_the_sampler_is_the_student():
    """μ = π_S (one update per batch, temperature 1, no top-p/top-k): the rewards coincide and the
    summed loss is N times the token mean, in value and gradient."""
    name = "thinking-machines"
    b = make_batch(name, preset_config(name), mu="on")
    tinker_loss, tinker_grad, _ = run_objective(name, b)
    cur_loss, cur_grad, _ = run_objective(name, b, "route2.reward_logprobs=current", "gates.reduction=token_mean")
    n = b.mask.sum().float()
    torch.testing.assert_close(tinker_loss / n, cur_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tinker_grad / n, cur_grad, rtol=1e-4, atol=1e-8)


def test_opdvr_gate_and_opsa_selection_bind_on_the_batch():
    """The batch has OPDVR conflicts of both types and OPSA's selection is a strict subset."""
    b = make_batch("opdvr", preset_config("opdvr"))
    r = (_t(b) - _lp(b)).detach()
    correct = (b.outcome > 0)[:, None].expand_as(r)
    assert (b.mask & correct & (r < 0)).any() and (b.mask & ~correct & (r > 0)).any()
    assert 1 < int(0.2 * int(b.mask.sum())) < int(b.mask.sum())
