"""Held-out evaluation: greedy verifier accuracy, length, truncation, teacher–student divergence,
and the first few greedy completions with their verifier scores (the report's held-out samples).

The training loop (:mod:`opd.train`) and ``opd eval`` both score through :func:`evaluate`, so a
checkpoint gets the same accuracy from either: greedy decoding, the task's own verifier (user
data: cut at the tokenizer's EOS, :func:`opd.data.make_verifier`), the same ``max_new_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.errors import FeedbackUnavailable
from opd.math.divergences import reverse_kl
from opd.math.reduce import masked_mean
from opd.rollout import Sampling, completion_forward, generate_rollouts, rollouts_from_texts
from opd.tasks.base import Example, Task
from opd.teachers import Teacher
from opd.types import Rollouts


@dataclass(frozen=True)
class EvalResult:
    """Greedy evaluation of one model on a held-out set."""

    accuracy: float
    mean_length: float
    truncation_rate: float
    n: int
    # mean per-token reverse KL(student ‖ teacher) on the model's own greedy completions
    # (exact over the vocabulary when the teacher returns full logits; else — a vocabulary of 8192 or
    # more, or a server that refuses V log-probs per token — the sampled log-ratio, an unbiased estimate)
    teacher_rkl: float | None = None
    # the first ``samples`` held-out completions (see :func:`greedy_samples`); not a metric
    samples: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)
    # "greedy" (decoded), or "teacher-forced" (a served teacher scored on the reference answers:
    # :func:`evaluate_teacher_forced`); not a metric
    decoding: str = field(default="greedy", compare=False)

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """The numbers as ``{prefix}/{name}`` floats (the samples and the decoding are left out)."""
        return {f"{prefix}/{f.name}": float(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("samples", "decoding") and getattr(self, f.name) is not None}

    @classmethod
    def from_metrics(cls, record: dict[str, Any], prefix: str = "eval") -> EvalResult:
        """The result :meth:`as_metrics` wrote (a ``metrics.jsonl`` record), without its samples.

        Raises:
            KeyError: the record lacks ``{prefix}/accuracy`` (or another required number).
        """
        def number(name: str) -> float:
            return float(record[f"{prefix}/{name}"])  # float() also reads "nan" written for NaN

        rkl = record.get(f"{prefix}/teacher_rkl")
        return cls(accuracy=number("accuracy"), mean_length=number("mean_length"),
                   truncation_rate=number("truncation_rate"), n=int(number("n")),
                   teacher_rkl=None if rkl is None else float(rkl), decoding=str(record.get("decoding", "greedy")))


def decode_completions(tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> list[str]:
    """Completion texts with special tokens kept (an EOS string marks where the model stopped)."""
    out = []
    for ids, mask in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, strict=True):
        out.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False))
    return out


def verifier_texts(task: Task, tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> list[str]:
    """The completions as the task's verifier reads them, whatever the scored model's stop token is.

    A verifier cuts a completion at the task's EOS string (``task.eos_token``; built for the student's
    tokenizer) and scores a completion without it as truncated. A model with a tokenizer of its own
    (``builtin:arith_bpe/teacher`` stops with ``"</s>"``, the task expects ``"$"``) would otherwise
    score 0 on every row. So each row that stopped on the model's EOS (``truncated_B`` false and its
    last kept token is ``tokenizer.eos_token_id``) is decoded *without* that token, special tokens
    kept, and the task's EOS string is appended; any other row (truncated, or a partial rollout) is
    decoded as is. For a model whose EOS is the task's own this is exactly :func:`decode_completions`.
    A task without an ``eos_token`` attribute (a user's own task class) gets that text unchanged.
    """
    stop = getattr(task, "eos_token", None)
    eos_id = tokenizer.eos_token_id
    if not stop or eos_id is None:
        return decode_completions(tokenizer, rollouts)
    out = []
    for ids, mask, truncated in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, rollouts.truncated_B,
                                    strict=True):
        row = ids[mask.bool()].tolist()
        if truncated or not row or row[-1] != eos_id:
            out.append(tokenizer.decode(row, skip_special_tokens=False))
        else:
            out.append(tokenizer.decode(row[:-1], skip_special_tokens=False) + stop)
    return out


def verify_rollouts(task: Task, tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> torch.Tensor:
    """Verifier score of every rollout, ``[B]`` float (the texts of :func:`verifier_texts`)."""
    texts = verifier_texts(task, tokenizer, rollouts)
    return torch.tensor([task.verify(ex, text) for ex, text in zip(rollouts.examples, texts, strict=True)],
                        dtype=torch.float32)


def greedy_samples(tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts, scores_B: torch.Tensor, n: int,
                   log_ratio_BT: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The first ``n`` rows of a greedy evaluation batch as sample records for ``samples.jsonl``.

    Each record: ``source`` (``"heldout"``), ``decoding`` (``"greedy"``), ``prompt``, ``answer``,
    ``completion`` (the text the verifier read: special tokens kept), ``tokens`` / ``token_ids``
    (the completion's tokens), ``score`` (the verifier's score; None when the task has no
    verifier), ``truncated``, and, when a teacher scored the completions, ``log_ratio``: the
    per-token ``ℓ_t = log π_S(y_t) − log π_T(y_t)`` on the model's own greedy tokens.
    """
    texts = decode_completions(tokenizer, rollouts)
    out = []
    for b in range(min(n, rollouts.batch_size)):
        keep = rollouts.completion_mask_BT[b].bool()
        ids = rollouts.completion_ids_BT[b][keep].tolist()
        ex = rollouts.examples[b]
        score = float(scores_B[b])
        record: dict[str, Any] = {
            "source": "heldout", "decoding": "greedy", "prompt": ex.prompt, "answer": ex.answer,
            "completion": texts[b], "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
            "token_ids": ids, "score": None if math.isnan(score) else score,
            "truncated": bool(rollouts.truncated_B[b]),
        }
        if log_ratio_BT is not None:
            record["log_ratio"] = [round(float(v), 5) for v in log_ratio_BT[b][keep]]
        out.append(record)
    return out


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 500,
    teacher: Teacher | None = None,
    samples: int = 0,
) -> EvalResult:
    """Greedy-decode ``examples`` with ``model``, verify, and (optionally) score with ``teacher``.

    ``teacher`` may be the model itself (to evaluate a teacher) — then the divergence is skipped.
    ``samples``: keep the first ``samples`` completions (of ``examples``, so the same prompts at
    every evaluation) with their verifier scores as :attr:`EvalResult.samples`
    (:func:`greedy_samples`); they cost no extra model call.
    """
    was_training = model.training
    model.eval()
    correct = lengths = truncated = 0.0
    rkl_sum = rkl_tokens = 0.0
    kept: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rollouts = generate_rollouts(model, tokenizer, chunk, Sampling(max_new_tokens=max_new_tokens, greedy=True))
        scores_B = verify_rollouts(task, tokenizer, rollouts)
        correct += float(scores_B.sum())
        lengths += float(rollouts.lengths_B.sum())
        truncated += float(rollouts.truncated_B.sum())
        log_ratio_BT = None
        if teacher is not None:
            rkl_sum_b, n_b, log_ratio_BT = _teacher_rkl(model, teacher, rollouts)
            rkl_sum += rkl_sum_b
            rkl_tokens += n_b
        if len(kept) < samples:
            kept += greedy_samples(tokenizer, rollouts, scores_B, samples - len(kept), log_ratio_BT)
    model.train(was_training)
    n = len(examples)
    return EvalResult(
        accuracy=correct / max(n, 1), mean_length=lengths / max(n, 1), truncation_rate=truncated / max(n, 1),
        n=n, teacher_rkl=(rkl_sum / max(rkl_tokens, 1.0)) if teacher is not None else None, samples=tuple(kept),
    )


