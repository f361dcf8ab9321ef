"""Route 2: reward → temporal credit → routing → policy-gradient surrogate (docs/methods.md §3.1–§3.4).

    r_t   = per-token reward (route2.reward; the log-ratio log π_T(y_t) − log π_S(y_t) by default,
            with the student's current or the sampler's log-probs, route2.reward_logprobs; or OPD+'s
            de-biased f-divergence reward, reward=f_corrected; or RLCSD's correct- minus wrong-hint
            contrast, reward=contrastive, with the wrong-hint scores in ``reference``)
    r̃_t   = r_t, or OPDVR's verifier sign gate (outcome.sign_gate)
    A_t   = credit(r̃; γ, λ, baseline, value) → whitening / clipping → teacher_tau·A + adv_tau·A^outcome
    L_t   = −ρ_t · sg[A_t]   (ρ = π_S/μ with the route2.is_correction rule; CR-OPD routes the
            freed mass of negative-credit tokens, routing.kind=cr_opd)

Rows: the student's own samples; with ``route2.off_policy_rows`` also the off-policy rows (fixed
data: ``ρ = 1``, there is no sampler). Everything in ``A_t`` is detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math import contrast, credit, f_rewards, policy_gradient, rewards, routing
from opd.math.reduce import masked_mean, masked_sum
from opd.objective.outputs import TermInputs
from opd.objective.settings import Route2Settings
from opd.objective.weights import reward_student_logprobs

Terms = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]


def route2_rows(inputs: TermInputs, r2: Route2Settings) -> Tensor:
    """``[B, T]`` bool: the tokens route 2 trains on (on-policy rows, plus off-policy ones if asked)."""
    return inputs.mask_BT if r2.off_policy_rows else inputs.on_policy_BT


def route2_term(inputs: TermInputs, r2: Route2Settings) -> Terms:
    """Route 2's terms (``route2``, and ``value`` for a learned value head), per-token statistics and
    metrics (module docstring)."""
    rows_BT = route2_rows(inputs, r2)
    reward_BT = token_rewards(inputs, r2, rows_BT)
    terms: dict[str, Tensor] = {}
    values_BT = value_estimates(inputs, r2, reward_BT)
    adv_BT = credit_advantages(inputs, r2, reward_BT, values_BT, rows_BT)
    if r2.needs_value_head:
        _, targets_BT = credit.gae_advantages(reward_BT, values_BT, rows_BT, gamma=r2.gamma, lam=r2.lam)
        v_pred_BT = credit.decomposed_value(inputs.rkl_BT, inputs.student.continuation_BT, r2.gamma)
        terms["value"] = r2.value_coef * masked_sum(credit.value_loss(v_pred_BT, targets_BT),
                                                    inputs.weights()[1] * rows_BT)
    adv_BT, outcome_BT = shaped_advantages(inputs, r2, adv_BT, rows_BT)
    pg_terms, stats = policy_gradient_term(inputs, r2, adv_BT, outcome_BT, rows_BT)
    terms.update(pg_terms)
    stats = {"reward": reward_BT.detach(), "advantage": adv_BT,
             **({} if values_BT is None else {"value": values_BT.detach()}), **stats}
    metrics = {
        "reward_mean": float(masked_mean(reward_BT, rows_BT)),
        "advantage_mean": float(masked_mean(adv_BT, rows_BT)),
    }
    return terms, stats, metrics


def token_rewards(inputs: TermInputs, r2: Route2Settings, rows_BT: Tensor) -> Tensor:
    """``r_t`` of ``route2.reward``, gated by the verifier's sign with ``outcome.sign_gate`` (OPDVR)."""
    feedback, reference = inputs.feedback, inputs.reference
    ref_BT = None if reference is None else reference.sampled_logprobs_BT.float()
    if r2.reward == "extrapolated" and ref_BT is None:
        raise ValueError("route2.reward=extrapolated needs reference feedback (regularization.reference)")
    teacher_free = r2.reward in rewards.TEACHER_FREE_REWARDS
    if r2.reward == "entropy_rank" and inputs.student_entropy_BT is None:
        raise ValueError("route2.reward=entropy_rank needs the student's entropy (the dense path)")
    student_lp = reward_student_logprobs(inputs, r2.reward_logprobs)
    if r2.reward == "contrastive":  # RLCSD: correct-hint teacher minus wrong-hint reference (opd/math/contrast.py)
        if ref_BT is None:
            raise ValueError("route2.reward=contrastive needs the wrong-hint scores (regularization.reference)")
        reward_BT = contrast.contrastive_reward(feedback.sampled_logprobs_BT.float(), ref_BT, rows_BT)
    elif r2.reward == "f_corrected":  # OPD+: the de-biased f-divergence reward (opd/math/f_rewards.py)
        reward_BT = f_rewards.corrected_f_reward(student_lp, feedback.sampled_logprobs_BT.float(),
                                                 f=r2.f_divergence, mask_BT=rows_BT)
    else:
        reward_BT = rewards.per_token_reward(
            r2.reward, student_lp, feedback.sampled_logprobs_BT.float(),
            reference_logprobs_BT=ref_BT, low=r2.reward_low, high=r2.reward_high, alpha=r2.box_cox_alpha,
            lam=r2.extrapolation_lambda, value=r2.constant_reward, entropy_BT=inputs.student_entropy_BT,
            # teacher-free rewards are ranked over the tokens that are actually trained
            mask_BT=rows_BT & inputs.weights()[0] if teacher_free else rows_BT,
        )
    if r2.outcome.sign_gate:  # OPDVR: the verifier decides the sign, the teacher the size
        if inputs.outcome_rewards_B is None:
            raise ValueError("outcome.sign_gate needs the verifier's rewards for the rollouts "
                             "(the loop passes them when Objective.needs_outcome_rewards)")
        reward_BT = rewards.outcome_sign_gate(reward_BT, inputs.outcome_rewards_B.to(rows_BT.device) > 0, rows_BT)
    return reward_BT


