"""Checks of the data-format and teacher-tokenizer options (``data.format=chat``,
``teacher.system_prompt``, ``teacher.tokenizer=own``), called by :mod:`opd.config.validate`."""

from __future__ import annotations

from opd.config.fields import Problem
from opd.config.schema import Config

__all__ = ["chat_and_tokenizer_problems"]

#: route-1 supports a teacher with its own tokenizer can feed: its distribution over the student's
#: vocabulary is the teacher's top-k mapped by token text, defined only where the boundaries align
_CROSS_TOKENIZER_SUPPORTS = ("teacher_topk",)


def chat_and_tokenizer_problems(cfg: Config, *, support_used: bool) -> list[Problem]:
    """Problems of data.format=chat, teacher.system_prompt and teacher.tokenizer=own (opd/chat.py,
    opd/teachers/cross_tokenizer.py); ``support_used``: a route-1 term or a closed-form value reads the
    teacher's distribution on ``support.kind``."""
    d, t, r = cfg.data, cfg.teacher, cfg.rollout
    P: list[Problem] = []
    if d.format == "chat" and d.task == "arith":
        P.append(Problem("data.format=chat reads conversations from a file, but data.task=arith is the built-in "
                         "prompt task; use data.task=arith_chat (built-in conversations) or data.task=jsonl / hf with "
                         "data.path", ("data.format", "data.task")))
    if t.system_prompt is not None and not t.use_context:
        P.append(Problem("teacher.system_prompt is shown to the teacher only with teacher.use_context=true; set "
                         "teacher.use_context=true (or unset teacher.system_prompt)",
                         ("teacher.system_prompt", "teacher.use_context")))
    if t.system_prompt is not None and d.task == "arith":
        P.append(Problem("teacher.system_prompt cannot be used with data.task=arith: its teacher-only context is the "
                         "built-in answer hint (teacher.use_context=true shows it); use data.task=arith_chat, jsonl or hf",
                         ("teacher.system_prompt", "data.task")))
    if t.tokenizer != "own":
        return P
    if t.model == "self":
        P.append(Problem("teacher.tokenizer=own needs a teacher model with its own tokenizer, but teacher.model=self "
                         "is the student (same tokenizer); set teacher.tokenizer=same", ("teacher.tokenizer",
                                                                                          "teacher.model")))
    if r.teacher_mix > 0 or (r.on_policy_fraction < 1 and r.off_policy_source == "teacher"):
        P.append(Problem("teacher.tokenizer=own: a teacher with its own tokenizer scores the student's text but cannot "
                         "sample tokens in the student's vocabulary (rollout.teacher_mix > 0 or off-policy teacher "
                         "samples); set rollout.teacher_mix=0 and rollout.off_policy_source=answer",
                         ("teacher.tokenizer", "rollout.teacher_mix", "rollout.off_policy_source")))
    if t.cache != "none":
        P.append(Problem("teacher.cache does not keep the cross-tokenizer alignment (Feedback.cross_vocab) yet; set "
                         "teacher.cache=none with teacher.tokenizer=own", ("teacher.cache", "teacher.tokenizer")))
    if support_used and cfg.support.kind not in _CROSS_TOKENIZER_SUPPORTS:
        P.append(Problem(f"teacher.tokenizer=own: support.kind={cfg.support.kind} needs the teacher's probability of "
                         "every student token at every state, but across tokenizers it exists only where the token "
                         "boundaries align and only on the tokens both vocabularies share; use support.kind="
                         "teacher_topk (exact on the shared tokens, 0 where the states do not align), or route 2 "
                         "(route2.coef=1 route1.divergence=none: the merged log-prob of every student token)",
                         ("support.kind", "teacher.tokenizer")))
    return P
