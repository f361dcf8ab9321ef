"""Build the components of a run from a resolved config: task, student, teacher, reference.

Everything here is construction; nothing trains. Model names accept a local folder, a hub id,
or ``builtin:<task>/<name>`` for a checkpoint shipped with opd (``builtin:arith/teacher``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.config.schema import Config
from opd.models import load_model, load_tokenizer
from opd.tasks.base import Task
from opd.teachers import ModelTeacher, RoutedTeacher, SelfTeacher, Teacher
from opd.tokenization import check_tokenizers_agree

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name: str) -> str:
    """``builtin:arith/teacher`` → the shipped folder; anything else is returned unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    spec = name[len(BUILTIN_PREFIX):]
    task, _, ckpt = spec.partition("/")
    if task != "arith" or not ckpt:
        raise ValueError(
            f"unknown built-in model {name!r}; the shipped checkpoints are builtin:arith/teacher, "
            "builtin:arith/student, builtin:arith/smoke_teacher and builtin:arith/smoke_student"
        )
    from opd.tasks.arith import arith_checkpoint

    return str(arith_checkpoint(ckpt))


def build_task(cfg: Config, *, eos_token: str | None = None) -> Task:
    """The prompt source and verifier named by ``cfg.data``.

    ``eos_token`` is the student's EOS string: completions are decoded with special tokens
    kept, and user-data verifiers cut the completion there.
    """
    d = cfg.data
    if d.task == "arith":
        from opd.tasks.arith import ArithTask

        return ArithTask(digits=d.digits, reverse_operands=d.reverse_operands,
                         eval_size=cfg.eval.size or 500, seed=d.eval_seed)
    from opd.data import HFDatasetTask, JsonlTask

    common = dict(prompt_field=d.prompt_field, answer_field=d.answer_field, context_field=d.context_field,
                  route_field=d.route_field, verifier=d.verifier, eval_path=d.eval_path,
                  eval_size=cfg.eval.size, seed=d.eval_seed, eos_token=eos_token)
    if d.path is None:
        raise ValueError(f"data.task={d.task} needs data.path (a JSONL file or a dataset id)")
    if d.task == "jsonl":
        return JsonlTask(d.path, **common)
    return HFDatasetTask(d.path, split=d.split, eval_split=d.eval_split, **common)


def build_student(cfg: Config, device: torch.device | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_model_path(cfg.student.model)
    tokenizer = load_tokenizer(resolve_model_path(cfg.student.tokenizer) if cfg.student.tokenizer else path)
    model = load_model(path, dtype=cfg.student.dtype, device=device)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the student tokenizer ({path}) has no pad token; batched rollouts need one. "
            "Set tokenizer.pad_token (a token distinct from EOS) and save it with the model."
        )
    return model, tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached, eval-mode copy whose parameters never receive gradients."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _model_teacher(cfg: Config, name: str, student_tokenizer: PreTrainedTokenizerBase,
                   device: torch.device | str) -> ModelTeacher:
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    if cfg.teacher.check_tokenizer:
        check_tokenizers_agree(student_tokenizer, tokenizer)
    model = load_model(path, dtype=cfg.teacher.dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelTeacher(model, tokenizer, temperature=cfg.teacher.temperature,
                        use_context=cfg.teacher.use_context, context_template=cfg.teacher.context_template)


def build_teacher(cfg: Config, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  device: torch.device | str) -> Teacher:
    """The teacher named by ``cfg.teacher``: a model, the student itself (self-teacher), or routed."""
    t = cfg.teacher
    teacher: Teacher
    if t.model == "self":
        teacher = SelfTeacher(student, tokenizer, mode=t.self_mode, temperature=t.temperature,
                              use_context=t.use_context, context_template=t.context_template)
    else:
        teacher = _model_teacher(cfg, t.model, tokenizer, device)
        if t.routes:
            routes = {value: _model_teacher(cfg, name, tokenizer, device) for value, name in t.routes.items()}
            teacher = RoutedTeacher(routes, default=teacher, field=cfg.data.route_field)
    return cached_teacher(cfg, teacher)


def cached_teacher(cfg: Config, teacher: Teacher) -> Teacher:
    """``teacher`` behind the score cache that ``cfg.teacher.cache`` asks for (unchanged for ``none``)."""
    t = cfg.teacher
    if t.cache == "none":
        return teacher
    from opd.teacher_cache import CachedTeacher, DiskFeedbackStore, FeedbackStore

    if t.cache == "memory":
        return CachedTeacher(teacher, FeedbackStore(t.store_dtype))
    if not t.cache_dir:
        raise ValueError("teacher.cache=disk needs teacher.cache_dir (the folder that holds the cache)")
    signature = {"model": t.model, "self_mode": t.self_mode if t.model == "self" else None,
                 "student": cfg.student.model if t.model == "self" else None, "routes": dict(t.routes),
                 "temperature": t.temperature, "dtype": t.dtype, "use_context": t.use_context,
                 "context_template": t.context_template}
    return CachedTeacher(teacher, DiskFeedbackStore(t.cache_dir, t.store_dtype, signature=signature))


def build_reference(cfg: Config, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    device: torch.device | str) -> Teacher | None:
    """The reference policy of the KL regularizer and of G-OPD, when the config uses one.

    ``initial`` is a frozen copy of the starting student, loaded again from
    ``cfg.student.model`` so that a resumed run gets the same reference.
    """
    reg, r2 = cfg.regularization, cfg.route2
    needed = reg.ref_kl_coef > 0 or (r2.coef > 0 and r2.reward == "extrapolated")
    if not needed:
        return None
    if reg.reference == "initial":
        model = load_model(resolve_model_path(cfg.student.model), dtype=cfg.student.dtype, device=device)
        ref_tokenizer = tokenizer
    else:
        path = resolve_model_path(reg.reference)
        ref_tokenizer = load_tokenizer(path)
        check_tokenizers_agree(tokenizer, ref_tokenizer)
        model = load_model(path, dtype=cfg.student.dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelTeacher(model, ref_tokenizer, temperature=1.0, use_context=False)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tuple(sorted(set(int(i) for i in tokenizer.all_special_ids)))


def is_builtin_or_local(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX) or Path(name).expanduser().exists()
