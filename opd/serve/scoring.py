"""What ``opd serve-teacher`` computes: a causal LM's log-probs on given sequences.

For sequence ``i`` with teacher prompt ``x_i`` and completion ``y_i`` and each completion position
``t`` (state ``s_t = x_i ++ y_i[:t]``), at temperature ``τ``::

    lp_t          = log_softmax(z(s_t) / τ)                  (fp32, over the whole vocabulary)
    sampled_t     = lp_t[y_t]
    topk_t        = the K largest entries of lp_t and their ids (decreasing)
    chosen_t[m]   = lp_t[token_ids[t, m]]                    (caller-chosen ids, e.g. the student's top-k)

— exactly what :class:`opd.teachers.ModelTeacher` computes in process, through the same forward
pass (:func:`opd.forward.completion_forward`: left-padded prompts, right-padded completions,
position ids from the attention mask, so padding does not change a row's values).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from opd.forward import completion_forward, lm_head_vocab_size, model_device
from opd.serve.payload import ScoreAnswer, ScoreRequest

__all__ = ["forward_groups", "pad_rows", "score_request", "split_batches"]


def split_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of sequence indices whose padded size ``rows · longest`` stays within
    ``max_tokens`` (a sequence longer than that is a group of its own)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if current and grown * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
            grown = n
        current.append(i)
        longest = grown
    if current:
        groups.append(current)
    return groups


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[len(rows), longest]`` of token-id rows, padded on the left (prompts) or the
    right (completions) with ``pad_id``."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def forward_groups(model: nn.Module, request: ScoreRequest, *, pad_id: int, max_batch_tokens: int,
                   output: Literal["logits", "hidden"] = "logits"
                   ) -> Iterator[tuple[np.ndarray, Tensor, Tensor, Tensor]]:
    """The model's outputs on ``request`` in micro-batches of at most ``max_batch_tokens`` padded
    positions (prompts left-padded, completions right-padded; rows without completion tokens skipped),
    in eval mode (restored afterwards). Yields ``(rows, completion_ids_BT, completion_mask_BT, out)``:
    ``rows`` the flat token indices (``request.n_tokens`` order) of ``out[completion_mask]``."""
    device = model_device(model)
    offsets = np.cumsum([0] + [len(c) for c in request.completions])
    lengths = [len(p) + len(c) for p, c in zip(request.prompts, request.completions)]
    was_training = model.training
    model.eval()
    try:
        for group in split_batches(lengths, max_batch_tokens):
            group = [i for i in group if request.completions[i]]
            if not group:
                continue
            p_ids, p_mask = pad_rows([request.prompts[i] for i in group], pad_id, left=True)
            c_ids, c_mask = pad_rows([request.completions[i] for i in group], pad_id, left=False)
            c_ids, c_mask = c_ids.to(device), c_mask.bool().to(device)
            out = completion_forward(model, p_ids.to(device), p_mask.to(device), c_ids, c_mask, output=output)
            yield np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group]), c_ids, c_mask, out
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def score_request(model: nn.Module, request: ScoreRequest, *, pad_id: int = 0,
                  max_batch_tokens: int = 16384) -> ScoreAnswer:
    """The :class:`ScoreAnswer` of ``request`` (see the module docstring), computed in micro-batches
    of at most ``max_batch_tokens`` padded positions."""
    n_total = request.n_tokens
    k = min(request.topk, lm_head_vocab_size(model))
    sampled = np.zeros(n_total, dtype=np.float32)
    top_ids = top_lp = chosen = None
    for rows, c_ids, keep, logits in forward_groups(model, request, pad_id=pad_id, max_batch_tokens=max_batch_tokens):
        logits = logits.float()
        if request.temperature != 1.0:
            logits = logits / request.temperature
        flat = torch.log_softmax(logits, dim=-1)[keep]  # [n, V], rows in sequence order, positions in order
        sampled[rows] = flat.gather(-1, c_ids[keep][:, None]).squeeze(-1).cpu().numpy()
        if request.topk:
            if top_ids is None:
                top_ids = np.zeros((n_total, k), dtype=np.int64)
                top_lp = np.zeros((n_total, k), dtype=np.float32)
            values, ids = flat.topk(k, dim=-1)
            top_lp[rows] = values.cpu().numpy()
            top_ids[rows] = ids.cpu().numpy()
        if request.token_ids is not None:
            if chosen is None:
                chosen = np.zeros(request.token_ids.shape, dtype=np.float32)
            wanted = torch.as_tensor(request.token_ids[rows], dtype=torch.long, device=flat.device)
            chosen[rows] = flat.gather(-1, wanted).cpu().numpy()
    if request.topk and top_ids is None:  # no completion token at all
        top_ids = np.zeros((0, k), dtype=np.int64)
        top_lp = np.zeros((0, k), dtype=np.float32)
    if request.token_ids is not None and chosen is None:
        chosen = np.zeros(request.token_ids.shape, dtype=np.float32)
    return ScoreAnswer(sampled_logprobs_N=sampled, topk_ids_NK=top_ids, topk_logprobs_NK=top_lp,
                       token_logprobs_NM=chosen)
