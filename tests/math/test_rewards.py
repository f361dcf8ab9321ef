import math

import pytest
import torch

from opd.math.rewards import (
    LOG_RATIO_REWARDS,
    REWARD_KINDS,
    box_cox_reward,
    clipped_reward,
    extrapolated_reward,
    log_ratio_reward,
    per_token_reward,
)

# ---------------------------------------------------------------- naive references (python floats)


def loop_map(fn, *tensors, mask=None):
    """Apply a python-float function element by element; 0 where mask is False."""
    shape = tensors[0].shape
    flat = [t.detach().double().reshape(-1).tolist() for t in tensors]
    keep = [True] * len(flat[0]) if mask is None else mask.reshape(-1).tolist()
    out = [fn(*vals) if k else 0.0 for k, *vals in zip(keep, *flat)]
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def ref_log_ratio(s, t):
    return t - s


def ref_box_cox(alpha):
    def f(s, t):
        ratio = math.exp(t - s) if t > -math.inf else 0.0  # π_T / π_S
        return (ratio ** alpha - 1.0) / alpha
    return f


def ref_extrapolated(lam):
    return lambda s, t, ref: lam * t + (1.0 - lam) * ref - s


def logprobs(*shape, dtype=torch.float64):
    return torch.log_softmax(torch.randn(*shape, 5, dtype=dtype), -1)[..., 0]


def padded(x, mask, extra=4, fill=-float("inf")):
    """Append `extra` masked columns holding `fill` (padding invariance)."""
    pad = torch.full((*x.shape[:-1], extra), fill, dtype=x.dtype)
    m_pad = torch.zeros((*mask.shape[:-1], extra), dtype=torch.bool)
    return torch.cat([x, pad], -1), torch.cat([mask, m_pad], -1)


# ---------------------------------------------------------------- log-ratio


@pytest.mark.parametrize("shape", [(3, 7), (11,), (2, 3, 5)])
def test_log_ratio_matches_loop_masked_and_detached(shape):
    s = logprobs(*shape).requires_grad_()
    t = logprobs(*shape).requires_grad_()
    mask = torch.rand(shape) > 0.35
    got = log_ratio_reward(s, t, mask_BT=mask)
    torch.testing.assert_close(got, loop_map(ref_log_ratio, s, t, mask=mask))
    assert not got.requires_grad  # reward = teacher − sg(student): no gradient path at all
    torch.testing.assert_close(log_ratio_reward(s, t), loop_map(ref_log_ratio, s, t))


def test_hand_case():
    # student log-probs (−1, −2), teacher (−3, −0.5): r = (−3 + 1, −0.5 + 2) = (−2, 1.5)
    r = log_ratio_reward(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -0.5]]))
    assert r.tolist() == [[-2.0, 1.5]]


def test_all_masked_and_inf_padding_give_zero_without_nan():
    s = torch.full((3, 4), -float("inf"))
    t = torch.full((3, 4), -float("inf"))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for kind in REWARD_KINDS:
        r = per_token_reward(kind, s, t, reference_logprobs_BT=s, alpha=0.5, lam=2.0,
                             low=-1.0, high=1.0, entropy_BT=torch.rand(3, 4), mask_BT=mask)
        assert torch.equal(r, torch.zeros(3, 4)), kind


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_padding_invariance(kind):
    s, t, ref = logprobs(3, 7), logprobs(3, 7), logprobs(3, 7)
    mask = torch.rand(3, 7) > 0.3
    kw = dict(low=-0.5, high=0.7, alpha=0.3, lam=1.7)
    ent = torch.rand(3, 7)
    a = per_token_reward(kind, s, t, reference_logprobs_BT=ref, mask_BT=mask, entropy_BT=ent, **kw)
    s_p, m_p = padded(s, mask)
    t_p, _ = padded(t, mask)
    ref_p, _ = padded(ref, mask)
    ent_p, _ = padded(ent, mask)
    b = per_token_reward(kind, s_p, t_p, reference_logprobs_BT=ref_p, mask_BT=m_p, entropy_BT=ent_p, **kw)
    assert not torch.isnan(b).any()
    torch.testing.assert_close(b[:, :7], a)
    assert torch.equal(b[:, 7:], torch.zeros(3, 4, dtype=b.dtype))


