"""Factories: each builds *one* component from a resolved config — the task, the student, the teacher
(with its score cache), the reference.

Everything here is construction; nothing trains, and nothing here wires components together (that
is :mod:`opd.assemble`). Model names go through :func:`opd.model_paths.resolve_model_path` (a local
folder, a hub id, or ``builtin:<task>/<name>`` for a checkpoint shipped with opd).
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.config.schema import Config
from opd.lora import LoraSettings, apply_lora
from opd.model_paths import is_server_url, resolve_model_path
from opd.models import load_model, load_model_config, load_tokenizer
from opd.rollout import lm_head_vocab_size
from opd.tasks.base import Task
from opd.teachers import CrossTokenizerTeacher, ModelTeacher, RoutedTeacher, SelfTeacher, Teacher
from opd.teachers.wrong_hint import WrongHintTeacher
from opd.tokenization import check_tokenizers_agree

__all__ = ["build_reference", "build_student", "build_task", "build_teacher", "cached_teacher", "served_teacher",
           "special_token_ids"]

def build_task(cfg: Config, *, eos_token: str | None = None, eval_only: bool = False) -> Task:
    """The prompt source and verifier named by ``cfg.data``.

    ``eos_token`` is the student's EOS string: completions are decoded with special tokens
    kept, and user-data verifiers cut the completion there. ``eval_only`` (``opd eval --prompts``,
    ``data.task=jsonl`` only): every record of ``data.path`` is held out, the first ``eval.size``
    when set; there are no training prompts.
    """
    d = cfg.data
    if d.task == "arith":
        from opd.tasks.arith import ArithTask

        return ArithTask(digits=d.digits, reverse_operands=d.reverse_operands,
                         eval_size=cfg.eval.size or 500, seed=d.eval_seed,
                         **({"eos_token": eos_token} if eos_token else {}))
    if d.task in ("fork", "route", "modes", "long", "reach"):
        from opd.tasks.cases import make_case_task

        return make_case_task(d.task, length=d.length, eval_size=cfg.eval.size or 500, seed=d.eval_seed,
                              **({"eos_token": eos_token} if eos_token else {}))
    chat = None
    if d.task == "arith_chat" or d.format == "chat":
        # conversations are rendered with the student's chat template, and a conversation that does not
        # fit the student's context with room for the completion is refused here, naming its row
        from opd.chat import ChatFormat, require_chat_template

        student_path = resolve_model_path(cfg.student.model)
        tokenizer = load_tokenizer(resolve_model_path(cfg.student.tokenizer) if cfg.student.tokenizer else student_path)
        require_chat_template(tokenizer)
        window = getattr(load_model_config(student_path), "max_position_embeddings", None)
        budget = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
        chat = ChatFormat(tokenizer=tokenizer, messages_field=d.messages_field, train_turns=d.train_turns,  # type: ignore[arg-type]
                          system_prompt=cfg.teacher.system_prompt, context_window=window,
                          max_prompt_tokens=None if window is None else window - budget)
    if d.task == "arith_chat":
        from opd.data import ArithChatTask

        return ArithChatTask(chat.tokenizer, train_turns=d.train_turns, eval_size=cfg.eval.size or 500,  # type: ignore[union-attr]
                             seed=d.eval_seed, system_prompt=cfg.teacher.system_prompt,
                             max_prompt_tokens=chat.max_prompt_tokens, context_window=chat.context_window,  # type: ignore[union-attr]
                             eos_token=eos_token)
    from opd.data import HFDatasetTask, JsonlTask, RecordLayout

    layout = RecordLayout(prompt_field=d.prompt_field, answer_field=d.answer_field, context_field=d.context_field,
                          route_field=d.route_field, chat=chat, system_prompt=cfg.teacher.system_prompt)
    common = dict(layout=layout, verifier=d.verifier, eval_path=d.eval_path, eval_size=cfg.eval.size,
                  seed=d.eval_seed, eos_token=eos_token)
    if d.path is None:
        raise ValueError(f"data.task={d.task} needs data.path (a JSONL file or a dataset id)")
    if d.task == "jsonl":
        return JsonlTask(d.path, **common, eval_only=eval_only)
    if eval_only:
        raise ValueError(f"an evaluation-only set must be a JSONL file (data.task=jsonl), got data.task={d.task}")
    return HFDatasetTask(d.path, split=d.split, eval_split=d.eval_split, **common)


def build_student(cfg: Config, device: torch.device | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student and its tokenizer; with ``student.lora_rank > 0`` the model carries LoRA adapters
    (:func:`opd.lora.apply_lora`: base weights frozen, only the adapter trains)."""
    path = resolve_model_path(cfg.student.model)
    tokenizer = load_tokenizer(resolve_model_path(cfg.student.tokenizer) if cfg.student.tokenizer else path)
    model = load_model(path, dtype=cfg.student.dtype, device=device)
    lora = LoraSettings.from_student_config(cfg.student)
    if lora is not None:
        apply_lora(model, lora)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the student tokenizer ({path}) has no pad token; batched rollouts need one. "
            "Set tokenizer.pad_token (any token, the EOS included: completion masks come from the stop position, "
            "not from pad ids) and save it with the model."
        )
    return model, tokenizer


