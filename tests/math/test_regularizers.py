import math

import pytest
import torch

from opd.math.reduce import reduce_tokens
from opd.math.regularizers import entropy, full_kl, sampled_kl, token_cross_entropy

F64 = torch.float64
N, V = 3, 5          # 3 states, vocabulary of 5 tokens: small enough to enumerate exactly


def kl(p_logp, q_logp):
    """Explicit KL(p ‖ q) = Σ p (log p − log q) over the last dim."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def expectation_over_samples(student_logits, ref_logp, estimator):
    """E_{y~π_θ}[k(y)] by enumerating every token y of every state (π_θ held fixed as the
    sampling distribution), returned as a differentiable function of the student logits so that
    its gradient is E_{y~π}[∇k(y)] — the expected gradient of the estimator used as a loss."""
    logp = student_logits.log_softmax(-1)
    probs = logp.detach().exp()
    total = torch.zeros(N, dtype=F64)
    for y in range(V):
        ids = torch.full((N,), y)
        k = sampled_kl(logp.gather(-1, ids[:, None])[:, 0], ref_logp.gather(-1, ids[:, None])[:, 0],
                       estimator=estimator)
        total = total + probs[:, y] * k
    return total


@pytest.fixture
def problem():
    z = torch.randn(N, V, dtype=F64, requires_grad=True)
    ref = torch.randn(N, V, dtype=F64).log_softmax(-1)
    return z, ref


def test_k1_and_k3_are_unbiased_for_reverse_kl(problem):
    z, ref = problem
    exact = kl(z.detach().log_softmax(-1), ref)
    for est in ("k1", "k3"):
        torch.testing.assert_close(expectation_over_samples(z, ref, est).detach(), exact)
    # k2 is biased (its expectation is not the KL) — the test above could fail
    assert (expectation_over_samples(z, ref, "k2").detach() - exact).abs().max() > 1e-3


def test_expected_gradients_by_enumeration(problem):
    z, ref = problem
    logp = z.log_softmax(-1)
    grad_rkl, = torch.autograd.grad(kl(logp, ref).sum(), z, retain_graph=True)   # ∇KL(π‖π_ref)
    grad_fkl, = torch.autograd.grad(kl(ref, logp).sum(), z)                       # ∇KL(π_ref‖π)
    g1, = torch.autograd.grad(expectation_over_samples(z, ref, "k1").sum(), z)
    g2, = torch.autograd.grad(expectation_over_samples(z, ref, "k2").sum(), z)
    g3, = torch.autograd.grad(expectation_over_samples(z, ref, "k3").sum(), z)
    torch.testing.assert_close(g1, torch.zeros_like(g1), atol=1e-15, rtol=0)   # E[∇k1] = 0
    torch.testing.assert_close(g2, grad_rkl)                                     # reverse KL
    torch.testing.assert_close(g3, grad_fkl)                                     # forward KL
    assert (grad_rkl - grad_fkl).abs().max() > 1e-3          # the two really differ here


def test_sampled_kl_values_and_gradient_match_formulas():
    lp = torch.randn(3, 7, dtype=F64).requires_grad_(True)
    lr = torch.randn(3, 7, dtype=F64)
    for est in ("k1", "k2", "k3"):
        got = sampled_kl(lp, lr, estimator=est)
        g, = torch.autograd.grad(got.sum(), lp)
        for b in range(3):
            for t in range(7):
                d = float(lr[b, t] - lp[b, t].detach())               # log r
                val = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - 1 - d}[est]
                dval = {"k1": 1.0, "k2": -d, "k3": 1 - math.exp(d)}[est]   # d/d log π
                assert abs(got[b, t].item() - val) < 1e-12
                assert abs(g[b, t].item() - dval) < 1e-12
        # student == reference: zero value and zero gradient for every estimator except k1's grad
        same = sampled_kl(lp, lp.detach(), estimator=est)
        assert torch.equal(same, torch.zeros_like(same))
        if est != "k1":
            g, = torch.autograd.grad(same.sum(), lp)
            assert torch.equal(g, torch.zeros_like(g))


def test_sampled_kl_masked_and_padding():
    lp = torch.randn(3, 7, dtype=F64)
    lr = torch.randn(3, 7, dtype=F64)
    lp[:, -2:] = -float("inf")
    lr[:, -2:] = -float("inf")
    lp.requires_grad_(True)
    none = torch.zeros(3, 7, dtype=torch.bool)
    mask = torch.rand(3, 7) > 0.3
    mask[:, -2:] = False
    for est in ("k1", "k2", "k3"):
        total = reduce_tokens(sampled_kl(lp, lr, estimator=est, mask_BT=none), none)
        assert total.item() == 0.0
        g, = torch.autograd.grad(total, lp)
        assert torch.equal(g, torch.zeros_like(g))
        full = reduce_tokens(sampled_kl(lp, lr, estimator=est, mask_BT=mask), mask)
        short = reduce_tokens(sampled_kl(lp[:, :5], lr[:, :5], estimator=est), mask[:, :5])
        torch.testing.assert_close(full, short)
        g, = torch.autograd.grad(full, lp)
        assert torch.isfinite(g).all()


def test_full_kl_entropy_match_loops_and_grad():
    z = torch.randn(2, 3, 7, dtype=F64, requires_grad=True)
    ref = torch.randn(2, 3, 7, dtype=F64).log_softmax(-1)
    logp = z.log_softmax(-1)
    got_kl, got_h = full_kl(logp, ref), entropy(logp)
    ref_kl = torch.zeros(2, 3, dtype=F64)
    ref_h = torch.zeros(2, 3, dtype=F64)
    for i in range(2):
        for j in range(3):
            for v in range(7):
                p = logp[i, j, v].exp()
                ref_kl[i, j] = ref_kl[i, j] + p * (logp[i, j, v] - ref[i, j, v])
                ref_h[i, j] = ref_h[i, j] - p * logp[i, j, v]
    torch.testing.assert_close(got_kl, ref_kl)
    torch.testing.assert_close(got_h, ref_h)
    for got, r in ((got_kl, ref_kl), (got_h, ref_h)):
        g, = torch.autograd.grad(got.sum(), z, retain_graph=True)
        g_ref, = torch.autograd.grad(r.sum(), z, retain_graph=True)
        torch.testing.assert_close(g, g_ref)
    # student == reference: zero KL and zero gradient
    same = full_kl(logp, logp.detach())
    assert same.abs().max() < 1e-15
    g, = torch.autograd.grad(same.sum(), z)
    assert g.abs().max() < 1e-15


def test_full_kl_and_entropy_with_zero_probabilities():
    # π = (½, ½, 0), π_ref = (¼, ¾, 0): KL = ½ log 2 + ½ log(2/3); H = log 2; no NaN
    z = torch.tensor([[0.0, 0.0, -float("inf")]], dtype=F64, requires_grad=True)
    logp = z.log_softmax(-1)
    ref = torch.tensor([[0.25, 0.75, 0.0]], dtype=F64).log()
    torch.testing.assert_close(full_kl(logp, ref)[0], torch.tensor(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3), dtype=F64))
    torch.testing.assert_close(entropy(logp)[0], torch.tensor(math.log(2), dtype=F64))
    g, = torch.autograd.grad((full_kl(logp, ref) + entropy(logp)).sum(), z)
    assert torch.isfinite(g[0, :2]).all() and not torch.isnan(g).any()


def test_token_cross_entropy():
    z = torch.randn(3, 7, 11, dtype=F64, requires_grad=True)
    logp = z.log_softmax(-1)
    tgt = torch.randint(0, 11, (3, 7))
    tgt[0, -3:] = -100                                       # ignored positions
    got = token_cross_entropy(logp, tgt)
    g, = torch.autograd.grad(got.sum(), z)
    probs = logp.detach().exp()
    for b in range(3):
        for t in range(7):
            if tgt[b, t] < 0:
                assert got[b, t].item() == 0.0 and g[b, t].abs().max() == 0
                continue
            assert abs(got[b, t].item() + logp[b, t, tgt[b, t]].item()) < 1e-12
            e = torch.zeros(11, dtype=F64)
            e[tgt[b, t]] = 1.0
            torch.testing.assert_close(g[b, t], probs[b, t] - e)       # ∂CE/∂z = π − e_y
    with pytest.raises(ValueError, match="must be < 11"):
        token_cross_entropy(logp, torch.full((3, 7), 11))
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        token_cross_entropy(logp, tgt[:, :6])


def test_errors():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        sampled_kl(torch.zeros(2), torch.zeros(2), estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)|\(2, 4\).*\(2, 3\)"):
        sampled_kl(torch.zeros(2, 3), torch.zeros(2, 4), estimator="k1")
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)|\(2, 6\).*\(2, 5\)"):
        full_kl(torch.zeros(2, 5), torch.zeros(2, 6))