def test_teacher_equals_student_gives_zero_reward():
    s = logprobs(3, 7)
    for kind in LOG_RATIO_REWARDS:
        r = per_token_reward(kind, s, s.clone(), reference_logprobs_BT=s.clone(), alpha=0.4, lam=1.3)
        torch.testing.assert_close(r, torch.zeros_like(r), msg=kind)


def test_low_precision_is_upcast_and_inputs_not_mutated():
    s = logprobs(3, 7).to(torch.bfloat16)
    t = logprobs(3, 7).to(torch.bfloat16)
    s0, t0 = s.clone(), t.clone()
    r = log_ratio_reward(s, t)
    assert r.dtype == torch.float32
    assert torch.equal(s, s0) and torch.equal(t, t0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        log_ratio_reward(torch.zeros(3, 7), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="mask_BT"):
        log_ratio_reward(torch.zeros(3, 7), torch.zeros(3, 7), mask_BT=torch.ones(3, 6))


# ---------------------------------------------------------------- clipped


def test_clipped_matches_loop():
    s, t = logprobs(3, 7), logprobs(3, 7)
    mask = torch.rand(3, 7) > 0.3
    got = clipped_reward(s, t, low=-0.4, high=0.6, mask_BT=mask)
    ref = loop_map(lambda a, b: min(max(b - a, -0.4), 0.6), s, t, mask=mask)
    torch.testing.assert_close(got, ref)
    only_low = clipped_reward(s, t, low=-0.4)
    torch.testing.assert_close(only_low, loop_map(lambda a, b: max(b - a, -0.4), s, t))
    torch.testing.assert_close(clipped_reward(s, t), log_ratio_reward(s, t))
    with pytest.raises(ValueError, match="low <= high"):
        clipped_reward(s, t, low=1.0, high=0.0)


# ---------------------------------------------------------------- Box–Cox (PowerOPD)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0])
def test_box_cox_matches_loop(alpha):
    s, t = logprobs(3, 7), logprobs(3, 7)
    mask = torch.rand(3, 7) > 0.3
    got = box_cox_reward(s, t, alpha=alpha, mask_BT=mask)
    torch.testing.assert_close(got, loop_map(ref_box_cox(alpha), s, t, mask=mask))
    assert not got.requires_grad


def test_box_cox_alpha_zero_is_exact_log_ratio_and_limit_is_continuous():
    s, t = logprobs(3, 7), logprobs(3, 7)
    assert torch.equal(box_cox_reward(s, t, alpha=0.0), log_ratio_reward(s, t))
    torch.testing.assert_close(box_cox_reward(s, t, alpha=1e-7), log_ratio_reward(s, t),
                               atol=1e-6, rtol=1e-6)


def test_box_cox_lower_bound():
    # π_T(y) = 0 on a valid token: (0^α − 1)/α = −1/α exactly, no nan;
    # α = 1 on the ratio 0.6/0.2 = 3: (3 − 1)/1 = 2
    s = torch.tensor([[math.log(0.2), math.log(0.2)]], dtype=torch.float64)
    t = torch.tensor([[-float("inf"), math.log(0.6)]], dtype=torch.float64)
    r = box_cox_reward(s, t, alpha=0.5)
    assert r[0, 0].item() == -2.0
    torch.testing.assert_close(box_cox_reward(s, t, alpha=1.0)[0, 1],
                               torch.tensor(2.0, dtype=torch.float64))
    assert (box_cox_reward(logprobs(3, 7), logprobs(3, 7), alpha=0.5) > -2.0).all()
    with pytest.raises(ValueError, match="alpha"):
        box_cox_reward(s, t, alpha=-0.1)


# ---------------------------------------------------------------- G-OPD / ExOPD


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.5])
def test_extrapolated_matches_loop(lam):
    s, t, ref = logprobs(3, 7), logprobs(3, 7), logprobs(3, 7)
    mask = torch.rand(3, 7) > 0.3
    got = extrapolated_reward(s, t, ref, lam=lam, mask_BT=mask)
    torch.testing.assert_close(got, loop_map(ref_extrapolated(lam), s, t, ref, mask=mask))


