"""RLCSD's contrastive self-distillation reward (arXiv 2606.11709).

On-policy self-distillation (OPSD) rewards the student's token with the gap between the model under a
privileged *correct* hint ``c⁺`` and the student itself,

    e_c(y_t) = log π(y_t | c⁺, x, y_<t) − log π_S(y_t | x, y_<t).

RLCSD observes that conditioning on *any* hint shifts style (shorter, more direct outputs) whatever its
correctness, so ``e_c`` concentrates on style tokens ("privilege-induced style drift"). It contrasts the
gap under the correct hint with the gap under a *wrong* hint ``c⁻``:

    e_ctr(y_t) = e_c⁺(y_t) − e_c⁻(y_t) = log π(y_t | c⁺, ·) − log π(y_t | c⁻, ·),

in which the student term and the hint-induced style shift cancel. Used as the per-token reward of the
policy gradient (higher is better). That ``e_ctr`` enters as the token reward of a sampled-token policy
gradient, beside a verifier's GRPO advantage, is our reading **[INFER]**: the paper's exact advantage
was not retrieved. Detached; exactly 0 at masked positions; at least float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_same_shape


def contrastive_reward(correct_hint_logprobs_BT: Tensor, wrong_hint_logprobs_BT: Tensor,
                       mask_BT: Tensor | None = None) -> Tensor:
    """``e_ctr = log π(y_t|c⁺) − log π(y_t|c⁻)`` (detached), 0 where ``mask_BT`` is False."""
    check_same_shape(correct_hint_logprobs_BT=correct_hint_logprobs_BT,
                     wrong_hint_logprobs_BT=wrong_hint_logprobs_BT, mask_BT=mask_BT)
    dtype = torch.promote_types(correct_hint_logprobs_BT.dtype, torch.float32)
    pos = correct_hint_logprobs_BT.detach().to(dtype)
    neg = wrong_hint_logprobs_BT.detach().to(dtype)
    if mask_BT is None:
        return pos - neg
    keep = mask_BT.bool()
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    return torch.where(keep, torch.where(keep, pos, zero) - torch.where(keep, neg, zero), zero)
