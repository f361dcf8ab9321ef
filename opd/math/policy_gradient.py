"""Route R2: sampled-token policy-gradient surrogates, trust regions and advantage shaping.

Reward convention (docs/methods.md §1): the advantage ``A_t`` is higher-is-better and always treated
as a constant (``sg[A]``). The surrogate loss of a token is

    L_t = −ρ_t · sg[A_t],        ρ_t = π_θ(y_t|s_t) / μ(y_t|s_t),

whose gradient is ``−sg[ρ_t A_t] ∇log π_θ(y_t|s_t)``. Strictly on-policy (``μ = sg π_θ``) the
ratio is ``exp(log π − sg log π) = 1`` in value, so ``L_t = −A_t`` and ``∇L_t = −A_t ∇log π``.

Sources: REINFORCE / PPO (Schulman et al. 2017, arXiv 1707.06347); truncated importance
sampling for train–inference mismatch (Ionides 2008; Yao et al. 2025,
https://fengyao.notion.site/off-policy-rl); prime-rl DPPO sign-conditioned trust region
(https://github.com/PrimeIntellect-ai/prime-rl, docs/methods.md §4.2); GRPO group-normalised outcome
advantages (Shao et al., arXiv 2402.03300); ``teacher_tau``/``adv_tau`` mixing (prime-rl; MiMo
MOPD arXiv 2601.02780).

All functions return per-token tensors; reduction goes through :mod:`opd.math.reduce`. Metrics
are per-token detached tensors so the caller reduces them with its own mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_range, check_same_shape

__all__ = [
    "importance_ratio",
    "pg_loss",
    "dppo_mask",
    "ratio_band_mask",
    "whiten_advantages",
    "clip_advantages",
    "outcome_advantages",
    "mix_advantages",
]


def _zero(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _masked(values: Tensor, mask: Tensor | None) -> Tensor:
    """``values`` with masked entries replaced by 0 (a ``where``, so no NaN/inf leaks, in value or
    gradient, from padding)."""
    if mask is None:
        return values
    return torch.where(mask.bool(), values, _zero(values))


def importance_ratio(logprobs_BT: Tensor, behaviour_logprobs_BT: Tensor,
                     *, mask_BT: Tensor | None = None) -> Tensor:
    """``ρ = exp(log π_θ − sg[log μ])`` per token; the gradient flows through ``log π_θ`` only.

    Shapes ``[...]`` (any, equal). With ``mask_BT`` the ratio is exactly 1 at masked positions
    (padding log-probs such as ``-inf`` never produce NaN there).
    """
    check_same_shape(logprobs_BT=logprobs_BT, behaviour_logprobs_BT=behaviour_logprobs_BT,
                     mask_BT=mask_BT)
    diff = logprobs_BT - behaviour_logprobs_BT.detach()
    return torch.exp(_masked(diff, mask_BT))


def pg_loss(
    logprobs_BT: Tensor,
    advantages_BT: Tensor,
    *,
    behaviour_logprobs_BT: Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    ratio_cap: float | None = None,
    mask_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token policy-gradient surrogate (REINFORCE / IS / TIS / PPO-clip).

    * No behaviour log-probs: ``ρ = exp(log π − sg log π)`` (value 1), ``L = −ρ·sg[A]``;
      value ``−A``, gradient ``−A ∇log π``.
    * With ``behaviour_logprobs_BT`` (``log μ``): ``ρ = exp(log π − sg log μ)``.
    * ``ratio_cap = C`` (truncated IS, Ionides 2008; TIS, Yao et al. 2025):
      ``ρ ← ρ · sg[min(1, C/ρ)]`` — value ``min(ρ, C)`` and gradient ``min(ρ, C)·∇log π``
      (the weight is truncated but the token still gets a gradient).
    * ``clip_low = ε_l`` and/or ``clip_high = ε_h`` (PPO, arXiv 1707.06347):
      ``L = −min(ρA, clip(ρ, 1−ε_l, 1+ε_h)·A)`` (a missing side is unbounded). Applied to the
      capped ratio when both are given.

    Args:
        logprobs_BT: ``log π_θ(y_t)`` with gradient, shape ``[...]``.
        advantages_BT: ``A_t`` (detached inside), same shape.
        behaviour_logprobs_BT: ``log μ(y_t)`` of the sampler (detached inside), same shape.
        clip_low: ``ε_l ∈ [0, 1]``.  clip_high: ``ε_h ≥ 0``.  ratio_cap: ``C > 0``.
        mask_BT: optional; masked tokens get loss exactly 0 and no gradient, NaN-free.

    Returns:
        ``(loss_BT, metrics)`` with per-token detached metrics ``ratio`` (the ratio used),
        ``clipped`` (bool: PPO clipping removed the token's gradient, i.e.
        ``A>0 ∧ ρ>1+ε_h`` or ``A<0 ∧ ρ<1−ε_l``) and ``capped`` (bool: ``ρ > C``).
    """
    check_same_shape(logprobs_BT=logprobs_BT, advantages_BT=advantages_BT,
                     behaviour_logprobs_BT=behaviour_logprobs_BT, mask_BT=mask_BT)
    if clip_low is not None:
        check_range("clip_low", clip_low, 0.0, 1.0)
    if clip_high is not None:
        check_range("clip_high", clip_high, 0.0)
    if ratio_cap is not None:
        check_range("ratio_cap", ratio_cap, 0.0, low_open=True)

    adv = _masked(advantages_BT.detach(), mask_BT)
    logp = _masked(logprobs_BT, mask_BT)
    if behaviour_logprobs_BT is None:
        ratio = torch.exp(logp - logp.detach())
    else:
        ratio = torch.exp(logp - _masked(behaviour_logprobs_BT.detach(), mask_BT))

    capped = torch.zeros_like(adv, dtype=torch.bool)
    if ratio_cap is not None:
        r = ratio.detach()
        capped = r > ratio_cap
        ratio = ratio * torch.clamp(ratio_cap / r, max=1.0)

    loss = -ratio * adv
    clipped = torch.zeros_like(adv, dtype=torch.bool)
    if clip_low is not None or clip_high is not None:
        lo = 1.0 - clip_low if clip_low is not None else None
        hi = 1.0 + clip_high if clip_high is not None else None
        clipped_ratio = torch.clamp(ratio, min=lo, max=hi)
        loss = torch.maximum(loss, -clipped_ratio * adv)     # −min(ρA, clip(ρ)A)
        r = ratio.detach()
        if hi is not None:
            clipped = clipped | ((adv > 0) & (r > hi))
        if lo is not None:
            clipped = clipped | ((adv < 0) & (r < lo))

    if mask_BT is not None:
        keep = mask_BT.bool()
        loss = _masked(loss, mask_BT)
        clipped, capped = clipped & keep, capped & keep
    metrics = {"ratio": ratio.detach(), "clipped": clipped, "capped": capped}
    return loss, metrics


