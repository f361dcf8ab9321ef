"""Objective assembly: the config's sections become one per-batch loss, built from ``opd.math``.

This is the only place where the design variables meet. It is built once from the resolved
config and then called on each micro-batch::

    objective = Objective.from_config(cfg, eos_id=..., special_ids=...)
    out = objective(student, feedback, rollouts, reference=..., counts=...)
    out.loss.backward()

The loss is a sum of named terms, each a masked, gated, reduced sum of per-token values:

    L = c₁ Σ_t w_t D(π_T ‖ π_S)(s_t)                      route 1 (support + divergence)
      + c₂ Σ_t w_t ℓ^PG_t(A_t)                             route 2 (reward → credit → routing)
      + c_V Σ_t w_t ½(V_φ(s_t) − sg[target_t])²            GAE-OPD value head (decomposed value)
      + c_KL Σ_t w_t KL̂(π_S ‖ π_ref)(s_t)                  regularization
      − c_H Σ_t w_t H(π_S)(s_t) + c_SFT Σ_t w^off_t (−log π_S(y_t))

with ``w_t`` = reducer weight (``opd.math.reduce``) × gates × position weights. The
normaliser of the reducer counts the tokens of the batch (global counts under data
parallelism are passed in ``counts``); gates remove tokens from the sum without rescaling the
others, so a gate changes *which* tokens teach, not the per-token scale.

Route 2 applies to on-policy rows only (rows the student or a student/teacher mixture sampled,
whose behaviour log-probs are known); route 1 and the SFT term also see off-policy rows (GKD
λ mixing, SFT on teacher samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from opd.config.schema import Config
from opd.math import credit, gates, policy_gradient, regularizers, rewards, routing
from opd.math.diagnostics import diagnostics_extra_fn, token_diagnostics
from opd.math.divergences import divergence as divergence_fn
from opd.math.divergences import reverse_kl
from opd.math.fused import fused_linear_divergence, fused_linear_token_logprobs
from opd.math.reduce import masked_mean, masked_sum, reduction_weights
from opd.math.support import SupportSpec, build_support, support_from_logprobs
from opd.types import Feedback, Rollouts

# Vocabularies at least this large use the chunked, memory-efficient route-1 path when
# route1.chunk_size = 0 (auto) and no term needs the student's full distribution; the chunk size
# is then opd.math.fused.auto_chunk_size(V) (a [chunk, V] block of about 2^22 elements).
AUTO_CHUNK_VOCAB = 8192


@dataclass(frozen=True)
class StudentOutputs:
    """The student's forward pass over the completion positions (one pass feeds every term).

    Either ``logits_BTV`` (dense path) or ``hidden_BTH`` with the LM head (chunked path).
    ``continuation_BT`` is the learned value head ``U_φ(s_t)`` for the decomposed GAE-OPD value.
    """

    logits_BTV: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head_weight_VH: Tensor | None = None
    head_bias_V: Tensor | None = None
    continuation_BT: Tensor | None = None


@dataclass(frozen=True)
class TokenCounts:
    """Normaliser counts of the whole optimizer batch (all micro-batches, all processes)."""

    num_tokens: float
    num_sequences: float
    # data parallelism averages gradients over processes; the loss is scaled back by this
    world_size: int = 1


@dataclass
class ObjectiveOutput:
    loss: Tensor
    metrics: dict[str, float]
    # per-token detached tensors [B, T] (diagnostics / failure detectors); mask under "mask"
    token_stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """The per-batch loss of one resolved config (see the module docstring for the formula)."""

    cfg: Config
    eos_id: int | None
    special_ids: tuple[int, ...] = ()
    # per-token actionability diagnostics (``diag/*`` token stats) from the same forward pass
    diagnostics: bool = True

    @classmethod
    def from_config(cls, cfg: Config, *, eos_id: int | None, special_ids: tuple[int, ...] = (),
                    diagnostics: bool = True) -> "Objective":
        return cls(cfg=cfg, eos_id=eos_id, special_ids=tuple(special_ids), diagnostics=diagnostics)

    # ----------------------------------------------------------------------------------------
    # what the objective needs from the rest of the pipeline
    @property
    def route1_on(self) -> bool:
        return self.cfg.route1.divergence != "none" and self.cfg.route1.coef > 0

    @property
    def route2_on(self) -> bool:
        return self.cfg.route2.coef > 0

    @property
    def needs_value_head(self) -> bool:
        r2 = self.cfg.route2
        return self.route2_on and r2.credit == "gae" and r2.value == "decomposed"

    @property
    def needs_closed_form_value(self) -> bool:
        r2 = self.cfg.route2
        uses_value = r2.baseline == "value" or r2.credit == "gae"
        return self.route2_on and uses_value and r2.value in ("closed_form", "decomposed")

    def needs_full_student(self) -> bool:
        """Terms that need the student's whole next-token distribution with gradient."""
        cfg = self.cfg
        return (
            (self.route2_on and cfg.routing.kind == "cr_opd")
            or cfg.regularization.entropy_coef > 0
            or (cfg.regularization.ref_kl_coef > 0 and cfg.regularization.ref_kl_estimator == "full")
            or cfg.gates.entropy_gate != "none"
        )

    def use_chunked(self, vocab_size: int) -> bool:
        """Whether the student forward should hand over hidden states instead of logits."""
        chunk = self.cfg.route1.chunk_size
        if chunk > 0:
            return not self.needs_full_student()
        return vocab_size >= AUTO_CHUNK_VOCAB and not self.needs_full_student()

    @property
    def chunk_size(self) -> int | None:
        """Tokens per chunk on the memory-efficient path (None: automatic from the vocabulary)."""
        return self.cfg.route1.chunk_size or None

    def support_spec(self) -> SupportSpec:
        s = self.cfg.support
        # feedback arrives at the teacher's temperature already (opd.types.Feedback)
        return SupportSpec(kind=s.kind, k=s.k, norm=s.norm, teacher_temperature=1.0,
                           student_temperature=s.student_temperature)

    # ----------------------------------------------------------------------------------------
    def __call__(
        self,
        student: StudentOutputs,
        feedback: Feedback,
        rollouts: Rollouts,
        *,
        reference: Feedback | None = None,
        outcome_rewards_B: Tensor | None = None,
        counts: TokenCounts | None = None,
    ) -> ObjectiveOutput:
        cfg = self.cfg
        ids_BT = rollouts.completion_ids_BT
        base_mask_BT = self.base_mask(rollouts)
        device = ids_BT.device

        dense = student.logits_BTV is not None
        if not dense and (student.hidden_BTH is None or student.head_weight_VH is None):
            raise ValueError("StudentOutputs needs logits_BTV, or hidden_BTH with head_weight_VH")
        logp_BTV = torch.log_softmax(student.logits_BTV.float(), dim=-1) if dense else None
        # On the chunked path, when nothing differentiates through log π_S(y_t) and nothing needs it
        # before the loss, it is read off the route-1 pass's chunks instead of a separate pass over
        # the LM head (one [N, V] projection fewer per step).
        from_route1 = not dense and self._sampled_from_route1()
        sampled_logp_BT: Tensor | None
        if dense:
            sampled_logp_BT = logp_BTV.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
        elif from_route1:
            sampled_logp_BT = None
        else:
            b, t, h = student.hidden_BTH.shape
            sampled_logp_BT = fused_linear_token_logprobs(
                student.hidden_BTH.reshape(b * t, h), student.head_weight_VH, ids_BT.reshape(-1),
                bias_V=student.head_bias_V, chunk_size=self.chunk_size,
            ).reshape(b, t)
        teacher_logp_BT = feedback.sampled_logprobs_BT.float()
        teacher_kl_BT = None if sampled_logp_BT is None else _on(sampled_logp_BT.detach() - teacher_logp_BT, base_mask_BT)

        # ---- gates and weights ---------------------------------------------------------------
        keep_BT = base_mask_BT.clone()
        g = cfg.gates
        if g.mask_special_tokens:
            specials = [i for i in self.special_ids if i != self.eos_id]
            keep_BT &= gates.special_token_mask(ids_BT, specials)
        if g.coverage_gate:
            if feedback.topk_ids_BTK is None:
                raise ValueError("gates.coverage_gate needs the teacher's top-k (teacher.access topk or full)")
            keep_BT &= gates.teacher_coverage_gate(ids_BT, feedback.topk_ids_BTK)
        stats: dict[str, Tensor] = {"mask": base_mask_BT, "teacher_kl": teacher_kl_BT}
        if logp_BTV is not None:
            with torch.no_grad():
                stats["student_entropy"] = _on(regularizers.entropy(logp_BTV), base_mask_BT)
            if self.diagnostics:
                stats.update(self._diagnostics(logp_BTV, ids_BT, feedback, base_mask_BT))
        if g.entropy_gate != "none":
            keep_BT &= gates.entropy_gate(
                stats["student_entropy"], teacher_kl_BT.abs(), base_mask_BT, mode=g.entropy_gate,
                keep_fraction=g.keep_fraction, entropy_low=g.entropy_low, divergence_high=g.divergence_high,
            )
        pos_w_BT = gates.position_weights(
            base_mask_BT, kind=g.position, prefix_fraction=g.prefix_fraction, decay_to=g.decay_to,
            drift_BT=teacher_kl_BT.clamp(min=0.0) if g.position == "drift" else None, beta=g.drift_beta,
        )
        counts = counts or TokenCounts(
            num_tokens=float(base_mask_BT.sum()), num_sequences=float((base_mask_BT.sum(1) > 0).sum())
        )
        norm_BT = reduction_weights(
            base_mask_BT, g.reduction, constant_normalizer=float(self.max_len(ids_BT)),
            num_tokens=counts.num_tokens, num_sequences=counts.num_sequences,
        ) * counts.world_size
        weight_BT = norm_BT * keep_BT.float() * pos_w_BT
        stats["gate_keep"] = keep_BT

        terms: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        zero = torch.zeros((), device=device)

        # ---- route 1: distributional loss on the support -------------------------------------
        rkl_BT: Tensor | None = None
        if self.route1_on or self.needs_closed_form_value:
            d_BT, rkl_BT, r1_loss, diag = self._route1(student, feedback, ids_BT, weight_BT, base_mask_BT,
                                                       want_sampled=from_route1)
            if from_route1:
                sampled_logp_BT = diag.pop("sampled_logp")
                teacher_kl_BT = _on(sampled_logp_BT - teacher_logp_BT, base_mask_BT)
                stats["teacher_kl"] = teacher_kl_BT
            stats.update(diag)
            if self.route1_on:
                terms["route1"] = cfg.route1.coef * r1_loss
                stats["route1_divergence"] = _on(d_BT, base_mask_BT)
            if rkl_BT is not None:
                stats["rkl"] = _on(rkl_BT, base_mask_BT)

        # ---- route 2: reward → temporal credit → routing --------------------------------------
        if self.route2_on:
            r2_terms, r2_stats, r2_metrics = self._route2(
                student, logp_BTV, sampled_logp_BT, feedback, rollouts, reference, rkl_BT,
                base_mask_BT, weight_BT, outcome_rewards_B,
            )
            terms.update(r2_terms)
            stats.update(r2_stats)
            metrics.update(r2_metrics)

        # ---- regularization --------------------------------------------------------------------
        reg = cfg.regularization
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
            stats["ref_kl"] = _on(kl_BT.detach(), base_mask_BT)
        if reg.entropy_coef > 0:
            ent_BT = regularizers.entropy(logp_BTV)
            terms["entropy_bonus"] = -reg.entropy_coef * masked_sum(ent_BT, weight_BT)
        if reg.sft_coef > 0:
            off_BT = (~rollouts.on_policy_B.to(device))[:, None] & base_mask_BT
            ce_BT = -sampled_logp_BT
            off_w_BT = reduction_weights(off_BT, g.reduction, constant_normalizer=float(self.max_len(ids_BT)))
            terms["sft"] = reg.sft_coef * masked_sum(ce_BT, off_w_BT * keep_BT.float())

        loss = sum(terms.values(), zero)
        if not terms:
            raise ValueError("the objective has no active term (route1, route2, sft): nothing to train")
        for name, value in terms.items():
            metrics[f"loss/{name}"] = float(value.detach())
        metrics["loss"] = float(loss.detach())
        metrics["teacher_kl"] = float(masked_mean(teacher_kl_BT, base_mask_BT))
        metrics["tokens_kept_frac"] = float(keep_BT.sum() / base_mask_BT.sum().clamp(min=1))
        return ObjectiveOutput(loss=loss, metrics=metrics, token_stats=stats)

    # ----------------------------------------------------------------------------------------
    def base_mask(self, rollouts: Rollouts) -> Tensor:
        """Tokens that exist: completion tokens up to EOS, minus truncated rollouts if masked."""
        mask = rollouts.completion_mask_BT.bool()
        if self.cfg.rollout.truncated == "mask":
            mask = mask & ~rollouts.truncated_B.to(mask.device)[:, None]
        return mask

    def max_len(self, ids_BT: Tensor) -> int:
        return self.cfg.rollout.prefix_tokens or self.cfg.rollout.max_new_tokens or ids_BT.shape[1]

    def _diagnostics(self, logp_BTV: Tensor, ids_BT: Tensor, feedback: Feedback, mask_BT: Tensor) -> dict[str, Tensor]:
        teacher_logp = None if feedback.logits_BTV is None else torch.log_softmax(feedback.logits_BTV.float(), -1)
        diags = token_diagnostics(
            logp_BTV, ids_BT, teacher_logp_NV=teacher_logp, teacher_topk_ids_NK=feedback.topk_ids_BTK,
            teacher_topk_logprobs_NK=feedback.topk_logprobs_BTK, teacher_sampled_logprobs_N=feedback.sampled_logprobs_BT,
            mask_N=mask_BT, k=min(self.cfg.teacher.topk, logp_BTV.shape[-1]),
        )
        return {f"diag/{k}": v for k, v in diags.items()}

    def _sampled_from_route1(self) -> bool:
        """Whether the chunked path may take ``log π_S(y_t)`` from the route-1 chunks: only its
        detached value is used (no route 2, SFT or sampled reference KL), nothing needs it before
        the loss (no drift position weights), and the route-1 student temperature is 1."""
        cfg = self.cfg
        return (self.route1_on and not self.route2_on and cfg.regularization.ref_kl_coef == 0
                and cfg.regularization.sft_coef == 0 and cfg.gates.position != "drift"
                and cfg.support.student_temperature == 1.0)

    def _route1(self, student: StudentOutputs, feedback: Feedback, ids_BT: Tensor, weight_BT: Tensor,
                mask_BT: Tensor, want_sampled: bool = False) -> tuple[Tensor, Tensor | None, Tensor, dict[str, Tensor]]:
        """Per-token divergence, per-token RKL on the support (for closed-form values), weighted
        loss, and — on the chunked path — the diagnostics computed from the same chunks (with
        ``want_sampled``, also ``sampled_logp``: the student's ``log π_S(y_t)``, detached).

        Only the ``N`` valid tokens are packed and evaluated: padding positions (whose teacher
        signal is a placeholder) never enter a distribution, so they cannot produce inf/NaN in
        the loss or its gradient, and no work is spent on them.
        """
        r1 = self.cfg.route1
        spec = self.support_spec()
        name = r1.divergence if self.route1_on else "rkl"
        weight_N = weight_BT[mask_BT] if self.route1_on else torch.zeros_like(weight_BT[mask_BT])
        ids_N = ids_BT[mask_BT]

        def pack(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[mask_BT]

        def unpack(x_N: Tensor) -> Tensor:
            out = torch.zeros(mask_BT.shape, dtype=x_N.dtype, device=x_N.device)
            out[mask_BT] = x_N
            return out

        want_rkl = self.needs_closed_form_value
        if student.logits_BTV is not None:
            sup = build_support(
                pack(student.logits_BTV), spec, sampled_ids=ids_N, teacher_logits=pack(feedback.logits_BTV),
                teacher_topk_ids=pack(feedback.topk_ids_BTK), teacher_topk_logprobs=pack(feedback.topk_logprobs_BTK),
            )
            d_N = divergence_fn(name, sup.student_logp, sup.teacher_logp, sup.valid,
                                beta=r1.beta, alpha=r1.alpha, mu=r1.mu)
            rkl_BT = None
            if want_rkl:
                rkl_BT = unpack(d_N.detach() if name == "rkl"
                                else reverse_kl(sup.student_logp.detach(), sup.teacher_logp, sup.valid))
            return unpack(d_N.detach()), rkl_BT, masked_sum(d_N, weight_N), {}

        topk_ids_N, topk_lp_N = pack(feedback.topk_ids_BTK), pack(feedback.topk_logprobs_BTK)
        diag_fn = None
        if self.diagnostics:
            diag_fn = diagnostics_extra_fn(
                ids_N, teacher_topk_ids_NK=topk_ids_N, teacher_topk_logprobs_NK=topk_lp_N,
                teacher_sampled_logprobs_N=pack(feedback.sampled_logprobs_BT), k=self.cfg.teacher.topk,
            )
        rkl_extra = want_rkl and name != "rkl"

        def extra_fn(s_logp: Tensor, t_logp: Tensor | None, rows: slice) -> dict[str, Tensor]:
            out = {} if diag_fn is None else {f"diag/{k}": v for k, v in diag_fn(s_logp, t_logp, rows).items()}
            if want_sampled:
                out["sampled_logp"] = s_logp.gather(-1, ids_N[rows, None].to(s_logp.device).long()).squeeze(-1)
            if rkl_extra:  # RKL on the configured support, from the same chunk
                sup = support_from_logprobs(
                    s_logp, spec, sampled_ids=ids_N[rows], teacher_logp=t_logp,
                    teacher_topk_ids=None if topk_ids_N is None else topk_ids_N[rows],
                    teacher_topk_logprobs=None if topk_lp_N is None else topk_lp_N[rows],
                )
                out["rkl"] = reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid)
            return out

        loss, d_N, extras = fused_linear_divergence(
            pack(student.hidden_BTH), student.head_weight_VH, weight_N,
            spec=spec, divergence=name, beta=r1.beta, alpha=r1.alpha, mu=r1.mu,
            teacher_hidden_NH=pack(feedback.hidden_BTH), teacher_weight_VH=feedback.head_weight_VH,
            teacher_bias_V=feedback.head_bias_V, teacher_logits_NV=pack(feedback.logits_BTV),
            teacher_topk_ids_NK=topk_ids_N, teacher_topk_logprobs_NK=topk_lp_N,
            sampled_ids_N=ids_N, student_bias_V=student.head_bias_V,
            chunk_size=self.chunk_size,
            extra_fn=extra_fn if (diag_fn is not None or rkl_extra or want_sampled) else None,
        )
        rkl_N = d_N if (want_rkl and name == "rkl") else extras.pop("rkl", None)
        diag = {k: unpack(v) for k, v in extras.items()}
        return unpack(d_N), None if rkl_N is None else unpack(rkl_N), loss, diag

    def _route2(
        self, student: StudentOutputs, logp_BTV: Tensor | None, sampled_logp_BT: Tensor,
        feedback: Feedback, rollouts: Rollouts, reference: Feedback | None, rkl_BT: Tensor | None,
        base_mask_BT: Tensor, weight_BT: Tensor, outcome_rewards_B: Tensor | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
        cfg, r2 = self.cfg, self.cfg.route2
        device = base_mask_BT.device
        on_BT = rollouts.on_policy_B.to(device)[:, None] & base_mask_BT
        ref_BT = None if reference is None else reference.sampled_logprobs_BT.float()
        if r2.reward == "extrapolated" and ref_BT is None:
            raise ValueError("route2.reward=extrapolated needs reference feedback (regularization.reference)")
        reward_BT = rewards.per_token_reward(
            r2.reward, sampled_logp_BT, feedback.sampled_logprobs_BT.float(), reference_logprobs_BT=ref_BT,
            low=r2.reward_low, high=r2.reward_high, alpha=r2.box_cox_alpha, lam=r2.extrapolation_lambda,
            mask_BT=on_BT,
        )

        values_BT = None
        terms: dict[str, Tensor] = {}
        if self.needs_closed_form_value or r2.value == "zero":
            if r2.value == "zero":
                values_BT = torch.zeros_like(reward_BT)
            elif r2.value == "closed_form":
                values_BT = credit.closed_form_value(rkl_BT)
            else:  # decomposed: V = −RKL_t + γ U_φ(s_t), U_φ a learned head
                if student.continuation_BT is None:
                    raise ValueError("route2.value=decomposed needs the value head output (continuation_BT)")
                values_BT = credit.decomposed_value(rkl_BT, student.continuation_BT.detach(), r2.gamma)

        credit_reward_BT, credit_mask_BT = reward_BT, on_BT
        if r2.future_only:  # A_t from rewards t+1.. (MiniLLM's long-term term)
            credit_reward_BT = torch.nn.functional.pad(reward_BT[:, 1:], (0, 1))
            credit_mask_BT = torch.nn.functional.pad(on_BT[:, 1:], (0, 1))
        kind = r2.credit
        gamma = r2.gamma if kind in ("discounted", "gae") else (1.0 if kind == "return_to_go" else 0.0)
        adv_BT = credit.temporal_credit(
            credit_reward_BT, credit_mask_BT, kind=kind, gamma=gamma, lam=r2.lam,
            values_BT=values_BT if (kind == "gae" or r2.baseline == "value") else None,
            baseline=r2.baseline, group_index_B=rollouts.group_index_B.to(device),
            length_normalize=r2.length_normalize,
        ) * on_BT

        if self.needs_value_head:
            _, targets_BT = credit.gae_advantages(reward_BT, values_BT, on_BT, gamma=r2.gamma, lam=r2.lam)
            v_pred_BT = credit.decomposed_value(rkl_BT, student.continuation_BT, r2.gamma)
            terms["value"] = r2.value_coef * masked_sum(credit.value_loss(v_pred_BT, targets_BT), weight_BT * on_BT)

        if r2.whiten:
            adv_BT = policy_gradient.whiten_advantages(adv_BT, on_BT)
        if r2.adv_clip is not None:
            adv_BT = policy_gradient.clip_advantages(adv_BT, r2.adv_clip)
        out = cfg.outcome
        if out.adv_tau > 0:
            if outcome_rewards_B is None:
                raise ValueError("outcome.adv_tau > 0 needs verifier rewards for the rollouts")
            outcome_B = policy_gradient.outcome_advantages(
                outcome_rewards_B.to(device).float(), rollouts.group_index_B.to(device), normalize_std=out.normalize_std
            )
            adv_BT = policy_gradient.mix_advantages(adv_BT, outcome_B, on_BT, teacher_tau=out.teacher_tau,
                                                    adv_tau=out.adv_tau)
        elif out.teacher_tau != 1.0:
            adv_BT = adv_BT * out.teacher_tau
        adv_BT = adv_BT.detach()

        behaviour_BT = rollouts.behaviour_logprobs_BT.to(device).float()
        keep_BT = on_BT
        stats: dict[str, Tensor] = {"reward": reward_BT.detach(), "advantage": adv_BT}
        if r2.is_correction == "dppo":
            keep_BT = keep_BT & policy_gradient.dppo_mask(
                sampled_logp_BT.detach(), behaviour_BT, adv_BT, delta_low=r2.clip_low, delta_high=r2.clip_high
            )
            stats["is_masked"] = on_BT & ~keep_BT
        if cfg.routing.kind == "cr_opd":
            if feedback.topk_ids_BTK is None:
                raise ValueError("routing.kind=cr_opd needs the teacher's top-k (teacher.access topk or full)")
            rho_BT = 1.0
            if r2.is_correction != "none":
                ratio = policy_gradient.importance_ratio(sampled_logp_BT.detach(), behaviour_BT, mask_BT=on_BT)
                rho_BT = ratio if r2.ratio_cap is None else ratio.clamp(max=r2.ratio_cap)
            rt = cfg.routing
            pg_BT, rmetrics = routing.cr_opd_loss(
                logp_BTV, rollouts.completion_ids_BT, adv_BT * rho_BT, feedback.topk_ids_BTK,
                feedback.topk_logprobs_BTK.float(), tau_a=rt.tau_a, student_k=rt.student_k, tau_s=rt.tau_s,
                tau_t=rt.tau_t, kappa=rt.kappa, eta=rt.eta, mask_N=keep_BT,
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
            "reward_mean": float(masked_mean(reward_BT, on_BT)),
            "advantage_mean": float(masked_mean(adv_BT, on_BT)),
        }
        return terms, stats, metrics


def _on(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``x`` on the counted tokens and 0 elsewhere (``where``, not a product: a NaN or ±inf computed at
    a padding position must not leak into the statistics)."""
    return torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))
