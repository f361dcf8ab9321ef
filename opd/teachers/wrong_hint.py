"""A teacher that reads each rollout's prompt under a *wrong* privileged hint (RLCSD, arXiv 2606.11709).

RLCSD contrasts the self-teacher under the correct hint with the same model under a wrong one. The
wrong hint of a row is the privileged context of another prompt in the same batch — the next row, in
batch order, whose context differs — so it has the form of a hint but the content of another problem.
That construction is our reconstruction **[INFER]** (the paper's wrong hints were not retrieved); it
needs no task-specific corruption and works for any data set with ``data.context_field``.
"""

from __future__ import annotations

from dataclasses import replace

from opd.tasks.base import Example
from opd.teachers.base import LocalModel, Teacher
from opd.types import Access, Feedback, Rollouts


def wrong_hint_examples(examples: tuple[Example, ...]) -> tuple[Example, ...]:
    """Each example with the teacher context (and teacher prompt) of the next example, cyclically, whose
    context differs from its own.

    Raises:
        ValueError: fewer than two distinct teacher contexts in the batch (there is no wrong hint to give).
    """
    contexts = [(e.teacher_context, e.teacher_prompt) for e in examples]
    if len(set(contexts)) < 2:
        raise ValueError(f"RLCSD's wrong hints need at least two different teacher contexts in a batch, got "
                         f"{len(set(contexts))} in {len(examples)} rollouts; raise rollout.prompts_per_step")
    out = []
    n = len(examples)
    for i, e in enumerate(examples):
        j = next((i + k) % n for k in range(1, n) if contexts[(i + k) % n] != contexts[i])
        out.append(replace(e, teacher_context=examples[j].teacher_context, teacher_prompt=examples[j].teacher_prompt))
    return tuple(out)


class WrongHintTeacher:
    """Scores rollouts with ``inner`` after swapping every row's hint for a wrong one
    (:func:`wrong_hint_examples`); ``inner`` must read the context (``use_context=True``)."""

    model = None  # a reference: it never samples

    def __init__(self, inner: Teacher) -> None:
        self.inner = inner

    def local_models(self) -> list[LocalModel]:
        return self.inner.local_models()

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        if not rollouts.examples:
            raise ValueError("WrongHintTeacher needs rollouts with examples (their teacher_context)")
        swapped = replace(rollouts, examples=wrong_hint_examples(tuple(rollouts.examples)))
        return self.inner.score(swapped, access=access, topk=topk)
