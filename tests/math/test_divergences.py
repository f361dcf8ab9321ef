import math

import pytest
import torch

from opd.math.divergences import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    adaptive_kl,
    divergence,
    forward_kl,
    generalized_jsd,
    resolve_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

KNOBS = dict(beta=0.3, alpha=0.2, mu=0.6)
CASES = [(name, KNOBS) for name in DIVERGENCE_NAMES] + [
    ("jsd", dict(beta=0.0, alpha=0.1, mu=0.5)),
    ("jsd", dict(beta=1.0, alpha=0.1, mu=0.5)),
    ("skl", dict(beta=0.5, alpha=0.0, mu=0.5)),
    ("srkl", dict(beta=0.5, alpha=0.9, mu=0.5)),
    ("srkl_sg", dict(beta=0.5, alpha=0.9, mu=0.5)),
    ("akl", dict(beta=0.5, alpha=0.1, mu=0.0)),
]


# ---------------------------------------------------------------- naive references (float64, probability space)


def naive_kl(p, q):
    """Σ_{p>0} p log(p/q): explicit, with 0 log 0 = 0 and p log(p/0) = +inf."""
    keep = p > 0
    return (p[keep] * (torch.log(p[keep]) - torch.log(q[keep]))).sum()


def naive_token(name, ps, pt, beta, alpha, mu):
    """One token, 1-D probability vectors over the valid entries only."""
    if name == "fkl" or (name == "jsd" and beta == 0):
        return naive_kl(pt, ps)
    if name == "rkl" or (name == "jsd" and beta == 1):
        return naive_kl(ps, pt)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * naive_kl(pt, m) + (1 - beta) * naive_kl(ps, m)
    if name == "skl":
        return naive_kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "srkl":
        return naive_kl(ps, (1 - alpha) * pt + alpha * ps)
    if name == "srkl_sg":  # DistiLLM-2's released trainer: the student inside the mixture is detached
        return naive_kl(ps, (1 - alpha) * pt + alpha * ps.detach())
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum()
    assert name == "akl"
    order = sorted(range(len(pt)), key=lambda i: -float(pt[i]))  # stable: ties keep position order
    g_head = g_tail = 0.0
    cum = 0.0
    for rank, i in enumerate(order):
        cum += float(pt[i])
        gap = abs(float(pt[i]) - float(ps[i].detach()))
        if rank == 0 or cum <= mu:
            g_head += gap
        else:
            g_tail += gap
    w = g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5
    return w * naive_kl(pt, ps) + (1 - w) * naive_kl(ps, pt)


def naive(name, s_logp, t_logp, valid, knobs):
    """Loop over tokens; per token, exponentiate the valid entries and apply the formula."""
    lead = s_logp.shape[:-1]
    s2, t2, v2 = s_logp.reshape(-1, s_logp.shape[-1]), t_logp.reshape(-1, t_logp.shape[-1]), valid.reshape(-1, valid.shape[-1])
    out = []
    for n in range(s2.shape[0]):
        idx = v2[n].nonzero()[:, 0]
        if len(idx) == 0:
            out.append(torch.zeros((), dtype=s_logp.dtype))
            continue
        out.append(naive_token(name, torch.exp(s2[n, idx]), torch.exp(t2[n, idx].detach()), **knobs))
    return torch.stack(out).reshape(lead)


def masked_logp(z, valid, garbage):
    """Log-probs renormalised over the valid entries; ``garbage`` at the invalid ones."""
    logp = torch.log_softmax(torch.where(valid, z, torch.full_like(z, -1e4)), dim=-1)
    return torch.where(valid, logp, torch.full_like(z, garbage))


