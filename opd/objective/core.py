"""The :class:`Objective`: built once from the resolved config, called on every micro-batch.

It reads the student's forward pass once, builds the token gates and weights
(:mod:`opd.objective.weights`), and sums the terms of routes 1 and 2 and of regularization
(:mod:`opd.objective.route1`, :mod:`opd.objective.route2`, :mod:`opd.objective.regularization`).
The formula is in the package docstring (:mod:`opd.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from opd.config.schema import Config
from opd.math import regularizers
from opd.math.diagnostics import token_diagnostics
from opd.math.fused import fused_linear_token_logprobs
from opd.math.reduce import masked_mean
from opd.math.support import SupportSpec
from opd.objective.outputs import ObjectiveOutput, StudentOutputs, TermInputs, TokenCounts
from opd.objective.regularization import regularization_terms
from opd.objective.route1 import cross_vocab_uld_term, route1_term
from opd.objective.route2 import route2_term
from opd.objective.settings import ObjectiveSettings
from opd.objective.weights import on_mask, token_weights
from opd.types import Feedback, Rollouts

# Vocabularies at least this large use the chunked, memory-efficient route-1 path when
# route1.chunk_size = 0 (auto) and no term needs the student's full distribution; the chunk size
# is then opd.math.fused.auto_chunk_size(V) (a [chunk, V] block of about 2^22 elements).
AUTO_CHUNK_VOCAB = 8192


@dataclass(frozen=True)
class Objective:
    """The per-batch loss of one resolved config (see :mod:`opd.objective` for the formula).

    Holds only the typed settings (:class:`~opd.objective.settings.ObjectiveSettings`) built once by
    :meth:`from_config`; each term reads its own."""

    settings: ObjectiveSettings

    @classmethod
    def from_config(cls, cfg: Config, *, eos_id: int | None, special_ids: tuple[int, ...] = (),
                    diagnostics: bool = True) -> "Objective":
        return cls(ObjectiveSettings.from_config(cfg, eos_id=eos_id, special_ids=tuple(special_ids),
                                                 diagnostics=diagnostics))

    # ----------------------------------------------------------------------------------------
    # what the objective needs from the rest of the pipeline
    @property
    def route1_on(self) -> bool:
        return self.settings.route1.on

    @property
    def route2_on(self) -> bool:
        return self.settings.route2.on

    @property
    def needs_value_head(self) -> bool:
        return self.route2_on and self.settings.route2.needs_value_head

    @property
    def needs_closed_form_value(self) -> bool:
        return self.route2_on and self.settings.route2.needs_rkl

    @property
    def needs_outcome_rewards(self) -> bool:
        """The loop must pass the verifier's rewards (``outcome_rewards_B``): an outcome advantage
        is mixed in (``outcome.adv_tau > 0``) or the verifier gates the reward's sign
        (``outcome.sign_gate``, OPDVR)."""
        out = self.settings.route2.outcome
        return self.route2_on and (out.adv_tau > 0 or out.sign_gate)

    def needs_full_student(self) -> bool:
        """Terms that need the student's whole next-token distribution with gradient (or its entropy)."""
        r2, reg = self.settings.route2, self.settings.regularization
        return (
            (self.route2_on and r2.routing.kind == "cr_opd")
            or (self.route2_on and r2.reward == "entropy_rank")
            or reg.entropy_coef > 0
            or (reg.ref_kl_coef > 0 and reg.ref_kl_estimator == "full")
            or self.settings.gates.entropy_gate != "none"
        )

    def use_chunked(self, vocab_size: int) -> bool:
        """Whether the student forward should hand over hidden states instead of logits."""
        if self.chunk_size is not None:
            return not self.needs_full_student()
        return vocab_size >= AUTO_CHUNK_VOCAB and not self.needs_full_student()

    @property
    def chunk_size(self) -> int | None:
        """Tokens per chunk on the memory-efficient path (None: automatic from the vocabulary)."""
        return self.settings.route1.chunk_size

    def support_spec(self) -> SupportSpec:
        """The route-1 support (feedback arrives at the teacher's temperature already)."""
        return self.settings.route1.support

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
        ids_BT = rollouts.completion_ids_BT
        base_mask_BT = self.base_mask(rollouts)
        device = ids_BT.device

        dense = student.logits_BTV is not None
        if not dense and (student.hidden_BTH is None or student.head_weight_VH is None):
            raise ValueError("StudentOutputs needs logits_BTV, or hidden_BTH with head_weight_VH")
        # padding is zeroed before any log-softmax / exp / LM head: a NaN or ±1e4 there (fully masked
        # attention rows) would otherwise reach the gradient as 0·NaN or 0·inf (StudentOutputs.without_padding)
        student = student.without_padding(base_mask_BT)
        logp_BTV = None
        if dense:  # log-softmax in fp32 (a float64 student stays float64)
            logits = student.logits_BTV
            logp_BTV = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
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
        teacher_kl_BT = None if sampled_logp_BT is None else on_mask(sampled_logp_BT.detach() - teacher_logp_BT,
                                                                     base_mask_BT)

        stats: dict[str, Tensor] = {"mask": base_mask_BT, "teacher_kl": teacher_kl_BT}
        if logp_BTV is not None:
            with torch.no_grad():
                stats["student_entropy"] = on_mask(regularizers.entropy(logp_BTV), base_mask_BT)
            if self.settings.diagnostics.on:
                stats.update(self._diagnostics(logp_BTV, ids_BT, feedback, base_mask_BT))

        # ---- gates and weights ---------------------------------------------------------------
        counts = counts or TokenCounts(
            num_tokens=float(base_mask_BT.sum()), num_sequences=float((base_mask_BT.sum(1) > 0).sum())
        )
        inputs = TermInputs(
            student=student, feedback=feedback, rollouts=rollouts, mask_BT=base_mask_BT,
            max_len=self.max_len(ids_BT), reference=reference, outcome_rewards_B=outcome_rewards_B,
            logp_BTV=logp_BTV, sampled_logp_BT=sampled_logp_BT, student_entropy_BT=stats.get("student_entropy"),
            teacher_kl_BT=teacher_kl_BT,
        )
        keep_BT, weight_BT = token_weights(inputs, self.settings.gates, counts)
        inputs = replace(inputs, keep_BT=keep_BT, weight_BT=weight_BT)
        stats["gate_keep"] = keep_BT

        terms: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        zero = torch.zeros((), device=device)

        # ---- route 1: distributional loss on the support -------------------------------------
        if self.route1_on or self.needs_closed_form_value:
            r1 = route1_term(inputs, self.settings.route1, want_sampled=from_route1)
            if from_route1:
                sampled_logp_BT = r1.sampled_logp_BT
                teacher_kl_BT = on_mask(sampled_logp_BT - teacher_logp_BT, base_mask_BT)
                stats["teacher_kl"] = teacher_kl_BT
                inputs = replace(inputs, sampled_logp_BT=sampled_logp_BT, teacher_kl_BT=teacher_kl_BT)
            stats.update(r1.diag)
            if self.route1_on:
                terms["route1"] = self.settings.route1.coef * r1.loss
                stats["route1_divergence"] = on_mask(r1.divergence_BT, base_mask_BT)
            inputs = replace(inputs, rkl_BT=r1.rkl_BT)
            if r1.rkl_BT is not None:
                stats["rkl"] = on_mask(r1.rkl_BT, base_mask_BT)

        uld_coef = self.settings.route1.uld_coef
        if self.route1_on and uld_coef > 0:  # a teacher with its own vocabulary (teacher.tokenizer=own)
            uld = cross_vocab_uld_term(inputs)
            if uld is not None:
                terms["route1_uld"] = uld_coef * uld

        # ---- route 2: reward → temporal credit → routing --------------------------------------
        if self.route2_on:
            r2_terms, r2_stats, r2_metrics = route2_term(inputs, self.settings.route2)
            terms.update(r2_terms)
            stats.update(r2_stats)
            metrics.update(r2_metrics)

        # ---- regularization --------------------------------------------------------------------
        reg_terms, reg_stats = regularization_terms(inputs, self.settings.regularization)
        terms.update(reg_terms)
        stats.update(reg_stats)

        if not terms:
            raise ValueError("the objective has no active term (route1, route2, sft): nothing to train")
        loss = sum(terms.values(), zero)
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
        if self.settings.mask_truncated:
            mask = mask & ~rollouts.truncated_B.to(mask.device)[:, None]
        return mask

    def max_len(self, ids_BT: Tensor) -> int:
        """The constant reducer's length: ``rollout.prefix_tokens`` or ``rollout.max_new_tokens``."""
        return self.settings.max_len or ids_BT.shape[1]

    def _diagnostics(self, logp_BTV: Tensor, ids_BT: Tensor, feedback: Feedback, mask_BT: Tensor) -> dict[str, Tensor]:
        teacher_logp = None if feedback.logits_BTV is None else torch.log_softmax(feedback.logits_BTV.float(), -1)
        diags = token_diagnostics(
            logp_BTV, ids_BT, teacher_logp_NV=teacher_logp, teacher_topk_ids_NK=feedback.topk_ids_BTK,
            teacher_topk_logprobs_NK=feedback.topk_logprobs_BTK, teacher_sampled_logprobs_N=feedback.sampled_logprobs_BT,
            mask_N=mask_BT, k=min(self.settings.diagnostics.topk, logp_BTV.shape[-1]),
        )
        return {f"diag/{k}": v for k, v in diags.items()}

    def _sampled_from_route1(self) -> bool:
        """Whether the chunked path may take ``log π_S(y_t)`` from the route-1 chunks: only its
        detached value is used (no route 2, SFT, mismatch or sampled reference KL, no k3 route-1
        estimator), nothing needs it before the loss (no drift position weights, no log-prob gate),
        and the route-1 student temperature is 1."""
        r1, reg, g = self.settings.route1, self.settings.regularization, self.settings.gates
        return (r1.on and not self.route2_on and reg.ref_kl_coef == 0 and reg.sft_coef == 0
                and reg.mismatch_coef == 0 and g.position not in ("drift", "drift_share") and not g.logprob_gate
                and g.trust_min is None
                and "k3" not in (r1.divergence, r1.off_policy_divergence)
                and r1.support.student_temperature == 1.0)
