"""What the objective reads and returns, and the one inputs record its terms read per micro-batch.

A leaf module: the term modules (:mod:`~opd.objective.route1`, :mod:`~opd.objective.route2`,
:mod:`~opd.objective.regularization`, :mod:`~opd.objective.weights`) and :mod:`~opd.objective.core`
all import from here, and nothing here imports them. Each term takes a :class:`TermInputs` and its
own settings (:mod:`opd.objective.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from opd.types import Feedback, Rollouts

__all__ = ["ObjectiveOutput", "StudentOutputs", "TermInputs", "TokenCounts"]


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

    def without_padding(self, mask_BT: Tensor) -> "StudentOutputs":
        """These outputs with the positions outside ``mask_BT`` replaced by 0 (logits, hidden states, value
        head), through ``torch.where``: whatever a padded position holds (NaN from a fully masked attention
        row, ±1e4) never enters a log-softmax, an ``exp`` or the LM head, so the loss and every gradient —
        the output head's included — equal those of a clean-padding batch (the gradient there is 0)."""
        keep = mask_BT.bool()
        if bool(keep.all()):
            return self

        def clean(x: Tensor | None, m: Tensor) -> Tensor | None:
            if x is None:
                return None
            return torch.where(m.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))

        return replace(self, logits_BTV=clean(self.logits_BTV, keep[..., None]),
                       hidden_BTH=clean(self.hidden_BTH, keep[..., None]),
                       continuation_BT=clean(self.continuation_BT, keep))


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
class TermInputs:
    """Everything a term reads of one micro-batch, built by :class:`opd.objective.Objective` in stages.

    ``mask_BT`` are the tokens that exist (completion up to EOS, truncated rollouts removed if
    masked); ``max_len`` is the constant reducer's length. The student's forward gives ``logp_BTV``
    (dense path only), ``sampled_logp_BT`` = ``log π_S(y_t)`` (with gradient; None on the chunked path
    until route 1 hands it over) and the detached ``student_entropy_BT``; ``teacher_kl_BT`` is
    ``log π_S(y_t) − log π_T(y_t)`` (detached). The gates add ``keep_BT`` and ``weight_BT`` (``w_t``),
    route 1 adds ``rkl_BT`` (the per-token RKL on the support, for a closed-form value).
    """

    student: StudentOutputs
    feedback: Feedback
    rollouts: Rollouts
    reference: Feedback | None
    outcome_rewards_B: Tensor | None
    mask_BT: Tensor
    max_len: int
    logp_BTV: Tensor | None
    sampled_logp_BT: Tensor | None
    student_entropy_BT: Tensor | None
    teacher_kl_BT: Tensor | None
    keep_BT: Tensor | None = None
    weight_BT: Tensor | None = None
    rkl_BT: Tensor | None = None

    @property
    def ids_BT(self) -> Tensor:
        return self.rollouts.completion_ids_BT

    @property
    def on_policy_BT(self) -> Tensor:
        """``[B, T]`` bool: the existing tokens of the rows the student (or a student/teacher mix) sampled."""
        return self.rollouts.on_policy_B.to(self.mask_BT.device)[:, None] & self.mask_BT

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(keep_BT, weight_BT)``; a ``ValueError`` before the gates have run."""
        if self.keep_BT is None or self.weight_BT is None:
            raise ValueError("TermInputs has no token weights yet (opd.objective.weights.token_weights)")
        return self.keep_BT, self.weight_BT
