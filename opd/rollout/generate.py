"""Rollout generation: the behaviour policy μ samples completions and records ``log μ(y_t | s_t)``.

Two samplers, one batched decode loop with a KV cache per model (:class:`_CachedDecoder`):

* :func:`generate_rollouts` — one model, with temperature / top-k / top-p. ``μ`` is the processed
  distribution ``softmax(filter(logits / τ))`` (the filtering rules of ``transformers``' warpers),
  and ``behaviour_logprobs_BT = log μ(y_t)`` is read off the same step's log-probs.
* :func:`generate_mixed_rollouts` — MiniLLM teacher-mixed sampling (arXiv 2306.08543, §2.2):
  every token is drawn from ``α·π_T + (1 − α)·π_S``; ``μ`` is that mixture.

Tokens are drawn by inverse-CDF sampling (one uniform number per row against the cumulative
probabilities in fp64), which is exact for the categorical distribution. ``torch.multinomial``
(what ``generate`` uses) draws ``V`` exponential variates per row instead, which on CPU at large
vocabularies costs about as much as the decode step's forward pass (bench/breakdown.py, "Before /
after"); the loop also reads ``log μ(y_t)`` off the step's log-probs rather than stacking
``[B, T, V]`` scores.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from opd.forward import cache_kwarg, forward_params, model_device, output_cache, position_ids_from_mask
from opd.tasks.base import Example, RenderedPrompt
from opd.types import Rollouts

__all__ = ["Sampling", "encode_prompts", "finish_rollouts", "generate_mixed_rollouts", "generate_rollouts",
           "stop_token_ids"]


@dataclass(frozen=True)
class Sampling:
    """How the behaviour policy μ samples: ``μ = softmax(filter_top_p(filter_top_k(logits / τ)))``.

    ``greedy`` takes the argmax (evaluation; the recorded log-probs are then the untempered
    model's). ``prefix_tokens`` generates only ``min(prefix_tokens, max_new_tokens)`` tokens
    (partial rollouts, never marked truncated). ``samples_per_prompt`` is ``G``: rows of one prompt
    are adjacent. ``top_k=0`` and ``top_p=1`` are off.
    """

    max_new_tokens: int
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prefix_tokens: int | None = None
    greedy: bool = False

    @property
    def new_tokens(self) -> int:
        """How many tokens a row may get: ``min(prefix_tokens, max_new_tokens)`` for partial rollouts."""
        return self.max_new_tokens if self.prefix_tokens is None else min(self.prefix_tokens, self.max_new_tokens)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first knob out of range."""
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use greedy=True for argmax decoding")
        if self.prefix_tokens is not None and self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1 or None, got {self.prefix_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Tokenize ``texts`` into a left-padded batch: special tokens added (e.g. BOS) to plain texts,
    none to a :class:`~opd.tasks.base.RenderedPrompt` (a chat template's output already holds its
    own, so the ids are exactly those of ``apply_chat_template(..., tokenize=True)``).

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
    rendered = [isinstance(t, RenderedPrompt) for t in texts]
    if all(rendered) or not any(rendered):
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                        add_special_tokens=not rendered[0])
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    else:  # a mixed batch: encode each text its own way, then left-pad
        rows = [tokenizer(t, add_special_tokens=not r)["input_ids"] for t, r in zip(texts, rendered, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
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


def _check(examples: Sequence[Example], sampling: Sampling) -> None:
    if not examples:
        raise ValueError("no examples: pass at least one Example")
    sampling.check()


def finish_rollouts(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt: tuple[Tensor, Tensor],
    sampled: tuple[Tensor, Tensor],
    stop_ids: list[int],
    sampling: Sampling,
    *,
    group_offset: int = 0,
    on_policy: bool = True,
) -> Rollouts:
    """Mask after the first stop token, flag truncation and lay out the groups.

    ``prompt = (ids_BP, mask_BP)`` one row per example; ``sampled = (tokens_BT, logprobs_BT)`` one row per
    sample (``G`` adjacent rows per example, ``G = sampling.samples_per_prompt``). A row keeps its tokens
    up to and including the first stop id; it is truncated when it has none (never for partial rollouts,
    ``sampling.prefix_tokens`` set). Every engine lays out its samples through this function.
    """
    g = sampling.samples_per_prompt
    prompt_ids, prompt_mask = prompt
    tokens_BT, logprobs_BT = sampled
    device = tokens_BT.device
    is_stop = torch.isin(tokens_BT, torch.tensor(stop_ids, device=device))
    # True up to and including the first stop token: no stop token strictly before t.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    mask = stops_before == 0
    pad = tokenizer.pad_token_id
    completion = torch.where(mask, tokens_BT, torch.full_like(tokens_BT, pad))
    logprobs = torch.where(mask, logprobs_BT.float(), torch.zeros((), device=device))
    truncated = torch.zeros(tokens_BT.shape[0], dtype=torch.bool, device=device)
    if sampling.prefix_tokens is None:
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


def sample_from_logprobs(logprobs_BV: Tensor) -> Tensor:
    """One token per row from ``softmax(logprobs_BV)`` by inverse-CDF sampling.

    ``u ~ U[0, 1)`` per row (torch's global generator) and ``y = min{v : F(v) > u·F(V−1)}`` with
    ``F`` the fp64 cumulative sum of the probabilities, so ``P(y = v) = p_v`` up to fp64 rounding
    and a zero-probability entry (``-inf``) is never drawn. The rows need not be normalised.
    """
    probs = torch.exp(logprobs_BV.double())
    cdf = probs.cumsum_(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * total
    tokens = torch.searchsorted(cdf, u, right=True)
    last = torch.searchsorted(cdf, total, right=False)  # the last entry with positive probability
    return torch.minimum(tokens, last).squeeze(1)


def _decode(
    decoders: Sequence["_CachedDecoder"],
    next_logprobs: Callable[[Sequence["_CachedDecoder"]], Tensor],
    *,
    n_new: int,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
) -> tuple[Tensor, Tensor]:
    """The decode loop shared by the samplers: ``next_logprobs(decoders) -> [B, V]`` log μ(·|s_t);
    draw ``y_t`` (argmax when ``greedy``), feed it to every decoder; rows that reached a stop id
    get ``pad_id`` afterwards; stop when every row has stopped or after ``n_new`` tokens.

    Returns ``(tokens_BT, logprobs_BT)`` with ``logprobs_BT[b, t] = log μ(y_t)``.
    """
    device = decoders[0].device
    stop = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(decoders[0].mask.shape[0], dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    logprobs: list[Tensor] = []
    for step in range(n_new):
        log_mu = next_logprobs(decoders)
        tok = log_mu.argmax(dim=-1) if greedy else sample_from_logprobs(log_mu)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        logprobs.append(log_mu.gather(-1, tok[:, None]).squeeze(1))
        finished = finished | torch.isin(tok, stop)
        if bool(finished.all()) or step == n_new - 1:
            break
        for dec in decoders:
            dec.step(tok)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    sampling: Sampling,
    *,
    group_offset: int = 0,
    on_policy: bool = True,
    sampling_prompt_texts: Sequence[str] | None = None,
    eos_token_ids: Sequence[int] | int | None = None,
) -> Rollouts:
    """Sample ``samples_per_prompt`` completions per example (batched, KV-cached decode loop).

    The behaviour policy is ``μ(·|s_t) = softmax(filter_top_p(filter_top_k(logits / τ)))`` — the
    distribution ``transformers``' ``generate`` samples from with the same knobs — and
    ``behaviour_logprobs_BT[b, t] = log μ(y_t | s_t)`` (0 on padding). With ``greedy=True`` the
    argmax is taken and the recorded log-probs are those of the untempered model,
    ``log_softmax(logits)[y_t]``. The checkpoint's own ``generation_config`` is never read.

    Args:
        model: the sampling model (the student; or the teacher for GKD off-policy samples, then
            pass ``on_policy=False``). Evaluated in eval mode; its train/eval mode is restored.
        tokenizer: encodes ``Example.prompt`` (left-padded) and defines pad / EOS.
        examples: one per prompt; each is repeated ``G`` times, rows of a prompt adjacent.
        sampling: ``G``, the length limit, the sampling transforms, greedy decoding and partial
            rollouts (Prefix-OPD: ``prefix_tokens``; no row is then marked truncated), see :class:`Sampling`.
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
    _check(examples, sampling)
    stop_ids = stop_token_ids(tokenizer, eos_token_ids)
    device = model_device(model)
    g, greedy, temperature = sampling.samples_per_prompt, sampling.greedy, sampling.temperature
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], device)
    gen_ids, gen_mask = _conditioning(tokenizer, sampling_prompt_texts, (prompt_ids, prompt_mask), device,
                                      "sampling_prompt_texts")
    was_training = model.training
    model.eval()
    try:
        decoder = _CachedDecoder(model, gen_ids.repeat_interleave(g, dim=0), gen_mask.repeat_interleave(g, dim=0))

        def next_logprobs(decoders: Sequence[_CachedDecoder]) -> Tensor:
            logits = decoders[0].logits.float()
            if greedy:
                return torch.log_softmax(logits, dim=-1)
            scaled = logits if temperature == 1.0 else logits / temperature
            return _filter_logprobs(torch.log_softmax(scaled, dim=-1), sampling.top_k, sampling.top_p)

        tokens, logprobs = _decode([decoder], next_logprobs, n_new=sampling.new_tokens, stop_ids=stop_ids,
                                   pad_id=tokenizer.pad_token_id, greedy=greedy)
    finally:
        if was_training:  # train(False) would only repeat eval()'s walk over the modules
            model.train()
    return finish_rollouts(examples, tokenizer, (prompt_ids, prompt_mask), (tokens, logprobs), stop_ids, sampling,
                           group_offset=group_offset, on_policy=on_policy)


def _conditioning(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] | None, prompt: tuple[Tensor, Tensor],
                  device: torch.device | str, what: str) -> tuple[Tensor, Tensor]:
    """The batch a model reads while sampling: ``texts`` (one per example) encoded, else ``prompt``."""
    if texts is None:
        return prompt
    if len(texts) != prompt[0].shape[0]:
        raise ValueError(f"{len(texts)} {what} for {prompt[0].shape[0]} examples; pass one text per example")
    return encode_prompts(tokenizer, texts, device)


class _CachedDecoder:
    """Incremental decoding of one model with its own KV cache and left-padded prompt batch."""

    def __init__(self, model: nn.Module, ids_BP: Tensor, mask_BP: Tensor):
        self.model = model
        self.device = model_device(model)
        self.mask = mask_BP.to(self.device)
        kwargs: dict[str, Any] = {}
        if "logits_to_keep" in forward_params(type(model)):
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=ids_BP.to(self.device), attention_mask=self.mask,
                    position_ids=position_ids_from_mask(self.mask), use_cache=True, **kwargs)
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1]

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed one token per row; return the next-token logits ``[B, V]``."""
        tokens_B = tokens_B.to(self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=tokens_B[:, None], attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{cache_kwarg(self.model): self.cache})
        self.cache = output_cache(out)
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
    sampling: Sampling,
    *,
    alpha: float,
    teacher_prompt_texts: Sequence[str] | None = None,
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
        ValueError: ``alpha`` outside ``[0, 1]``, ``sampling.greedy`` (the mixture is sampled), or the
            arguments ``generate_rollouts`` rejects.
    """
    _check(examples, sampling)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (MiniLLM uses 0.2), got {alpha}")
    if sampling.greedy:
        raise ValueError("teacher-mixed sampling draws from the mixture; greedy decoding is not supported")
    stop_ids = stop_token_ids(tokenizer, eos_token_ids)
    g, temperature = sampling.samples_per_prompt, sampling.temperature
    device = model_device(student)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], device)
    t_ids, t_mask = _conditioning(tokenizer, teacher_prompt_texts, (prompt_ids, prompt_mask), model_device(teacher),
                                  "teacher_prompt_texts")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        s_dec = _CachedDecoder(student, prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0))
        t_dec = _CachedDecoder(teacher, t_ids.repeat_interleave(g, 0), t_mask.repeat_interleave(g, 0))

        def next_logprobs(decoders: Sequence[_CachedDecoder]) -> Tensor:
            log_mix = _mixture_logprobs(decoders[0].logits, decoders[1].logits, alpha, temperature)
            return _filter_logprobs(log_mix, sampling.top_k, sampling.top_p)

        tokens, logprobs = _decode([s_dec, t_dec], next_logprobs, n_new=sampling.new_tokens, stop_ids=stop_ids,
                                   pad_id=tokenizer.pad_token_id)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return finish_rollouts(examples, tokenizer, (prompt_ids, prompt_mask), (tokens, logprobs), stop_ids, sampling,
                           group_offset=group_offset, on_policy=True)
