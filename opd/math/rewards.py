"""Per-token rewards for sampled-token (route R2) OPD.

Every function here maps the log-probabilities of the *sampled* tokens to a per-token reward
``r_t`` in the package's reward convention (higher is better, see :mod:`opd.math`):

    r_t = log π_T(y_t | s_t^T) − log π_S(y_t | s_t)          (the log-ratio reward)

and its published variants (clipped, Box–Cox/PowerOPD, G-OPD/ExOPD extrapolation), two
teacher-free rewards (a constant, and OPSA's entropy-ranked negative reward) that serve as placebo
baselines, and OPDVR's verifier sign gate (:func:`outcome_sign_gate`).

Rewards are **fully detached**: the student log-probabilities are stop-gradient inside
(``r_t = log π_T − sg[log π_S]``; teacher and reference tensors are detached too). The
stop-gradient is unbiased for the reverse KL because ``E_{y~π}[∇ log π(y)] = 0``
(docs/methods.md §3.2); the gradient reaches the student only through the policy-gradient loss
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

RewardKind = Literal["log_ratio", "clipped", "box_cox", "extrapolated", "constant", "entropy_rank"]
REWARD_KINDS: tuple[str, ...] = get_args(RewardKind)
#: rewards built from the teacher–student log-ratio (0 where teacher == student)
LOG_RATIO_REWARDS: tuple[str, ...] = ("log_ratio", "clipped", "box_cox", "extrapolated")
#: rewards that ignore the teacher (placebo baselines)
TEACHER_FREE_REWARDS: tuple[str, ...] = ("constant", "entropy_rank")


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
    and of MiniLLM's return (arXiv 2306.08543); docs/methods.md §1, §3.2.

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
    PowerOPD, Zhao et al., arXiv 2606.17199; the explicit form is [INFER] (docs/methods.md §4.4).

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
    arXiv 2602.12125; the expansion is [INFER], docs/methods.md §4.7). λ = 1 is the plain log-ratio
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


def constant_reward(mask_BT: Tensor, value: float) -> Tensor:
    """The teacher-free placebo ``r_t = c`` on every masked-in token (0 elsewhere), float32.

    Ding & Zhang (arXiv 2608.31046) find that a single fixed *negative* advantage on the student's
    lowest-log-probability tokens matches teacher-provided OPD advantages (and a fixed positive one
    collapses the responses): the control that tells how much of a run is distillation.
    """
    m = mask_BT.bool()
    return torch.where(m, torch.full(m.shape, float(value), dtype=torch.float32, device=m.device),
                       torch.zeros((), dtype=torch.float32, device=m.device))


def entropy_rank_reward(entropy_BT: Tensor, mask_BT: Tensor, value: float = -1.0) -> Tensor:
    """OPSA's entropy-adaptive teacher-free reward (Ding & Zhang, arXiv 2608.31046).

        r_t = c · (1 + Ĥ_t) / 2,     Ĥ_t = (H_t − min H) / (max H − min H) ∈ [0, 1]

    with the min and max taken over the masked-in tokens (the tokens that are trained) and
    ``Ĥ = 1`` everywhere when that range is ≤ 1e-12 (as the authors' code does). With ``c = −1``
    this is the paper's ``A = −½ − (H − H_min)/(2(H_max − H_min)) ∈ [−1, −½]``: the most uncertain
    selected tokens are pushed down hardest. Detached, 0 on masked positions, at least float32.
    """
    check_same_shape(entropy_BT=entropy_BT, mask_BT=mask_BT)
    m = mask_BT.bool()
    h = _float(entropy_BT)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    if not bool(m.any()):
        return torch.zeros_like(h)
    sel = h[m]
    lo, hi = sel.min(), sel.max()
    rank = torch.where(hi - lo > 1e-12, (h - lo) / (hi - lo).clamp(min=1e-12), torch.ones_like(h))
    return torch.where(m, float(value) * (1.0 + rank) / 2.0, zero)


def outcome_sign_gate(reward_BT: Tensor, correct_B: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """OPDVR's verifier sign gate on a per-token reward (Lin et al., arXiv 2608.24696).

        r̃_t = max(0, r_t)   on rows the verifier judges correct,
        r̃_t = min(0, r_t)   on rows it judges incorrect

    (the paper writes the second as ``−max(0, log π_S/π_T)``: the same value). The verifier sets the
    direction of every token's update, the teacher only its size; tokens whose teacher signal
    disagrees with the verdict get 0. ``correct_B`` is ``[B]`` bool. Detached.
    """
    if correct_B.dim() != 1 or correct_B.shape[0] != reward_BT.shape[0]:
        raise ValueError(f"correct_B has shape {tuple(correct_B.shape)}; expected ({reward_BT.shape[0]},), "
                         f"one verdict per row of reward_BT {tuple(reward_BT.shape)}")
    r = reward_BT.detach()
    gated = torch.where(correct_B.bool().to(r.device)[:, None], r.clamp(min=0.0), r.clamp(max=0.0))
    return _apply_mask(gated, mask_BT)


def per_token_reward(kind: RewardKind, student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor,
                     *, reference_logprobs_BT: Tensor | None = None, low: float | None = None,
                     high: float | None = None, alpha: float = 0.0, lam: float = 1.0,
                     value: float = -1.0, entropy_BT: Tensor | None = None,
                     mask_BT: Tensor | None = None) -> Tensor:
    """Dispatch to the reward named ``kind`` (one of :data:`REWARD_KINDS`).

    Only the knobs of the chosen kind are used (``low``/``high`` for clipped, ``alpha`` for
    box_cox, ``lam`` and ``reference_logprobs_BT`` for extrapolated, ``value`` for constant and
    entropy_rank, ``entropy_BT`` — the student's entropy — for entropy_rank). The teacher-free
    kinds ignore both log-probs; they need ``mask_BT`` (the tokens that are trained).
    """
    fn = _REWARDS.get(kind)
    if fn is None:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {', '.join(REWARD_KINDS)}")
    if kind in ("constant", "entropy_rank"):
        if mask_BT is None:
            raise ValueError(f"reward kind {kind!r} needs mask_BT (the tokens that are trained)")
        if kind == "entropy_rank" and entropy_BT is None:
            raise ValueError("reward kind 'entropy_rank' needs entropy_BT (the student's per-token entropy)")
        check_same_shape(student_logprobs_BT=student_logprobs_BT, mask_BT=mask_BT)
    return fn(student_logprobs_BT, teacher_logprobs_BT, reference_logprobs_BT=reference_logprobs_BT,
              low=low, high=high, alpha=alpha, lam=lam, value=value, entropy_BT=entropy_BT, mask_BT=mask_BT)


_REWARDS: dict[str, Callable[..., Tensor]] = {
    "log_ratio": lambda s, t, *, mask_BT, **_: log_ratio_reward(s, t, mask_BT=mask_BT),
    "clipped": lambda s, t, *, low, high, mask_BT, **_: clipped_reward(
        s, t, low=low, high=high, mask_BT=mask_BT),
    "box_cox": lambda s, t, *, alpha, mask_BT, **_: box_cox_reward(s, t, alpha=alpha, mask_BT=mask_BT),
    "extrapolated": lambda s, t, *, reference_logprobs_BT, lam, mask_BT, **_: extrapolated_reward(
        s, t, reference_logprobs_BT, lam=lam, mask_BT=mask_BT),
    "constant": lambda s, t, *, value, mask_BT, **_: constant_reward(mask_BT, value),
    "entropy_rank": lambda s, t, *, value, entropy_BT, mask_BT, **_: entropy_rank_reward(entropy_BT, mask_BT, value),
}
