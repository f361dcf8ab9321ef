"""Reducers: how per-token values become one scalar loss.

Every loss in ``opd`` is computed per token and reduced here, in one place, so the
normalisation of a method is a named choice and never an accident of the loss code
(TRL dispatching on ``loss_type`` twice is the cautionary tale).

A reducer is expressed as per-token **weights** ``w_BT`` such that ``loss = Σ_bt w_bt · x_bt``.
That form also feeds the memory-efficient loss paths, which need the weights before the
backward pass, and makes data-parallel normalisation explicit (pass the global counts).

With mask ``m_BT`` (1 = the token counts), sequence lengths ``L_b = Σ_t m_bt`` and
``S = #{b : L_b > 0}`` (rows with no counted token never change a loss):

* ``token_mean``     ``w_bt = m_bt / max(Σ_bt m_bt, 1)``            (DAPO-style token mean)
* ``sequence_mean``  ``w_bt = m_bt / (max(L_b, 1) · max(S, 1))``     (mean over tokens, then sequences)
* ``constant``       ``w_bt = m_bt / (C · max(S, 1))``               (Dr. GRPO-style constant normaliser C,
                                                                     e.g. the maximum completion length)
* ``sum``            ``w_bt = m_bt``                                  (no normaliser: tinker's built-in losses
                                                                     sum over tokens and sequences,
                                                                     https://tinker-docs.thinkingmachines.ai/tinker/losses)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_same_shape

Reduction = Literal["token_mean", "sequence_mean", "constant", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def reduction_weights(
    mask_BT: Tensor,
    reduction: Reduction = "token_mean",
    *,
    constant_normalizer: float | None = None,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Tensor:
    """Per-token weights ``w_BT`` (float32) that implement ``reduction`` as ``Σ w·x``.

    Args:
        mask_BT: ``[B, T]`` bool or 0/1 mask (a float mask is used as given, so soft gates work).
        reduction: ``token_mean``, ``sequence_mean``, ``constant`` or ``sum``.
        constant_normalizer: ``C`` for ``constant`` (required there, must be > 0).
        num_tokens: overrides ``Σ m`` for ``token_mean`` (the global count under data parallelism).
        num_sequences: overrides ``S`` for ``sequence_mean`` and ``constant``.
    """
    check_ndim("mask_BT", mask_BT, 2)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    m = mask_BT.to(torch.float32)
    lengths_B = m.sum(dim=1)
    if num_sequences is None:
        num_sequences = (lengths_B > 0).sum().to(torch.float32)
    seqs = torch.as_tensor(num_sequences, dtype=torch.float32, device=m.device).clamp(min=1.0)
    if reduction == "token_mean":
        if num_tokens is None:
            num_tokens = m.sum()
        tokens = torch.as_tensor(num_tokens, dtype=torch.float32, device=m.device).clamp(min=1.0)
        return m / tokens
    if reduction == "sequence_mean":
        return m / (lengths_B.clamp(min=1.0)[:, None] * seqs)
    if reduction == "sum":
        return m
    if constant_normalizer is None or constant_normalizer <= 0:
        raise ValueError(
            f"reduction='constant' needs constant_normalizer > 0 (e.g. the maximum completion "
            f"length), got {constant_normalizer}"
        )
    return m / (float(constant_normalizer) * seqs)


def masked_sum(values: Tensor, weights: Tensor) -> Tensor:
    """``Σ weights · values`` over all elements, where positions with weight 0 contribute exactly 0.

    ``values`` may hold ``nan``/``inf`` at masked positions (for example ``-inf`` log-probs of
    padding); they neither reach the sum nor its gradient.
    """
    check_same_shape(values=values, weights=weights)
    keep = weights != 0
    safe = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (safe * weights.to(values.dtype)).sum()


def reduce_tokens(
    values_BT: Tensor,
    mask_BT: Tensor,
    reduction: Reduction = "token_mean",
    *,
    constant_normalizer: float | None = None,
) -> Tensor:
    """Reduce per-token ``values_BT`` to a scalar with the named reducer (see module docstring), with the
    counts of this batch: ``masked_sum(values_BT, reduction_weights(mask_BT, ...))``. Global counts under
    data parallelism go to :func:`reduction_weights` (``num_tokens``, ``num_sequences``)."""
    check_same_shape(values_BT=values_BT, mask_BT=mask_BT)
    return masked_sum(values_BT, reduction_weights(mask_BT, reduction, constant_normalizer=constant_normalizer))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (any shape); 0 when nothing is selected. For metrics."""
    check_same_shape(values=values, mask=mask)
    m = mask.to(values.dtype) if values.is_floating_point() else mask.to(torch.float32)
    v = values if values.is_floating_point() else values.to(torch.float32)
    safe = torch.where(mask.bool(), v, torch.zeros((), dtype=v.dtype, device=v.device))
    return (safe * m).sum() / m.sum().clamp(min=1.0)