def value_estimates(inputs: TermInputs, r2: Route2Settings, reward_BT: Tensor) -> Tensor | None:
    """``V(s_t)`` of ``route2.value`` when a credit rule or baseline reads one (else None); ``exact_mc`` and
    ``critic`` were computed with the batch (``Feedback.values_BT``, :mod:`opd.value_source`)."""
    if inputs.feedback.values_BT is not None:
        return inputs.feedback.values_BT.to(reward_BT.device).float()
    if not (r2.needs_rkl or r2.value == "zero"):
        return None
    if r2.value == "zero":
        return torch.zeros_like(reward_BT)
    if r2.value == "closed_form":
        return credit.closed_form_value(inputs.rkl_BT)
    # decomposed: V = −RKL_t + γ U_φ(s_t), U_φ a learned head
    if inputs.student.continuation_BT is None:
        raise ValueError("route2.value=decomposed needs the value head output (continuation_BT)")
    return credit.decomposed_value(inputs.rkl_BT, inputs.student.continuation_BT.detach(), r2.gamma)


def credit_advantages(inputs: TermInputs, r2: Route2Settings, reward_BT: Tensor, values_BT: Tensor | None,
                      rows_BT: Tensor) -> Tensor:
    """``A_t`` of ``route2.credit`` and ``route2.baseline`` (:func:`opd.math.credit.temporal_credit`;
    each rule reads γ as it defines it), from rewards ``t+1..`` with ``route2.future_only``."""
    credit_reward_BT, credit_mask_BT = reward_BT, rows_BT
    if r2.future_only:  # A_t from rewards t+1.. (MiniLLM's long-term term)
        credit_reward_BT = torch.nn.functional.pad(reward_BT[:, 1:], (0, 1))
        credit_mask_BT = torch.nn.functional.pad(rows_BT[:, 1:], (0, 1))
    return credit.temporal_credit(
        credit_reward_BT, credit_mask_BT, kind=r2.credit, gamma=r2.gamma, lam=r2.lam,
        values_BT=values_BT if r2.uses_values else None,
        baseline=r2.baseline, group_index_B=inputs.rollouts.group_index_B.to(rows_BT.device),
        length_normalize=r2.length_normalize, window=r2.window,
    ) * rows_BT


