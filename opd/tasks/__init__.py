"""Built-in tasks: prompt sources with a held-out set and a verifier (see :mod:`opd.tasks.base`)."""

from __future__ import annotations

from typing import Any

from opd.tasks.arith import ARITH_ALPHABET, ArithTask, arith_checkpoint, arith_tokenizer
from opd.tasks.base import Example, Task

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

#: Built-in tasks by name.
TASKS: dict[str, type] = {"arith": ArithTask}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the built-in task ``name`` with keyword arguments for its constructor.

    Raises:
        ValueError: unknown task name (the message lists the built-in ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
