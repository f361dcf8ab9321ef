"""Rollout generation: the behaviour policy μ samples completions and records ``log μ(y_t | s_t)``.

Two samplers:

* :func:`generate_rollouts` — one model through ``transformers`` ``generate`` (KV cache, batched),
  with temperature / top-k / top-p. ``μ`` is the *processed* distribution that ``generate`` samples
  from, so ``behaviour_logprobs_BT = log_softmax(processed_scores)[y_t]``.
* :func:`generate_mixed_rollouts` — MiniLLM teacher-mixed sampling (arXiv 2306.08543, §2.2):
  every token is drawn from ``α·π_T + (1 − α)·π_S`` by a decode loop that keeps a KV cache for
  both models; ``μ`` is that mixture.

Layout: each prompt is repeated ``G = samples_per_prompt`` times, rows of one prompt adjacent
(``group_index_B = prompt index + group_offset``). A completion is kept up to and including its
first EOS (``completion_mask_BT``); a completion with no EOS within ``max_new_tokens`` is
``truncated``. Randomness comes from torch's global RNG: seed it before a call (the training loop
does, per step) to reproduce a batch exactly.

The student's prompt ids are always encoded from ``Example.prompt`` alone. Nothing here reads
``Example.teacher_context``; a teacher's privileged text reaches a sampler only through an
explicit ``*_prompt_texts`` argument and never enters ``Rollouts.prompt_ids_BP``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from opd.rollout.forward import (
    _cache_kwarg,
    _forward_params,
    _output_cache,
    model_device,
    position_ids_from_mask,
)
from opd.tasks.base import Example
from opd.types import Rollouts

__all__ = ["encode_prompts", "generate_mixed_rollouts", "generate_rollouts", "stop_token_ids"]

#: Generation options a checkpoint's ``generation_config.json`` may set that would silently change
#: the behaviour policy; ``generate_rollouts`` pins them to their neutral value.
_NEUTRAL_PROCESSORS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_new_tokens": 0,
}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Tokenize ``texts`` (special tokens added, e.g. BOS) into a left-padded batch.

    Returns:
        ``(ids_BP, mask_BP)``: ``long`` tensors on ``device``; ``mask`` is 1 on real tokens, and
        every row ends with a real token.

    Raises:
        ValueError: no texts, a tokenizer without a pad token, or a text that encodes to no tokens.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_prompts got no texts; pass at least one prompt")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, so prompts cannot be batched; set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (completion masks come from EOS positions, not padding)"
        )
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty or ids.shape[1] == 0:
        raise ValueError(f"prompt(s) {empty or list(range(len(texts)))} encode to no tokens; prompts must be "
                         "non-empty or the tokenizer must add a BOS token")
    return ids.to(device), mask.to(device)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] | int | None = None) -> list[int]:
    """The ids that end a completion: ``eos_token_ids`` when given, else the tokenizer's EOS.

    Raises:
        ValueError: neither is available.
    """
    if eos_token_ids is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids=[...] so completions can end")
        return [int(tokenizer.eos_token_id)]
    ids = [int(eos_token_ids)] if isinstance(eos_token_ids, int) else [int(i) for i in eos_token_ids]
    if not ids:
        raise ValueError("eos_token_ids is empty; pass at least one id, or None for the tokenizer's EOS")
    return ids


def _validate(examples: Sequence[Example], samples_per_prompt: int, max_new_tokens: int,
              temperature: float, prefix_tokens: int | None) -> None:
    if not examples:
        raise ValueError("no examples: pass at least one Example")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True for argmax decoding")
    if prefix_tokens is not None and prefix_tokens < 1:
        raise ValueError(f"prefix_tokens must be >= 1 or None, got {prefix_tokens}")


def _check_filters(top_p: float, top_k: int) -> None:
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def _finish(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    tokens_BT: Tensor,
    logprobs_BT: Tensor,
    stop_ids: list[int],
    *,
    samples_per_prompt: int,
    partial: bool,
    group_offset: int,
    on_policy: bool,
) -> Rollouts:
    """Mask after the first stop token, flag truncation and lay out the groups."""
    g = samples_per_prompt
    device = tokens_BT.device
    is_stop = torch.isin(tokens_BT, torch.tensor(stop_ids, device=device))
    # True up to and including the first stop token: no stop token strictly before t.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    mask = stops_before == 0
    pad = tokenizer.pad_token_id
    completion = torch.where(mask, tokens_BT, torch.full_like(tokens_BT, pad))
    logprobs = torch.where(mask, logprobs_BT.float(), torch.zeros((), device=device))
    truncated = torch.zeros(tokens_BT.shape[0], dtype=torch.bool, device=device)
    if not partial:
        truncated = ~(is_stop & mask).any(dim=1)
    n = len(examples)
    return Rollouts(
        prompt_ids_BP=prompt_ids.repeat_interleave(g, dim=0),
        prompt_mask_BP=prompt_mask.repeat_interleave(g, dim=0),
        completion_ids_BT=completion,
        completion_mask_BT=mask,
        behaviour_logprobs_BT=logprobs,
        truncated_B=truncated,
        on_policy_B=torch.full((n * g,), on_policy, dtype=torch.bool, device=device),
        group_index_B=torch.arange(n, device=device).repeat_interleave(g) + group_offset,
        examples=tuple(e for e in examples for _ in range(g)),
    )


def _generation_config(model: nn.Module, *, greedy: bool, max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> GenerationConfig:
    """An explicit config: the checkpoint's own sampling defaults must not change μ. The sampling
    warpers are neutral here: :func:`_warpers` passes them explicitly, ahead of the recorder."""
    kwargs: dict[str, Any] = dict(
        do_sample=not greedy, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=pad_id, output_scores=False, return_dict_in_generate=True, use_cache=True,
        **_NEUTRAL_PROCESSORS,
    )
    if not greedy:
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        model_gen = getattr(model, "generation_config", None)
        if getattr(model_gen, "min_p", None) is not None:
            kwargs["min_p"] = 0.0  # None would inherit the checkpoint's min_p (0.0 removes nothing)
    return GenerationConfig(**kwargs)


def _warpers(greedy: bool, temperature: float, top_p: float, top_k: int) -> list[LogitsProcessor]:
    """``transformers``' own sampling warpers, in the order ``generate`` applies them
    (temperature → top-k → top-p), so μ is exactly the distribution ``generate`` samples from."""
    if greedy:
        return []
    warpers: list[LogitsProcessor] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return warpers


class _BehaviourRecorder(LogitsProcessor):
    """The last logits processor of ``generate``: records ``log μ(y_t) = s_t[y_t] − logsumexp(s_t)``
    of the processed scores ``s_t``, one step late (at step ``t + 1`` the sampled ``y_t`` is the
    last input id). Only the previous step's ``[B, V]`` scores are kept, never ``[B, T, V]``."""

    def __init__(self) -> None:
        self.logprobs: list[Tensor] = []
        self._prev: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._prev is not None:
            self._take(input_ids[:, -1])
        self._prev = scores
        return scores

    def _take(self, tokens_B: Tensor) -> None:
        s = self._prev.float()
        self.logprobs.append(s.gather(-1, tokens_B[:, None].to(s.device)).squeeze(1) - torch.logsumexp(s, dim=-1))
        self._prev = None

    def finish(self, tokens_BT: Tensor) -> Tensor:
        """``[B, T]`` log-probs of the generated tokens (steps ``generate`` undid are dropped)."""
        t = tokens_BT.shape[1]
        if len(self.logprobs) < t and self._prev is not None:
            self._take(tokens_BT[:, len(self.logprobs)])
        if len(self.logprobs) < t:
            raise RuntimeError(f"recorded {len(self.logprobs)} behaviour log-probs for {t} generated tokens")
        return torch.stack(self.logprobs[:t], dim=1)


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    prefix_tokens: int | None = None,
    group_offset: int = 0,
    on_policy: bool = True,
    sampling_prompt_texts: Sequence[str] | None = None,
    eos_token_ids: Sequence[int] | int | None = None,
) -> Rollouts:
    """Sample ``samples_per_prompt`` completions per example with ``model.generate``.

    The behaviour policy is the distribution ``generate`` samples from after its logits
    processors: ``μ(·|s_t) = softmax(filter_top_p(filter_top_k(logits / τ)))``, and
    ``behaviour_logprobs_BT[b, t] = log μ(y_t | s_t)`` (0 on padding). With ``greedy=True`` the
    argmax is taken and the recorded log-probs are those of the untempered model,
    ``log_softmax(logits)[y_t]``.

    Args:
        model: the sampling model (the student; or the teacher for GKD off-policy samples, then
            pass ``on_policy=False``). Evaluated in eval mode; its train/eval mode is restored.
        tokenizer: encodes ``Example.prompt`` (left-padded) and defines pad / EOS.
        examples: one per prompt; each is repeated ``G`` times, rows of a prompt adjacent.
        samples_per_prompt: ``G``.
        max_new_tokens: completion length limit.
        temperature, top_p, top_k: sampling transforms (``top_k=0`` and ``top_p=1`` are off).
        greedy: argmax decoding (evaluation).
        prefix_tokens: partial rollouts (Prefix-OPD): generate only ``min(prefix_tokens,
            max_new_tokens)`` tokens; no row is marked truncated.
        group_offset: added to the prompt index in ``group_index_B``.
        on_policy: the value of ``on_policy_B`` (False when ``model`` is not the student).
        sampling_prompt_texts: texts the model is conditioned on while sampling (e.g. a teacher's
            privileged prompt), one per example; ``Rollouts.prompt_ids_BP`` is still the encoding of
            ``Example.prompt``. Default: the example prompts.
        eos_token_ids: ids that end a completion (default: the tokenizer's EOS).

    Returns:
        :class:`~opd.types.Rollouts` on the model's device; ``T`` is the longest completion
        generated (≤ the limit).

    Raises:
        ValueError: empty ``examples``, a non-positive size or temperature, or
            ``sampling_prompt_texts`` of the wrong length.
    """
    _validate(examples, samples_per_prompt, max_new_tokens, temperature, prefix_tokens)
    _check_filters(top_p, top_k)
    stop_ids = stop_token_ids(tokenizer, eos_token_ids)
    device = model_device(model)
    g = samples_per_prompt
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], device)
    if sampling_prompt_texts is None:
        gen_ids, gen_mask = prompt_ids, prompt_mask
    else:
        if len(sampling_prompt_texts) != len(examples):
            raise ValueError(f"{len(sampling_prompt_texts)} sampling_prompt_texts for {len(examples)} examples; "
                             "pass one text per example")
        gen_ids, gen_mask = encode_prompts(tokenizer, sampling_prompt_texts, device)
    n_new = max_new_tokens if prefix_tokens is None else min(prefix_tokens, max_new_tokens)
    config = _generation_config(model, greedy=greedy, max_new_tokens=n_new, stop_ids=stop_ids,
                                pad_id=tokenizer.pad_token_id)
    recorder = _BehaviourRecorder()
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=gen_ids.repeat_interleave(g, dim=0),
            attention_mask=gen_mask.repeat_interleave(g, dim=0),
            generation_config=config,
            logits_processor=LogitsProcessorList([*_warpers(greedy, temperature, top_p, top_k), recorder]),
        )
    finally:
        model.train(was_training)
    tokens = out.sequences[:, gen_ids.shape[1]:]
    logprobs = recorder.finish(tokens)
    return _finish(examples, tokenizer, prompt_ids, prompt_mask, tokens, logprobs, stop_ids,
                   samples_per_prompt=g, partial=prefix_tokens is not None, group_offset=group_offset,
                   on_policy=on_policy)


