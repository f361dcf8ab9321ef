"""Gates and weights: which tokens count, and by how much (docs/methods.md §3.6).

``w_t`` = reducer weight (``opd.math.reduce``) × gates × position weights. Gates remove tokens from
the sum without rescaling the others, so a gate changes *which* tokens teach, not the per-token
scale; the reducer's normaliser counts every token of the batch (global counts under data
parallelism come in ``counts``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math import gates, trust
from opd.math.reduce import reduction_weights
from opd.objective.outputs import TermInputs, TokenCounts
from opd.objective.settings import GateSettings


def on_mask(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``x`` on the counted tokens and 0 elsewhere (``where``, not a product: a NaN or ±inf computed at
    a padding position must not leak into the statistics)."""
    return torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))


def reward_student_logprobs(inputs: TermInputs, reward_logprobs: str) -> Tensor | None:
    """The student log-probs of the log-ratio reward: the current student's (detached) or, with
    ``reward_logprobs="behaviour"`` (``route2.reward_logprobs``), the sampler's μ; off-policy rows always
    use the current student (they have no μ)."""
    if inputs.sampled_logp_BT is None:
        return None
    current = inputs.sampled_logp_BT.detach().float()
    if reward_logprobs != "behaviour":
        return current
    on_B = inputs.rollouts.on_policy_B.to(current.device)
    return torch.where(on_B[:, None], inputs.rollouts.behaviour_logprobs_BT.to(current.device).float(), current)


def token_weights(inputs: TermInputs, g: GateSettings, counts: TokenCounts) -> tuple[Tensor, Tensor]:
    """``(keep_BT, weight_BT)``: the gates' keep mask and ``w_t`` = reducer weight × gates × position weight."""
    ids_BT, base_mask_BT, feedback = inputs.ids_BT, inputs.mask_BT, inputs.feedback
    sampled_logp_BT, teacher_kl_BT = inputs.sampled_logp_BT, inputs.teacher_kl_BT
    keep_BT = base_mask_BT.clone()
    if g.mask_special_tokens:
        keep_BT &= gates.special_token_mask(ids_BT, g.special_ids)
    if g.coverage_gate:
        if feedback.topk_ids_BTK is None:
            raise ValueError("gates.coverage_gate needs the teacher's top-k (teacher.access topk or full)")
        keep_BT &= gates.teacher_coverage_gate(ids_BT, feedback.topk_ids_BTK)
    if g.trust_min is not None:  # TrOPD: only where the teacher would accept the student's token
        if sampled_logp_BT is None:
            raise ValueError("gates.trust_min needs the student's sampled-token log-probs (the dense path)")
        keep_BT &= trust.trust_region_mask(sampled_logp_BT.detach(), feedback.sampled_logprobs_BT.float(),
                                           base_mask_BT, g.trust_min)
    if g.entropy_gate != "none":
        if inputs.student_entropy_BT is None:
            raise ValueError("gates.entropy_gate needs the student's logits (the dense path)")
        keep_BT &= gates.entropy_gate(
            inputs.student_entropy_BT, teacher_kl_BT.abs(), base_mask_BT, mode=g.entropy_gate,
            keep_fraction=g.keep_fraction, entropy_low=g.entropy_low, divergence_high=g.divergence_high,
        )
    if g.logprob_gate:  # OPSA: the lowest log π_S(y_t) among the tokens still kept
        keep_BT &= gates.bottom_fraction_mask(sampled_logp_BT.detach(), keep_BT, g.logprob_fraction)
    drift_BT = None
    if g.position == "drift":
        drift_BT = teacher_kl_BT.clamp(min=0.0)
    elif g.position == "drift_share":  # IW-OPD: |log π_T − log π_S| with the reward's student log-probs
        student_lp = reward_student_logprobs(inputs, g.reward_logprobs)
        drift_BT = on_mask(feedback.sampled_logprobs_BT.float() - student_lp, base_mask_BT)
    pos_w_BT = gates.position_weights(
        base_mask_BT, kind=g.position, prefix_fraction=g.prefix_fraction, decay_to=g.decay_to,
        drift_BT=drift_BT, beta=g.drift_beta, gamma=g.drift_gamma,
    )
    norm_BT = reduction_weights(
        base_mask_BT, g.reduction, constant_normalizer=float(inputs.max_len),
        num_tokens=counts.num_tokens, num_sequences=counts.num_sequences,
    ) * counts.world_size
    return keep_BT, norm_BT * keep_BT.float() * pos_w_BT
