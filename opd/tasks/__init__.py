"""Built-in tasks: prompt sources with a held-out set and a verifier (see :mod:`opd.tasks.base`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opd.tasks.arith import ARITH_ALPHABET, ArithTask, arith_checkpoint, arith_tokenizer
from opd.tasks.base import Example, Task
from opd.tasks.cases import CASE_TASKS

__all__ = [
    "ARITH_ALPHABET",
    "TASKS",
    "ArithTask",
    "Example",
    "Task",
    "arith_checkpoint",
    "arith_tokenizer",
    "make_task",
]

def _arith_chat(**kwargs: Any) -> Task:
    # imported on use: the chat task reads conversations through opd.data, which imports this package
    from opd.tasks.arith_chat import ArithChatTask

    return ArithChatTask(**kwargs)


#: Built-in tasks by name (a class or a factory taking the constructor's keyword arguments).
TASKS: dict[str, Callable[..., Task]] = {"arith": ArithTask, "arith_chat": _arith_chat, **CASE_TASKS}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the built-in task ``name`` with keyword arguments for its constructor.

    Raises:
        ValueError: unknown task name (the message lists the built-in ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
