"""The task protocol: where prompts come from and how completions are scored.

A task is three functions. ``train_examples(step, batch_size, seed)`` is a pure function of its
arguments, so an exact resume needs no iterator state (restart at the saved step and the same
prompts come back). ``eval_examples(n)`` is a fixed held-out set, disjoint from everything
``train_examples`` can return. ``verify(example, completion)`` scores one completion.

Completion convention: ``completion`` is the generated text *after* the prompt, decoded with
special tokens kept (``skip_special_tokens=False``), so an EOS string in it marks where the model
stopped. A verifier reads the text up to the first EOS; text with no EOS is a truncated rollout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Example", "Task"]


@dataclass(frozen=True)
class Example:
    """One prompt with what the trainer, the verifier and a privileged teacher may need.

    Attributes:
        prompt: the text the student sees (the tokenizer adds BOS).
        answer: the reference answer (for the verifier and SFT baselines), or ``None``.
        teacher_context: privileged context only a teacher sees, prepended to the prompt for
            the teacher (the teacher's text is ``teacher_context + prompt``), e.g. the answer
            as a hint for a self-teacher; ``None`` when there is none.
        fields: anything else (e.g. ``"domain"`` for multi-teacher routing, the operands).
    """

    prompt: str
    answer: str | None = None
    teacher_context: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A source of training prompts, a held-out set and a verifier."""

    name: str

    def train_examples(self, step: int, batch_size: int, seed: int) -> list[Example]:
        """``batch_size`` training examples for ``step``; deterministic in ``(seed, step)``."""
        ...

    def eval_examples(self, n: int) -> list[Example]:
        """The first ``n`` examples of the fixed held-out set, disjoint from all training examples."""
        ...

    def verify(self, example: Example, completion: str) -> float:
        """Score a completion (special tokens kept): 1.0 correct, 0.0 wrong."""
        ...