def served_teacher(cfg: Config, url: str, student: PreTrainedModel, student_tokenizer: PreTrainedTokenizerBase):
    """A :class:`~opd.teachers.served.ServedTeacher` at ``url`` speaking ``teacher.protocol``."""
    from opd.rollout import lm_head_vocab_size
    from opd.serve.client import ServiceClient
    from opd.teachers.served import ServedTeacher
    from opd.teachers.served_backends import OPDBackend, VLLMBackend

    t = cfg.teacher
    client = ServiceClient(url, role="teacher server", timeout=t.server_timeout, retries=t.server_retries)
    vocab = lm_head_vocab_size(student)
    if t.protocol == "vllm":
        backend = VLLMBackend(client, student_tokenizer, vocab_size=vocab, temperature=t.temperature,
                              check_tokenizer=t.check_tokenizer)
    elif t.payload == "hidden":  # hidden states on the wire, the head held here
        from opd.teachers.hidden_head import HiddenBackend

        backend = HiddenBackend(client, student_tokenizer, temperature=t.temperature, dtype=t.server_dtype,
                                check_tokenizer=t.check_tokenizer, vocab_size=vocab)
    else:
        backend = OPDBackend(client, student_tokenizer, temperature=t.temperature, dtype=t.server_dtype,
                             check_tokenizer=t.check_tokenizer, vocab_size=vocab)
    # reach the server now: a server that is down or disagrees (protocol, vocabulary, tokenizer) stops the
    # run before anything is written, with one line naming it
    backend.check()
    teacher = ServedTeacher(backend, student_tokenizer, vocab_size=vocab,
                            use_context=t.use_context or t.system_prompt is not None,
                            context_template=t.context_template)
    # and the feedback the training needs, so that a server capped below it (vLLM --max-logprobs) stops the
    # run here, naming the flag, instead of at the first step (the held-out evaluation asks only what it gets)
    from opd.config.validate import resolve_teacher_access

    teacher.check_access(resolve_teacher_access(cfg), t.topk, why="training")  # type: ignore[arg-type]
    return teacher


