"""Gates (0/1 token masks) and token weights, multiplied into the reducer weights by the caller.

Taxonomy: docs/methods.md §3.6 (**[INFER]** organisation of published gates). Every function is
detached (gates select tokens, they are not trained through) and returns a tensor of the token
shape ``[B, T]`` (any ``[...]`` where noted); masked positions are ``False`` / ``0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_leading_shape, check_ndim, check_range, check_same_shape

__all__ = [
    "EntropyGateMode",
    "PositionWeightKind",
    "special_token_mask",
    "top_fraction_mask",
    "entropy_gate",
    "teacher_coverage_gate",
    "bottom_fraction_mask",
    "position_weights",
]

EntropyGateMode = Literal["q1", "q3", "q1_or_q3"]
PositionWeightKind = Literal["uniform", "linear_decay", "prefix", "drift", "drift_share"]
ENTROPY_GATE_MODES: tuple[str, ...] = get_args(EntropyGateMode)
POSITION_WEIGHT_KINDS: tuple[str, ...] = get_args(PositionWeightKind)


def special_token_mask(ids_BT: Tensor, special_ids: Sequence[int]) -> Tensor:
    """``keep = y_t ∉ special_ids`` (Fu et al. arXiv 2603.25562: mask chat-template / special
    tokens whose teacher log-probs are unreliable). Any shape ``[...]``; empty list keeps all."""
    if len(special_ids) == 0:
        return torch.ones_like(ids_BT, dtype=torch.bool)
    special = torch.as_tensor(list(special_ids), dtype=ids_BT.dtype, device=ids_BT.device)
    return ~torch.isin(ids_BT, special)


@torch.no_grad()
def top_fraction_mask(values_BT: Tensor, mask_BT: Tensor, fraction: float) -> Tensor:
    """Tokens whose value is among the top ``fraction`` of the valid tokens (whole batch).

    ``k = ceil(fraction · n_valid)``; the threshold is the ``k``-th largest valid value and every
    valid token ``≥`` it is kept (ties at the threshold are all kept). ``fraction ∈ [0, 1]``.
    """
    check_same_shape(values_BT=values_BT, mask_BT=mask_BT)
    check_range("fraction", fraction, 0.0, 1.0)
    keep = mask_BT.bool()
    n = int(keep.sum().item())
    k = math.ceil(fraction * n - 1e-9)
    if k <= 0:
        return torch.zeros_like(keep)
    vals = values_BT.detach()[keep]
    threshold = vals.topk(k).values.min()
    return keep & (values_BT.detach() >= threshold)


@torch.no_grad()
def entropy_gate(
    student_entropy_BT: Tensor,
    divergence_BT: Tensor,
    mask_BT: Tensor,
    *,
    mode: EntropyGateMode,
    keep_fraction: float = 0.5,
    entropy_low: float | None = None,
    divergence_high: float | None = None,
) -> Tensor:
    """TIP entropy × divergence quadrant gate (Xu et al., arXiv 2604.14084; **[INFER form]**).

    * Q1 (high student entropy): ``H_S(t)`` among the top ``keep_fraction`` of valid tokens
      (batch quantile ``H_S ≥ q_{1−keep_fraction}(H_S)``, see :func:`top_fraction_mask`).
    * Q3 (low entropy, high divergence — overconfident and wrong):
      ``H_S(t) ≤ entropy_low ∧ D_t ≥ divergence_high``. Defaults when unset: "low entropy" is
      the complement of Q1 among valid tokens and "high divergence" is the top
      ``keep_fraction`` of valid tokens by ``D_t`` **[INFER]**.
    * ``q1_or_q3``: the union, ``m_t = Q1 ∨ Q3``.

    ``D_t`` is any per-token teacher–student divergence (e.g. the sampled ``ℓ_t`` or a top-K
    KL). ``keep_fraction ∈ [0, 1]``. Returns ``keep_BT`` (bool, False on masked tokens).
    """
    check_same_shape(student_entropy_BT=student_entropy_BT, divergence_BT=divergence_BT,
                     mask_BT=mask_BT)
    if mode not in ENTROPY_GATE_MODES:
        raise ValueError(f"unknown entropy gate mode {mode!r}; choose one of "
                         f"{', '.join(ENTROPY_GATE_MODES)}")
    check_range("keep_fraction", keep_fraction, 0.0, 1.0)
    valid = mask_BT.bool()
    q1 = top_fraction_mask(student_entropy_BT, valid, keep_fraction)
    if mode == "q1":
        return q1
    if entropy_low is None:
        low_h = valid & ~q1
    else:
        low_h = valid & (student_entropy_BT.detach() <= entropy_low)
    if divergence_high is None:
        high_d = top_fraction_mask(divergence_BT, valid, keep_fraction)
    else:
        high_d = valid & (divergence_BT.detach() >= divergence_high)
    q3 = low_h & high_d
    return q3 if mode == "q3" else (q1 | q3)


@torch.no_grad()
def bottom_fraction_mask(values_BT: Tensor, mask_BT: Tensor, fraction: float) -> Tensor:
    """Tokens whose value is among the lowest ``fraction`` of the valid tokens (whole batch).

    ``n = max(1, floor(fraction · N))`` of the ``N`` valid tokens are kept (none when ``N = 0``),
    chosen by a stable ascending sort over the valid tokens in row-major order, so ties keep the
    earlier token and exactly ``n`` are kept. With ``values_BT = log π_S(y_t)`` this is OPSA's token
    selection (Ding & Zhang, arXiv 2608.31046: the lowest-log-probability 20 % of the sampled
    tokens, selected across the batch). ``fraction ∈ (0, 1]``.
    """
    check_same_shape(values_BT=values_BT, mask_BT=mask_BT)
    check_range("fraction", fraction, 0.0, 1.0, low_open=True)
    keep = mask_BT.bool()
    flat_keep = keep.reshape(-1)
    idx = torch.nonzero(flat_keep, as_tuple=False).flatten()
    out = torch.zeros_like(flat_keep)
    if idx.numel():
        n = min(idx.numel(), max(1, math.floor(fraction * idx.numel() + 1e-9)))
        order = torch.argsort(values_BT.detach().reshape(-1)[idx], stable=True)
        out[idx[order[:n]]] = True
    return out.reshape(keep.shape)


def teacher_coverage_gate(sampled_ids_BT: Tensor, teacher_topk_ids_BTK: Tensor) -> Tensor:
    """``keep = y_t ∈ TopK_T(s_t)`` (docs/methods.md §3.6; teacher-supported sampled tokens).

    ``teacher_topk_ids_BTK`` is ``[..., K]`` over ``sampled_ids_BT`` ``[...]``; negative ids are
    padding and never match.
    """
    check_leading_shape("sampled_ids_BT", sampled_ids_BT, teacher_topk_ids_BTK=teacher_topk_ids_BTK)
    if teacher_topk_ids_BTK.dim() != sampled_ids_BT.dim() + 1:
        raise ValueError(f"teacher_topk_ids_BTK has shape {tuple(teacher_topk_ids_BTK.shape)}; it "
                         f"must be sampled_ids_BT's shape {tuple(sampled_ids_BT.shape)} plus K")
    hit = (teacher_topk_ids_BTK == sampled_ids_BT.unsqueeze(-1)) & (teacher_topk_ids_BTK >= 0)
    return hit.any(dim=-1)


@torch.no_grad()
def position_weights(
    mask_BT: Tensor,
    *,
    kind: PositionWeightKind,
    prefix_fraction: float = 0.3,
    decay_to: float = 0.0,
    drift_BT: Tensor | None = None,
    beta: float = 1.0,
    gamma: float = 0.5,
    eps: float = 1e-8,
) -> Tensor:
    """Per-token position weights (position bias / IW-OPD, Xie et al., arXiv 2606.22600).

    Positions count valid tokens only: ``p_t = #{t' < t : m_{t'}}``, ``L = Σ_t m_t`` per row, so
    padding (left or right) never shifts a weight.

    * ``uniform``:       ``w_t = 1``.
    * ``linear_decay``:  ``w_t = 1 − (1 − decay_to) · p_t / (L − 1)`` (1 → ``decay_to``; ``L = 1``
      gives 1).
    * ``prefix``:        ``w_t = 1[p_t < ceil(prefix_fraction · L)]`` (the paper's finding that
      the first ~30% of tokens carry the signal).
    * ``drift``:         ``w_t = exp(−β Σ_{t'<t, valid} max(d_{t'}, 0))`` with ``d = drift_BT`` a
      per-token discrepancy (e.g. a k3 or full-vocabulary KL) — IW-OPD accumulated-drift weights
      **[INFER form]**; the clamp keeps ``w ∈ (0, 1]``.
    * ``drift_share``:   ``w_t = 1 + γ · (1 − D_{<t} / max(D, ε))`` with ``D_{<t} = Σ_{t'<t} |d_{t'}|`` and
      ``D = Σ_{t'} |d_{t'}|`` over the row's valid tokens — IW-OPD's importance weights as implemented in
      TRL's ``IWOPDTrainer`` (Algorithm 1 of arXiv 2606.22600; ``iw_opd_gamma = γ``, ``iw_opd_epsilon
      = ε``), with ``d_t`` the sampled log-ratio. ``w ∈ [1, 1 + γ]``: the first token gets ``1 + γ``,
      tokens after most of the row's discrepancy get close to 1.

    Knobs: ``prefix_fraction ∈ (0, 1]``, ``decay_to ∈ [0, 1]``, ``beta ≥ 0``, ``gamma ≥ 0``,
    ``eps > 0``. Returns float32 ``[B, T]`` (the dtype of ``drift_BT`` for ``drift`` and
    ``drift_share``), 0 on masked tokens.
    """
    check_ndim("mask_BT", mask_BT, 2)
    if kind not in POSITION_WEIGHT_KINDS:
        raise ValueError(f"unknown position weight kind {kind!r}; choose one of "
                         f"{', '.join(POSITION_WEIGHT_KINDS)}")
    check_range("prefix_fraction", prefix_fraction, 0.0, 1.0, low_open=True)
    check_range("decay_to", decay_to, 0.0, 1.0)
    check_range("beta", beta, 0.0)
    check_range("gamma", gamma, 0.0)
    check_range("eps", eps, 0.0, low_open=True)
    valid = mask_BT.bool()
    dtype = drift_BT.dtype if (kind in ("drift", "drift_share") and drift_BT is not None
                               and drift_BT.is_floating_point()) else torch.float32
    m = valid.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=m.device)
    if kind == "uniform":
        return m
    if kind == "drift_share":
        if drift_BT is None:
            raise ValueError("position_weights(kind='drift_share') needs drift_BT")
        check_same_shape(mask_BT=mask_BT, drift_BT=drift_BT)
        a = torch.where(valid, drift_BT.detach().to(dtype).abs(), zero)
        before = torch.cumsum(a, dim=1) - a
        total = a.sum(dim=1, keepdim=True).clamp(min=eps)
        return torch.where(valid, 1.0 + gamma * (1.0 - before / total), zero)
    if kind == "drift":
        if drift_BT is None:
            raise ValueError("position_weights(kind='drift') needs drift_BT")
        check_same_shape(mask_BT=mask_BT, drift_BT=drift_BT)
        d = torch.where(valid, drift_BT.detach().to(dtype).clamp(min=0.0), zero)
        before = torch.cumsum(d, dim=1) - d            # exclusive prefix sum over valid tokens
        return torch.where(valid, torch.exp(-beta * before), zero)
    pos = torch.cumsum(m, dim=1) - m                   # p_t
    length = m.sum(dim=1, keepdim=True)
    if kind == "linear_decay":
        w = 1.0 - (1.0 - decay_to) * pos / (length - 1.0).clamp(min=1.0)
        return torch.where(valid, w, zero)
    cutoff = torch.ceil(prefix_fraction * length - 1e-9)
    return torch.where(valid & (pos < cutoff), torch.ones((), dtype=dtype), zero)
