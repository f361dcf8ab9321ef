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

import random
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Example", "RenderedPrompt", "Task", "draw_training_examples"]

_Problem = TypeVar("_Problem")


class RenderedPrompt(str):
    """A prompt text already rendered with its special tokens (a chat template's output).

    It is an ordinary ``str``; the type only tells :func:`opd.rollout.encode_prompts` to encode it
    with ``add_special_tokens=False``, so that a template that writes its own BOS does not get a
    second one from the tokenizer (the ids are exactly ``apply_chat_template(..., tokenize=True)``'s).
    """

    __slots__ = ()


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
        messages: chat examples (``data.format=chat``): the conversation before the assistant turn
            the student writes, as ``{"role", "content"}`` dicts; ``prompt`` is its rendering with
            the student's chat template (a :class:`RenderedPrompt`). ``None`` for plain prompts.
        teacher_prompt: the whole text the teacher reads instead of ``context + prompt`` when it
            uses the teacher-only context, e.g. the conversation rendered with a teacher-only
            system prompt (``teacher_context``) that the student never sees. ``None``: the teacher's
            text is built from ``teacher_context`` and ``prompt`` (:func:`opd.teachers.teacher_prompt_texts`).
        origin: where the example came from (``"prompts.jsonl:18"``), named by error messages.
    """

    prompt: str
    answer: str | None = None
    teacher_context: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[Mapping[str, Any], ...] | None = None
    teacher_prompt: str | None = None
    origin: str | None = None  # where the example came from, for error messages ("prompts.jsonl:18")


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


def draw_training_examples(step: int, batch_size: int, rng: random.Random,
                           draw: Callable[[random.Random], _Problem], held_out: Container[_Problem],
                           example: Callable[[_Problem], Example]) -> list[Example]:
    """The training batch of a generated task: ``example(x)`` for successive draws ``x = draw(rng)``,
    skipping every ``x`` in ``held_out``, until there are ``batch_size`` (``rng`` seeded from the
    task, the run seed and ``step``, so the batch is a pure function of them).

    Raises:
        ValueError: ``step < 0`` or ``batch_size < 1``.
    """
    if step < 0 or batch_size < 1:
        raise ValueError(f"step must be >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    out: list[Example] = []
    while len(out) < batch_size:
        x = draw(rng)
        if x not in held_out:
            out.append(example(x))
    return out
