import math

import pytest
import torch

from opd.math.policy_gradient import (
    clip_advantages,
    dppo_mask,
    importance_ratio,
    mix_advantages,
    outcome_advantages,
    pg_loss,
    whiten_advantages,
)
from opd.math.reduce import reduce_tokens

B, T, V = 3, 7, 11
F64 = torch.float64


def sampled_logprobs(logits, ids):
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def naive_pg(logp, adv, behaviour=None, clip_low=None, clip_high=None, cap=None):
    """Per-element loop reference: returns (loss, d loss / d logp) computed by hand."""
    loss = torch.zeros_like(adv, dtype=F64)
    grad = torch.zeros_like(adv, dtype=F64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in adv.shape]):
        i = tuple(idx.tolist())
        a = float(adv[i])
        rho = 1.0 if behaviour is None else math.exp(float(logp[i]) - float(behaviour[i]))
        if cap is not None and rho > cap:
            rho = cap              # value min(ρ, C); gradient min(ρ, C)·∇log π
        val, g = -rho * a, -rho * a   # d(−ρA)/dlogπ = −ρA
        if clip_low is not None or clip_high is not None:
            lo = 1 - clip_low if clip_low is not None else -math.inf
            hi = 1 + clip_high if clip_high is not None else math.inf
            clipped = min(max(rho, lo), hi)
            if -clipped * a > val:   # the clipped branch is the max: it is constant in θ
                val, g = -clipped * a, 0.0
        loss[i], grad[i] = val, g
    return loss, grad


def test_on_policy_value_is_minus_A_and_gradient_is_minus_A_grad_logp():
    logits = torch.randn(B, T, V, dtype=F64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B, T, dtype=F64)
    mask = torch.rand(B, T) > 0.3
    logp = sampled_logprobs(logits, ids)
    loss, metrics = pg_loss(logp, adv)
    torch.testing.assert_close(loss, -adv)                     # ρ = 1 in value: L = −A·1
    torch.testing.assert_close(metrics["ratio"], torch.ones(B, T, dtype=F64))
    total = reduce_tokens(loss, mask)
    (g,) = torch.autograd.grad(total, logits)
    # naive: ∂/∂z of Σ_t w_t (−A_t log π(y_t)) = −w_t A_t (e_y − π)
    w = mask.to(F64) / mask.sum()
    probs = logits.detach().softmax(-1)
    ref = torch.zeros_like(g)
    for b in range(B):
        for t in range(T):
            e = torch.zeros(V, dtype=F64)
            e[ids[b, t]] = 1.0
            ref[b, t] = -w[b, t] * adv[b, t] * (e - probs[b, t])
    torch.testing.assert_close(g, ref)


def test_importance_ratio_value_and_gradient():
    logp = torch.randn(B, T, dtype=F64, requires_grad=True)
    beh = torch.randn(B, T, dtype=F64, requires_grad=True)
    rho = importance_ratio(logp, beh)
    torch.testing.assert_close(rho, torch.exp(logp - beh))
    g_logp, g_beh = torch.autograd.grad(rho.sum(), [logp, beh], allow_unused=True)
    torch.testing.assert_close(g_logp, torch.exp(logp - beh).detach())
    assert g_beh is None or torch.equal(g_beh, torch.zeros_like(g_beh))  # behaviour detached


@pytest.mark.parametrize("clip_low,clip_high,cap", [
    (None, None, None), (0.2, 0.2, None), (0.2, 0.28, None), (None, 0.3, None),
    (0.1, None, None), (None, None, 1.5), (0.2, 0.2, 1.3)])
def test_pg_loss_matches_loop(clip_low, clip_high, cap):
    logp = (torch.randn(B, T, dtype=F64) * 0.5).requires_grad_(True)
    beh = logp.detach() + torch.randn(B, T, dtype=F64) * 0.5
    adv = torch.randn(B, T, dtype=F64)
    loss, metrics = pg_loss(logp, adv, behaviour_logprobs_BT=beh, clip_low=clip_low,
                            clip_high=clip_high, ratio_cap=cap)
    ref_loss, ref_grad = naive_pg(logp.detach(), adv, beh, clip_low, clip_high, cap)
    torch.testing.assert_close(loss, ref_loss)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, ref_grad)
    # the "clipped" indicator is exactly "PPO clipping removed the gradient"
    clipped_ref = (ref_grad == 0) & (adv != 0)
    assert torch.equal(metrics["clipped"], clipped_ref)
    if cap is not None:
        assert torch.equal(metrics["capped"], torch.exp(logp - beh).detach() > cap)


