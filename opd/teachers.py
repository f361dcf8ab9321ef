"""Teachers: score the student's completions in the teacher's own context and return :class:`Feedback`.

A teacher reads ``teacher prompt ++ student completion`` and returns, for every completion token
``y_t``, at the teacher temperature ``τ``::

    sampled_logprobs_BT[b, t] = log softmax(z_T(s_t^T) / τ)[y_t]                   (always)
    topk_ids_BTK, topk_logprobs_BTK = topk(log softmax(z_T / τ), K)                (access topk/full)
    logits_BTV = z_T / τ        or   hidden_BTH, head_weight_VH = W/τ, head_bias_V = b/τ   (full)

Padding positions (``completion_mask_BT`` False) hold 0 in every tensor. The teacher prompt is the
example's prompt, optionally preceded by its teacher-only context
(``context_template.replace("{context}", example.teacher_context)``); the student's tokens are
appended unchanged, so the teacher scores exactly the tokens the student sampled.

Implementations: :class:`ModelTeacher` (an in-process causal LM), :class:`SelfTeacher` (the
student's own weights under a privileged context, frozen copy or live) and
:class:`RoutedTeacher` (one teacher per value of an example field).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from opd.rollout import (
    HeadNotLinearError,
    completion_forward,
    encode_prompts,
    lm_head_of,
    lm_head_vocab_size,
    model_device,
)
from opd.tasks.base import Example
from opd.types import ACCESS_LEVELS, Access, Feedback, Rollouts

__all__ = [
    "ModelTeacher",
    "RoutedTeacher",
    "SelfTeacher",
    "Teacher",
    "teacher_prompt_texts",
]

#: Elements of one ``[chunk, V]`` fp32 logits block in the hidden-state path (≈ 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


@runtime_checkable
class Teacher(Protocol):
    """Anything that scores rollouts: ``score(rollouts, access=..., topk=...) -> Feedback``."""

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Teacher feedback on ``rollouts`` at the teacher temperature (0 on padding)."""
        ...


def teacher_prompt_texts(
    examples: Sequence[Example], use_context: bool, template: str = "{context}\n"
) -> list[str]:
    """The text each example's teacher reads before the completion.

    ``use_context=False``: ``example.prompt``. ``use_context=True``:
    ``template.replace("{context}", example.teacher_context) + example.prompt``.

    Raises:
        ValueError: ``template`` lacks ``{context}``, or an example has no ``teacher_context``
            (the message names the field and the first rows that lack it).
    """
    if not use_context:
        return [e.prompt for e in examples]
    if "{context}" not in template:
        raise ValueError(f"context_template {template!r} does not contain '{{context}}'; e.g. '{{context}}\\n'")
    missing = [i for i, e in enumerate(examples) if e.teacher_context is None]
    if missing:
        raise ValueError(
            f"use_context=True but Example.teacher_context is None for {len(missing)} example(s) (rows "
            f"{missing[:10]}); set data.context_field to the field that holds the teacher-only context, or "
            "turn teacher.use_context off"
        )
    return [template.replace("{context}", str(e.teacher_context)) + e.prompt for e in examples]