def shaped_advantages(inputs: TermInputs, r2: Route2Settings, adv_BT: Tensor,
                      rows_BT: Tensor) -> tuple[Tensor, Tensor | None]:
    """Whitening, clipping and the outcome mix ``teacher_tau·A + adv_tau·A^outcome``; returns the detached
    advantages and the outcome advantage per token (None without ``outcome.adv_tau``)."""
    device = rows_BT.device
    if r2.whiten:
        adv_BT = policy_gradient.whiten_advantages(adv_BT, rows_BT)
    if r2.adv_clip is not None:
        adv_BT = policy_gradient.clip_advantages(adv_BT, r2.adv_clip)
    out = r2.outcome
    outcome_BT: Tensor | None = None
    if out.adv_tau > 0:
        if inputs.outcome_rewards_B is None:
            raise ValueError("outcome.adv_tau > 0 needs verifier rewards for the rollouts")
        outcome_B = policy_gradient.outcome_advantages(
            inputs.outcome_rewards_B.to(device).float(), inputs.rollouts.group_index_B.to(device),
            normalize_std=out.normalize_std,
        )
        outcome_BT = outcome_B[:, None].expand_as(adv_BT) * rows_BT
        adv_BT = policy_gradient.mix_advantages(adv_BT, outcome_B, rows_BT, teacher_tau=out.teacher_tau,
                                                adv_tau=out.adv_tau)
    elif out.teacher_tau != 1.0:
        adv_BT = adv_BT * out.teacher_tau
    return adv_BT.detach(), outcome_BT


def policy_gradient_term(inputs: TermInputs, r2: Route2Settings, adv_BT: Tensor, outcome_BT: Tensor | None,
                         rows_BT: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``L_t = −ρ_t · sg[A_t]`` with the ``route2.is_correction`` rule, or CR-OPD's routed loss."""
    sampled_logp_BT, rollouts, feedback = inputs.sampled_logp_BT, inputs.rollouts, inputs.feedback
    device = rows_BT.device
    # the sampler's log-probs; fixed off-policy rows have none: ρ = 1 there
    behaviour_BT = torch.where(inputs.on_policy_BT, rollouts.behaviour_logprobs_BT.to(device).float(),
                               sampled_logp_BT.detach().float())
    keep_BT = rows_BT
    stats: dict[str, Tensor] = {}
    if r2.is_correction == "dppo":
        sign_BT = adv_BT if r2.dppo_sign == "advantage" else (
            outcome_BT if outcome_BT is not None else torch.zeros_like(adv_BT))
        keep_BT = keep_BT & policy_gradient.dppo_mask(
            sampled_logp_BT.detach(), behaviour_BT, sign_BT, delta_low=r2.clip_low, delta_high=r2.clip_high,
            zero_as_negative=r2.dppo_sign == "outcome",
        )
        stats["is_masked"] = rows_BT & ~keep_BT
    elif r2.is_correction == "icepop":
        keep_BT = keep_BT & policy_gradient.ratio_band_mask(sampled_logp_BT.detach(), behaviour_BT,
                                                            low=r2.icepop_low, high=r2.icepop_high)
        stats["is_masked"] = rows_BT & ~keep_BT
    if r2.routing.kind == "cr_opd":
        if feedback.topk_ids_BTK is None:
            raise ValueError("routing.kind=cr_opd needs the teacher's top-k (teacher.access topk or full)")
        rho_BT = 1.0
        if r2.is_correction != "none":
            ratio = policy_gradient.importance_ratio(sampled_logp_BT.detach(), behaviour_BT, mask_BT=rows_BT)
            rho_BT = ratio if r2.ratio_cap is None else ratio.clamp(max=r2.ratio_cap)
        rt = r2.routing
        pg_BT, rmetrics = routing.cr_opd_loss(
            inputs.logp_BTV, rollouts.completion_ids_BT, adv_BT * rho_BT, feedback.topk_ids_BTK,
            feedback.topk_logprobs_BTK.float(), knobs=rt.knobs, tau_a=rt.tau_a, mask_N=keep_BT,
        )
        for key, value in rmetrics.items():
            stats[f"routing_{key}"] = value.detach()
    else:
        use_is = r2.is_correction != "none"
        clip = r2.is_correction == "ppo_clip"
        pg_BT, pmetrics = policy_gradient.pg_loss(
            sampled_logp_BT, adv_BT, behaviour_logprobs_BT=behaviour_BT if use_is else None,
            clip_low=r2.clip_low if clip else None, clip_high=r2.clip_high if clip else None,
            ratio_cap=r2.ratio_cap if use_is else None, mask_BT=keep_BT,
        )
        for key, value in pmetrics.items():
            stats[f"is_{key}"] = value.detach()
    return {"route2": r2.coef * masked_sum(pg_BT, inputs.weights()[1] * keep_BT)}, stats
