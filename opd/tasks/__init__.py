"""Built-in tasks: prompt sources with a held-out set and a verifier (see :mod:`opd.tasks.base`).

The checkpoints shipped for them lie under ``opd/assets/`` (:mod:`opd.tasks.assets`); the code that
trains those is :mod:`opd.shipped`."""

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

#: Built-in generated tasks by name (a class or a factory taking the constructor's keyword arguments).
#: ``arith_chat`` is read through the user-data path: :class:`opd.data.ArithChatTask`.
TASKS: dict[str, Callable[..., Task]] = {"arith": ArithTask, **CASE_TASKS}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the built-in task ``name`` with keyword arguments for its constructor.

    Raises:
        ValueError: unknown task name (the message lists the built-in ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
