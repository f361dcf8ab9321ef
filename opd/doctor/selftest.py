"""The teacher self-test of ``opd doctor``: run every check of :mod:`opd.doctor.checks` and
:mod:`opd.doctor.tokens` on the configured teacher and the student's own rollouts.

The teacher is tested without its score cache (a cache would make determinism trivially true); a
routed teacher is tested through its default route. A served teacher (``teacher.server``) is
compared with ``teacher.model`` loaded here when that is a local or built-in model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.config.schema import Config
from opd.doctor.checks import (
    Check,
    agreement,
    batch_invariance,
    determinism,
    padding_invariance,
    skipped,
    temperature_check,
)
from opd.doctor.tokens import embedding_rows, pad_eos, round_trip, special_tokens, system_prompts
from opd.model_paths import is_server_url, resolve_model_path
from opd.models import load_model, load_tokenizer
from opd.rollout import lm_head_vocab_size
from opd.teachers import ModelTeacher, Teacher
from opd.types import Rollouts

__all__ = ["TOLERANCES", "TeacherParts", "run_self_test", "teacher_parts"]

#: Numeric tolerance on log-probs per teacher dtype (scoring the same tokens in another batch
#: shape changes the order of floating-point sums; determinism is held to a tenth of it).
TOLERANCES: dict[str, float] = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass
class TeacherParts:
    """What the self-test needs to know about the configured teacher."""

    teacher: Teacher  # the scorer, without its cache
    model: nn.Module | None  # the in-process network (None: served)
    tokenizer: PreTrainedTokenizerBase | None  # the teacher's own tokenizer
    own_tokenizer: bool  # teacher.tokenizer=own
    url: str | None  # teacher.server


def teacher_parts(cfg: Config, teacher: Any) -> TeacherParts:
    """Unwrap the cache and the routing around the configured teacher."""
    while hasattr(teacher, "store") and hasattr(teacher, "teacher"):  # a score cache
        teacher = teacher.teacher
    if hasattr(teacher, "routes") and hasattr(teacher, "default"):
        teacher = teacher.default
    found = teacher.local_models()
    if found:
        return TeacherParts(teacher, found[0].model, found[0].tokenizer, found[0].own_tokenizer, None)
    return TeacherParts(teacher, None, getattr(teacher, "tokenizer", None), False, cfg.teacher.server)


def _in_process(cfg: Config, device: torch.device | str, temperature: float) -> ModelTeacher | None:
    """``teacher.model`` loaded here (the reference of a served teacher), or None when it is not local."""
    t = cfg.teacher
    if t.model == "self" or is_server_url(t.model):
        return None
    path = resolve_model_path(t.model)
    try:
        model = load_model(path, dtype=t.dtype, device=device)
    except (OSError, ValueError):
        return None
    return ModelTeacher(model.eval(), load_tokenizer(path), temperature=temperature, use_context=t.use_context,
                        context_template=t.context_template)


def _full_logprobs(teacher: ModelTeacher, rollouts: Rollouts) -> torch.Tensor:
    """``log π_T^1`` over the whole vocabulary ``[B, T, V]`` (τ = 1 scorer), float32 on the CPU."""
    fb = teacher.score(rollouts, access="full", topk=1)
    logits = fb.logits_BTV
    if logits is None:
        logits = F.linear(fb.hidden_BTH.float(), fb.head_weight_VH.float(),  # type: ignore[union-attr]
                          None if fb.head_bias_V is None else fb.head_bias_V.float())
    return torch.log_softmax(logits.float(), -1).cpu()


def _numeric_checks(cfg: Config, parts: TeacherParts, rollouts: Rollouts, pad_id: int, device) -> list[Check]:
    t = cfg.teacher
    tol = TOLERANCES[t.server_dtype if parts.url else t.dtype]
    who = f"teacher server {parts.url}" if parts.url else "teacher"
    checks = [determinism(parts.teacher, rollouts, tolerance=tol / 10, access="topk", topk=8),
              batch_invariance(parts.teacher, rollouts, tolerance=tol, access="topk", topk=8, rows=4),
              padding_invariance(parts.teacher, rollouts, pad_id, tolerance=tol, access="topk", topk=8,
                                 reads_prompt_ids=not rollouts.examples)]
    local = None
    if parts.url:
        local = _in_process(cfg, device, t.temperature)
        if local is None:
            checks.append(skipped("served vs in-process", f"teacher.model={t.model!r} cannot be loaded here to "
                                                          "compare with the server"))
        else:
            checks.append(agreement("served vs in-process", parts.teacher.score(rollouts, access="topk", topk=8),
                                    local.score(rollouts, access="topk", topk=8), rollouts.completion_mask_BT,
                                    max(tol, TOLERANCES[t.dtype]),
                                    f"max |Δ log π_T| between {who} and teacher.model={t.model} run here"))
    else:
        checks.append(skipped("served vs in-process", "teacher.server is not set"))
    if parts.own_tokenizer:
        checks.append(skipped("temperature", "the teacher has its own tokenizer: its scores are merged over "
                                             "teacher tokens, so the τ identity holds per teacher token only"))
    else:
        ref_model = parts.model if parts.model is not None else (None if local is None else local.model)
        ref_tok = parts.tokenizer if parts.model is not None else (None if local is None else local.tokenizer)
        if ref_model is None or ref_tok is None:
            checks.append(skipped("temperature", "no in-process copy of the teacher to compute the τ = 1 scores"))
        else:
            untempered = ModelTeacher(ref_model, ref_tok, temperature=1.0, use_context=t.use_context,
                                      context_template=t.context_template)
            checks.append(temperature_check(parts.teacher.score(rollouts, access="sampled"),
                                            _full_logprobs(untempered, rollouts), rollouts, t.temperature,
                                            tolerance=max(tol, TOLERANCES[t.dtype])))
    return [c if not parts.url or c.passed is not False else
            Check(c.name, c.passed, c.measured, c.tolerance, f"{who}: {c.detail}") for c in checks]


def run_self_test(cfg: Config, teacher: Any, student: nn.Module, student_tokenizer: PreTrainedTokenizerBase,
                  rollouts: Rollouts, *, device: torch.device | str = "cpu", rows: int = 16) -> list[Check]:
    """Every self-test check on the first ``rows`` of ``rollouts`` (the student's own samples)."""
    parts = teacher_parts(cfg, teacher)
    sample = rollouts.select(list(range(min(rows, rollouts.batch_size))))
    chat = cfg.data.format == "chat" or cfg.data.task == "arith_chat"
    if cfg.teacher.model == "self":
        checks = _numeric_checks(cfg, parts, sample, student_tokenizer.pad_token_id, device)
        return checks + [skipped("tokenizer round trip", "self-teacher: the student's own tokenizer")]
    checks = _numeric_checks(cfg, parts, sample, student_tokenizer.pad_token_id, device)
    texts = student_tokenizer.batch_decode([row[m.bool()] for row, m in zip(
        sample.completion_ids_BT.cpu(), sample.completion_mask_BT.cpu(), strict=True)], skip_special_tokens=True)
    t_tok = parts.tokenizer
    if t_tok is None:  # a served teacher: the student's tokenizer was checked against the server's at start
        checks.append(skipped("tokenizer round trip", "served teacher: the server checked the tokenizer at start"))
        t_tok_for_checks = student_tokenizer
    else:
        checks.append(round_trip(texts, t_tok))
        t_tok_for_checks = t_tok
    mode = cfg.teacher.tokenizer
    checks.append(special_tokens(student_tokenizer, t_tok_for_checks, mode=mode, chat=chat))
    t_rows = None if parts.model is None else lm_head_vocab_size(parts.model)
    checks.append(embedding_rows(lm_head_vocab_size(student), t_rows, student_tokenizer,
                                 None if parts.model is None else t_tok, shared=mode == "same"))
    named = [("student", student_tokenizer)] + ([("teacher", t_tok)] if t_tok is not None else [])
    checks.append(pad_eos(named))
    checks.append(system_prompts(student_tokenizer, t_tok, chat=chat))
    return checks
