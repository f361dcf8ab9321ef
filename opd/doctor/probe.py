"""The pair on the user's prompts: lengths, rewards, accuracies and one real training step.

Everything is measured on the configured task's prompts with the configured models:

* the student's rollouts of step 1 (the batch ``opd distill`` would train on first) and the teacher's
  scores of them (:func:`opd.step.prepare_batch`), their lengths, truncation and EOS rates;
* the per-token reward ``r_t = log π_T(y_t) − log π_S(y_t)`` of those rollouts (its histogram);
* teacher samples of the same prompts with a longer budget (``budget_factor ×
  rollout.max_new_tokens``), measured in *student* tokens: the share of teacher answers that
  ``rollout.max_new_tokens`` would cut (Demystifying OPD, arXiv 2604.08527: truncated rollouts
  dominate the batch and collapse the run);
* the accuracy of the student's step-1 rollouts and of the teacher's answers with the task's
  verifier (sampled at ``rollout.temperature``; the teacher with the longer budget);
* one real optimizer step of the configured batch (:func:`opd.step.train_step`): its seconds, peak
  memory, gradient norm and every ``diag/*`` metric the monitor sees — the survey's actionability
  diagnostics by position (arXiv 2606.22793) — and how far that one update moved the student:
  ``mean_t |log π_S'(y_t) − log π_S(y_t)|`` over the batch's own tokens.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.evaluate import verify_rollouts
from opd.math.diagnostics import ngram_repetition_rate
from opd.rollout import Sampling, completion_forward, generate_rollouts
from opd.tasks.base import Example, Task
from opd.teachers import LocalModel
from opd.types import Feedback, Rollouts

__all__ = ["LengthStats", "Probe", "length_stats", "peak_memory_mb", "student_logprobs", "student_rewards",
           "teacher_lengths"]


@dataclass(frozen=True)
class LengthStats:
    """Completion lengths (student tokens, EOS included) of one sampler, against a budget."""

    lengths: tuple[int, ...]
    ended: tuple[bool, ...]  # the completion ended with EOS within the sampling budget
    budget: int  # rollout.max_new_tokens

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def mean(self) -> float:
        return sum(self.lengths) / max(len(self.lengths), 1)

    def quantile(self, q: float) -> float:
        if not self.lengths:
            return math.nan
        xs = sorted(self.lengths)
        return float(xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1 if q > 0 else 0)])

    @property
    def cut_share(self) -> float:
        """Share that does not end with EOS within ``budget`` tokens (would be truncated)."""
        cut = [not e or n > self.budget for n, e in zip(self.lengths, self.ended, strict=True)]
        return sum(cut) / max(len(cut), 1)

    @property
    def eos_rate(self) -> float:
        ok = [e and n <= self.budget for n, e in zip(self.lengths, self.ended, strict=True)]
        return sum(ok) / max(len(ok), 1)


def length_stats(rollouts: Rollouts, budget: int) -> LengthStats:
    """Lengths and EOS of ``rollouts`` (a row that is not ``truncated`` ended with EOS)."""
    return LengthStats(tuple(int(x) for x in rollouts.lengths_B.tolist()),
                       tuple(not bool(x) for x in rollouts.truncated_B.tolist()), budget)


def teacher_lengths(teacher: LocalModel, student_tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                    task: Task, *, budget: int, sample_budget: int,
                    temperature: float) -> tuple[LengthStats, float, float]:
    """Sample one answer of ``teacher``'s network per example (reading its prompt texts,
    :meth:`~opd.teachers.LocalModel.prompt_texts`) with ``sample_budget`` new tokens and measure each
    in student tokens (``len(student_tok(text)) + 1`` for the EOS when the teacher stopped).

    Returns the lengths, the teacher's n-gram (n = 3) repetition rate and its accuracy (the task's
    verifier on these answers, which had ``sample_budget`` tokens of room).
    """
    teacher_tokenizer = teacher.tokenizer
    texts = teacher.prompt_texts(examples)
    rollouts = generate_rollouts(teacher.model, teacher_tokenizer, examples,
                                 Sampling(max_new_tokens=sample_budget, temperature=temperature),
                                 sampling_prompt_texts=texts, on_policy=False)
    answers = teacher_tokenizer.batch_decode([row[m.bool()] for row, m in zip(
        rollouts.completion_ids_BT.cpu(), rollouts.completion_mask_BT.cpu(), strict=True)], skip_special_tokens=True)
    ended = [not bool(x) for x in rollouts.truncated_B.tolist()]
    lengths = [len(student_tokenizer(a, add_special_tokens=False)["input_ids"]) + int(e)
               for a, e in zip(answers, ended, strict=True)]
    rep = ngram_repetition_rate(rollouts.completion_ids_BT, rollouts.completion_mask_BT.bool(), 3)
    rep_mean = float(rep.mean()) if rep.numel() else 0.0
    accuracy = float(verify_rollouts(task, teacher_tokenizer, rollouts).mean()) if examples else math.nan
    return LengthStats(tuple(lengths), tuple(ended), budget), rep_mean, accuracy


@torch.no_grad()
def student_logprobs(student: nn.Module, rollouts: Rollouts) -> torch.Tensor:
    """``log π_S(y_t)`` at every completion token of ``rollouts`` (flat, CPU, float32; eval mode)."""
    was_training = student.training
    student.eval()
    try:
        logits = completion_forward(student, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                    rollouts.completion_ids_BT, rollouts.completion_mask_BT)
    finally:
        student.train(was_training)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, rollouts.completion_ids_BT.to(logits.device)[..., None])
    return logp.squeeze(-1).cpu()[rollouts.completion_mask_BT.bool().cpu()]


def student_rewards(student_logprobs_N: torch.Tensor, rollouts: Rollouts, feedback: Feedback) -> torch.Tensor:
    """``r_t = log π_T(y_t) − log π_S(y_t)`` at every completion token of ``rollouts`` (flat, CPU)."""
    mask = rollouts.completion_mask_BT.bool().cpu()
    return feedback.sampled_logprobs_BT.float().cpu()[mask] - student_logprobs_N


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocated memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Probe:
    """What ``opd doctor`` measured on the pair (see the module docstring)."""

    student: LengthStats
    teacher: LengthStats | None
    teacher_repetition: float | None
    rewards: list[float]
    step_metrics: dict[str, float]
    step_seconds: float  # rollouts + teacher scoring + update
    rollout_seconds: float
    peak_memory_mb: float
    memory_kind: str
    batch_rows: int
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    update_seconds: float = 0.0
    step_shift: float | None = None  # mean |Δ log π_S(y_t)| over the batch's tokens made by the one update
    student_params: int | None = None
    teacher_params: int | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reward_neg_frac(self) -> float:
        """Share of negative rewards: the monitor's ``diag/reward_neg_frac`` of the real step (the
        objective's own log-probs), else counted on :attr:`rewards`."""
        if "diag/reward_neg_frac" in self.step_metrics:
            return self.step_metrics["diag/reward_neg_frac"]
        return sum(r < 0 for r in self.rewards) / max(len(self.rewards), 1)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall-clock seconds."""
    tic = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - tic
