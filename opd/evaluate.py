"""Held-out evaluation: greedy verifier accuracy, length, truncation, teacher–student divergence."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.math.divergences import reverse_kl
from opd.math.reduce import masked_mean
from opd.rollout import completion_forward, generate_rollouts
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
    # (exact over the vocabulary when the teacher returns full logits; else the sampled log-ratio)
    teacher_rkl: float | None = None

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in asdict(self).items() if v is not None}


def decode_completions(tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> list[str]:
    """Completion texts with special tokens kept (an EOS string marks where the model stopped)."""
    out = []
    for ids, mask in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, strict=True):
        out.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False))
    return out


def verify_rollouts(task: Task, tokenizer: PreTrainedTokenizerBase, rollouts: Rollouts) -> torch.Tensor:
    """Verifier score of every rollout, ``[B]`` float."""
    texts = decode_completions(tokenizer, rollouts)
    return torch.tensor([task.verify(ex, text) for ex, text in zip(rollouts.examples, texts, strict=True)],
                        dtype=torch.float32)


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
) -> EvalResult:
    """Greedy-decode ``examples`` with ``model``, verify, and (optionally) score with ``teacher``.

    ``teacher`` may be the model itself (to evaluate a teacher) — then the divergence is skipped.
    """
    was_training = model.training
    model.eval()
    correct = lengths = truncated = 0.0
    rkl_sum = rkl_tokens = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rollouts = generate_rollouts(model, tokenizer, chunk, max_new_tokens=max_new_tokens, greedy=True)
        correct += float(verify_rollouts(task, tokenizer, rollouts).sum())
        lengths += float(rollouts.lengths_B.sum())
        truncated += float(rollouts.truncated_B.sum())
        if teacher is not None:
            rkl_sum_b, n_b = _teacher_rkl(model, teacher, rollouts)
            rkl_sum += rkl_sum_b
            rkl_tokens += n_b
    model.train(was_training)
    n = len(examples)
    return EvalResult(
        accuracy=correct / max(n, 1), mean_length=lengths / max(n, 1), truncation_rate=truncated / max(n, 1),
        n=n, teacher_rkl=(rkl_sum / max(rkl_tokens, 1.0)) if teacher is not None else None,
    )


def _teacher_rkl(model: PreTrainedModel, teacher: Teacher, rollouts: Rollouts) -> tuple[float, float]:
    """Sum over completion tokens of RKL(student ‖ teacher), and the token count."""
    vocab = model.get_output_embeddings().weight.shape[0]
    access = "full" if vocab < 8192 else "sampled"
    feedback = teacher.score(rollouts, access=access, topk=1)
    mask = rollouts.completion_mask_BT.bool()
    logits = completion_forward(model, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                rollouts.completion_ids_BT, rollouts.completion_mask_BT)
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    if feedback.logits_BTV is not None:
        t_logp = torch.log_softmax(feedback.logits_BTV.float(), dim=-1)
        per_token = reverse_kl(s_logp, t_logp)
    else:
        sampled = s_logp.gather(-1, rollouts.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
        per_token = sampled - feedback.sampled_logprobs_BT.float()
    n = float(mask.sum())
    return float(masked_mean(per_token, mask)) * n, n
