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
from opd.objective.outputs import ObjectiveView, StudentOutputs
from opd.objective.weights import reward_student_logprobs
from opd.types import Feedback, Rollouts


def route2_rows(obj: ObjectiveView, rollouts: Rollouts, base_mask_BT: Tensor) -> Tensor:
    """``[B, T]`` bool: the tokens route 2 trains on (on-policy rows, plus off-policy ones if asked)."""
    if obj.cfg.route2.off_policy_rows:
        return base_mask_BT
    return rollouts.on_policy_B.to(base_mask_BT.device)[:, None] & base_mask_BT


def route2_term(
    obj: ObjectiveView, student: StudentOutputs, logp_BTV: Tensor | None, sampled_logp_BT: Tensor,
    feedback: Feedback, rollouts: Rollouts, reference: Feedback | None, rkl_BT: Tensor | None,
    base_mask_BT: Tensor, gate_keep_BT: Tensor, weight_BT: Tensor, outcome_rewards_B: Tensor | None,
    student_entropy_BT: Tensor | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
    cfg, r2 = obj.cfg, obj.cfg.route2
    device = base_mask_BT.device
    rows_BT = route2_rows(obj, rollouts, base_mask_BT)
    on_policy_BT = rollouts.on_policy_B.to(device)[:, None] & base_mask_BT
    ref_BT = None if reference is None else reference.sampled_logprobs_BT.float()
    if r2.reward == "extrapolated" and ref_BT is None:
        raise ValueError("route2.reward=extrapolated needs reference feedback (regularization.reference)")
    teacher_free = r2.reward in rewards.TEACHER_FREE_REWARDS
    if r2.reward == "entropy_rank" and student_entropy_BT is None:
        raise ValueError("route2.reward=entropy_rank needs the student's entropy (the dense path)")
    if r2.reward == "contrastive":  # RLCSD: correct-hint teacher minus wrong-hint reference (opd/math/contrast.py)
        if ref_BT is None:
            raise ValueError("route2.reward=contrastive needs the wrong-hint scores (regularization.reference)")
        reward_BT = contrast.contrastive_reward(feedback.sampled_logprobs_BT.float(), ref_BT, rows_BT)
    elif r2.reward == "f_corrected":  # OPD+: the de-biased f-divergence reward (opd/math/f_rewards.py)
        reward_BT = f_rewards.corrected_f_reward(
            reward_student_logprobs(obj, rollouts, sampled_logp_BT), feedback.sampled_logprobs_BT.float(),
            f=r2.f_divergence, mask_BT=rows_BT,
        )
    else:
        reward_BT = rewards.per_token_reward(
            r2.reward, reward_student_logprobs(obj, rollouts, sampled_logp_BT), feedback.sampled_logprobs_BT.float(),
            reference_logprobs_BT=ref_BT, low=r2.reward_low, high=r2.reward_high, alpha=r2.box_cox_alpha,
            lam=r2.extrapolation_lambda, value=r2.constant_reward, entropy_BT=student_entropy_BT,
            # teacher-free rewards are ranked over the tokens that are actually trained
            mask_BT=rows_BT & gate_keep_BT if teacher_free else rows_BT,
        )
    if cfg.outcome.sign_gate:  # OPDVR: the verifier decides the sign, the teacher the size
        if outcome_rewards_B is None:
            raise ValueError("outcome.sign_gate needs the verifier's rewards for the rollouts "
                             "(the loop passes them when Objective.needs_outcome_rewards)")
        reward_BT = rewards.outcome_sign_gate(reward_BT, outcome_rewards_B.to(device) > 0, rows_BT)

    values_BT = None
    terms: dict[str, Tensor] = {}
    if obj.needs_closed_form_value or r2.value == "zero":
        if r2.value == "zero":
            values_BT = torch.zeros_like(reward_BT)
        elif r2.value == "closed_form":
            values_BT = credit.closed_form_value(rkl_BT)
        else:  # decomposed: V = −RKL_t + γ U_φ(s_t), U_φ a learned head
            if student.continuation_BT is None:
                raise ValueError("route2.value=decomposed needs the value head output (continuation_BT)")
            values_BT = credit.decomposed_value(rkl_BT, student.continuation_BT.detach(), r2.gamma)

    credit_reward_BT, credit_mask_BT = reward_BT, rows_BT
    if r2.future_only:  # A_t from rewards t+1.. (MiniLLM's long-term term)
        credit_reward_BT = torch.nn.functional.pad(reward_BT[:, 1:], (0, 1))
        credit_mask_BT = torch.nn.functional.pad(rows_BT[:, 1:], (0, 1))
    kind = r2.credit
    gamma = r2.gamma if kind in ("discounted", "gae", "window") else (1.0 if kind == "return_to_go" else 0.0)
    adv_BT = credit.temporal_credit(
        credit_reward_BT, credit_mask_BT, kind=kind, gamma=gamma, lam=r2.lam,
        values_BT=values_BT if (kind == "gae" or r2.baseline == "value") else None,
        baseline=r2.baseline, group_index_B=rollouts.group_index_B.to(device),
        length_normalize=r2.length_normalize, window=r2.window,
    ) * rows_BT

    if obj.needs_value_head:
        _, targets_BT = credit.gae_advantages(reward_BT, values_BT, rows_BT, gamma=r2.gamma, lam=r2.lam)
        v_pred_BT = credit.decomposed_value(rkl_BT, student.continuation_BT, r2.gamma)
        terms["value"] = r2.value_coef * masked_sum(credit.value_loss(v_pred_BT, targets_BT), weight_BT * rows_BT)

    if r2.whiten:
        adv_BT = policy_gradient.whiten_advantages(adv_BT, rows_BT)
    if r2.adv_clip is not None:
        adv_BT = policy_gradient.clip_advantages(adv_BT, r2.adv_clip)
    out = cfg.outcome
    outcome_BT: Tensor | None = None
    if out.adv_tau > 0:
        if outcome_rewards_B is None:
            raise ValueError("outcome.adv_tau > 0 needs verifier rewards for the rollouts")
        outcome_B = policy_gradient.outcome_advantages(
            outcome_rewards_B.to(device).float(), rollouts.group_index_B.to(device), normalize_std=out.normalize_std
        )
        outcome_BT = outcome_B[:, None].expand_as(adv_BT) * rows_BT
        adv_BT = policy_gradient.mix_advantages(adv_BT, outcome_B, rows_BT, teacher_tau=out.teacher_tau,
                                                adv_tau=out.adv_tau)
    elif out.teacher_tau != 1.0:
        adv_BT = adv_BT * out.teacher_tau
    adv_BT = adv_BT.detach()

    # the sampler's log-probs; fixed off-policy rows have none: ρ = 1 there
    behaviour_BT = torch.where(on_policy_BT, rollouts.behaviour_logprobs_BT.to(device).float(),
                               sampled_logp_BT.detach().float())
    keep_BT = rows_BT
    stats: dict[str, Tensor] = {"reward": reward_BT.detach(), "advantage": adv_BT}
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
    if cfg.routing.kind == "cr_opd":
        if feedback.topk_ids_BTK is None:
            raise ValueError("routing.kind=cr_opd needs the teacher's top-k (teacher.access topk or full)")
        rho_BT = 1.0
        if r2.is_correction != "none":
            ratio = policy_gradient.importance_ratio(sampled_logp_BT.detach(), behaviour_BT, mask_BT=rows_BT)
            rho_BT = ratio if r2.ratio_cap is None else ratio.clamp(max=r2.ratio_cap)
        rt = cfg.routing
        pg_BT, rmetrics = routing.cr_opd_loss(
            logp_BTV, rollouts.completion_ids_BT, adv_BT * rho_BT, feedback.topk_ids_BTK,
            feedback.topk_logprobs_BTK.float(), tau_a=rt.tau_a, student_k=rt.student_k, tau_s=rt.tau_s,
            tau_t=rt.tau_t, kappa=rt.kappa, eta=rt.eta, temperature=rt.temperature, reach_p=rt.reach_p,
            mass=rt.mass, mask_N=keep_BT,
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
    terms["route2"] = r2.coef * masked_sum(pg_BT, weight_BT * keep_BT)
    metrics = {
        "reward_mean": float(masked_mean(reward_BT, rows_BT)),
        "advantage_mean": float(masked_mean(adv_BT, rows_BT)),
    }
    return terms, stats, metrics