def _check_request(access: str, topk: int) -> None:
    if access not in ACCESS_LEVELS:
        raise ValueError(f"unknown access {access!r}; choose one of {ACCESS_LEVELS}")
    if access != "sampled" and (not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive integer for access={access!r}, got {topk!r}")


class ModelTeacher:
    """An in-process causal LM that scores the student's tokens in its own (optionally privileged)
    context, with one forward pass per (sub-)batch under ``torch.no_grad``.

    Args:
        model: the teacher (``*ForCausalLM``); it is only read: run in eval mode (its mode is
            restored), never receives gradients.
        tokenizer: encodes the teacher prompt texts; it must share the student's vocabulary
            (see :func:`opd.tokenization.check_tokenizers_agree`).
        temperature: ``τ`` applied to the logits before every log-softmax.
        use_context: prepend ``example.teacher_context`` through ``context_template``.
        context_template: how the context is rendered before the prompt.
        full_as_hidden_above_vocab: for vocabularies larger than this, ``access="full"`` returns
            hidden states and the tempered head weight instead of ``[B, T, V]`` logits, and the
            sampled / top-k values are computed chunk by chunk from the hidden states.
        micro_batch_size: rows per forward pass (None = the whole batch at once).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        temperature: float = 1.0,
        use_context: bool = False,
        context_template: str = "{context}\n",
        full_as_hidden_above_vocab: int = 8192,
        micro_batch_size: int | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if use_context and "{context}" not in context_template:
            raise ValueError(f"context_template {context_template!r} does not contain '{{context}}'")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.use_context = use_context
        self.context_template = context_template
        self.full_as_hidden_above_vocab = full_as_hidden_above_vocab
        self.micro_batch_size = micro_batch_size

    def prompt_batch(self, rollouts: Rollouts) -> tuple[Tensor, Tensor]:
        """The teacher's left-padded prompt ``(ids_BP, mask_BP)`` for each row of ``rollouts``,
        encoded from :func:`teacher_prompt_texts` of ``rollouts.examples``. Rollouts without
        examples reuse the student's prompt ids (only possible without a context).

        Raises:
            ValueError: ``use_context`` with rollouts that carry no examples, or an example
                without ``teacher_context``.
        """
        device = model_device(self.model)
        if not rollouts.examples:
            if self.use_context:
                raise ValueError("use_context=True needs rollouts with examples (their teacher_context); build the "
                                 "rollouts with their examples")
            return rollouts.prompt_ids_BP.to(device), rollouts.prompt_mask_BP.to(device)
        texts = teacher_prompt_texts(rollouts.examples, self.use_context, self.context_template)
        return encode_prompts(self.tokenizer, texts, device)

    def _hidden_head(self) -> tuple[Tensor, Tensor | None] | None:
        """The plain linear head when the vocabulary is above the threshold, else None."""
        if lm_head_vocab_size(self.model) <= self.full_as_hidden_above_vocab:
            return None
        try:
            return lm_head_of(self.model)
        except HeadNotLinearError as err:
            warnings.warn(f"teacher vocabulary is above full_as_hidden_above_vocab but {err} Falling back to full "
                          "[B, T, V] logits.", stacklevel=3)
            return None

    @torch.no_grad()
    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Teacher feedback for ``rollouts`` (see the module docstring for the formulas).

        Returns:
            :class:`~opd.types.Feedback` on the rollouts' device: ``sampled_logprobs_BT`` always;
            ``topk_*`` for ``access`` topk / full (``K = min(topk, V)``); ``logits_BTV`` or the
            hidden-state accessor for ``access="full"``. fp32 except the accessor's tensors,
            which keep the model dtype.
        """
        _check_request(access, topk)
        out_device = rollouts.completion_ids_BT.device
        prompt_ids, prompt_mask = self.prompt_batch(rollouts)
        head = self._hidden_head()
        b = rollouts.batch_size
        step = self.micro_batch_size or max(b, 1)
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self._score_rows(slice(i, i + step), rollouts, prompt_ids, prompt_mask, head, access, topk)
                     for i in range(0, b, step)]
        finally:
            if was_training:  # train(False) would only repeat eval()'s walk over the modules
                self.model.train()
        merged = {k: torch.cat([p[k] for p in parts]).to(out_device) for k in parts[0]}
        if head is not None and access == "full":
            weight, bias = head
            # always a copy (the division makes one): the feedback must keep the head as it was at
            # scoring time even if these are the live student's weights, updated before it is used again
            merged["head_weight_VH"] = (weight.detach() / self.temperature).to(out_device)
            merged["head_bias_V"] = None if bias is None else (bias.detach() / self.temperature).to(out_device)
        return Feedback(access=access, **merged)

    def _tempered(self, x: Tensor) -> Tensor:
        """``x / τ`` (``x`` itself at τ = 1: no ``[.., V]`` pass or copy for a no-op division); only for
        tensors computed in this call, never for weights the caller may update later."""
        return x if self.temperature == 1.0 else x / self.temperature

    def _score_rows(self, rows: slice, rollouts: Rollouts, prompt_ids: Tensor, prompt_mask: Tensor,
                    head: tuple[Tensor, Tensor | None] | None, access: Access, topk: int) -> dict[str, Tensor]:
        ids_BT = rollouts.completion_ids_BT[rows]
        mask_BT = rollouts.completion_mask_BT[rows]
        output: Literal["logits", "hidden"] = "hidden" if head is not None else "logits"
        out = completion_forward(self.model, prompt_ids[rows], prompt_mask[rows], ids_BT, mask_BT, output=output)
        mask_BT = mask_BT.to(out.device)
        ids_BT = ids_BT.to(out.device)
        result: dict[str, Tensor] = {}
        if head is None:
            logits = self._tempered(out.float())
            logprobs = torch.log_softmax(logits, dim=-1)
            result["sampled_logprobs_BT"] = logprobs.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
            if access != "sampled":
                k = min(topk, logprobs.shape[-1])
                result["topk_logprobs_BTK"], result["topk_ids_BTK"] = logprobs.topk(k, dim=-1)
            if access == "full":
                result["logits_BTV"] = logits
        else:
            result.update(self._chunked_from_hidden(out, ids_BT, head, access, topk))
            if access == "full":
                result["hidden_BTH"] = out
        # Padding positions carry no signal: 0 everywhere (never NaN or -inf).
        for key, value in result.items():
            keep = mask_BT.view(*mask_BT.shape, *([1] * (value.dim() - 2)))
            result[key] = torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))
        return result

    def _chunked_from_hidden(self, hidden_BTH: Tensor, ids_BT: Tensor, head: tuple[Tensor, Tensor | None],
                             access: Access, topk: int) -> dict[str, Tensor]:
        """Sampled and top-k log-probs from ``hidden @ W.T + b`` one ``[chunk, V]`` block at a time."""
        weight, bias = head
        b, t, h = hidden_BTH.shape
        flat_h, flat_ids = hidden_BTH.reshape(b * t, h), ids_BT.reshape(b * t)
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        sampled, top_lp, top_ids = [], [], []
        for i in range(0, b * t, chunk):
            # log softmax(z)_v = z_v − logsumexp(z): only the gathered / top-k entries are normalised,
            # no [chunk, V] log-prob tensor is written
            z = self._tempered(F.linear(flat_h[i:i + chunk], weight, bias).float())
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            sampled.append((z.gather(-1, flat_ids[i:i + chunk, None]) - lse).squeeze(-1))
            if access != "sampled":
                lp, ix = z.topk(min(topk, z.shape[-1]), dim=-1)
                top_lp.append(lp - lse)
                top_ids.append(ix)
        result = {"sampled_logprobs_BT": torch.cat(sampled).view(b, t)} if sampled else {
            "sampled_logprobs_BT": hidden_BTH.new_zeros(b, t, dtype=torch.float32)}
        if access != "sampled":
            k = min(topk, weight.shape[0])
            result["topk_logprobs_BTK"] = torch.cat(top_lp).view(b, t, k) if top_lp else hidden_BTH.new_zeros(
                b, t, k, dtype=torch.float32)
            result["topk_ids_BTK"] = torch.cat(top_ids).view(b, t, k) if top_ids else torch.zeros(
                b, t, k, dtype=torch.long, device=hidden_BTH.device)
        return result


