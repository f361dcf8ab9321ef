"""TrOPD's trust region: the tokens where the teacher's supervision is reliable (arXiv 2606.01249).

TrOPD performs the K1 reverse-KL policy gradient only inside a teacher-verifiable trust region
defined by the teacher–student *decoding agreement* on the sampled token,

    P_trust(y_t) = min(π_T(y_t|s_t) / π_S(y_t|s_t), 1) = exp(min(r_t, 0)),  r_t = log π_T − log π_S,

the probability that the teacher would accept the student's token (as in speculative decoding). A
token with ``P_trust < δ`` is an *outlier*: its log-ratio reward is large and negative and its
policy gradient unreliable (``∇J → −∞`` as ``π_T(y_t) → 0``). The paper handles outliers by
clipping, masking or a top-k forward-KL estimator; :func:`trust_region_mask` gives the mask. The
paper's threshold is adaptive; a fixed δ is our simplification **[INFER]**.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_range, check_same_shape


def trust_probability(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor) -> Tensor:
    """``P_trust = min(π_T(y_t)/π_S(y_t), 1)`` (detached, float32 or wider)."""
    check_same_shape(student_logprobs_BT=student_logprobs_BT, teacher_logprobs_BT=teacher_logprobs_BT)
    dtype = torch.promote_types(student_logprobs_BT.dtype, torch.float32)
    r = teacher_logprobs_BT.detach().to(dtype) - student_logprobs_BT.detach().to(dtype)
    return torch.exp(torch.clamp(torch.nan_to_num(r, nan=-float("inf")), max=0.0))


def trust_region_mask(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, mask_BT: Tensor,
                      threshold: float) -> Tensor:
    """``[B, T]`` bool: valid tokens with ``P_trust(y_t) ≥ threshold`` (the trust region).

    ``threshold`` δ in [0, 1]: 0 keeps every valid token, 1 only those with ``π_T(y_t) ≥ π_S(y_t)``.
    Masked positions are never in the region, whatever their log-probabilities hold.
    """
    check_same_shape(student_logprobs_BT=student_logprobs_BT, teacher_logprobs_BT=teacher_logprobs_BT,
                     mask_BT=mask_BT)
    check_range("threshold", threshold, 0.0, 1.0)
    keep = mask_BT.bool()
    zero = torch.zeros((), dtype=student_logprobs_BT.dtype, device=student_logprobs_BT.device)
    # padding may hold -inf in either tensor: replace it before the subtraction (no nan)
    p = trust_probability(torch.where(keep, student_logprobs_BT.detach(), zero),
                          torch.where(keep, teacher_logprobs_BT.detach(), zero.to(teacher_logprobs_BT.dtype)))
    return keep & (p >= threshold)
