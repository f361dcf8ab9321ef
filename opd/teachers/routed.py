"""Multi-teacher routing: one teacher per value of an example field."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from opd.tasks.base import Example
from opd.teachers.base import LocalModel, Teacher, check_request
from opd.types import Access, Feedback, Rollouts

__all__ = ["RoutedTeacher"]


def _pad_last(t: Tensor, size: int, value: float | int) -> Tensor:
    if t.shape[-1] == size:
        return t
    return F.pad(t, (0, size - t.shape[-1]), value=value)


class RoutedTeacher:
    """Multi-teacher routing: each row is scored by the teacher of its example's
    ``fields[field]`` value (the value is matched as a string), or by ``default`` when the value
    is missing or has no route.

    The rows of each teacher are scored together and merged back in the original order. When
    the parts differ in top-k size or vocabulary, top-k is padded with id 0 / log-prob ``-inf``
    and logits with ``-inf`` (probability 0 outside a teacher's vocabulary). When more than one
    teacher is used and one returns the hidden-state accessor, its logits are materialised
    (``hidden @ W.T + b``) so the parts can share ``logits_BTV``.

    Raises (from :meth:`score`):
        ValueError: a row whose value has no route while ``default`` is None (lists the known
            values), or rollouts without examples.
    """

    def __init__(self, routes: Mapping[str, Teacher], default: Teacher | None = None, field: str = "domain"):
        if not routes and default is None:
            raise ValueError("RoutedTeacher needs at least one route or a default teacher")
        self.routes = {str(k): v for k, v in routes.items()}
        self.default = default
        self.field = field

    model = None  # several networks: none samples for the student

    def local_models(self) -> list[LocalModel]:
        """The default teacher's networks first, then each route's."""
        teachers = [t for t in (self.default, *self.routes.values()) if t is not None]
        return [m for t in teachers for m in t.local_models()]

    def teacher_for(self, example: Example) -> Teacher:
        """The teacher that scores ``example``."""
        value = example.fields.get(self.field)
        key = None if value is None else str(value)
        if key is not None and key in self.routes:
            return self.routes[key]
        if self.default is None:
            raise ValueError(
                f"no teacher for {self.field}={value!r} and no default teacher; known values: "
                f"{sorted(self.routes)}. Add a route for it or set a default teacher (teacher.model)."
            )
        return self.default

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Per-row feedback from each row's own teacher, in the original row order."""
        check_request(access, topk)
        if not rollouts.examples:
            raise ValueError("RoutedTeacher needs rollouts with examples (routing reads example.fields)")
        groups: dict[int, tuple[Teacher, list[int]]] = {}
        for row, example in enumerate(rollouts.examples):
            teacher = self.teacher_for(example)
            groups.setdefault(id(teacher), (teacher, []))[1].append(row)
        if len(groups) == 1:
            teacher, _ = next(iter(groups.values()))
            return teacher.score(rollouts, access=access, topk=topk)
        parts = [(rows, teacher.score(rollouts.select(rows), access=access, topk=topk))
                 for teacher, rows in groups.values()]
        return _merge_feedback(parts, rollouts.batch_size, access)


def _merge_feedback(parts: list[tuple[list[int], Feedback]], batch: int, access: Access) -> Feedback:
    """Scatter per-part feedback back to ``batch`` rows (see :class:`RoutedTeacher`)."""
    first = parts[0][1].sampled_logprobs_BT
    t = first.shape[1]
    device = first.device
    sampled = torch.zeros(batch, t, device=device)
    merged: dict[str, Tensor | None] = {}
    for rows, fb in parts:
        sampled[torch.as_tensor(rows, device=device)] = fb.sampled_logprobs_BT.to(device)
    if access != "sampled":
        k = max(fb.topk_ids_BTK.shape[-1] for _, fb in parts if fb.topk_ids_BTK is not None)
        ids = torch.zeros(batch, t, k, dtype=torch.long, device=device)
        lps = torch.full((batch, t, k), float("-inf"), device=device)
        for rows, fb in parts:
            idx = torch.as_tensor(rows, device=device)
            ids[idx] = _pad_last(fb.topk_ids_BTK.to(device), k, 0)
            lps[idx] = _pad_last(fb.topk_logprobs_BTK.to(device), k, float("-inf"))
        merged["topk_ids_BTK"], merged["topk_logprobs_BTK"] = ids, lps
    if access == "full" and _hidden_mergeable(parts):
        merged.update(_merge_hidden(parts, batch, t, device))
    elif access == "full":
        logits_parts = []
        for rows, fb in parts:
            if fb.logits_BTV is not None:
                logits = fb.logits_BTV.float()
            else:  # materialise the hidden-state accessor (padding rows stay 0: hidden is 0 there)
                logits = F.linear(fb.hidden_BTH, fb.head_weight_VH, fb.head_bias_V).float()
            logits_parts.append((rows, logits.to(device)))
        v = max(lg.shape[-1] for _, lg in logits_parts)
        full = torch.zeros(batch, t, v, device=device)
        for rows, lg in logits_parts:
            full[torch.as_tensor(rows, device=device)] = _pad_last(lg, v, float("-inf"))
        merged["logits_BTV"] = full
    return Feedback(access=access, sampled_logprobs_BT=sampled, **merged)


def _hidden_mergeable(parts: list[tuple[list[int], Feedback]]) -> bool:
    """Every part holds the hidden-state accessor, with heads of one vocabulary size."""
    return (all(fb.logits_BTV is None and fb.hidden_BTH is not None and fb.head_weight_VH is not None
                for _, fb in parts)
            and len({fb.head_weight_VH.shape[0] for _, fb in parts}) == 1)


def _merge_hidden(parts: list[tuple[list[int], Feedback]], batch: int, t: int,
                  device: torch.device) -> dict[str, Tensor | None]:
    """One hidden-state accessor for rows scored by teachers with different heads, never ``[B, T, V]``.

    Parts that share one head (the same tensor or equal values) share its columns; otherwise the heads
    are laid side by side, ``W' = [W_1 | … | W_G | b_1 … b_G]`` (``[V, G·H + G]``), and the hidden state
    of a row scored by teacher ``g`` is placed in block ``g`` with a 1 in bias column ``g``:
    ``h' W'ᵀ = h W_gᵀ + b_g`` — each row's own (tempered) logits, exactly, at ``G·H`` values per token.
    """
    heads: list[tuple[Tensor, Tensor | None]] = []
    block_of: list[int] = []
    for _, fb in parts:
        w, b = fb.head_weight_VH, fb.head_bias_V
        for g, (hw, hb) in enumerate(heads):
            same_bias = (hb is None and b is None) or (hb is not None and b is not None and torch.equal(hb, b.to(hb)))
            if same_bias and (hw is w or (hw.shape == w.shape and torch.equal(hw, w.to(hw)))):
                block_of.append(g)
                break
        else:
            block_of.append(len(heads))
            heads.append((w, b))
    dtype = torch.promote_types(heads[0][0].dtype, parts[0][1].hidden_BTH.dtype)
    if len(heads) == 1:
        hidden = torch.zeros(batch, t, heads[0][0].shape[1], dtype=dtype, device=device)
        for rows, fb in parts:
            hidden[torch.as_tensor(rows, device=device)] = fb.hidden_BTH.to(device, dtype)
        w, b = heads[0]
        return {"hidden_BTH": hidden, "head_weight_VH": w.to(device), "head_bias_V": None if b is None else b.to(device)}
    sizes = [w.shape[1] for w, _ in heads]
    offsets = [sum(sizes[:g]) for g in range(len(heads))]
    with_bias = any(b is not None for _, b in heads)
    width = sum(sizes) + (len(heads) if with_bias else 0)
    hidden = torch.zeros(batch, t, width, dtype=dtype, device=device)
    for (rows, fb), g in zip(parts, block_of):
        idx = torch.as_tensor(rows, device=device)
        block = torch.zeros(len(rows), t, width, dtype=dtype, device=device)
        block[..., offsets[g]:offsets[g] + sizes[g]] = fb.hidden_BTH.to(device, dtype)
        if with_bias:  # the bias column is 1 only at real tokens (hidden is 0 at padding, so are its logits)
            real = (fb.hidden_BTH != 0).any(dim=-1).to(device, dtype)
            block[..., sum(sizes) + g] = real
        hidden[idx] = block
    v = heads[0][0].shape[0]
    weight = torch.zeros(v, width, dtype=dtype, device=device)
    for g, (w, b) in enumerate(heads):
        weight[:, offsets[g]:offsets[g] + sizes[g]] = w.to(device, dtype)
        if b is not None:
            weight[:, sum(sizes) + g] = b.to(device, dtype)
    return {"hidden_BTH": hidden, "head_weight_VH": weight, "head_bias_V": None}
