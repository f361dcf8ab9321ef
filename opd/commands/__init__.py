"""The ``opd`` sub-commands, one module each.

A command module defines ``NAME`` (what the user types), ``HELP`` (one line for ``opd --help``),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). A module with
``RAW_ARGV = True`` parses its own arguments instead: ``run(argv: list[str])``.

Modules import nothing heavy at the top (no torch, no transformers): ``opd COMMAND --help`` and
configuration errors answer at once, and the heavy imports happen after the input was checked.
Adding a command: a new module here and its name in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Command modules in the order ``opd --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "distill", "doctor", "eval", "export", "methods", "config_help", "bias_lab", "sweep", "report", "make_checkpoints",
    "serve_teacher", "make_student",
)


def load_commands() -> list[ModuleType]:
    """The command modules, imported (cheap: see the module docstring)."""
    return [importlib.import_module(f"opd.commands.{name}") for name in COMMANDS]