def random_case(shape=(3, 7, 11), p_valid=0.7, all_masked_row=True):
    zs = (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    zt = 2 * torch.randn(shape, dtype=torch.float64)
    valid = torch.rand(shape) < p_valid
    valid[..., 0] = True
    if all_masked_row:
        valid[1, 2] = False  # one token with an empty support
    return zs, zt, valid


# ---------------------------------------------------------------- value and gradient vs the naive reference


@pytest.mark.parametrize("name,knobs", CASES)
def test_matches_naive_value_and_gradient(name, knobs):
    zs, zt, valid = random_case()
    s = masked_logp(zs, valid, float("nan"))  # invalid entries hold garbage that must be ignored
    t = masked_logp(zt, valid, float("inf"))
    got = divergence(name, s, t, valid, **knobs)
    ref = naive(name, s, t, valid, knobs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    coef = torch.rand(got.shape, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * coef).sum(), zs, retain_graph=True)
    (g_ref,) = torch.autograd.grad((ref * coef).sum(), zs)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    assert torch.all(g_got[~valid] == 0)


@pytest.mark.parametrize("name,knobs", CASES)
def test_full_vocab_without_mask_matches_naive(name, knobs):
    zs = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    zt = 3 * torch.randn(5, 13, dtype=torch.float64)
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    got = DIVERGENCES[name](s, t, None, **knobs)
    ref = naive(name, s, t, torch.ones(5, 13, dtype=torch.bool), knobs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), zs, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,knobs", CASES)
def test_all_masked_is_zero_with_zero_gradient(name, knobs):
    zs = torch.randn(2, 3, 5, requires_grad=True)
    valid = torch.zeros(2, 3, 5, dtype=torch.bool)
    s = torch.where(valid, zs, torch.full_like(zs, float("nan")))
    t = torch.full((2, 3, 5), float("-inf"))
    got = divergence(name, s, t, valid, **knobs)
    assert torch.equal(got, torch.zeros(2, 3))
    got.sum().backward()
    assert torch.equal(zs.grad, torch.zeros(2, 3, 5))


@pytest.mark.parametrize("name,knobs", CASES)
def test_teacher_equals_student_gives_zero_loss_and_gradient(name, knobs):
    zs, _, valid = random_case()
    s = masked_logp(zs, valid, float("-inf"))
    got = divergence(name, s, s.detach().clone(), valid, **knobs)
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-14)
    (g,) = torch.autograd.grad(got.sum(), zs)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name,knobs", CASES)
def test_padding_columns_do_not_change_value_or_gradient(name, knobs):
    zs, zt, valid = random_case(shape=(4, 6), all_masked_row=False)
    s, t = masked_logp(zs, valid, -float("inf")), masked_logp(zt, valid, -float("inf"))
    base = divergence(name, s, t, valid, **knobs)
    (g_base,) = torch.autograd.grad(base.sum(), zs, retain_graph=True)
    pad_s = torch.cat([s, torch.randn(4, 3, dtype=s.dtype)], -1)  # garbage columns, marked invalid
    pad_t = torch.cat([t, torch.randn(4, 3, dtype=t.dtype)], -1)
    pad_v = torch.cat([valid, torch.zeros(4, 3, dtype=torch.bool)], -1)
    padded = divergence(name, pad_s, pad_t, pad_v, **knobs)
    (g_pad,) = torch.autograd.grad(padded.sum(), zs)
    torch.testing.assert_close(padded, base, rtol=0, atol=1e-15)
    torch.testing.assert_close(g_pad, g_base, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name,knobs", CASES)
def test_zero_probability_entries_are_nan_free(name, knobs):
    """-inf teacher entries (valid): 0·log 0 = 0; a genuinely infinite KL is +inf, never NaN."""
    zs = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 9, dtype=torch.float64)
    zt[:, :3] = float("-inf")  # teacher puts zero mass on 3 tokens
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    valid = torch.ones(4, 9, dtype=torch.bool)
    got = divergence(name, s, t, valid, **knobs)
    ref = naive(name, s, t, valid, knobs)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    infinite = name in ("rkl", "akl") or (name == "jsd" and knobs["beta"] == 1.0)
    assert torch.isinf(got).all() == infinite
    (g,) = torch.autograd.grad(got.sum(), zs, retain_graph=True)
    assert torch.isfinite(g).all()
    if not infinite:
        (g_ref,) = torch.autograd.grad(ref.sum(), zs)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,knobs", CASES)
def test_nan_in_a_valid_entry_propagates_to_its_token_only(name, knobs):
    s = torch.log_softmax(torch.randn(3, 6), -1)
    t = torch.log_softmax(torch.randn(3, 6), -1)
    s[1, 2] = float("nan")  # a broken student logit must surface, not be read as zero probability
    got = divergence(name, s, t, torch.ones(3, 6, dtype=torch.bool), **knobs)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


# ---------------------------------------------------------------- closed-form anchors and identities


def two_point():
    s = torch.tensor([0.1, 0.9], dtype=torch.float64).log()  # student
    t = torch.tensor([0.9, 0.1], dtype=torch.float64).log()  # teacher
    return s, t