def test_ppo_clip_hand_case():
    # ε_low = ε_high = 0.2, so clip(ρ) ∈ [0.8, 1.2]
    rho = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=F64)
    adv = torch.tensor([2.0, 2.0, -2.0, -2.0], dtype=F64)
    beh = torch.zeros(4, dtype=F64)
    logp = rho.log().requires_grad_(True)
    loss, metrics = pg_loss(logp, adv, behaviour_logprobs_BT=beh, clip_low=0.2, clip_high=0.2)
    # 0: ρA = 3.0,  clip·A = 1.2·2 = 2.4,   min = 2.4  -> loss −2.4, clipped (no gradient)
    # 1: ρA = 1.0,  clip·A = 0.8·2 = 1.6,   min = 1.0  -> loss −1.0, grad −ρA = −1.0
    # 2: ρA = −1.0, clip·A = 0.8·−2 = −1.6, min = −1.6 -> loss 1.6,  clipped (no gradient)
    # 3: ρA = −3.0, clip·A = 1.2·−2 = −2.4, min = −3.0 -> loss 3.0,  grad −ρA = 3.0
    torch.testing.assert_close(loss, torch.tensor([-2.4, -1.0, 1.6, 3.0], dtype=F64))
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([0.0, -1.0, 0.0, 3.0], dtype=F64))
    assert metrics["clipped"].tolist() == [True, False, True, False]


def test_ratio_cap_truncates_weight_but_keeps_gradient():
    # ρ = e^1 ≈ 2.718 > C = 2: value −2A, gradient −2A (truncated IS), not 0 as with clipping
    logp = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    beh = torch.zeros(2, dtype=F64)
    adv = torch.tensor([3.0, 3.0], dtype=F64)
    loss, metrics = pg_loss(logp, adv, behaviour_logprobs_BT=beh, ratio_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor([-6.0, -3.0 * math.exp(-0.5)], dtype=F64))
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([-6.0, -3.0 * math.exp(-0.5)], dtype=F64))
    assert metrics["capped"].tolist() == [True, False]


