"""Checks of the serving options (``rollout.engine=vllm`` / ``rollout.server``, ``teacher.server`` and
``teacher.protocol``; docs/serving.md), called by :mod:`opd.config.validate`."""

from __future__ import annotations

from opd.config.fields import Problem
from opd.config.schema import Config

__all__ = ["served_student_topk", "serving_problems", "teacher_is_served"]


def teacher_is_served(cfg: Config) -> bool:
    """The default teacher is reached over HTTP (``teacher.server``, or a URL as ``teacher.model``)."""
    return bool(cfg.teacher.server) or cfg.teacher.model.startswith(("http://", "https://"))


def served_student_topk(cfg: Config, *, support_used: bool) -> bool:
    """``support.kind=student_topk`` (read by the objective: ``support_used``) with a teacher server of
    protocol ``opd``, no routes and ``teacher.access`` not ``full``: the server scores the student's top-k
    ids chosen when the rollouts are scored (opd.teachers.student_support), so this support needs no full
    teacher logits."""
    t = cfg.teacher
    return (support_used and cfg.support.kind == "student_topk" and teacher_is_served(cfg)
            and t.protocol == "opd" and not t.routes and t.access != "full" and t.payload != "hidden")


def serving_problems(cfg: Config, *, support_used: bool) -> list[Problem]:
    """rollout.engine=vllm / rollout.server and teacher servers; ``support_used``: a route-1 term or a
    closed-form value reads the teacher's distribution on ``support.kind``."""
    r, t = cfg.rollout, cfg.teacher
    P: list[Problem] = []
    if r.server and r.engine != "vllm":
        P.append(Problem(f"rollout.server={r.server!r} is a vLLM server that samples the rollouts, but "
                         f"rollout.engine={r.engine}; set rollout.engine=vllm (or unset rollout.server)",
                         ("rollout.server", "rollout.engine")))
    for key, url in (("rollout.server", r.server), ("teacher.server", t.server)):
        if url and not url.startswith(("http://", "https://")):
            P.append(Problem(f"{key}={url!r} is not a URL; write it as http://HOST:PORT", (key,)))
    if r.engine == "vllm" and cfg.student.lora_rank > 0:
        P.append(Problem("rollout.engine=vllm pushes the student's full weights to vLLM, which does not take peft "
                         "LoRA adapters from opd yet; use rollout.engine=hf with student.lora_rank > 0",
                         ("rollout.engine", "student.lora_rank")))
    if t.payload == "hidden" and t.protocol != "opd":
        P.append(Problem("teacher.payload=hidden needs teacher.protocol=opd (opd serve-teacher sends hidden states; "
                         "vLLM's server does not)", ("teacher.payload", "teacher.protocol")))
    if t.server_dtype == "bfloat16" and t.payload != "hidden":
        P.append(Problem("teacher.server_dtype=bfloat16 is for hidden states (teacher.payload=hidden); log-probs "
                         "travel as float32 or float16", ("teacher.server_dtype", "teacher.payload")))
    if not teacher_is_served(cfg):
        return P
    if t.server and t.model == "self":
        P.append(Problem("teacher.server replaces the teacher model by a server, but teacher.model=self is the "
                         "student; unset teacher.server or name the teacher model", ("teacher.server", "teacher.model")))
    if r.teacher_mix > 0 or (r.on_policy_fraction < 1 and r.off_policy_source == "teacher"):
        P.append(Problem("sampling from the teacher (rollout.teacher_mix > 0, or off-policy teacher samples) needs an "
                         "in-process teacher model, but the teacher is a server (teacher.server); set "
                         "rollout.teacher_mix=0 and rollout.off_policy_source=answer, or load the teacher in process",
                         ("teacher.server", "rollout.teacher_mix", "rollout.off_policy_source")))
    if support_used and cfg.support.kind == "student_topk" and t.protocol == "vllm" and t.access != "full":
        P.append(Problem("support.kind=student_topk needs the teacher's log-probs at the student's top-k ids, which "
                         "a vLLM teacher server cannot score (it returns only its own top-k); use teacher.protocol=opd "
                         "(opd serve-teacher scores them), support.kind=teacher_topk, or teacher.access=full (all V "
                         "log-probs per token)", ("support.kind", "teacher.protocol")))
    if served_student_topk(cfg, support_used=support_used) and r.overlap and r.engine == "vllm":
        P.append(Problem("support.kind=student_topk with a teacher server and rollout.overlap=true takes the student's "
                         "top-k from the sampler's copy of the weights, which rollout.engine=vllm lacks; set "
                         "rollout.overlap=false or rollout.engine=hf", ("support.kind", "rollout.overlap")))
    if t.tokenizer == "own":
        P.append(Problem("teacher.tokenizer=own is not available with a teacher server: a served teacher reads the "
                         "student's token ids; set teacher.tokenizer=same", ("teacher.tokenizer", "teacher.server")))
    return P
