"""What the objective reads and returns, and the view of the objective its terms read.

A leaf module: the term modules (:mod:`~opd.objective.route1`, :mod:`~opd.objective.route2`,
:mod:`~opd.objective.regularization`, :mod:`~opd.objective.weights`) and :mod:`~opd.objective.core`
all import from here, and nothing here imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from opd.config.schema import Config
from opd.math.support import SupportSpec

__all__ = ["ObjectiveOutput", "ObjectiveView", "StudentOutputs", "TokenCounts"]


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


class ObjectiveView(Protocol):
    """What the term modules read of :class:`opd.objective.Objective` (built once per config)."""

    cfg: Config
    eos_id: int | None
    special_ids: tuple[int, ...]
    diagnostics: bool

    @property
    def route1_on(self) -> bool: ...

    @property
    def route2_on(self) -> bool: ...

    @property
    def needs_value_head(self) -> bool: ...

    @property
    def needs_closed_form_value(self) -> bool: ...

    @property
    def chunk_size(self) -> int | None: ...

    def support_spec(self) -> SupportSpec: ...

    def max_len(self, ids_BT: Tensor) -> int: ...