class SelfTeacher(ModelTeacher):
    """The student's own weights as teacher, conditioned on the teacher-only context
    (self-distillation with privileged information; OPSD-style).

    ``mode="frozen"``: a deep copy of the student taken at construction (``requires_grad`` False,
    eval mode), so the teacher stays the initial policy while the student trains.
    ``mode="live"``: the student module itself, run under ``no_grad``: the teacher moves with the
    student. The context only ever enters the *teacher's* prompt (:meth:`prompt_batch`); the
    student's inputs come from :mod:`opd.rollout`, which never reads ``teacher_context``.

    Other arguments are those of :class:`ModelTeacher` (``use_context`` defaults to True here).
    """

    def __init__(
        self,
        student_model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mode: Literal["frozen", "live"] = "frozen",
        temperature: float = 1.0,
        use_context: bool = True,
        context_template: str = "{context}\n",
        full_as_hidden_above_vocab: int = 8192,
        micro_batch_size: int | None = None,
    ):
        if mode not in ("frozen", "live"):
            raise ValueError(f"mode must be 'frozen' or 'live', got {mode!r}")
        if mode == "frozen":
            model = copy.deepcopy(student_model)
            model.requires_grad_(False)
            model.eval()
        else:
            model = student_model
        self.mode = mode
        super().__init__(model, tokenizer, temperature=temperature, use_context=use_context,
                         context_template=context_template, full_as_hidden_above_vocab=full_as_hidden_above_vocab,
                         micro_batch_size=micro_batch_size)


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
        _check_request(access, topk)
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
    if access == "full":
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
