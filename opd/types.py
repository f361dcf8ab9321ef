"""Typed containers that cross stage boundaries (rollout → feedback → objective).

Shapes use the package notation (``opd.math``): ``B`` rollouts, ``P`` prompt tokens, ``T``
completion tokens, ``K`` top-k, ``V`` vocabulary, ``H`` hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from opd.tasks.base import Example

Access = Literal["sampled", "topk", "full"]
ACCESS_LEVELS: tuple[str, ...] = ("sampled", "topk", "full")


@dataclass(frozen=True)
class Rollouts:
    """Completions and the states that produced them.

    Attributes:
        prompt_ids_BP: student prompt ids, left-padded (BOS included by the tokenizer).
        prompt_mask_BP: 1 on real prompt tokens.
        completion_ids_BT: completion ids, right-padded with the pad id.
        completion_mask_BT: True on completion tokens up to and including EOS (the student's
            EOS is a token like any other: the teacher scores it and the loss sees it).
        behaviour_logprobs_BT: ``log μ(y_t | s_t)`` under the distribution that actually sampled
            the token (temperature / top-p / teacher mixture applied); 0 on padding.
        truncated_B: the completion reached the length limit without EOS (partial
            ``prefix_tokens`` rollouts are not truncated: they are short by design).
        on_policy_B: True when the student sampled the completion (GKD λ mixing may put teacher
            samples or dataset answers in the batch).
        group_index_B: which prompt of the step a row belongs to (``G`` rows share one).
        examples: the example behind each row (answer, teacher-only context, fields).
    """

    prompt_ids_BP: Tensor
    prompt_mask_BP: Tensor
    completion_ids_BT: Tensor
    completion_mask_BT: Tensor
    behaviour_logprobs_BT: Tensor
    truncated_B: Tensor
    on_policy_B: Tensor
    group_index_B: Tensor
    examples: tuple[Example, ...] = field(default=())

    def __post_init__(self) -> None:
        b, t = self.completion_ids_BT.shape
        for name in ("completion_mask_BT", "behaviour_logprobs_BT"):
            if getattr(self, name).shape != (b, t):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(b, t)}")
        if self.prompt_ids_BP.shape[0] != b or self.prompt_mask_BP.shape != self.prompt_ids_BP.shape:
            raise ValueError(
                f"prompt_ids_BP {tuple(self.prompt_ids_BP.shape)} / prompt_mask_BP "
                f"{tuple(self.prompt_mask_BP.shape)} do not match {b} completions"
            )
        for name in ("truncated_B", "on_policy_B", "group_index_B"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(b,)}")
        if self.examples and len(self.examples) != b:
            raise ValueError(f"{len(self.examples)} examples for {b} rollouts")

    @property
    def batch_size(self) -> int:
        return int(self.completion_ids_BT.shape[0])

    @property
    def lengths_B(self) -> Tensor:
        return self.completion_mask_BT.sum(dim=1)

    def select(self, rows: Tensor | list[int] | slice) -> "Rollouts":
        """The rollouts at ``rows`` (a micro-batch or a data-parallel shard)."""
        if isinstance(rows, slice):
            idx = torch.arange(self.batch_size)[rows]
        else:
            idx = torch.as_tensor(rows, dtype=torch.long)
        idx_list = idx.tolist()
        return Rollouts(
            prompt_ids_BP=self.prompt_ids_BP[idx],
            prompt_mask_BP=self.prompt_mask_BP[idx],
            completion_ids_BT=self.completion_ids_BT[idx],
            completion_mask_BT=self.completion_mask_BT[idx],
            behaviour_logprobs_BT=self.behaviour_logprobs_BT[idx],
            truncated_B=self.truncated_B[idx],
            on_policy_B=self.on_policy_B[idx],
            group_index_B=self.group_index_B[idx],
            examples=tuple(self.examples[i] for i in idx_list) if self.examples else (),
        )

    def as_off_policy(self) -> "Rollouts":
        """The same rollouts marked as not sampled by the student (teacher samples, answers)."""
        return replace(self, on_policy_B=torch.zeros_like(self.on_policy_B, dtype=torch.bool))

    def to(self, device: torch.device | str) -> "Rollouts":
        return replace(
            self,
            prompt_ids_BP=self.prompt_ids_BP.to(device),
            prompt_mask_BP=self.prompt_mask_BP.to(device),
            completion_ids_BT=self.completion_ids_BT.to(device),
            completion_mask_BT=self.completion_mask_BT.to(device),
            behaviour_logprobs_BT=self.behaviour_logprobs_BT.to(device),
            truncated_B=self.truncated_B.to(device),
            on_policy_B=self.on_policy_B.to(device),
            group_index_B=self.group_index_B.to(device),
        )


@dataclass(frozen=True)
class CrossVocabFeedback:
    """What a teacher with its own tokenizer adds to :class:`Feedback` (``teacher.tokenizer=own``;
    :class:`opd.teachers.CrossTokenizerTeacher`). Everything else in the feedback is already in the
    student's token positions and vocabulary; these fields say how exact it is and carry what the
    cross-vocabulary route-1 term (:func:`opd.xtok.uld.hybrid_divergence`) needs beyond top-k.

    Attributes:
        token_aligned_BT: the student token starts and ends on teacher token boundaries, so its
            ``sampled_logprobs_BT`` entry is an exact merge of whole teacher tokens (elsewhere it is
            a within-token split of the smallest span both tokenizations agree on; the sum over a
            completion is exact either way).
        state_aligned_BT: the student's state before the token is a teacher state; only there do
            ``topk_*`` / ``logits_BTV`` hold the teacher's next-token distribution (mapped to student
            ids by token text). Elsewhere they hold only the sampled token (``topk``) or the sampled
            token against a uniform rest (``logits_BTV``).
        unmapped_topk_BTU: at state-aligned positions, the ``U`` largest probabilities of teacher
            tokens that no student token maps to, sorted decreasingly (0 elsewhere); None with
            ``access="sampled"``.
        unmapped_mass_BT: their total probability (0 elsewhere); None with ``access="sampled"``.
        student_unmapped_V: ``[V_S]`` True at student tokens that map to no teacher token.
    """

    token_aligned_BT: Tensor
    state_aligned_BT: Tensor
    unmapped_topk_BTU: Tensor | None = None
    unmapped_mass_BT: Tensor | None = None
    student_unmapped_V: Tensor | None = None

    def select(self, idx: Tensor) -> "CrossVocabFeedback":
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return replace(self, token_aligned_BT=pick(self.token_aligned_BT), state_aligned_BT=pick(self.state_aligned_BT),
                       unmapped_topk_BTU=pick(self.unmapped_topk_BTU), unmapped_mass_BT=pick(self.unmapped_mass_BT))


@dataclass(frozen=True)
class Feedback:
    """What a teacher (or the reference policy) returns for a batch of rollouts.

    Everything is already at the teacher's temperature: ``log_softmax(logits_BTV)`` and
    ``topk_logprobs_BTK`` are the tempered teacher log-probs. Nothing downstream knows whether
    the scores came from an in-process model, a server, a cache or the student under a
    privileged context.

    Attributes:
        access: the richest signal present (``sampled`` ⊂ ``topk`` ⊂ ``full``).
        sampled_logprobs_BT: ``log π_T(y_t | s_t^T)`` of the sampled tokens; 0 on padding.
        topk_ids_BTK / topk_logprobs_BTK: the teacher's own top-k (full-vocabulary log-probs).
        logits_BTV: full tempered logits (small vocabularies).
        hidden_BTH / head_weight_VH / head_bias_V: a chunked accessor for large vocabularies:
            ``logits = hidden @ head_weight.T + head_bias`` (the temperature is folded into the
            head), consumed chunk by chunk by :mod:`opd.math.fused` without materialising
            ``[B·T, V]``.
        cross_vocab: set by a teacher with its own tokenizer (:class:`CrossVocabFeedback`); None
            when teacher and student share one tokenizer.
        student_topk_ids_BTK / student_topk_teacher_logprobs_BTK: the *student's* top-k ids at each
            position, chosen when the rollouts were scored (not the teacher's top-k), and the teacher's
            full-vocabulary log-probs at them — the support of ``support.kind=student_topk`` with a teacher
            server that scores caller-chosen ids (:func:`opd.teachers.student_support.add_student_topk`);
            None otherwise. 0 on padding.
    """

    access: Access
    sampled_logprobs_BT: Tensor
    topk_ids_BTK: Tensor | None = None
    topk_logprobs_BTK: Tensor | None = None
    logits_BTV: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head_weight_VH: Tensor | None = None
    head_bias_V: Tensor | None = None
    cross_vocab: CrossVocabFeedback | None = None
    student_topk_ids_BTK: Tensor | None = None
    student_topk_teacher_logprobs_BTK: Tensor | None = None
    values_BT: Tensor | None = None  # GAE-OPD values computed outside the objective (opd/value_source.py)
    value_probe_BT: Tensor | None = None  # the Monte-Carlo value on probe steps (diagnostics only)

    def __post_init__(self) -> None:
        if self.access not in ACCESS_LEVELS:
            raise ValueError(f"unknown access {self.access!r}; choose one of {ACCESS_LEVELS}")
        if self.access in ("topk", "full") and self.topk_ids_BTK is None and not self.has_full:
            raise ValueError(f"access={self.access!r} needs top-k ids/log-probs or full logits")
        if self.access == "full" and not self.has_full:
            raise ValueError("access='full' needs logits_BTV or hidden_BTH + head_weight_VH")
        if (self.topk_ids_BTK is None) != (self.topk_logprobs_BTK is None):
            raise ValueError("topk_ids_BTK and topk_logprobs_BTK come together")
        if (self.student_topk_ids_BTK is None) != (self.student_topk_teacher_logprobs_BTK is None):
            raise ValueError("student_topk_ids_BTK and student_topk_teacher_logprobs_BTK come together")

    @property
    def has_full(self) -> bool:
        return self.logits_BTV is not None or (self.hidden_BTH is not None and self.head_weight_VH is not None)

    def select(self, rows: Tensor | list[int]) -> "Feedback":
        idx = torch.as_tensor(rows, dtype=torch.long)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return replace(
            self,
            sampled_logprobs_BT=self.sampled_logprobs_BT[idx.to(self.sampled_logprobs_BT.device)],
            topk_ids_BTK=pick(self.topk_ids_BTK),
            topk_logprobs_BTK=pick(self.topk_logprobs_BTK),
            logits_BTV=pick(self.logits_BTV),
            hidden_BTH=pick(self.hidden_BTH),
            cross_vocab=None if self.cross_vocab is None else self.cross_vocab.select(idx),
            student_topk_ids_BTK=pick(self.student_topk_ids_BTK),
            student_topk_teacher_logprobs_BTK=pick(self.student_topk_teacher_logprobs_BTK),
            values_BT=pick(self.values_BT),
            value_probe_BT=pick(self.value_probe_BT),
        )