def _model_teacher(cfg: Config, name: str, student_tokenizer: PreTrainedTokenizerBase,
                   device: torch.device | str, student: PreTrainedModel | None = None) -> Teacher:
    if is_server_url(name) and student is not None:
        return served_teacher(cfg, name, student, student_tokenizer)
    # a teacher model scores the student's token ids (teacher.tokenizer=same, after the tokenizer check) or
    # the student's text through its own tokenizer (own); the check's findings (what differs, and whether
    # opd aligns or refuses it) are printed
    t = cfg.teacher
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    if t.check_tokenizer or t.tokenizer == "own":
        chat = cfg.data.format == "chat" or cfg.data.task == "arith_chat"
        comparison = check_tokenizers_agree(student_tokenizer, tokenizer, teacher_tokenizer=t.tokenizer, chat=chat,
                                            teacher_name=name)
        if os.environ.get("RANK", "0") == "0":
            for line in comparison.report():
                print(f"opd preflight: teacher {name}: {line}", file=sys.stderr)
    model = load_model(path, dtype=t.dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    if t.tokenizer == "own":
        return CrossTokenizerTeacher(model, tokenizer, student_tokenizer,
                                     student_vocab_size=None if student is None else lm_head_vocab_size(student),
                                     temperature=t.temperature, use_context=t.use_context,
                                     context_template=t.context_template, unmapped_topk=t.topk)
    return ModelTeacher(model, tokenizer, temperature=t.temperature, use_context=t.use_context,
                        context_template=t.context_template)


def build_teacher(cfg: Config, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  device: torch.device | str) -> Teacher:
    """The teacher named by ``cfg.teacher``: a model, a server (``teacher.server``, or route values that are
    URLs: :func:`served_teacher`), the student itself (self-teacher), or routed."""
    t = cfg.teacher
    teacher: Teacher
    if t.model == "self":
        teacher = SelfTeacher(student, tokenizer, mode=t.self_mode, temperature=t.temperature,
                              use_context=t.use_context, context_template=t.context_template)
    else:
        # teacher.server: the default teacher is reached over HTTP; a route whose value is a URL too
        teacher = _model_teacher(cfg, t.server or t.model, tokenizer, device, student)
        if t.routes:
            routes = {value: _model_teacher(cfg, name, tokenizer, device, student) for value, name in t.routes.items()}
            teacher = RoutedTeacher(routes, default=teacher, field=cfg.data.route_field)
    return cached_teacher(cfg, teacher)


def cached_teacher(cfg: Config, teacher: Teacher) -> Teacher:
    """``teacher`` behind the score cache that ``cfg.teacher.cache`` asks for (unchanged for ``none``)."""
    t = cfg.teacher
    if t.cache == "none":
        return teacher
    from opd.teachers.cache import CachedTeacher, DiskFeedbackStore, FeedbackStore

    if t.cache == "memory":
        return CachedTeacher(teacher, FeedbackStore(t.store_dtype))
    if not t.cache_dir:
        raise ValueError("teacher.cache=disk needs teacher.cache_dir (the folder that holds the cache)")
    signature = {"model": t.model, "self_mode": t.self_mode if t.model == "self" else None,
                 "student": cfg.student.model if t.model == "self" else None, "routes": dict(t.routes),
                 "temperature": t.temperature, "dtype": t.dtype, "use_context": t.use_context,
                 "context_template": t.context_template}
    if t.server:  # a served teacher is named by its URL and protocol (only then: older caches keep their signature)
        signature.update(server=t.server, protocol=t.protocol)
    return CachedTeacher(teacher, DiskFeedbackStore(t.cache_dir, t.store_dtype, signature=signature))


def build_reference(cfg: Config, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    device: torch.device | str) -> Teacher | None:
    """The reference policy of the KL regularizer and of G-OPD, when the config uses one.

    ``initial`` is a frozen copy of the starting student, loaded again from
    ``cfg.student.model`` so that a resumed run gets the same reference.
    """
    reg, r2 = cfg.regularization, cfg.route2
    contrastive = r2.coef > 0 and r2.reward == "contrastive"  # RLCSD: the reference reads a wrong hint
    needed = reg.ref_kl_coef > 0 or (r2.coef > 0 and r2.reward == "extrapolated") or contrastive
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
    if contrastive:
        return WrongHintTeacher(ModelTeacher(model, ref_tokenizer, temperature=cfg.teacher.temperature,
                                             use_context=True, context_template=cfg.teacher.context_template))
    return ModelTeacher(model, ref_tokenizer, temperature=1.0, use_context=False)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tuple(sorted(set(int(i) for i in tokenizer.all_special_ids)))
