"""Regularizers: KL to a reference policy, entropy, and a cross-entropy (SFT / pretraining) term.

docs/methods.md §3.6 (regularization, and the k1/k2/k3 estimators). The reference policy (initial model,
sampler ``μ``, ...) is always detached; gradients flow through the student only. Per-token
outputs; reduction through :mod:`opd.math.reduce`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_leading_shape, check_same_shape

__all__ = [
    "KLEstimator",
    "KL_ESTIMATORS",
    "sampled_kl",
    "full_kl",
    "entropy",
    "token_cross_entropy",
]

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def _zero(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def sampled_kl(student_logprobs_BT: Tensor, reference_logprobs_BT: Tensor, *,
               estimator: KLEstimator, mask_BT: Tensor | None = None) -> Tensor:
    """Sampled-token estimators of ``KL(π_θ ‖ π_ref)`` for ``y_t ~ π_θ`` (Schulman 2020,
    http://joschu.net/blog/kl-approx.html; docs/methods.md §3.6).

    With ``δ = log π_ref(y) − log π_θ(y)`` (``log r``):

    * ``k1 = −δ = log π_θ − log π_ref``          — ``E[k1] = KL(π_θ‖π_ref)`` (unbiased);
    * ``k2 = ½ δ²``                               — biased value, low variance;
    * ``k3 = e^δ − 1 − δ``                        — ``E[k3] = KL(π_θ‖π_ref)`` (unbiased, ≥ 0).

    **What the gradient estimates when the estimator is used as a loss** (autodiff through
    ``log π_θ(y)`` with the sample held fixed, ``y ~ π_θ``):

    * ``E[∇k1] = E[∇log π_θ] = 0`` — k1 is only useful as a detached reward / penalty in the
      advantage (route R2), never as a loss;
    * ``E[∇k2] = E[(log π_θ − log π_ref) ∇log π_θ] = ∇KL(π_θ‖π_ref)`` — the reverse-KL gradient
      (prime-rl's ``kl_tau · (log π_θ − log μ)²`` mismatch penalty is ``2 k2``);
    * ``E[∇k3] = E[(1 − π_ref/π_θ) ∇log π_θ] = ∇KL(π_ref‖π_θ)`` — the **forward**-KL gradient,
      not the reverse one (Tang & Munos, arXiv 2506.09477).

    Token-level estimators also miss the effect of ``y_t`` on later states (docs/methods.md §3.2).
    ``mask_BT``: masked tokens give exactly 0 with no gradient (``-inf`` padding is safe).
    """
    check_same_shape(student_logprobs_BT=student_logprobs_BT,
                     reference_logprobs_BT=reference_logprobs_BT, mask_BT=mask_BT)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of "
                         f"{', '.join(KL_ESTIMATORS)}")
    logp = student_logprobs_BT
    ref = reference_logprobs_BT.detach().to(logp.dtype)
    if mask_BT is not None:
        keep = mask_BT.bool()
        logp = torch.where(keep, logp, _zero(logp))
        ref = torch.where(keep, ref, _zero(ref))
    delta = ref - logp
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return torch.expm1(delta) - delta


def full_kl(student_logp_NV: Tensor, reference_logp_NV: Tensor) -> Tensor:
    """Exact ``KL(π_θ ‖ π_ref) = Σ_v π_θ(v) (log π_θ(v) − log π_ref(v))`` per token.

    ``[..., V]`` log-probs → ``[...]``. Terms with ``π_θ(v) = 0`` are 0 (``0·log 0 = 0``, no NaN
    from ``-inf``); ``π_θ(v) > 0 = π_ref(v)`` gives ``+inf`` (the true value). Reference detached.
    """
    check_same_shape(student_logp_NV=student_logp_NV, reference_logp_NV=reference_logp_NV)
    logp = student_logp_NV
    ref = reference_logp_NV.detach().to(logp.dtype)
    support = logp > -float("inf")
    safe_logp = torch.where(support, logp, _zero(logp))
    safe_ref = torch.where(support, ref, _zero(ref))
    terms = torch.where(support, safe_logp.exp() * (safe_logp - safe_ref), _zero(logp))
    return terms.sum(dim=-1)


def entropy(student_logp_NV: Tensor) -> Tensor:
    """``H(π_θ) = −Σ_v π_θ(v) log π_θ(v)`` per token (differentiable, ``0·log 0 = 0``).

    The entropy bonus ``−coef·H`` is built by the caller.
    """
    support = student_logp_NV != -float("inf")  # NaN stays NaN (never silently a zero-probability entry)
    safe = torch.where(support, student_logp_NV, _zero(student_logp_NV))
    return -torch.where(support, safe.exp() * safe, _zero(safe)).sum(dim=-1)


def token_cross_entropy(student_logp_NV: Tensor, target_ids_N: Tensor) -> Tensor:
    """``−log π_θ(target)`` per token (SFT / pretraining mix, e.g. MiniLLM's ``L_PT``,
    arXiv 2306.08543). Negative targets (e.g. ``-100``) are ignored and give 0."""
    check_leading_shape("target_ids_N", target_ids_N, student_logp_NV=student_logp_NV)
    if student_logp_NV.dim() != target_ids_N.dim() + 1:
        raise ValueError(f"student_logp_NV has shape {tuple(student_logp_NV.shape)}; it must be "
                         f"target_ids_N's shape {tuple(target_ids_N.shape)} plus a vocabulary dim")
    V = student_logp_NV.shape[-1]
    keep = target_ids_N >= 0
    if keep.any() and int(target_ids_N.max()) >= V:
        raise ValueError(f"target_ids_N must be < {V} (the vocabulary size)")
    ids = torch.where(keep, target_ids_N, torch.zeros_like(target_ids_N)).long()
    logp_y = student_logp_NV.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, -logp_y, _zero(logp_y))