def test_closed_form_anchors():
    s, t = two_point()
    # FKL = 0.9 ln(0.9/0.1) + 0.1 ln(0.1/0.9) = 0.8 ln 9 = 1.7577797; RKL is the same by symmetry.
    assert forward_kl(s, t).item() == pytest.approx(0.8 * math.log(9), abs=1e-12)
    assert forward_kl(s, t).item() == pytest.approx(1.7577797, abs=1e-7)
    assert reverse_kl(s, t).item() == pytest.approx(1.7577797, abs=1e-7)
    # β = 0.5: M = [0.5, 0.5], JSD = 0.5·2·(0.9 ln 1.8 + 0.1 ln 0.2) = 0.3680642
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(0.3680642, abs=1e-7)
    # β = 0.25, TRL's mixture M = (1−β)S + βT = [0.75·0.1 + 0.25·0.9, 0.75·0.9 + 0.25·0.1] = [0.3, 0.7];
    # our M = βT + (1−β)S is the same vector. 0.25·KL(T‖M) + 0.75·KL(S‖M) = 0.25·0.794157 + 0.75·0.116321
    m_trl = 0.75 * s.exp() + 0.25 * t.exp()
    by_hand = 0.25 * naive_kl(t.exp(), m_trl) + 0.75 * naive_kl(s.exp(), m_trl)
    assert by_hand.item() == pytest.approx(0.2857813, abs=1e-7)
    assert generalized_jsd(s, t, 0.25).item() == pytest.approx(0.2857813, abs=1e-7)
    # TVD = ½(0.8 + 0.8) = 0.8
    assert total_variation(s, t).item() == pytest.approx(0.8, abs=1e-12)


def test_adaptive_kl_hand_case():
    # T = [0.4, 0.35, 0.25], S = [0.2, 0.5, 0.3], μ = 0.8: cumulative teacher mass [0.4, 0.75, 1.0]
    # → head = {0, 1}; g_head = 0.2 + 0.15 = 0.35, g_tail = 0.05 → weights 0.875 / 0.125.
    # FKL = 0.4 ln 2 + 0.35 ln 0.7 + 0.25 ln(0.25/0.3) = 0.1068423
    # RKL = 0.2 ln 0.5 + 0.5 ln(0.5/0.35) + 0.3 ln 1.2 = 0.0944045 → AKL = 0.1052875
    s = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log()
    t = torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64).log()
    assert adaptive_kl(s, t, 0.8).item() == pytest.approx(0.1052875, abs=1e-7)
    # μ = 0.3: only the forced top-1 is head: g_head = 0.2, g_tail = 0.15 + 0.05 → weights ½ / ½
    assert adaptive_kl(s, t, 0.3).item() == pytest.approx(0.5 * (0.1068423 + 0.0944045), abs=1e-7)


def test_jsd_endpoints_are_exactly_fkl_and_rkl_and_limits():
    zs = torch.randn(6, 17, dtype=torch.float64)
    zt = torch.randn(6, 17, dtype=torch.float64)
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    assert torch.equal(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    eps = 1e-5
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-3, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-3, atol=0)
    for beta in (0.1, 0.25, 0.5, 0.9):  # 0 ≤ JSD_β ≤ H_b(β)
        j = generalized_jsd(s, t, beta)
        assert (j >= 0).all() and (j <= -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)).all()