class _CachedDecoder:
    """Incremental decoding of one model with its own KV cache and left-padded prompt batch."""

    def __init__(self, model: nn.Module, ids_BP: Tensor, mask_BP: Tensor):
        self.model = model
        self.device = model_device(model)
        self.mask = mask_BP.to(self.device)
        kwargs: dict[str, Any] = {}
        if "logits_to_keep" in _forward_params(type(model)):
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=ids_BP.to(self.device), attention_mask=self.mask,
                    position_ids=position_ids_from_mask(self.mask), use_cache=True, **kwargs)
        self.cache = _output_cache(out)
        self.logits = out.logits[:, -1]

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed one token per row; return the next-token logits ``[B, V]``."""
        tokens_B = tokens_B.to(self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=tokens_B[:, None], attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{_cache_kwarg(self.model): self.cache})
        self.cache = _output_cache(out)
        self.logits = out.logits[:, -1]
        return self.logits


def _mixture_logprobs(student_logits_BV: Tensor, teacher_logits_BV: Tensor, alpha: float,
                      temperature: float) -> Tensor:
    """``log(α·softmax(z_T/τ) + (1−α)·softmax(z_S/τ))`` in fp32, computed with ``logaddexp`` so
    α = 0 gives exactly the student's and α = 1 exactly the teacher's log-probs."""
    v = min(student_logits_BV.shape[-1], teacher_logits_BV.shape[-1])
    lp_s = torch.log_softmax(student_logits_BV[:, :v].float() / temperature, dim=-1)
    lp_t = torch.log_softmax(teacher_logits_BV[:, :v].float().to(lp_s.device) / temperature, dim=-1)
    log_a = math.log(alpha) if alpha > 0 else -math.inf
    log_1ma = math.log1p(-alpha) if alpha < 1 else -math.inf
    return torch.logaddexp(lp_t + log_a, lp_s + log_1ma)


def _filter_logprobs(logprobs_BV: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus filtering of a distribution given as log-probs, renormalised.

    Same rule as ``transformers``' ``TopKLogitsWarper`` / ``TopPLogitsWarper``: keep the ``k``
    largest; then drop the tokens whose ascending cumulative mass is ``≤ 1 − top_p`` (the most
    likely token always stays). With neither filter the input is returned unchanged.
    """
    if top_k <= 0 and top_p >= 1.0:
        return logprobs_BV
    if top_k > 0 and top_k < logprobs_BV.shape[-1]:
        kth = logprobs_BV.topk(top_k, dim=-1).values[:, -1:]
        logprobs_BV = logprobs_BV.masked_fill(logprobs_BV < kth, -math.inf)
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs_BV, dim=-1)  # ascending
        cum = torch.softmax(sorted_lp, dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logprobs_BV = logprobs_BV.masked_fill(drop, -math.inf)
    return torch.log_softmax(logprobs_BV, dim=-1)


@torch.no_grad()
def generate_mixed_rollouts(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    alpha: float,
    teacher_prompt_texts: Sequence[str] | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    prefix_tokens: int | None = None,
    group_offset: int = 0,
    eos_token_ids: Sequence[int] | int | None = None,
) -> Rollouts:
    """MiniLLM teacher-mixed sampling (arXiv 2306.08543): each token from the mixture

        μ(·|s_t) = α·π_T(·|s_t^T) + (1 − α)·π_S(·|s_t),    π = softmax(logits / τ),

    where the student reads ``Example.prompt`` and the teacher reads ``teacher_prompt_texts`` (its
    own context, e.g. with privileged information; default: the same prompts), both followed by
    the tokens sampled so far. ``behaviour_logprobs_BT = log μ(y_t | ·)``, so an importance weight
    ``π_S / μ`` corrects the objective (MiniLLM's ``p_θ / p̃``). ``α = 0`` is plain student sampling
    at temperature τ and ``α = 1`` the teacher's; both models run every step with their own KV
    cache (call :func:`generate_rollouts` when α = 0 to save the teacher's forward passes). When
    the two output layers have different sizes (padded embeddings), both distributions are
    restricted to the shared first ``min(V_S, V_T)`` ids and renormalised **[INFER]**.

    ``top_k`` / ``top_p`` filter the *mixture* (same rule as :func:`generate_rollouts`, then
    renormalised; MiniLLM does not filter — off by default) **[INFER]**: at α = 0 this is exactly
    the student's processed distribution of :func:`generate_rollouts`.

    Other arguments and the returned layout are those of :func:`generate_rollouts`
    (``on_policy_B`` is True: the student's own distribution is part of μ and the IS weight is
    available).

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or the arguments ``generate_rollouts`` rejects.
    """
    _validate(examples, samples_per_prompt, max_new_tokens, temperature, prefix_tokens)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (MiniLLM uses 0.2), got {alpha}")
    _check_filters(top_p, top_k)
    stop_ids = stop_token_ids(tokenizer, eos_token_ids)
    g = samples_per_prompt
    device = model_device(student)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], device)
    if teacher_prompt_texts is None:
        t_ids, t_mask = prompt_ids, prompt_mask
    else:
        if len(teacher_prompt_texts) != len(examples):
            raise ValueError(f"{len(teacher_prompt_texts)} teacher_prompt_texts for {len(examples)} examples; "
                             "pass one text per example")
        t_ids, t_mask = encode_prompts(tokenizer, teacher_prompt_texts, model_device(teacher))
    n_new = max_new_tokens if prefix_tokens is None else min(prefix_tokens, max_new_tokens)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        s_dec = _CachedDecoder(student, prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0))
        t_dec = _CachedDecoder(teacher, t_ids.repeat_interleave(g, 0), t_mask.repeat_interleave(g, 0))
        stop = torch.tensor(stop_ids, device=device)
        finished = torch.zeros(prompt_ids.shape[0] * g, dtype=torch.bool, device=device)
        tokens: list[Tensor] = []
        logprobs: list[Tensor] = []
        for step in range(n_new):
            log_mix = _mixture_logprobs(s_dec.logits, t_dec.logits, alpha, temperature)
            log_mix = _filter_logprobs(log_mix, top_k, top_p)
            tok = torch.multinomial(log_mix.exp(), num_samples=1).squeeze(1)
            tok = torch.where(finished, torch.full_like(tok, tokenizer.pad_token_id), tok)
            tokens.append(tok)
            logprobs.append(log_mix.gather(-1, tok[:, None]).squeeze(1))
            finished = finished | torch.isin(tok, stop)
            if bool(finished.all()) or step == n_new - 1:
                break
            s_dec.step(tok)
            t_dec.step(tok)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return _finish(examples, tokenizer, prompt_ids, prompt_mask, torch.stack(tokens, 1), torch.stack(logprobs, 1),
                   stop_ids, samples_per_prompt=g, partial=prefix_tokens is not None, group_offset=group_offset,
                   on_policy=True)
