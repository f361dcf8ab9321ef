"""In-process teachers: a causal LM (:class:`ModelTeacher`) and the student under a privileged
context (:class:`SelfTeacher`)."""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from opd.lora import adapters_disabled, is_lora
from opd.rollout import (
    HeadNotLinearError,
    completion_forward,
    encode_prompts,
    lm_head_of,
    lm_head_vocab_size,
    model_device,
)
from opd.teachers.base import LocalModel, check_request, teacher_prompt_texts
from opd.types import Access, Feedback, Rollouts

__all__ = ["ModelTeacher", "SelfTeacher"]

#: Elements of one ``[chunk, V]`` fp32 logits block in the hidden-state path (≈ 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


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

    def local_models(self) -> list[LocalModel]:
        return [LocalModel(self, self.model, self.tokenizer, False, self.use_context, self.context_template)]

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
        check_request(access, topk)
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

    A LoRA student (:func:`opd.lora.is_lora`) in ``mode="frozen"`` is not copied: its base weights
    never train and its adapter starts at zero, so the base *is* the initial student. The teacher
    holds the student module itself (``base_as_teacher`` True) and scores inside
    :func:`opd.lora.adapters_disabled`, so every adapted layer computes ``W x + b`` for the
    teacher's forward only — the same scores as the base model, with no second copy of the weights.
    Scoring switches the shared module's adapter off and on again, so it must not run while another
    thread runs the student.

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
        self.base_as_teacher = mode == "frozen" and is_lora(student_model)
        if mode == "frozen" and not self.base_as_teacher:
            model = copy.deepcopy(student_model)
            model.requires_grad_(False)
            model.eval()
        else:
            model = student_model
        self.mode = mode
        super().__init__(model, tokenizer, temperature=temperature, use_context=use_context,
                         context_template=context_template, full_as_hidden_above_vocab=full_as_hidden_above_vocab,
                         micro_batch_size=micro_batch_size)

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """:meth:`ModelTeacher.score`; a LoRA student's frozen teacher scores with the adapter off."""
        if not self.base_as_teacher:
            return super().score(rollouts, access=access, topk=topk)
        with adapters_disabled(self.model):
            return super().score(rollouts, access=access, topk=topk)
