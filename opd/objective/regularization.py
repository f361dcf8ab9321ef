"""Regularization terms (docs/methods.md §3.6): what keeps the student sane.

    c_KL Σ_t w_t KL̂(π_S ‖ π_ref)(s_t)               reference KL (StableOPD), k1/k2/k3 or exact
    − c_H Σ_t w_t H(π_S)(s_t)                        entropy bonus
    + c_SFT Σ_t w^off_t (−log π_S(y_t))              SFT on the off-policy rows (rollout mixture)
    + c_M Σ_t w_t (log π_S(y_t) − log μ(y_t))²       train–inference mismatch penalty on the student's
                                                     own samples (prime-rl ``kl_tau``, = 2·k2)
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math import regularizers
from opd.math.reduce import masked_sum, reduction_weights
from opd.objective.outputs import TermInputs
from opd.objective.settings import RegularizationSettings
from opd.objective.weights import on_mask


def regularization_terms(inputs: TermInputs,
                         reg: RegularizationSettings) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The active regularization terms and their per-token statistics."""
    logp_BTV, sampled_logp_BT, rollouts = inputs.logp_BTV, inputs.sampled_logp_BT, inputs.rollouts
    base_mask_BT, reference = inputs.mask_BT, inputs.reference
    keep_BT, weight_BT = inputs.weights()
    device = base_mask_BT.device
    terms: dict[str, Tensor] = {}
    stats: dict[str, Tensor] = {}
    if reg.ref_kl_coef > 0:
        if reference is None:
            raise ValueError("regularization.ref_kl_coef > 0 needs reference feedback")
        if reg.ref_kl_estimator == "full":
            if reference.logits_BTV is None:
                raise ValueError("ref_kl_estimator=full needs the reference's full logits")
            ref_logp = torch.log_softmax(reference.logits_BTV.float(), dim=-1)
            kl_BT = regularizers.full_kl(logp_BTV, ref_logp)
        else:
            kl_BT = regularizers.sampled_kl(sampled_logp_BT, reference.sampled_logprobs_BT.float(),
                                            estimator=reg.ref_kl_estimator, mask_BT=base_mask_BT)
        terms["ref_kl"] = reg.ref_kl_coef * masked_sum(kl_BT, weight_BT)
        stats["ref_kl"] = on_mask(kl_BT.detach(), base_mask_BT)
    if reg.entropy_coef > 0:
        ent_BT = regularizers.entropy(logp_BTV)
        terms["entropy_bonus"] = -reg.entropy_coef * masked_sum(ent_BT, weight_BT)
    if reg.sft_coef > 0:
        off_BT = (~rollouts.on_policy_B.to(device))[:, None] & base_mask_BT
        ce_BT = -sampled_logp_BT
        off_w_BT = reduction_weights(off_BT, reg.reduction, constant_normalizer=float(inputs.max_len))
        terms["sft"] = reg.sft_coef * masked_sum(ce_BT, off_w_BT * keep_BT.float())
    if reg.mismatch_coef > 0:
        on_BT = inputs.on_policy_BT
        # (log π_S − log μ)² = 2·k2 of the sampler as the "reference"
        sq_BT = 2.0 * regularizers.sampled_kl(sampled_logp_BT, rollouts.behaviour_logprobs_BT.to(device).float(),
                                              estimator="k2", mask_BT=on_BT)
        terms["mismatch"] = reg.mismatch_coef * masked_sum(sq_BT, weight_BT * on_BT)
        stats["mismatch"] = on_mask(sq_BT.detach(), on_BT)
    return terms, stats
