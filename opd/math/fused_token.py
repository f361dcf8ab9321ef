"""``log π(y_n | h_n)`` through a linear head, chunk by chunk, with a recomputing backward.

Route R2 needs the student's log-prob of each sampled token, ``log π(y_n | h_n) = z_n[y_n]/τ −
logsumexp(z_n/τ)`` with ``z_n = h_n Wᵀ + b``, and its gradient ``∂/∂z = (e_y − softmax(z/τ))/τ``,
without keeping ``[N, V]`` logits: the forward keeps two numbers per token (the row max ``m_n`` and
``logsumexp(z_n/τ − m_n)``, so large logits lose no precision: :mod:`opd.math.chunking`), and the
backward recomputes each chunk's logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.math.chunking import check_chunk, check_head, compute_dtype, scaled_logits

__all__ = ["fused_linear_token_logprobs"]


def fused_linear_token_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    ids_N: Tensor,
    *,
    bias_V: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``log π(ids_N[n] | h_n) = z_n[y_n]/τ − logsumexp(z_n/τ)``, ``z_n = h_n Wᵀ + b``, as ``[N]``.

    fp32 (float64 when the hidden states or the head are float64). Differentiable w.r.t.
    ``hidden_NH``, ``weight_VH`` and ``bias_V`` without keeping ``[N, V]``: the forward keeps the
    per-token row max and shifted logsumexp, the backward recomputes each chunk's logits and applies
    ``∂ log π(y)/∂z = (e_y − softmax(z/τ))/τ``. Ids must lie in ``[0, V)``.
    """
    check_head("hidden_NH", hidden_NH, "weight_VH", weight_VH, "bias_V", bias_V)
    N, V = hidden_NH.shape[0], weight_VH.shape[0]
    if ids_N.shape != (N,):
        raise ValueError(f"ids_N has shape {tuple(ids_N.shape)}; expected ({N},) to match hidden_NH "
                         f"{tuple(hidden_NH.shape)}")
    if ids_N.numel() and (int(ids_N.min()) < 0 or int(ids_N.max()) >= V):
        raise ValueError(f"ids_N must lie in [0, V = {V}), got range [{int(ids_N.min())}, {int(ids_N.max())}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk_size = check_chunk(chunk_size, V)
    return _FusedTokenLogprobs.apply(hidden_NH, weight_VH, bias_V, ids_N.long(), float(temperature), chunk_size)


class _FusedTokenLogprobs(torch.autograd.Function):
    """Chunked ``log softmax(hWᵀ + b)/τ`` at given ids, recomputing each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, h, W, b, ids, temperature, chunk_size):
        N = h.shape[0]
        dt = compute_dtype(h, W)
        Wc = W.to(dt)
        bc = None if b is None else b.to(dt)
        out = torch.empty(N, dtype=dt, device=h.device)
        mx = torch.empty(N, dtype=dt, device=h.device)  # row max m_n
        lse = torch.empty(N, dtype=dt, device=h.device)  # logsumexp(z_n/τ − m_n)
        for start in range(0, N, chunk_size):
            rows = slice(start, min(N, start + chunk_size))
            z = scaled_logits(h[rows], Wc, bc, temperature)
            mx[rows] = z.amax(dim=-1)
            z -= mx[rows, None]
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, ids[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(h, W, b, ids, mx, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, W, b, ids, mx, lse = ctx.saved_tensors
        tau, N = ctx.temperature, h.shape[0]
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        dt = mx.dtype
        Wc = W.to(dt)
        bc = None if b is None else b.to(dt)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_W = torch.zeros(Wc.shape, dtype=dt, device=h.device) if need_W else None
        grad_b = torch.zeros(Wc.shape[0], dtype=dt, device=h.device) if need_b else None
        g = grad_out.to(dt) / tau
        for start in range(0, N, ctx.chunk_size):
            rows = slice(start, min(N, start + ctx.chunk_size))
            z = scaled_logits(h[rows], Wc, bc, tau)
            dz = torch.exp_(z.sub_(mx[rows, None]).sub_(lse[rows, None])).mul_(-g[rows, None])  # −g·softmax
            dz.scatter_add_(-1, ids[rows, None], g[rows, None])  # + g·e_y
            if grad_h is not None:
                grad_h[rows] = (dz @ Wc).to(h.dtype)
            if grad_W is not None:
                grad_W.addmm_(dz.T, h[rows].to(dt))
            if grad_b is not None:
                grad_b += dz.sum(dim=0)
        return (grad_h, None if grad_W is None else grad_W.to(W.dtype),
                None if grad_b is None else grad_b.to(b.dtype), None, None, None)
