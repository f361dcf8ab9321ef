"""Per-token rewards for sampled-token (route R2) OPD.

Every function here maps the log-probabilities of the *sampled* tokens to a per-token reward
``r_t`` in the package's reward convention (higher is better, see :mod:`opd.math`):

    r_t = log π_T(y_t | s_t^T) − log π_S(y_t | s_t)          (the log-ratio reward)

and its published variants (clipped, Box–Cox/PowerOPD, G-OPD/ExOPD extrapolation).

Rewards are **fully detached**: the student log-probabilities are stop-gradient inside
(``r_t = log π_T − sg[log π_S]``; teacher and reference tensors are detached too). The
stop-gradient is unbiased for the reverse KL because ``E_{y~π}[∇ log π(y)] = 0``
(methods.md §3.2); the gradient reaches the student only through the policy-gradient loss
``−sg[A_t] log π_S(y_t)`` built from these rewards.

Shapes: any leading shape ``[...]`` (written ``_BT`` for the common case). With ``mask_BT``
the reward is exactly ``0`` at masked positions, whatever the log-probabilities hold there
(``-inf`` padding gives no ``nan``). Computation is in at least float32 (bf16/fp16 inputs are
upcast; float64 stays float64).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_range, check_same_shape

RewardKind = Literal["log_ratio", "clipped", "box_cox", "extrapolated"]
REWARD_KINDS: tuple[str, ...] = get_args(RewardKind)


def _float(t: Tensor) -> Tensor:
    """Detached copy in at least float32."""
    t = t.detach()
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        return t.to(torch.float32)
    return t


def _apply_mask(r: Tensor, mask_BT: Tensor | None) -> Tensor:
    if mask_BT is None:
        return r
    return torch.where(mask_BT.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))


def _safe_inputs(mask_BT: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """Detached float copies with masked entries replaced by 0 (no ``-inf − -inf = nan``)."""
    out = [_float(t) for t in tensors]
    if mask_BT is None:
        return out
    return [_apply_mask(t, mask_BT) for t in out]


def log_ratio_reward(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, *,
                     mask_BT: Tensor | None = None) -> Tensor:
    """The OPD log-ratio reward ``r_t = log π_T(y_t|s_t^T) − sg[log π_S(y_t|s_t)]``.

    ``−r_t = ℓ_t`` is the k1 estimate of the per-token reverse KL; its conditional mean
    under the student is ``−RKL_t``. This is the "negative reverse KL as advantage" reward of
    Thinking Machines' on-policy distillation (https://thinkingmachines.ai/blog/on-policy-distillation/)
    and of MiniLLM's return (arXiv 2306.08543); methods.md §1, §3.2.

    Args:
        student_logprobs_BT: log π_S of the sampled tokens ``[...]`` (detached here).
        teacher_logprobs_BT: log π_T of the same tokens ``[...]`` (detached here).
        mask_BT: optional ``[...]`` mask; the reward is 0 where it is False.

    Returns:
        ``[...]`` detached reward, float32 or wider.

    >>> log_ratio_reward(torch.tensor([-1.0]), torch.tensor([-3.0]))   # −3 − (−1)
    tensor([-2.])
    """
    check_same_shape(student_logprobs_BT=student_logprobs_BT,
                     teacher_logprobs_BT=teacher_logprobs_BT, mask_BT=mask_BT)
    s, t = _safe_inputs(mask_BT, student_logprobs_BT, teacher_logprobs_BT)
    return _apply_mask(t - s, mask_BT)


def clipped_reward(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, *,
                   low: float | None = None, high: float | None = None,
                   mask_BT: Tensor | None = None) -> Tensor:
    """Log-ratio reward clamped to ``[low, high]``: ``r_t = clip(log π_T − sg[log π_S], low, high)``.

    A common stabiliser for the unbounded log-ratio (PowerOPD, arXiv 2606.17199, motivates
    bounding it; Fu et al. arXiv 2603.25562 analyse bounded per-token rewards). The clip
    makes the estimator biased for the reverse-KL gradient. [INFER: the hard clip is a
    library knob, not a specific paper's recipe.] ``low``/``high`` ``None`` = no bound on that
    side; ``low <= high`` is required.
    """
    if low is not None and high is not None and low > high:
        raise ValueError(f"clipped_reward needs low <= high, got low={low}, high={high}")
    r = log_ratio_reward(student_logprobs_BT, teacher_logprobs_BT, mask_BT=mask_BT)
    if low is None and high is None:
        return r
    return _apply_mask(r.clamp(min=low, max=high), mask_BT)


def box_cox_reward(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, *, alpha: float,
                   mask_BT: Tensor | None = None) -> Tensor:
    """PowerOPD bounded reward (Box–Cox transform of the probability ratio).

        r_t^{(α)} = ((π_T(y_t)/π_S(y_t))^α − 1) / α = expm1(α · (log π_T − sg[log π_S])) / α

    α → 0 recovers the log-ratio reward (α = 0 is handled exactly, not by a limit); for α > 0
    the reward is bounded below by ``−1/α`` (reached when ``π_T(y_t) = 0``).
    PowerOPD, Zhao et al., arXiv 2606.17199; the explicit form is [INFER] (methods.md §4.4).

    Args:
        alpha: α ≥ 0.
    """
    check_range("alpha", alpha, 0.0)
    r = log_ratio_reward(student_logprobs_BT, teacher_logprobs_BT, mask_BT=mask_BT)
    if alpha == 0.0:
        return r
    return _apply_mask(torch.expm1(alpha * r) / alpha, mask_BT)


def extrapolated_reward(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor,
                        reference_logprobs_BT: Tensor | None, *, lam: float,
                        mask_BT: Tensor | None = None) -> Tensor:
    """G-OPD / ExOPD reward with reward scale λ and reference policy π_ref.

        r_t = λ log π_T(y_t) + (1 − λ) log π_ref(y_t) − sg[log π_S(y_t)]
            = λ (log π_T − log π_S) + (1 − λ)(log π_ref − log π_S)

    The per-token expansion of J_G(θ) = E[λ log(π_T(y)/π_ref(y)) − KL(π_θ ‖ π_ref)] (Yang et al.,
    arXiv 2602.12125; the expansion is [INFER], methods.md §4.7). λ = 1 is the plain log-ratio
    reward (``reference_logprobs_BT`` is then not used and may be ``None``); 0 < λ < 1
    interpolates teacher and reference; λ > 1 is ExOPD (reward extrapolation). A term whose
    coefficient is exactly 0 is skipped, so a ``-inf`` log-prob there yields no ``nan``.
    """
    if lam == 1.0:
        return log_ratio_reward(student_logprobs_BT, teacher_logprobs_BT, mask_BT=mask_BT)
    if reference_logprobs_BT is None:
        raise ValueError(f"extrapolated_reward with lam={lam} != 1 needs reference_logprobs_BT")
    check_same_shape(student_logprobs_BT=student_logprobs_BT,
                     teacher_logprobs_BT=teacher_logprobs_BT,
                     reference_logprobs_BT=reference_logprobs_BT, mask_BT=mask_BT)
    s, t, ref = _safe_inputs(mask_BT, student_logprobs_BT, teacher_logprobs_BT,
                             reference_logprobs_BT)
    r = -s
    if lam != 0.0:
        r = r + lam * t
    r = r + (1.0 - lam) * ref
    return _apply_mask(r, mask_BT)


def per_token_reward(kind: RewardKind, student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor,
                     *, reference_logprobs_BT: Tensor | None = None, low: float | None = None,
                     high: float | None = None, alpha: float = 0.0, lam: float = 1.0,
                     mask_BT: Tensor | None = None) -> Tensor:
    """Dispatch to the reward named ``kind`` (``log_ratio``, ``clipped``, ``box_cox``, ``extrapolated``).

    Only the knobs of the chosen kind are used (``low``/``high`` for clipped, ``alpha`` for
    box_cox, ``lam`` and ``reference_logprobs_BT`` for extrapolated).
    """
    fn = _REWARDS.get(kind)
    if fn is None:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {', '.join(REWARD_KINDS)}")
    return fn(student_logprobs_BT, teacher_logprobs_BT, reference_logprobs_BT=reference_logprobs_BT,
              low=low, high=high, alpha=alpha, lam=lam, mask_BT=mask_BT)


_REWARDS: dict[str, Callable[..., Tensor]] = {
    "log_ratio": lambda s, t, *, mask_BT, **_: log_ratio_reward(s, t, mask_BT=mask_BT),
    "clipped": lambda s, t, *, low, high, mask_BT, **_: clipped_reward(
        s, t, low=low, high=high, mask_BT=mask_BT),
    "box_cox": lambda s, t, *, alpha, mask_BT, **_: box_cox_reward(s, t, alpha=alpha, mask_BT=mask_BT),
    "extrapolated": lambda s, t, *, reference_logprobs_BT, lam, mask_BT, **_: extrapolated_reward(
        s, t, reference_logprobs_BT, lam=lam, mask_BT=mask_BT),
}
