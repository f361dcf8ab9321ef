"""Where the shipped checkpoints lie: package data under ``opd/assets/<family>/<name>``.

Each built-in task names its checkpoints (``builtin:<family>/<name>``, resolved by
:func:`opd.model_paths.resolve_model_path`); the code that trains them is :mod:`opd.shipped`
(``opd make-checkpoints <family>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["ASSETS", "shipped_checkpoint"]

#: The package-data folder of the shipped checkpoints (one subfolder per family).
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def shipped_checkpoint(family: str, name: str, names: Sequence[str], *, make: str) -> Path:
    """The folder ``opd/assets/<family>/<name>`` of a shipped checkpoint; ``names`` are the family's
    checkpoints and ``make`` the command that regenerates them (quoted in the error).

    Raises:
        ValueError: ``name`` is not one of ``names``.
        FileNotFoundError: the folder holds no ``config.json`` (the checkpoint was not generated).
    """
    if name not in names:
        raise ValueError(f"unknown {family} checkpoint {name!r}; choose one of {list(names)}")
    path = ASSETS / family / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the checkpoint {family}/{name} is missing at {path}; regenerate it with `{make}`")
    return path
