"""The chunked LM-head losses at large logits (|z| ≈ 1e4) against a float64 reference, and a float64
student staying float64 (opd.math.fused, opd.math.fused_token, opd.math.chunking)."""

from __future__ import annotations

import pytest
import torch

from opd.math.chunking import log_softmax_inplace
from opd.math.fused import dense_linear_divergence, fused_linear_divergence, fused_linear_token_logprobs
from opd.math.support import SupportSpec
from tests.math.fused_call import call

N, V, H = 13, 29, 6


def exact_large_logits(seed: int = 0):
    """fp32 head inputs whose logits ``h Wᵀ + b`` are exact in fp32 and lie around ±1e4: small integers
    times 1/8 plus a bias of ±1e4 (every partial sum is a multiple of 1/8 below 2^14, so no rounding)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (N, H), generator=g).float()
    W = torch.randint(-4, 5, (V, H), generator=g).float() / 8
    b = torch.where(torch.arange(V) % 2 == 0, 1e4, -1e4) + torch.randint(-8, 9, (V,), generator=g).float() / 8
    b[:3] = 1e4  # several tokens share the large logit: the softmax is not one-hot
    th = torch.randint(-3, 4, (N, H), generator=g).float()
    return h, W, b, th


def reference_fp64(h, W, b, th, weights, name):
    """The loss and its gradients with everything in float64 (plain autograd, no chunking)."""
    h64, W64, b64 = (x.double().requires_grad_(True) for x in (h, W, b))
    s = torch.log_softmax(h64 @ W64.T + b64, dim=-1)
    t = torch.log_softmax(th.double() @ W.double().T + b.double(), dim=-1)
    if name == "rkl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        d = (t.exp() * (t - s)).sum(-1)
    loss = (weights.double() * d).sum()
    return (loss, *torch.autograd.grad(loss, (h64, W64, b64)))


@pytest.mark.parametrize("name", ["rkl", "fkl"])
def test_fused_divergence_is_precise_at_large_logits(name):
    h, W, b, th = exact_large_logits()
    weights = torch.rand(N, generator=torch.Generator().manual_seed(1)) / N
    ref = reference_fp64(h, W, b, th, weights, name)
    for fn in (fused_linear_divergence, dense_linear_divergence):
        hh, WW, bb = (x.clone().requires_grad_(True) for x in (h, W, b))
        loss, _, _ = call(fn, hh, WW, weights, spec=SupportSpec(kind="full"), divergence=name, student_bias_V=bb,
                        teacher_hidden_NH=th, teacher_weight_VH=W, teacher_bias_V=b, chunk_size=4)
        grads = torch.autograd.grad(loss, (hh, WW, bb))
        assert abs(float(loss.detach()) - float(ref[0])) < 2e-6, (fn.__name__, float(loss), float(ref[0]))
        for g, r in zip(grads, ref[1:]):
            assert float((g.double() - r).abs().max()) < 2e-5 * max(1.0, float(r.abs().max())), fn.__name__


def test_fused_token_logprobs_are_precise_at_large_logits():
    h, W, b, _ = exact_large_logits(2)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    ids[:3] = torch.tensor([0, 1, 2])
    hh, WW, bb = (x.clone().requires_grad_(True) for x in (h, W, b))
    out = fused_linear_token_logprobs(hh, WW, ids, bias_V=bb, chunk_size=4)
    coef = torch.linspace(-1, 1, N)
    grads = torch.autograd.grad((coef * out).sum(), (hh, WW, bb))
    h64, W64, b64 = (x.double().requires_grad_(True) for x in (h, W, b))
    ref = torch.log_softmax(h64 @ W64.T + b64, -1).gather(-1, ids[:, None])[:, 0]
    ref_grads = torch.autograd.grad((coef.double() * ref).sum(), (h64, W64, b64))
    # log-probs near −2e4 are themselves rounded at ~1e-3 in fp32: the bound is relative there
    assert bool(((out.double() - ref.detach()).abs() <= 1e-6 + 1e-7 * ref.detach().abs()).all())
    for g, r in zip(grads, ref_grads):
        assert float((g.double() - r).abs().max()) < 2e-5 * max(1.0, float(r.abs().max()))


def test_inplace_log_softmax_subtracts_the_row_max_first():
    x = torch.tensor([[1e4, 1e4 - 1.5, 1e4 - 0.25, -1e4], [0.5, -2.0, 3.0, 1.0],
                      [float("-inf"), 2.0, float("-inf"), 0.0]])
    ref = torch.log_softmax(x.double(), -1)
    got = log_softmax_inplace(x.clone())
    torch.testing.assert_close(got.double(), ref, rtol=1e-7, atol=1e-6)  # −2e4 itself rounds at 1e-3
    all_inf = torch.full((1, 3), float("-inf"))
    assert (log_softmax_inplace(all_inf) == float("-inf")).all()


def test_float64_student_stays_float64():
    """A float64 student (hidden states and head) is computed in float64: loss, per-token values and
    gradients are float64 and match the float64 dense reference to fp64 precision."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * 3
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    t_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    weights = torch.full((N,), 1.0 / N, dtype=torch.float64)
    for name, spec in (("rkl", SupportSpec(kind="full")), ("jsd", SupportSpec(kind="teacher_topk", k=5))):
        out = []
        for fn in (fused_linear_divergence, dense_linear_divergence):
            hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
            loss, per_token, _ = call(fn, hh, WW, weights, spec=spec, divergence=name, teacher_logits_NV=t_logits,
                                    chunk_size=4)
            grads = torch.autograd.grad(loss, (hh, WW))
            assert loss.dtype == per_token.dtype == torch.float64, (fn.__name__, loss.dtype)
            assert all(gr.dtype == torch.float64 for gr in grads)
            out.append((loss, *grads))
        for a, r in zip(*out):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    hh = h.clone().requires_grad_(True)
    ids = torch.randint(0, V, (N,), generator=g)
    lp = fused_linear_token_logprobs(hh, W, ids, chunk_size=4)
    assert lp.dtype == torch.float64
    ref = torch.log_softmax(h @ W.T, -1).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=1e-13, atol=1e-13)
    (gh,) = torch.autograd.grad(lp.sum(), hh)
    h2 = h.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(torch.log_softmax(h2 @ W.T, -1).gather(-1, ids[:, None]).sum(), h2)
    assert gh.dtype == torch.float64
    torch.testing.assert_close(gh, gr, rtol=1e-12, atol=1e-13)