def dppo_mask(
    logprobs_BT: Tensor,
    behaviour_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    *,
    delta_low: float,
    delta_high: float,
    zero_as_negative: bool = False,
) -> Tensor:
    """prime-rl DPPO sign-conditioned trust region (prime-rl ``src/prime_rl/trainer/rl/loss.py``,
    https://github.com/PrimeIntellect-ai/prime-rl; DPPO arXiv 2602.04879).

    A token is dropped (``keep = False``) when the update would push it further out of the
    probability band around the sampler:

        drop_t = (A_t > 0 ∧ π_θ(y_t) − μ(y_t) > δ_high) ∨ (A_t < 0 ∧ π_θ(y_t) − μ(y_t) < −δ_low)

    with probabilities (not ratios) and everything detached. ``A_t = 0`` is kept, unless
    ``zero_as_negative`` — then ``A_t ≤ 0`` uses the low band, exactly prime-rl's
    ``where(A > 0, high_violation, low_violation)``. ``delta_low, delta_high ∈ [0, 1]``. Returns
    ``keep_BT`` (bool) of the common shape.
    """
    check_same_shape(logprobs_BT=logprobs_BT, behaviour_logprobs_BT=behaviour_logprobs_BT,
                     advantages_BT=advantages_BT)
    check_range("delta_low", delta_low, 0.0, 1.0)
    check_range("delta_high", delta_high, 0.0, 1.0)
    with torch.no_grad():
        diff = torch.exp(logprobs_BT.detach()) - torch.exp(behaviour_logprobs_BT.detach())
        adv = advantages_BT.detach()
        negative = adv <= 0 if zero_as_negative else adv < 0
        drop = ((adv > 0) & (diff > delta_high)) | (negative & (diff < -delta_low))
    return ~drop


def ratio_band_mask(logprobs_BT: Tensor, behaviour_logprobs_BT: Tensor, *, low: float, high: float) -> Tensor:
    """ICE-POP truncated importance sampling as a mask: ``keep_t = low ≤ π_θ(y_t)/μ(y_t) ≤ high``.

    NeMo-RL's ``truncated_importance_sampling_type: icepop`` zeroes the tokens whose importance
    weight falls outside ``[low, high]`` (its MOPD recipe uses ``[0.2, 5]``;
    https://github.com/NVIDIA-NeMo/RL, ``nemo_rl/algorithms/loss/loss_functions.py``), where
    truncation (TIS) would clamp the weight instead. Detached; ``0 ≤ low ≤ high``. Returns bool.
    """
    check_same_shape(logprobs_BT=logprobs_BT, behaviour_logprobs_BT=behaviour_logprobs_BT)
    check_range("low", low, 0.0)
    if high < low:
        raise ValueError(f"ratio_band_mask needs low <= high, got low={low}, high={high}")
    with torch.no_grad():
        ratio = torch.exp(logprobs_BT.detach() - behaviour_logprobs_BT.detach())
        return (ratio >= low) & (ratio <= high)


