"""Shared pieces of the chunked LM-head losses (:mod:`opd.math.fused`, :mod:`opd.math.fused_token`).

Chunk sizing, the argument checks of a linear head ``z = h Wᵀ + b``, the compute dtype, and a
numerically stable in-place log-softmax. Pure functions on tensors.

Precision: ``log softmax(x) = (x − m) − log Σ_v exp(x_v − m)`` with ``m = max_v x_v``. Subtracting the
row max *first* keeps the result accurate when the logits are large: ``x − logsumexp(x)`` rounds
both terms at the magnitude of ``x`` (at ``|x| ≈ 1e4`` in fp32 that is an absolute error of
``≈ 1e4 · 2^-24 ≈ 6e-4`` per log-prob), whereas ``x − m`` is exact for the entries that matter
(Sterbenz) and the remaining logsumexp is of order ``log V``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_ndim

__all__ = ["CHUNK_ELEMENTS", "MIN_CHUNK_TOKENS", "auto_chunk_size", "check_chunk", "check_head",
           "compute_dtype", "log_softmax_inplace", "scaled_logits"]

#: Elements of one ``[chunk, V]`` fp32 buffer when ``chunk_size`` is None: 2**22 (16 MiB), i.e.
#: 131 tokens at V = 32,000. The peak memory of the chunked path is a small multiple of this (the
#: divergence's temporaries, and glibc's fragmentation) plus the ``[V, H]`` weight gradient.
CHUNK_ELEMENTS = 1 << 22
#: Fewest tokens per automatic chunk: every chunk re-reads the ``[V, H]`` weights and the weight
#: gradient, and the matmuls do about ``chunk/2`` FLOP per byte of them, so much smaller chunks are
#: bandwidth-bound (measured: at V = 128,000 on 2 CPU cores, 32 tokens/chunk was ~1.6x slower than 64).
MIN_CHUNK_TOKENS = 64


def auto_chunk_size(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS,
                    min_tokens: int = MIN_CHUNK_TOKENS) -> int:
    """``max(min_tokens, chunk_elements // V)`` tokens per chunk (chosen with bench/fused_divergence.py)."""
    if vocab_size < 1 or chunk_elements < 1 or min_tokens < 1:
        raise ValueError(f"vocab_size, chunk_elements and min_tokens must be >= 1, got "
                         f"{vocab_size}, {chunk_elements}, {min_tokens}")
    return max(min_tokens, chunk_elements // vocab_size)


def check_chunk(chunk_size: int | None, vocab_size: int) -> int:
    """``chunk_size`` checked (an integer ≥ 1), or :func:`auto_chunk_size` ``(V)`` for None."""
    if chunk_size is None:
        return auto_chunk_size(vocab_size)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None (auto), got {chunk_size}")
    return int(chunk_size)


def check_head(h_name: str, h: Tensor, w_name: str, W: Tensor, b_name: str, b: Tensor | None) -> None:
    """``h [N, H]``, ``W [V, H]`` and ``b [V]`` (optional) fit together; ``ValueError`` naming the shapes."""
    check_ndim(h_name, h, 2)
    check_ndim(w_name, W, 2)
    if h.shape[1] != W.shape[1]:
        raise ValueError(f"{h_name} has shape {tuple(h.shape)} and {w_name} has shape {tuple(W.shape)}; "
                         "their last (hidden) dimensions must be equal")
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(f"{b_name} has shape {tuple(b.shape)}; expected ({W.shape[0]},) to match "
                         f"{w_name} {tuple(W.shape)}")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64 (a float64 student stays float64), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def log_softmax_inplace(x: Tensor, temperature: float = 1.0) -> Tensor:
    """``x ← log_softmax(x / τ)`` over the last dim, in place (no grad): ``(x − m) − logsumexp(x − m)``
    with the row max ``m`` subtracted first (module docstring). A row of ``-inf`` stays ``-inf``."""
    if temperature != 1.0:
        x /= temperature
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    m = x.amax(dim=-1, keepdim=True)
    x.sub_(torch.where(torch.isfinite(m), m, zero))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x.sub_(torch.where(lse == float("-inf"), zero, lse))


def scaled_logits(h: Tensor, W: Tensor, b: Tensor | None, temperature: float) -> Tensor:
    """``(h Wᵀ + b) / τ`` in ``W``'s dtype (``W`` and ``b`` already in the compute dtype)."""
    z = h.to(W.dtype) @ W.T
    if b is not None:
        z += b
    if temperature != 1.0:
        z /= temperature
    return z