def test_extrapolated_corners():
    s, t = logprobs(3, 7), logprobs(3, 7)
    # λ = 1 is the log-ratio reward; the reference is not used (None or −inf are fine)
    assert torch.equal(extrapolated_reward(s, t, None, lam=1.0), log_ratio_reward(s, t))
    inf_ref = torch.full_like(s, -float("inf"))
    assert torch.equal(extrapolated_reward(s, t, inf_ref, lam=1.0), log_ratio_reward(s, t))
    # λ = 0: teacher not used, −inf teacher gives no nan: r = log π_ref − log π_S
    ref = logprobs(3, 7)
    r0 = extrapolated_reward(s, torch.full_like(s, -float("inf")), ref, lam=0.0)
    torch.testing.assert_close(r0, ref - s)
    with pytest.raises(ValueError, match="reference_logprobs_BT"):
        extrapolated_reward(s, t, None, lam=0.5)


def test_dispatch_matches_functions_and_rejects_unknown():
    s, t, ref = logprobs(3, 7), logprobs(3, 7), logprobs(3, 7)
    torch.testing.assert_close(per_token_reward("log_ratio", s, t), log_ratio_reward(s, t))
    torch.testing.assert_close(per_token_reward("clipped", s, t, low=-0.1, high=0.2),
                               clipped_reward(s, t, low=-0.1, high=0.2))
    torch.testing.assert_close(per_token_reward("box_cox", s, t, alpha=0.7),
                               box_cox_reward(s, t, alpha=0.7))
    torch.testing.assert_close(per_token_reward("extrapolated", s, t, reference_logprobs_BT=ref, lam=1.2),
                               extrapolated_reward(s, t, ref, lam=1.2))
    with pytest.raises(ValueError, match="unknown reward kind"):
        per_token_reward("nope", s, t)


def test_policy_gradient_through_reward_is_minus_reward_times_score():
    # The reward carries no gradient; a PG loss −Σ sg[r]·log π built on it has the gradient
    # −r · ∂log π, computed here by hand on the logits of one token: ∂log π(y)/∂z = e_y − π.
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    t = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)
    r = log_ratio_reward(logp[2:3], t[2:3])
    (-(r * logp[2:3]).sum()).backward()
    expected = -r.item() * (torch.nn.functional.one_hot(torch.tensor(2), 5).double() - logp.exp())
    torch.testing.assert_close(z.grad, expected.detach())


# ---------------------------------------------------------------- teacher-free rewards, OPDVR gate


def test_entropy_rank_reward_matches_the_opsa_loop():
    from opd.math.rewards import entropy_rank_reward

    g = torch.Generator().manual_seed(3)
    h = torch.rand(3, 6, generator=g) * 3
    m = torch.rand(3, 6, generator=g) > 0.4
    got = entropy_rank_reward(h, m, value=-1.0)
    lo, hi = float(h[m].min()), float(h[m].max())
    ref = torch.zeros(3, 6)
    for i in range(3):
        for j in range(6):
            if m[i, j]:
                ref[i, j] = -0.5 + (-1.0 - (-0.5)) * (float(h[i, j]) - lo) / (hi - lo)  # OPSA's a_max + (a_min − a_max)·rank
    torch.testing.assert_close(got, ref)
    # a constant entropy ranks every selected token 1 (as the authors' code): the strongest push
    flat = entropy_rank_reward(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), value=-1.0)
    assert torch.equal(flat, torch.full((2, 3), -1.0))


def test_constant_reward_and_outcome_sign_gate():
    from opd.math.rewards import constant_reward, outcome_sign_gate

    m = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(constant_reward(m, -0.7), torch.tensor([[-0.7, -0.7, 0.0], [-0.7, 0.0, 0.0]]))
    r = torch.tensor([[1.5, -2.0, 3.0], [-1.0, 4.0, 0.5]])
    got = outcome_sign_gate(r, torch.tensor([True, False]), m)
    # correct row: max(0, r); incorrect row: −max(0, −r) = min(0, r); masked entries 0
    assert torch.equal(got, torch.tensor([[1.5, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="one verdict per row"):
        outcome_sign_gate(r, torch.tensor([True, False, True]))