def whiten_advantages(advantages_BT: Tensor, mask_BT: Tensor, eps: float = 1e-6) -> Tensor:
    """``(A − mean)/(std + eps)`` with mean and (population) std over the valid tokens only.

    Masked positions are 0 in the output. No valid token: all zeros. Detached.
    ``eps > 0`` keeps a constant batch finite (it maps to 0).
    """
    check_same_shape(advantages_BT=advantages_BT, mask_BT=mask_BT)
    check_range("eps", eps, 0.0, low_open=True)
    with torch.no_grad():
        a = _masked(advantages_BT.detach(), mask_BT)
        m = mask_BT.bool().to(a.dtype)
        n = m.sum().clamp(min=1.0)
        mean = a.sum() / n
        var = (((a - mean) * m) ** 2).sum() / n
        out = (a - mean) / (var.sqrt() + eps)
        return _masked(out, mask_BT)


def clip_advantages(advantages_BT: Tensor, limit: float) -> Tensor:
    """``clamp(A, −limit, limit)`` (e.g. rllm's ±5), ``limit > 0``. Detached."""
    check_range("limit", limit, 0.0, low_open=True)
    return advantages_BT.detach().clamp(min=-limit, max=limit)


def outcome_advantages(rewards_B: Tensor, group_index_B: Tensor, *,
                       normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group-normalised outcome advantage (Shao et al., arXiv 2402.03300).

        A_i = (R_i − mean_{j∈g(i)} R_j) / (std_{j∈g(i)} R_j + eps)    (std only if normalize_std)

    ``std`` is the Bessel-corrected sample standard deviation (as in TRL's and verl's GRPO);
    a group with a single member gets ``A = 0``. ``group_index_B`` holds arbitrary integer
    prompt ids (need not be contiguous or sorted). Returns ``[B]`` (detached, float).
    """
    check_ndim("rewards_B", rewards_B, 1)
    check_same_shape(rewards_B=rewards_B, group_index_B=group_index_B)
    check_range("eps", eps, 0.0, low_open=True)
    with torch.no_grad():
        r = rewards_B.detach()
        if not r.is_floating_point():
            r = r.to(torch.float32)
        _, inv = torch.unique(group_index_B, return_inverse=True)
        n_groups = int(inv.max().item()) + 1 if inv.numel() else 0
        count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(
            0, inv, torch.ones_like(r))
        mean = torch.zeros_like(count).index_add_(0, inv, r) / count
        centred = r - mean[inv]
        if not normalize_std:
            return centred
        ss = torch.zeros_like(count).index_add_(0, inv, centred ** 2)
        std = torch.sqrt(ss / (count - 1.0).clamp(min=1.0))
        return torch.where(count[inv] > 1, centred / (std[inv] + eps), _zero(r))


def mix_advantages(opd_BT: Tensor, outcome_B: Tensor, mask_BT: Tensor, *,
                   teacher_tau: float = 1.0, adv_tau: float = 0.0) -> Tensor:
    """Hybrid advantage ``A_t = teacher_tau · A_t^OPD + adv_tau · A^outcome`` (prime-rl;
    MiMo MOPD arXiv 2601.02780 with ``α = adv_tau``; docs/methods.md §3.1 "Hybrid").

    The outcome advantage of row ``b`` is broadcast over its tokens. Masked positions are 0.
    Pure OPD: ``teacher_tau = 1, adv_tau = 0``; pure RL: ``teacher_tau = 0, adv_tau = 1``.
    Both taus must be ``≥ 0``. Detached.
    """
    check_ndim("opd_BT", opd_BT, 2)
    check_ndim("outcome_B", outcome_B, 1)
    check_same_shape(opd_BT=opd_BT, mask_BT=mask_BT)
    if outcome_B.shape[0] != opd_BT.shape[0]:
        raise ValueError(f"outcome_B has shape {tuple(outcome_B.shape)} but opd_BT has shape "
                         f"{tuple(opd_BT.shape)}; outcome_B must have one entry per row")
    check_range("teacher_tau", teacher_tau, 0.0)
    check_range("adv_tau", adv_tau, 0.0)
    opd = _masked(opd_BT.detach(), mask_BT)
    out = teacher_tau * opd + adv_tau * outcome_B.detach().to(opd.dtype)[:, None]
    return _masked(out, mask_BT)