@pytest.mark.parametrize("with_behaviour", [False, True])
def test_pg_all_masked_and_padding(with_behaviour):
    logp = torch.randn(B, T, dtype=F64)
    logp[:, -2:] = -float("inf")                          # padding log-probs
    logp.requires_grad_(True)
    beh = torch.randn(B, T, dtype=F64) if with_behaviour else None
    if beh is not None:
        beh[:, -2:] = -float("inf")
    adv = torch.randn(B, T, dtype=F64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, _ = pg_loss(logp, adv, behaviour_logprobs_BT=beh, clip_low=0.2, clip_high=0.2,
                      mask_BT=mask)
    total = reduce_tokens(loss, mask)
    assert total.item() == 0.0
    (g,) = torch.autograd.grad(total, logp)
    assert torch.equal(g, torch.zeros_like(g))
    # padding invariance: the real tokens are the first T-2 columns with a random mask
    mask = torch.rand(B, T) > 0.3
    mask[:, -2:] = False
    loss, _ = pg_loss(logp, adv, behaviour_logprobs_BT=beh, clip_low=0.2, clip_high=0.2,
                      mask_BT=mask)
    full = reduce_tokens(loss, mask, "sequence_mean")
    assert torch.isfinite(full)
    (g,) = torch.autograd.grad(full, logp)
    assert torch.isfinite(g).all() and torch.equal(g[:, -2:], torch.zeros(B, 2, dtype=F64))
    sl = slice(0, T - 2)
    loss2, _ = pg_loss(logp[:, sl], adv[:, sl],
                       behaviour_logprobs_BT=None if beh is None else beh[:, sl],
                       clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(full, reduce_tokens(loss2, mask[:, sl], "sequence_mean"))


@pytest.mark.parametrize("pi,mu,adv,keep", [
    (0.70, 0.40, 1.0, False),   # A>0 and π−μ = 0.3 > δ_high = 0.2: pushing up further -> drop
    (0.55, 0.40, 1.0, True),    # A>0, π−μ = 0.15 ≤ 0.2
    (0.10, 0.40, 1.0, True),    # A>0, π fell: raising it is inside the region
    (0.10, 0.40, -1.0, False),  # A<0 and π−μ = −0.3 < −δ_low = −0.2 -> drop
    (0.30, 0.40, -1.0, True),   # A<0, π−μ = −0.1
    (0.90, 0.40, -1.0, True),   # A<0, π rose: lowering it is inside the region
    (0.90, 0.10, 0.0, True),    # A = 0 is always kept
    (0.10, 0.90, 0.0, True),
])
def test_dppo_mask_cases(pi, mu, adv, keep):
    lp = torch.tensor([[math.log(pi)]])
    lm = torch.tensor([[math.log(mu)]])
    a = torch.tensor([[adv]])
    assert dppo_mask(lp, lm, a, delta_low=0.2, delta_high=0.2).item() is keep


def test_dppo_mask_random_matches_loop():
    lp = torch.rand(B, T).log()
    lm = torch.rand(B, T).log()
    adv = torch.randn(B, T)
    got = dppo_mask(lp, lm, adv, delta_low=0.1, delta_high=0.25)
    for b in range(B):
        for t in range(T):
            d = math.exp(lp[b, t]) - math.exp(lm[b, t])
            drop = (adv[b, t] > 0 and d > 0.25) or (adv[b, t] < 0 and d < -0.1)
            assert got[b, t].item() is (not drop)


def test_whiten_zero_mean_unit_std_over_valid_tokens():
    adv = torch.randn(B, T, dtype=F64) * 3 + 2
    mask = torch.rand(B, T) > 0.4
    mask[0, 0] = mask[1, 1] = True
    adv_padded = torch.where(mask, adv, torch.full_like(adv, float("nan")))
    out = whiten_advantages(adv_padded, mask, eps=1e-12)
    vals = out[mask]
    ref = (adv[mask] - adv[mask].mean()) / adv[mask].std(unbiased=False)
    torch.testing.assert_close(vals, ref)
    assert abs(vals.mean().item()) < 1e-12
    assert abs(vals.std(unbiased=False).item() - 1.0) < 1e-9
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    # padding invariance
    wide = torch.cat([adv_padded, torch.full((B, 3), 7.0, dtype=F64)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(whiten_advantages(wide, wide_mask, eps=1e-12)[:, :T], out)


def test_whiten_degenerate_cases():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = whiten_advantages(torch.randn(2, 3), mask)
    assert torch.equal(out, torch.zeros(2, 3))
    const = whiten_advantages(torch.full((2, 3), 5.0), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(const, torch.zeros(2, 3))


def test_clip_advantages():
    adv = torch.tensor([-7.0, -5.0, -1.0, 0.0, 4.9, 6.0])
    torch.testing.assert_close(clip_advantages(adv, 5.0),
                               torch.tensor([-5.0, -5.0, -1.0, 0.0, 4.9, 5.0]))
    with pytest.raises(ValueError, match="limit must be > 0"):
        clip_advantages(adv, 0.0)


def test_outcome_advantages_hand_case():
    # group 7: rewards [1, 0, 0, 1] -> mean 0.5, sample std sqrt((4·0.25)/3) = sqrt(1/3) = 0.5774
    #          A = ±0.5/0.5774 = ±0.8660
    # group 2: rewards [1, 1]       -> mean 1, std 0 -> A = 0 (0/(0+eps))
    # group 5: single sample        -> A = 0
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.3])
    groups = torch.tensor([7, 2, 7, 7, 7, 2, 5])
    got = outcome_advantages(rewards, groups, eps=0.0 + 1e-12)
    a = 0.5 / math.sqrt(1.0 / 3.0)
    torch.testing.assert_close(got, torch.tensor([a, 0.0, -a, -a, a, 0.0, 0.0]))
    no_std = outcome_advantages(rewards, groups, normalize_std=False)
    torch.testing.assert_close(no_std, torch.tensor([0.5, 0.0, -0.5, -0.5, 0.5, 0.0, 0.0]))


def test_outcome_advantages_match_loop():
    rewards = torch.randn(13, dtype=F64)
    groups = torch.randint(0, 4, (13,)) * 10 - 3
    got = outcome_advantages(rewards, groups, eps=1e-6)
    for i in range(13):
        members = [float(rewards[j]) for j in range(13) if groups[j] == groups[i]]
        n = len(members)
        if n == 1:
            assert got[i].item() == 0.0
            continue
        mean = sum(members) / n
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
        assert abs(got[i].item() - (float(rewards[i]) - mean) / (std + 1e-6)) < 1e-10


def test_mix_advantages():
    opd = torch.randn(B, T)
    opd[0, -1] = float("nan")
    out_b = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.rand(B, T) > 0.3
    mask[0, -1] = False
    got = mix_advantages(opd, out_b, mask, teacher_tau=0.7, adv_tau=0.4)
    for b in range(B):
        for t in range(T):
            ref = 0.7 * opd[b, t].item() + 0.4 * out_b[b].item() if mask[b, t] else 0.0
            assert abs(got[b, t].item() - ref) < 1e-6
    # pure OPD default ignores the outcome; pure RL broadcasts it
    torch.testing.assert_close(mix_advantages(opd, out_b, mask), torch.where(mask, opd, 0.0))
    pure_rl = mix_advantages(opd, out_b, mask, teacher_tau=0.0, adv_tau=1.0)
    torch.testing.assert_close(pure_rl, torch.where(mask, out_b[:, None].expand(B, T), 0.0))


def test_errors_name_shapes_and_ranges():
    with pytest.raises(ValueError, match=r"\(3, 7\).*\(3, 6\)|\(3, 6\).*\(3, 7\)"):
        pg_loss(torch.zeros(3, 7), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="clip_low must be <= 1.0"):
        pg_loss(torch.zeros(2), torch.zeros(2), behaviour_logprobs_BT=torch.zeros(2), clip_low=1.5)
    with pytest.raises(ValueError, match="ratio_cap must be > 0"):
        pg_loss(torch.zeros(2), torch.zeros(2), ratio_cap=0.0)
    with pytest.raises(ValueError, match="delta_high must be >= 0"):
        dppo_mask(torch.zeros(2), torch.zeros(2), torch.zeros(2), delta_low=0.1, delta_high=-1.0)
    with pytest.raises(ValueError, match="adv_tau must be >= 0"):
        mix_advantages(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), adv_tau=-1.0)
    with pytest.raises(ValueError, match="one entry per row"):
        mix_advantages(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


def test_ratio_band_mask_is_icepop():
    from opd.math.policy_gradient import ratio_band_mask

    lp = torch.log(torch.tensor([[0.1, 0.5, 0.9, 0.5]]))
    mu = torch.log(torch.tensor([[0.6, 0.05, 0.9, 0.1]]))  # ratios 1/6, 10, 1, 5
    assert ratio_band_mask(lp, mu, low=0.2, high=5.0).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="low <= high"):
        ratio_band_mask(lp, mu, low=2.0, high=1.0)


def test_dppo_zero_advantage_on_the_low_band_as_prime_rl():
    """prime-rl: ``where(A > 0, high_violation, low_violation)`` — A = 0 is checked on the low band."""
    lp = torch.log(torch.tensor([[0.2, 0.9, 0.2]]))
    mu = torch.log(torch.tensor([[0.9, 0.2, 0.9]]))  # π − μ = −0.7, +0.7, −0.7
    adv = torch.tensor([[0.0, 0.0, 1.0]])
    assert dppo_mask(lp, mu, adv, delta_low=0.2, delta_high=0.2).tolist() == [[True, True, True]]
    assert dppo_mask(lp, mu, adv, delta_low=0.2, delta_high=0.2, zero_as_negative=True).tolist() == [
        [False, True, True]]
