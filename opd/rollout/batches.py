"""Rollouts that were not sampled here (dataset answers), and joining rollout batches.

GKD (arXiv 2306.13649) mixes on-policy student samples with off-policy completions: with
probability ``1 − λ`` a prompt's completion is a dataset answer (:func:`rollouts_from_texts`) or
a teacher sample (:func:`opd.rollout.generate_rollouts` with the teacher and ``on_policy=False``).
:func:`concat_rollouts` joins such parts into one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opd.rollout.generate import encode_prompts
from opd.tasks.base import Example
from opd.types import Rollouts

__all__ = ["concat_rollouts", "rollouts_from_texts"]


def rollouts_from_texts(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    completion_texts: Sequence[str] | None = None,
    *,
    max_new_tokens: int,
    eos: bool = True,
    group_offset: int = 0,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """Off-policy rollouts whose completions are given texts (default: ``Example.answer``).

    Each text is tokenized without special tokens, followed by the tokenizer's EOS when ``eos``,
    and cut to ``max_new_tokens``. A row is ``truncated`` when the cut removed tokens (its EOS
    included). ``behaviour_logprobs_BT`` is 0 (no sampling distribution is known) and
    ``on_policy_B`` is False, so importance corrections can skip these rows. The completion is
    tokenized on its own, which for merge-based tokenizers may differ from how the student
    would tokenize ``prompt + text`` jointly.

    Raises:
        ValueError: no examples, a count mismatch, a missing answer (when ``completion_texts`` is
            None), ``eos`` with a tokenizer that has no EOS, or ``max_new_tokens < 1``.
    """
    if not examples:
        raise ValueError("no examples: pass at least one Example")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if completion_texts is None:
        missing = [i for i, e in enumerate(examples) if e.answer is None]
        if missing:
            raise ValueError(f"examples {missing[:10]} have no answer; pass completion_texts or use a task whose "
                             "examples carry answers (data.answer_field)")
        completion_texts = [e.answer for e in examples]  # type: ignore[misc]
    if len(completion_texts) != len(examples):
        raise ValueError(f"{len(completion_texts)} completion_texts for {len(examples)} examples; pass one per example")
    if eos and tokenizer.eos_token_id is None:
        raise ValueError("eos=True but the tokenizer has no eos_token_id; pass eos=False or set the tokenizer's EOS")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    rows: list[list[int]] = []
    truncated: list[bool] = []
    for text in completion_texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos:
            ids.append(int(tokenizer.eos_token_id))
        truncated.append(len(ids) > max_new_tokens)
        rows.append(ids[:max_new_tokens])
    t = max(len(r) for r in rows)
    pad = int(tokenizer.pad_token_id)
    completion = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, r in enumerate(rows):
        completion[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], device)
    b = len(rows)
    return Rollouts(
        prompt_ids_BP=prompt_ids,
        prompt_mask_BP=prompt_mask,
        completion_ids_BT=completion.to(device),
        completion_mask_BT=mask.to(device),
        behaviour_logprobs_BT=torch.zeros((b, t), device=device),
        truncated_B=torch.tensor(truncated, dtype=torch.bool, device=device),
        on_policy_B=torch.zeros(b, dtype=torch.bool, device=device),
        group_index_B=torch.arange(b, device=device) + group_offset,
        examples=tuple(examples),
    )


def _pad_cols(t: Tensor, width: int, value: float | int | bool, *, left: bool) -> Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    fill = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([fill, t] if left else [t, fill], dim=1)


def concat_rollouts(parts: Sequence[Rollouts], *, pad_token_id: int = 0) -> Rollouts:
    """Stack rollout batches row-wise: prompts are left-padded to the longest ``P`` (mask 0) and
    completions right-padded to the longest ``T`` (``pad_token_id``, mask False, log-prob 0).
    Rows keep their order and their ``group_index_B``; tensors go to the first part's device.

    Raises:
        ValueError: no parts, or parts where some carry ``examples`` and others do not.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concat_rollouts got no rollouts; pass at least one")
    if len(parts) == 1:
        return parts[0]
    with_examples = [bool(p.examples) for p in parts]
    if any(with_examples) and not all(with_examples):
        raise ValueError("some rollouts carry examples and some do not; build every part with its examples")
    device = parts[0].completion_ids_BT.device
    parts = [p.to(device) for p in parts]
    p_len = max(p.prompt_ids_BP.shape[1] for p in parts)
    t_len = max(p.completion_ids_BT.shape[1] for p in parts)
    return Rollouts(
        prompt_ids_BP=torch.cat([_pad_cols(p.prompt_ids_BP, p_len, pad_token_id, left=True) for p in parts]),
        prompt_mask_BP=torch.cat([_pad_cols(p.prompt_mask_BP, p_len, 0, left=True) for p in parts]),
        completion_ids_BT=torch.cat([_pad_cols(p.completion_ids_BT, t_len, pad_token_id, left=False) for p in parts]),
        completion_mask_BT=torch.cat([_pad_cols(p.completion_mask_BT, t_len, False, left=False) for p in parts]),
        behaviour_logprobs_BT=torch.cat([_pad_cols(p.behaviour_logprobs_BT, t_len, 0.0, left=False) for p in parts]),
        truncated_B=torch.cat([p.truncated_B for p in parts]),
        on_policy_B=torch.cat([p.on_policy_B for p in parts]),
        group_index_B=torch.cat([p.group_index_B for p in parts]),
        examples=tuple(e for p in parts for e in p.examples),
    )