def _teacher_rkl(model: PreTrainedModel, teacher: Teacher,
                 rollouts: Rollouts) -> tuple[float, float, torch.Tensor]:
    """Sum over completion tokens of RKL(student ‖ teacher), the token count, and the per-token
    sampled log-ratio ``ℓ_t = log π_S(y_t) − log π_T(y_t)`` ``[B, T]`` (for the samples)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    try:  # the exact RKL needs the teacher's whole distribution; ask for it only where it is small
        feedback = teacher.score(rollouts, access="full" if vocab < 8192 else "sampled", topk=1)
    except FeedbackUnavailable:  # a server that will not send V log-probs per token (vLLM --max-logprobs)
        feedback = teacher.score(rollouts, access="sampled", topk=1)
    mask = rollouts.completion_mask_BT.bool()
    logits = completion_forward(model, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                rollouts.completion_ids_BT, rollouts.completion_mask_BT)
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    sampled = s_logp.gather(-1, rollouts.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    if feedback.logits_BTV is not None:
        t_logp = torch.log_softmax(feedback.logits_BTV.float(), dim=-1)
        per_token = reverse_kl(s_logp, t_logp)
        t_sampled = t_logp.gather(-1, rollouts.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    else:
        t_sampled = feedback.sampled_logprobs_BT.float()
        per_token = sampled - t_sampled
    n = float(mask.sum())
    return float(masked_mean(per_token, mask)) * n, n, (sampled - t_sampled).detach()


@torch.no_grad()
def evaluate_teacher_forced(teacher: Teacher, tokenizer: PreTrainedTokenizerBase, examples: list[Example], *,
                            max_new_tokens: int, batch_size: int = 500) -> EvalResult | None:
    """Held-out accuracy of a teacher that can only *score* (a server: nothing here can sample it).

    Greedy decoding writes the reference answer ``a_1 … a_m`` followed by EOS exactly when, at every
    position of that sequence, the teacher's argmax given the reference prefix is the reference token:
    ``y_1 = argmax π_T(·|x) = a_1`` and then, by induction, ``y_t = argmax π_T(·|x, a_<t) = a_t``. So
    one scoring request with top-1 feedback on ``answer + EOS`` (:func:`opd.rollout.rollouts_from_texts`)
    gives, per prompt, whether greedy decoding reproduces the reference — the greedy accuracy of
    :func:`evaluate` for a task that accepts only the reference answer (``arith``, exact match), and a
    lower bound where other answers are accepted too. ``mean_length`` and ``truncation_rate`` are
    those of the greedy completions that reproduce the reference (the others are not decoded): NaN when
    none does. Returns None when an example has no reference answer.
    """
    if not examples or any(ex.answer is None for ex in examples):
        return None
    agree = lengths = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rollouts = rollouts_from_texts(tokenizer, chunk, max_new_tokens=max_new_tokens)
        top1_BT = teacher.score(rollouts, access="topk", topk=1).topk_ids_BTK[..., 0].to(rollouts.completion_ids_BT)
        mask_BT = rollouts.completion_mask_BT.bool()
        match_B = ((top1_BT == rollouts.completion_ids_BT) | ~mask_BT).all(dim=1) & ~rollouts.truncated_B.to(
            mask_BT.device)
        agree += float(match_B.sum())
        lengths += float(mask_BT.sum(dim=1)[match_B].sum())
    n = len(examples)
    return EvalResult(accuracy=agree / n, mean_length=lengths / agree if agree else math.nan,
                      truncation_rate=0.0 if agree else math.nan, n=n, decoding="teacher-forced")
