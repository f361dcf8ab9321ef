"""opd/math/value_targets.py against naive loops, and GAE with a Monte-Carlo value on the bias lab's tiny chain:
the Monte-Carlo value converges to the exact value, and GAE with it is unbiased for every λ."""

from __future__ import annotations

import math

import pytest
import torch

from opd.lab.bias_lab import _Problem
from opd.math.credit import gae_advantages
from opd.math.value_targets import continuation_returns, lambda_returns, masked_rmse, mc_value

DT = torch.float64


def test_continuation_returns_is_the_discounted_sum_of_minus_kl():
    gen = torch.Generator().manual_seed(0)
    kl = torch.rand(6, 5, generator=gen, dtype=DT)
    lengths = [5, 3, 1, 0, 2, 4]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    for gamma in (1.0, 0.9, 0.0):
        got = continuation_returns(kl, mask, gamma)
        for n, row in enumerate(lengths):
            want = -sum(gamma ** k * float(kl[n, k]) for k in range(row))
            assert math.isclose(float(got[n]), want, abs_tol=1e-12)


def test_mc_value_is_mean_and_standard_error():
    g = torch.tensor([[1.0, 3.0, 5.0, 7.0], [2.0, 2.0, 2.0, 2.0]], dtype=DT)
    v, se = mc_value(g)
    assert torch.allclose(v, torch.tensor([4.0, 2.0], dtype=DT))
    assert math.isclose(float(se[0]), math.sqrt(((9 + 1 + 1 + 9) / 3) / 4))
    assert float(se[1]) == 0.0
    v1, se1 = mc_value(g[:, :1])
    assert torch.equal(v1, g[:, 0]) and torch.equal(se1, torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError):
        mc_value(torch.zeros(3, 0))


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_lambda_returns_match_the_recursive_definition(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(3, 6, generator=gen, dtype=DT)
    v = torch.randn(3, 6, generator=gen, dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    got = lambda_returns(r, v, mask, gamma=gamma, lam=lam)
    for b in range(3):
        idx = [t for t in range(6) if mask[b, t]]  # time counts valid tokens
        g_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            g = float(r[b, t]) + gamma * ((1 - lam) * v_next + lam * g_next)
            assert math.isclose(float(got[b, t]), g, abs_tol=1e-10)
            g_next, v_next = g, float(v[b, t])
        assert all(float(got[b, t]) == 0.0 for t in range(6) if not mask[b, t])


def test_masked_rmse():
    a = torch.tensor([[1.0, 2.0, 100.0]])
    b = torch.tensor([[0.0, 4.0, 0.0]])
    m = torch.tensor([[True, True, False]])
    rmse, bias = masked_rmse(a, b, m)
    assert math.isclose(rmse, math.sqrt((1 + 4) / 2)) and math.isclose(bias, -0.5)
    assert all(math.isnan(x) for x in masked_rmse(a, b, torch.zeros_like(m)))


# ---- the bias lab's tabular chain: Monte-Carlo values by sampled continuations with dense KLs

def _tree_kl(pb: _Problem) -> torch.Tensor:
    """``[P]`` KL(π_S ‖ π_T) at every prefix of the tabular problem."""
    logp = torch.log_softmax(pb.theta, -1)
    return (logp.exp() * (logp - pb.teacher_logp)).sum(-1)


def _mc_values(pb: _Problem, gamma: float, samples: int, gen: torch.Generator) -> torch.Tensor:
    """``[P]`` Monte-Carlo value of every prefix: ``samples`` continuations sampled from the student table,
    each scored by :func:`continuation_returns` on the dense per-state KLs (written independently of the lab)."""
    V, H = pb.V, pb.H
    kl = _tree_kl(pb)
    probs = torch.softmax(pb.theta, -1)
    out = torch.zeros(pb.offsets[H], dtype=DT)
    for depth in range(H):
        for local in range(V ** depth):
            start = pb.offsets[depth] + local
            kl_NL = torch.zeros(samples, H - depth, dtype=DT)
            for n in range(samples):
                node_local = local
                for k in range(H - depth):
                    d = depth + k
                    node = pb.offsets[d] + node_local
                    kl_NL[n, k] = kl[node]
                    y = int(torch.multinomial(probs[node], 1, generator=gen))
                    node_local = node_local * V + y
            g = continuation_returns(kl_NL, torch.ones_like(kl_NL, dtype=torch.bool), gamma)
            out[start] = mc_value(g[None])[0][0]
    return out


def test_mc_value_converges_to_the_exact_value_on_the_tiny_chain():
    pb = _Problem(vocab=2, horizon=3, seed=0, logit_scale=1.5, teacher_equal_after_first=False)
    gen = torch.Generator().manual_seed(0)
    for gamma in (1.0, 0.9):
        exact = pb.values(gamma)
        errs = [float((_mc_values(pb, gamma, k, gen) - exact).abs().max()) for k in (4, 400)]
        assert errs[1] < 0.05 * float(exact.abs().max())
        assert errs[1] < errs[0]


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_gae_with_the_monte_carlo_value_is_unbiased_for_every_lambda(lam):
    """E over the Monte-Carlo noise of the GAE advantages (K = 1 continuation per state, 300 independent
    draws) equals GAE with the exact value; with the exact value GAE(γ=1) is unbiased for ∇J for every λ
    (opd bias-lab), so the policy gradient with the Monte-Carlo value is too. The expected gradient is
    computed here by enumeration and compared with ∇J from autograd on the enumerated sequence KL."""
    pb = _Problem(vocab=2, horizon=3, seed=1, logit_scale=1.5, teacher_equal_after_first=False)
    N, H = pb.ids_NH.shape
    logp_NHV = torch.log_softmax(pb.theta[pb.prefix_NH], -1)
    logp = logp_NHV.gather(-1, pb.ids_NH[..., None])[..., 0]
    tlogp = pb.teacher_logp[pb.prefix_NH].gather(-1, pb.ids_NH[..., None])[..., 0]
    prob_N = logp.sum(1).exp()
    r = tlogp - logp
    mask = torch.ones(N, H, dtype=torch.bool)
    gen = torch.Generator().manual_seed(2)
    draws = 300
    mean_adv = torch.zeros(N, H, dtype=DT)
    for _ in range(draws):
        v_hat = _mc_values(pb, 1.0, 1, gen)[pb.prefix_NH]
        mean_adv += gae_advantages(r, v_hat, mask, gamma=1.0, lam=lam)[0] / draws
    exact_adv = gae_advantages(r, pb.values(1.0)[pb.prefix_NH], mask, gamma=1.0, lam=lam)[0]
    assert float((mean_adv - exact_adv).abs().max()) < 0.25

    def expected_grad(adv_NH: torch.Tensor) -> torch.Tensor:
        theta = pb.theta.clone().requires_grad_(True)
        lp = torch.log_softmax(theta[pb.prefix_NH], -1).gather(-1, pb.ids_NH[..., None])[..., 0]
        (g,) = torch.autograd.grad(-(prob_N[:, None] * adv_NH * lp).sum(), theta)
        return g

    def seq_kl(theta: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(theta[pb.prefix_NH], -1).gather(-1, pb.ids_NH[..., None])[..., 0]
        return (lp.sum(1).exp() * (lp - tlogp).sum(1)).sum()

    theta = pb.theta.clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad(seq_kl(theta), theta)
    rel = float((expected_grad(mean_adv) - grad_j).norm() / grad_j.norm())
    rel_exact = float((expected_grad(exact_adv) - grad_j).norm() / grad_j.norm())
    assert rel_exact < 1e-10  # the exact value: unbiased for every λ
    assert rel < 0.1  # the Monte-Carlo value: the same up to the finite number of draws
    if lam < 1.0:  # and a wrong value is visibly biased, so the test can fail
        wrong = gae_advantages(r, torch.zeros(N, H, dtype=DT), mask, gamma=1.0, lam=lam)[0]
        assert float((expected_grad(wrong) - grad_j).norm() / grad_j.norm()) > 3 * rel
