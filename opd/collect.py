"""State compatibility: which states the student is taught on (survey variable 1).

One function turns a step's prompts into a batch of rollouts according to ``cfg.rollout``:

* on-policy fraction λ (GKD, arXiv 2306.13649): the first ``round(λ·n)`` prompts get student
  samples, the rest get teacher samples or dataset answers (``off_policy_source``);
* teacher-mixed sampling (MiniLLM, arXiv 2306.08543): each token from ``α·π_T + (1−α)·π_S``;
  the behaviour log-probs of the mixture make the importance ratio ``π_S / mix`` exact;
* partial rollouts (``prefix_tokens``): only the first n completion tokens are generated;
* sampling temperature / top-p / top-k of the behaviour policy μ.

Randomness comes from torch's global generator, which the loop seeds from ``(seed, step)``;
an exact resume therefore needs only the step number.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.config.schema import Config
from opd.rollout import (
    concat_rollouts,
    generate_mixed_rollouts,
    generate_rollouts,
    rollouts_from_texts,
)
from opd.rollout.engine import RolloutEngine, sampling_from_config
from opd.tasks.base import Example
from opd.teachers import teacher_prompt_texts
from opd.types import Rollouts


def step_seed(seed: int, step: int) -> int:
    """The torch seed of a step: a fixed function of (run seed, step)."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


def collect_rollouts(
    cfg: Config,
    examples: list[Example],
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    *,
    student: PreTrainedModel | None = None,
    teacher_model: PreTrainedModel | None = None,
    group_offset: int = 0,
) -> Rollouts:
    """Rollouts for ``examples`` (one process's share of a step) per ``cfg.rollout``.

    The student's own samples come from ``engine``; teacher-mixed sampling (which needs both
    models' next-token distributions at every step) runs opd's decode loop on ``student`` and
    ``teacher_model`` in this process.
    """
    r = cfg.rollout
    sampling = sampling_from_config(r)
    n_on = round(r.on_policy_fraction * len(examples))
    on_examples, off_examples = examples[:n_on], examples[n_on:]
    parts: list[Rollouts] = []
    if on_examples:
        if r.teacher_mix > 0:
            if teacher_model is None or student is None:
                raise ValueError("rollout.teacher_mix > 0 needs the student and an in-process teacher model")
            parts.append(generate_mixed_rollouts(
                student, teacher_model, tokenizer, on_examples, sampling, alpha=r.teacher_mix,
                teacher_prompt_texts=teacher_prompt_texts(on_examples, cfg.teacher.use_context,
                                                          cfg.teacher.context_template),
                group_offset=group_offset,
            ))
        else:
            parts.append(engine.generate(on_examples, sampling, group_offset=group_offset))
    if off_examples:
        offset = group_offset + len(on_examples)
        if r.off_policy_source == "answer":
            missing = [e.prompt for e in off_examples if e.answer is None]
            if missing:
                raise ValueError(
                    f"rollout.off_policy_source=answer but {len(missing)} examples have no answer "
                    f"(first: {missing[0]!r}); set data.answer_field or use off_policy_source=teacher"
                )
            parts.append(rollouts_from_texts(tokenizer, off_examples, [e.answer for e in off_examples],
                                             max_new_tokens=sampling.max_new_tokens, group_offset=offset))
        else:
            if teacher_model is None:
                raise ValueError("rollout.off_policy_source=teacher needs an in-process teacher model")
            teacher_rollouts = generate_rollouts(teacher_model, tokenizer, off_examples, sampling, group_offset=offset)
            parts.append(teacher_rollouts.as_off_policy())
    return parts[0] if len(parts) == 1 else concat_rollouts(parts)
