"""The student's top-k support scored by a teacher server (``support.kind=student_topk`` with
``teacher.server=URL teacher.protocol=opd``).

The ``student_topk`` support compares the two models on ``S_t = topk_k(π_S(·|s_t))`` (opd.math.support)
and needs the teacher's log-probs at ids the *student* chooses. An in-process teacher gives all ``V``
of them; a server would have to send ``V`` log-probs per token. Instead, when the rollouts are scored:

1. the student runs once more over the rollouts (no grad, eval mode) and
   ``S_t = topk_k(log softmax(z_S(s_t) / τ_S))`` is taken at every completion position
   (:func:`student_topk_ids`; ``τ_S`` = ``support.student_temperature`` does not change the ids);
2. the server returns ``log π_T(v | s_t^T)`` for ``v ∈ S_t`` (:meth:`ServedTeacher.score_token_ids`,
   full-vocabulary log-probs at the teacher temperature);
3. both go into :class:`~opd.types.Feedback` as ``student_topk_ids_BTK`` /
   ``student_topk_teacher_logprobs_BTK`` (:func:`add_student_topk`), and the route-1 support uses those
   ids instead of the student's current top-k (``student_topk_ids`` of :func:`opd.math.support.build_support`).

Exactness: ``renorm`` needs only the teacher's log-probs on ``S_t``; ``tail`` needs
``1 − Σ_{v∈S_t} π_T(v)``, exact because the log-probs are normalised over the whole vocabulary. While the
student's weights have not moved since scoring (one update per rollout batch, no overlap) ``S_t`` *is* the
student's current top-k and the loss and its gradient equal the in-process ``student_topk`` ones (up to the
rounding of the payload; tests/test_serve_student_topk.py). With ``rollout.updates_per_rollout > 1`` or
``rollout.overlap`` the support stays the student's top-k **at sampling time** (for overlap: the
sampler's snapshot of the weights), not at the update — a documented choice [INFER]: the ids are a
support, any fixed support gives a proper divergence, and re-asking the server after every update would
cost one more request per update.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opd.math.support import tempered_log_softmax
from opd.rollout import HeadNotLinearError, completion_forward, lm_head_of
from opd.teachers.base import Teacher
from opd.types import Feedback, Rollouts

__all__ = ["add_student_topk", "student_topk_ids"]

#: Elements of one ``[chunk, V]`` fp32 block when the top-k is taken from hidden states (≈ 16 MiB).
_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def student_topk_ids(model: nn.Module, rollouts: Rollouts, k: int, *, temperature: float = 1.0,
                     chunked: bool = False, micro_batch_size: int | None = None) -> Tensor:
    """``topk_k(log softmax(z_S / τ))`` ids ``[B, T, min(k, V)]`` (long, 0 on padding) of ``model`` at every
    completion position of ``rollouts``, in eval mode (the mode is restored).

    ``chunked`` mirrors the training forward (:func:`opd.step.student_forward`): hidden states times the
    head, ``[chunk, V]`` at a time, instead of the model's ``[B, T, V]`` logits — so the ids are those the
    training forward's logits give. ``micro_batch_size`` rows per forward (None: all at once).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b = rollouts.batch_size
    step = micro_batch_size or max(b, 1)
    was_training = model.training
    model.eval()
    try:
        parts = [_topk_rows(model, rollouts.select(slice(i, i + step)), k, temperature, chunked)
                 for i in range(0, b, step)]
    finally:
        if was_training:
            model.train()
    ids_BTK = torch.cat(parts) if parts else torch.zeros(0, rollouts.completion_ids_BT.shape[1], k, dtype=torch.long)
    mask = rollouts.completion_mask_BT.to(ids_BTK.device).bool()[..., None]
    ids_BTK = torch.where(mask, ids_BTK, torch.zeros((), dtype=ids_BTK.dtype, device=ids_BTK.device))
    return ids_BTK.to(rollouts.completion_ids_BT.device)


def _topk_rows(model: nn.Module, rows: Rollouts, k: int, temperature: float, chunked: bool) -> Tensor:
    args = (rows.prompt_ids_BP, rows.prompt_mask_BP, rows.completion_ids_BT, rows.completion_mask_BT)
    head = None
    if chunked:
        try:
            head = lm_head_of(model)
        except HeadNotLinearError:
            head = None
    if head is None:
        logits = completion_forward(model, *args, output="logits")
        return tempered_log_softmax(logits, temperature).topk(min(k, logits.shape[-1]), dim=-1).indices
    weight, bias = head
    hidden = completion_forward(model, *args, output="hidden")
    b, t, h = hidden.shape
    flat = hidden.reshape(b * t, h)
    kk = min(k, weight.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    out = [tempered_log_softmax(F.linear(flat[i:i + chunk], weight, bias), temperature).topk(kk, dim=-1).indices
           for i in range(0, b * t, chunk)]
    return torch.cat(out).view(b, t, kk) if out else torch.zeros(b, t, kk, dtype=torch.long, device=hidden.device)


def add_student_topk(teacher: Teacher, feedback: Feedback, rollouts: Rollouts, model: nn.Module, k: int, *,
                     temperature: float = 1.0, chunked: bool = False,
                     micro_batch_size: int | None = None) -> Feedback:
    """``feedback`` with the student's top-k ids (:func:`student_topk_ids` of ``model``) and the teacher's
    log-probs there (``teacher.score_token_ids``; a cache in front of a served teacher passes the call
    through uncached, the ids depend on the student's weights). Unchanged when ``feedback`` already
    holds the full teacher distribution (it gives every id).

    Raises:
        ValueError: the teacher cannot score caller-chosen ids (only ``opd serve-teacher`` can).
    """
    if feedback.has_full:
        return feedback
    score = getattr(teacher, "score_token_ids", None)
    if score is None:
        raise ValueError(f"support.kind=student_topk without full teacher logits needs a teacher that scores "
                         f"caller-chosen ids (teacher.server with teacher.protocol=opd); {type(teacher).__name__} "
                         "does not: set teacher.access=full")
    ids_BTK = student_topk_ids(model, rollouts, k, temperature=temperature, chunked=chunked,
                               micro_batch_size=micro_batch_size)
    logprobs_BTK = score(rollouts, ids_BTK)
    device = feedback.sampled_logprobs_BT.device
    return replace(feedback, student_topk_ids_BTK=ids_BTK.to(device),
                   student_topk_teacher_logprobs_BTK=logprobs_BTK.float().to(device))
