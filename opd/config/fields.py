"""Schema introspection and value conversion: the building blocks every config module uses.

* :func:`field_specs` — every option of :mod:`opd.config.schema` as a :class:`FieldSpec` (dotted
  path, type, default, documentation, choices, numeric bounds);
* :func:`coerce_value` — a raw (YAML / override) value converted to an option's type, or a
  ``TypeError`` saying what was expected;
* :class:`ConfigError` / :class:`Problem` — how problems are collected and reported.

This module imports only the schema, so loading, validation, presets and help text can all build
on it without importing each other in a circle.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from opd.config.schema import SECTIONS, Config

__all__ = [
    "ConfigError", "FieldSpec", "Problem", "coerce_value", "describe_value", "field_specs", "get_value",
    "range_text", "section_keys", "suggest",
]


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` holds one line per problem (each says how to fix it)."""

    def __init__(self, problems: Sequence[str], header: str = "invalid configuration") -> None:
        self.problems: list[str] = list(problems)
        n = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({n} problem{'' if n == 1 else 's'}):\n{body}")


@dataclass(frozen=True)
class Problem:
    """One problem: a message and the dotted keys it is about (to cite where their values came from)."""

    message: str
    keys: tuple[str, ...] = ()
    source: str | None = None  # where the offending entry came from, when it is not a stored value


# ---------------------------------------------------------------------------------------------
# schema introspection
@dataclass(frozen=True)
class FieldSpec:
    """One option of the schema: dotted ``path`` (``route2.gamma``; ``seed`` for top-level ones)."""

    path: str
    section: str | None
    name: str
    type: Any
    type_name: str
    default: Any
    doc: str
    choices: tuple[str, ...] | None
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool


def _specs_of(cls: type, section: str | None) -> list[FieldSpec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if section is None and f.name in SECTIONS:
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(FieldSpec(
            path=f.name if section is None else f"{section}.{f.name}", section=section, name=f.name,
            type=hints[f.name], type_name=str(f.type), default=default, doc=meta.get("doc", ""),
            choices=meta.get("choices"), low=meta.get("low"), high=meta.get("high"),
            low_open=bool(meta.get("low_open")), high_open=bool(meta.get("high_open")),
        ))
    return out


@functools.cache
def field_specs() -> dict[str, FieldSpec]:
    """Every option, top-level ones first, then the sections in pipeline (schema) order."""
    hints = typing.get_type_hints(Config)
    specs = _specs_of(Config, None)
    for section in SECTIONS:
        specs += _specs_of(hints[section], section)
    return {s.path: s for s in specs}


def section_keys(section: str) -> list[str]:
    """The option names of one section, in schema order."""
    return [s.name for s in field_specs().values() if s.section == section]


def get_value(cfg: Config, path: str) -> Any:
    """The value of a dotted option path in ``cfg``."""
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def suggest(word: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate to a misspelt ``word`` (difflib), or None."""
    hits = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------------------
# types
def _describe_type(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe_type(a) for a in inner) + " or null"
    if origin is list:
        return f"a list of {_describe_type(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a mapping of strings to strings" if args == (str, str) else "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def describe_value(value: Any) -> str:
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "an integer" if isinstance(value, int) else "a number" if isinstance(value, float) else
            "a string" if isinstance(value, str) else "a list" if isinstance(value, (list, tuple)) else
            "a mapping" if isinstance(value, Mapping) else type(value).__name__)
    return kind if value is None else f"{value!r} ({kind})"


def _parse_number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def coerce_value(value: Any, tp: Any) -> Any:
    """``value`` converted to the schema type ``tp``; raises ``TypeError`` saying what was expected.

    Accepted conversions: ``int`` → ``float``; a string holding a number → ``float`` (YAML 1.1
    reads ``1e-3`` as a string); an integral number or numeric string → ``int``; a tuple → list;
    numeric mapping keys → strings. A ``bool`` is never a number and a number never a ``bool``;
    ``None`` only where the type allows it; ``nan`` never.
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise TypeError(f"null is not allowed here (expected {_describe_type(tp)})")
        return coerce_value(value, inner[0])
    expected = f"expected {_describe_type(tp)}, got {describe_value(value)}"
    if value is None:
        raise TypeError(f"null is not allowed here ({expected})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(expected)
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(expected)
        number = _parse_number(value) if isinstance(value, str) else value
        if isinstance(number, (int, float)):
            if isinstance(number, float) and math.isnan(number):
                raise TypeError(f"nan is not allowed ({expected})")
            if tp is float:
                return float(number)
            if isinstance(number, int):
                return number
            if number.is_integer():
                return int(number)
        raise TypeError(expected)
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(expected + ("; quote it to keep it a string" if isinstance(value, (bool, int, float)) else ""))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(expected)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(coerce_value(item, args[0]))
            except TypeError as err:
                raise TypeError(f"item {i}: {err}") from None
        return out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TypeError(expected)
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if isinstance(key, bool) or not isinstance(key, (int, float)):
                    raise TypeError(f"key {key!r}: expected a string key")
                key = str(key)
            try:
                result[key] = coerce_value(item, args[1])
            except TypeError as err:
                raise TypeError(f"entry {key!r}: {err}") from None
        return result
    raise TypeError(f"unsupported schema type {tp!r} (a bug in opd/config/schema.py)")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def range_text(spec: FieldSpec) -> str:
    """The allowed range of a numeric option, e.g. ``in [0, 1]`` or ``> 0``; '' when unbounded."""
    if spec.low is not None and spec.high is not None:
        return f"in {'(' if spec.low_open else '['}{_num(spec.low)}, {_num(spec.high)}{')' if spec.high_open else ']'}"
    if spec.low is not None:
        return f"{'>' if spec.low_open else '≥'} {_num(spec.low)}"
    if spec.high is not None:
        return f"{'<' if spec.high_open else '≤'} {_num(spec.high)}"
    return ""
