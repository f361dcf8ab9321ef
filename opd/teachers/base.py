"""The teacher interface: anything that scores rollouts and returns :class:`~opd.types.Feedback`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.chat import render_prompt, teacher_messages
from opd.tasks.base import Example
from opd.types import ACCESS_LEVELS, Access, Feedback, Rollouts

__all__ = ["LocalModel", "Teacher", "check_request", "teacher_prompt_texts"]


@dataclass(frozen=True)
class LocalModel:
    """An in-process network behind a teacher, with what reads its prompts.

    ``teacher`` is the teacher that runs it (inside caches and routing); ``own_tokenizer`` is True
    when ``tokenizer`` is the teacher's own (``teacher.tokenizer=own``: nothing may feed it the
    student's token ids).
    """

    teacher: Any
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    own_tokenizer: bool
    use_context: bool
    context_template: str

    def prompt_texts(self, examples: Sequence[Example]) -> list[str]:
        """What this network reads before each completion (:func:`teacher_prompt_texts`)."""
        return teacher_prompt_texts(examples, self.use_context, self.context_template,
                                    tokenizer=self.tokenizer if self.own_tokenizer else None)


@runtime_checkable
class Teacher(Protocol):
    """Anything that scores rollouts: ``score(rollouts, access=..., topk=...) -> Feedback``.

    ``model`` is the network that may sample with the *student's* token ids (teacher-mixed sampling,
    off-policy teacher samples), None when there is none (a server, a teacher with its own
    tokenizer, several routed teachers). :meth:`local_models` lists every in-process network
    behind the teacher (context-length checks, the teacher's held-out evaluation).
    """

    model: nn.Module | None

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Teacher feedback on ``rollouts`` at the teacher temperature (0 on padding)."""
        ...

    def local_models(self) -> list[LocalModel]:
        """The in-process networks behind this teacher (empty for a server)."""
        ...


def teacher_prompt_texts(
    examples: Sequence[Example], use_context: bool, template: str = "{context}\n",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[str]:
    """The text each example's teacher reads before the completion.

    Plain prompts: ``use_context=False`` → ``example.prompt``; ``use_context=True`` →
    ``example.teacher_prompt`` when set, else
    ``template.replace("{context}", example.teacher_context) + example.prompt``.

    Conversations (``example.messages`` set, ``data.format=chat``): the conversation before the
    student's turn, with ``teacher_context`` as a teacher-only system prompt when ``use_context``
    (:func:`opd.chat.teacher_messages`; ``template`` is not used). Without ``tokenizer`` the
    renderings made with the student's chat template are returned (``example.prompt`` /
    ``example.teacher_prompt``); a teacher with its own tokenizer passes it to render the messages
    with *its* chat template.

    Raises:
        ValueError: ``template`` lacks ``{context}``, or an example has no ``teacher_context``
            (the message names the field and the first rows that lack it).
    """
    def chat(e: Example, system: str | None) -> str:
        if tokenizer is None:
            return e.prompt if system is None else (e.teacher_prompt or e.prompt)
        return render_prompt(tokenizer, teacher_messages(tokenizer, e.messages or (), system))

    if not use_context:
        return [chat(e, None) if e.messages is not None else e.prompt for e in examples]
    if "{context}" not in template:
        raise ValueError(f"context_template {template!r} does not contain '{{context}}'; e.g. '{{context}}\\n'")
    missing = [i for i, e in enumerate(examples) if e.teacher_context is None and e.teacher_prompt is None]
    if missing:
        raise ValueError(
            f"use_context=True but Example.teacher_context is None for {len(missing)} example(s) (rows "
            f"{missing[:10]}); set data.context_field to the field that holds the teacher-only context "
            "(or teacher.system_prompt), or turn teacher.use_context off"
        )
    out = []
    for e in examples:
        if e.messages is not None:
            out.append(chat(e, e.teacher_context))
        elif e.teacher_prompt is not None:
            out.append(e.teacher_prompt)
        else:
            out.append(template.replace("{context}", str(e.teacher_context)) + e.prompt)
    return out


def check_request(access: str, topk: int) -> None:
    if access not in ACCESS_LEVELS:
        raise ValueError(f"unknown access {access!r}; choose one of {ACCESS_LEVELS}")
    if access != "sampled" and (not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive integer for access={access!r}, got {topk!r}")