def test_skew_endpoints():
    s, t = torch.log_softmax(torch.randn(4, 9), -1), torch.log_softmax(torch.randn(4, 9), -1)
    assert torch.equal(skew_kl(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, 0.0), reverse_kl(s, t))
    torch.testing.assert_close(skew_kl(s, t, 1.0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(skew_reverse_kl(s, t, 1.0), torch.zeros(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_logit_gradient_identities(tau):
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 11, dtype=torch.float64)
    s = torch.log_softmax(z / tau, -1)
    t = torch.log_softmax(zt / tau, -1)
    p_s, p_t = s.exp().detach(), t.exp()
    (g_f,) = torch.autograd.grad(forward_kl(s, t).sum(), z, retain_graph=True)
    torch.testing.assert_close(g_f, (p_s - p_t) / tau)  # ∂FKL/∂z = (p_S − p_T)/τ
    rkl = reverse_kl(s, t)
    (g_r,) = torch.autograd.grad(rkl.sum(), z)
    ell = s.detach() - t  # ℓ(j) = log p_S(j) − log p_T(j)
    torch.testing.assert_close(g_r, p_s * (ell - rkl.detach()[:, None]) / tau)  # ∂RKL/∂z_j


@pytest.mark.parametrize("name,knobs", CASES)
def test_shift_invariance_of_logits(name, knobs):
    z = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 8, dtype=torch.float64)
    shift = 10 * torch.randn(3, 1, dtype=torch.float64)
    a = divergence(name, torch.log_softmax(z, -1), torch.log_softmax(zt, -1), **knobs)
    b = divergence(name, torch.log_softmax(z + shift, -1), torch.log_softmax(zt - shift, -1), **knobs)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a.sum(), z)
    (gb,) = torch.autograd.grad(b.sum(), z)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name,knobs", CASES)
def test_nonnegative_and_teacher_detached(name, knobs):
    s = torch.log_softmax(torch.randn(6, 10), -1)
    zt = torch.randn(6, 10, requires_grad=True)
    got = divergence(name, s, torch.log_softmax(zt, -1), **knobs)
    assert (got >= -1e-6).all()
    assert not got.requires_grad  # the teacher is detached inside; the student here has no grad
    if name == "tvd":
        assert (got <= 1 + 1e-6).all()


# ---------------------------------------------------------------- dispatch and checks


def test_dispatch_table_and_resolve():
    assert set(DIVERGENCES) == set(DIVERGENCE_NAMES) == {"fkl", "rkl", "jsd", "skl", "srkl", "srkl_sg", "tvd", "akl"}
    s, t = torch.log_softmax(torch.randn(4, 6), -1), torch.log_softmax(torch.randn(4, 6), -1)
    assert torch.equal(divergence("jsd", s, t, beta=0.3), generalized_jsd(s, t, 0.3))
    assert torch.equal(divergence("skl", s, t, alpha=0.3), skew_kl(s, t, 0.3))
    assert torch.equal(divergence("akl", s, t, mu=0.3), adaptive_kl(s, t, 0.3))
    fn = resolve_divergence("srkl", alpha=0.4)
    assert torch.equal(fn(s, t, None), skew_reverse_kl(s, t, 0.4))


def test_errors_name_shapes_and_ranges():
    s = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence("kl", s, s)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        forward_kl(s, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"valid has shape \(3,\)"):
        reverse_kl(s, s, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta must be <= 1"):
        generalized_jsd(s, s, 1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        divergence("skl", s, s, alpha=-0.1)
    with pytest.raises(ValueError, match="mu must be"):
        adaptive_kl(s, s, mu=2.0)


# ----------------------------------------------------------------------------- shaping


def test_shaping_floor_entropy_gated_fkl_and_clamp_match_the_hand_formula():
    from opd.math.divergences import DivergenceShaping

    g = torch.Generator().manual_seed(5)
    s = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=torch.float64) * 3, -1).requires_grad_(True)
    scale = torch.tensor([0.3, 6.0, 0.3, 6.0, 1.0, 8.0], dtype=torch.float64)[:, None]
    t = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=torch.float64) * scale, -1)
    shaping = DivergenceShaping(fkl_coef=0.7, fkl_entropy_min=1.0, logprob_floor=-6.0, clamp_low=0.05,
                                clamp_high=2.0)
    got = divergence("rkl", s, t, shaping=shaping)
    sf, tf = s.clamp(min=-6.0), t.clamp(min=-6.0)
    h_t = -(tf.exp() * tf).sum(-1)
    ref = (sf.exp() * (sf - tf)).sum(-1) + 0.7 * (h_t > 1.0) * (tf.exp() * (tf - sf)).sum(-1)
    ref = ref.clamp(0.05, 2.0)
    assert ((h_t > 1.0) != (h_t > 1.0)[0]).any()  # the gate is on for some rows, off for others
    torch.testing.assert_close(got, ref)
    (g1,) = torch.autograd.grad(got.sum(), s)
    (g2,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g1, g2)
    assert DivergenceShaping().plain and not shaping.plain
    with pytest.raises(ValueError, match="clamp_low"):
        DivergenceShaping(clamp_low=1.0, clamp_high=0.0)


def test_srkl_sg_is_srkl_in_value_with_the_released_distillm_2_gradient():
    """DistiLLM-2 (arXiv 2503.07067), released trainer: ``m = (1−α)p_T + α·sg(p_S)``. Same value as srkl;
    the gradient w.r.t. the logits is the closed form ``p_S ⊙ (g − Σ p_S g)``, ``g = log p_S − log m``
    (only ``p_S`` in front of the log-ratio is differentiated), which differs from srkl's."""
    torch.manual_seed(3)
    zs = (2 * torch.randn(4, 9, dtype=torch.float64)).requires_grad_(True)
    zt = 2 * torch.randn(4, 9, dtype=torch.float64)
    a = 0.3
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    sg = divergence("srkl_sg", s, t, alpha=a)
    torch.testing.assert_close(sg, skew_reverse_kl(s, t, alpha=a), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(sg.sum(), zs, retain_graph=True)
    p = s.detach().exp()
    g_ratio = s.detach() - torch.log((1 - a) * t.exp() + a * p)
    closed = p * (g_ratio - (p * g_ratio).sum(-1, keepdim=True))
    torch.testing.assert_close(g, closed, rtol=1e-10, atol=1e-12)
    (g_srkl,) = torch.autograd.grad(skew_reverse_kl(s, t, alpha=a).sum(), zs)
    assert float((g - g_srkl).abs().max()) > 1e-3
