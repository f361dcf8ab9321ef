"""A teacher's log-probs from its final hidden states and output head, chunk by chunk.

For hidden states ``h_n`` (``[N, H]``) and a linear head ``z_n = h_n Wᵀ + b`` (``W`` ``[V, H]``), at
temperature ``τ``::

    log π(v | h_n) = z_n[v]/τ − logsumexp(z_n/τ)

:func:`head_logprobs` returns the values a teacher's feedback needs — the sampled token's log-prob,
the ``K`` most likely ids with their log-probs, and the log-probs at caller-chosen ids — computing
``z`` for ``chunk_size`` tokens at a time, so only a ``[chunk, V]`` block ever exists (never
``[N, V]``). The matmul and the normalisation run in fp32. This is what a trainer computes from a
served teacher's hidden-state payload (:mod:`opd.serve.hidden`); the route-1 loss itself reads the
hidden states through :func:`opd.math.fused.fused_linear_divergence`. No gradient (teacher values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.math._checks import check_ndim

__all__ = ["HeadLogprobs", "head_logprobs"]

#: Elements of one ``[chunk, V]`` fp32 block when ``chunk_size`` is None (16 MiB).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class HeadLogprobs:
    """Teacher log-probs from hidden states (fp32, ``[N]`` / ``[N, K]`` / ``[N, M]``; None when not asked)."""

    sampled_N: Tensor
    topk_ids_NK: Tensor | None = None
    topk_logprobs_NK: Tensor | None = None
    chosen_NM: Tensor | None = None


@torch.no_grad()
def head_logprobs(hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, ids_N: Tensor, *, topk: int = 0,
                  chosen_ids_NM: Tensor | None = None, temperature: float = 1.0,
                  chunk_size: int | None = None) -> HeadLogprobs:
    """``log softmax((h Wᵀ + b)/τ)`` at ``ids_N``, its top-``topk`` (``K = min(topk, V)``, by decreasing
    log-prob) and at ``chosen_ids_NM``, one ``[chunk, V]`` block at a time (module docstring).

    Args:
        hidden_NH: final hidden states (any float dtype; computed in fp32).
        weight_VH, bias_V: the linear head.
        ids_N: the sampled token of each row, in ``[0, V)``.
        topk: 0 = no top-k.
        chosen_ids_NM: per row, ``M`` ids whose log-probs to return (e.g. the student's top-k).
        temperature: ``τ > 0``.
        chunk_size: rows per block; None = ``max(1, 2^22 // V)``.

    Raises:
        ValueError: shapes that do not match (naming both), ids outside ``[0, V)``, ``τ ≤ 0``, a
            negative ``topk`` or a chunk size below 1.
    """
    check_ndim("hidden_NH", hidden_NH, 2)
    check_ndim("weight_VH", weight_VH, 2)
    n, v = hidden_NH.shape[0], weight_VH.shape[0]
    if hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden_NH has shape {tuple(hidden_NH.shape)} and weight_VH {tuple(weight_VH.shape)}; "
                         "their hidden sizes (last dimensions) must be equal")
    if bias_V is not None and bias_V.shape != (v,):
        raise ValueError(f"bias_V has shape {tuple(bias_V.shape)}; expected ({v},) to match weight_VH")
    if ids_N.shape != (n,):
        raise ValueError(f"ids_N has shape {tuple(ids_N.shape)}; expected ({n},) to match hidden_NH")
    if chosen_ids_NM is not None and (chosen_ids_NM.dim() != 2 or chosen_ids_NM.shape[0] != n):
        raise ValueError(f"chosen_ids_NM has shape {tuple(chosen_ids_NM.shape)}; expected ({n}, M)")
    for name, ids in (("ids_N", ids_N), ("chosen_ids_NM", chosen_ids_NM)):
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"{name} must lie in [0, V = {v}), got range [{int(ids.min())}, {int(ids.max())}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (auto), got {chunk_size}")
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(v, 1))
    device = hidden_NH.device
    W = weight_VH.detach().to(device, torch.float32)
    b = None if bias_V is None else bias_V.detach().to(device, torch.float32)
    k = min(topk, v)
    sampled = torch.zeros(n, dtype=torch.float32, device=device)
    top_ids = torch.zeros(n, k, dtype=torch.long, device=device) if topk else None
    top_lp = torch.zeros(n, k, dtype=torch.float32, device=device) if topk else None
    chosen = None if chosen_ids_NM is None else torch.zeros(chosen_ids_NM.shape, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        z = hidden_NH[rows].detach().float() @ W.T
        if b is not None:
            z += b
        if temperature != 1.0:
            z /= temperature
        z -= torch.logsumexp(z, dim=-1, keepdim=True)  # the block now holds the log-probs
        sampled[rows] = z.gather(-1, ids_N[rows, None].to(device).long())[:, 0]
        if top_ids is not None:
            top_lp[rows], top_ids[rows] = z.topk(k, dim=-1)
        if chosen is not None:
            chosen[rows] = z.gather(-1, chosen_ids_NM[rows].to(device).long())
    return HeadLogprobs(sampled, top_ids, top_lp, chosen)
