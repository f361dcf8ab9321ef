"""A sweep specification: cells (override sets) × seeds, from one YAML file and/or the command line.

A spec file (every key optional except that there must be at least one cell)::

    name: fork-credit              # default: the file's stem
    config: base.yaml              # an `opd distill` config file every run starts from
    base:                          # overrides for every run (a mapping or a list of "key=value")
      student.model: builtin:fork/student
      train.steps: 200
    grid:                          # the cartesian product of these axes ...
      route2.credit: [immediate, return_to_go]
      train.lr: [1e-4, 3e-4]
    cells:                         # ... and/or explicit cells, each a name and its overrides
      - name: sft
        set: {method: sft-teacher}
    seeds: 5                       # an int n (seeds 0 … n−1) or a list
    baseline: {method: sft-teacher}   # differences against a partner cell (see below)
    pairs: [[gae, sft]]            # more differences: [cell, minus this cell]
    metrics: [after/accuracy]      # final metrics shown first in the tables
    sample_eval: 4                 # sampled evaluation: completions per held-out prompt (0 = off)
    jobs: 2                        # parallel runs (default: the number of cores)

A grid cell is named by its values, ``credit=immediate,lr=0.0003`` (the last part of each key).
``baseline``: a cell name, or ``{axis: value}`` — every cell is compared with the cell that has
that value on that axis and the same values on the other axes (e.g. OPD − SFT at each length).
``pairs`` adds explicit comparisons ``[cell, other]`` (the difference ``cell − other``). A value
``null`` on the ``method`` axis means "no preset" (the defaults).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opd.config.load import read_yaml, yaml_where

__all__ = ["Cell", "SpecError", "SweepSpec", "format_value", "load_spec", "parse_grid_arg", "parse_seeds",
           "spec_from_mapping"]

_KEYS = ("name", "config", "base", "grid", "cells", "seeds", "baseline", "pairs", "metrics", "sample_eval", "jobs")


class SpecError(ValueError):
    """A sweep specification that cannot be used (the message says what and how to fix it)."""


def format_value(value: Any) -> str:
    """A YAML value as the text of a ``key=value`` override (``None`` → ``null``, lists in flow style)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True).strip()


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a name and the overrides it adds to the base (``(key, value)`` pairs,
    values as override text); ``axes`` holds the grid values it was made from (empty for listed cells)."""

    name: str
    overrides: tuple[tuple[str, str], ...]
    axes: tuple[tuple[str, str], ...] = ()

    @property
    def slug(self) -> str:
        """The cell's folder name: its name with every character outside ``[A-Za-z0-9._=,+-]`` replaced."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name) or "cell"

    def override_args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides]


@dataclass
class SweepSpec:
    """A resolved sweep: every cell, the seeds, and how to run and compare them."""

    name: str
    cells: list[Cell]
    seeds: list[int]
    config: str | None = None
    base: list[str] = field(default_factory=list)
    baseline: str | dict[str, str] | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    sample_eval: int = 0
    jobs: int | None = None

    def baseline_of(self, cell: Cell) -> Cell | None:
        """The cell ``cell`` is compared with (None: no baseline, or ``cell`` is its own baseline)."""
        if self.baseline is None:
            return None
        if isinstance(self.baseline, str):
            partner = next((c for c in self.cells if c.name == self.baseline), None)
        else:
            (axis, value), = self.baseline.items()
            axes = dict(cell.axes)
            if axis not in axes:
                return None
            want = {**axes, axis: value}
            partner = next((c for c in self.cells if dict(c.axes) == want), None)
        return None if partner is None or partner.name == cell.name else partner

    def comparisons(self) -> list[tuple[str, str]]:
        """Every ``(cell, other)`` difference to report: each cell against its baseline, then ``pairs``."""
        out = [(c.name, b.name) for c in self.cells if (b := self.baseline_of(c)) is not None]
        return out + [p for p in self.pairs if p not in out]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "base": list(self.base), "seeds": list(self.seeds),
                "cells": [{"name": c.name, "overrides": c.override_args(), "axes": dict(c.axes)} for c in self.cells],
                "baseline": self.baseline, "pairs": [list(p) for p in self.pairs], "metrics": list(self.metrics),
                "sample_eval": self.sample_eval}


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _overrides(value: Any, what: str) -> list[tuple[str, str]]:
    """A mapping ``{key: value}`` or a list of ``"key=value"`` strings as ``(key, text)`` pairs."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(str(k), format_value(v)) for k, v in value.items()]
    if isinstance(value, Sequence) and not isinstance(value, str):
        out = []
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise SpecError(f"{what}: {item!r} is not a key=value override (e.g. train.lr=3e-4)")
            k, _, v = item.partition("=")
            out.append((k.strip(), v.strip()))
        return out
    raise SpecError(f"{what} must be a mapping {{key: value}} or a list of key=value strings, got {value!r}")


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """``"train.lr=1e-4,3e-4"`` → ``("train.lr", ["1e-4", "3e-4"])`` (a command-line grid axis)."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise SpecError(f"--grid {text!r}: write an axis as key=value1,value2 (e.g. --grid route2.credit=immediate,gae)")
    return key.strip(), [v.strip() for v in values.split(",")]


def parse_seeds(value: Any) -> list[int]:
    if isinstance(value, bool):
        raise SpecError(f"seeds must be an integer n (seeds 0 … n−1) or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SpecError(f"seeds is a count of seeds and must be at least 1, got {value}, which runs nothing"
                            + ("; for the seed 0 alone write a list: seeds: [0] in a spec, --seeds 0, on the command "
                               "line" if value == 0 else ""))
        return list(range(value))
    if isinstance(value, str):
        try:
            parts = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise SpecError(f"seeds {value!r}: write a count (5) or a comma-separated list (0,1,2)") from None
        if len(parts) == 1 and "," not in value:  # a count: `--seeds 0` would run nothing
            return parse_seeds(parts[0])
        return parse_seeds(parts)  # a list: `--seeds ,` is empty, `--seeds 1,1` has a duplicate
    if isinstance(value, Sequence) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise SpecError(f"seeds {list(value)} has duplicates")
        return list(value)
    raise SpecError(f"seeds must be an integer n (seeds 0 … n−1) or a list of integers, got {value!r}")


def spec_from_mapping(data: Mapping[str, Any], *, default_name: str = "sweep",
                      extra_grid: Sequence[tuple[str, list[str]]] = ()) -> SweepSpec:
    """Build a :class:`SweepSpec` from a parsed spec (``extra_grid``: axes from the command line).

    Raises:
        SpecError: an unknown key, a malformed value, no cell at all, duplicate cell names or a
            baseline that names no cell / no axis.
    """
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise SpecError(f"unknown sweep key(s) {unknown}; a sweep spec may hold {', '.join(_KEYS)} "
                        "(an `opd distill` config goes under `config:` or --config)")
    grid_raw = data.get("grid") or {}
    if not isinstance(grid_raw, Mapping):
        raise SpecError(f"grid must be a mapping {{axis: [values]}}, got {grid_raw!r}")
    axes: list[tuple[str, list[str]]] = []
    for key, values in grid_raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError(f"grid axis {key!r} has no values")
        axes.append((str(key), [format_value(v) for v in values]))
    axes += [(k, list(v)) for k, v in extra_grid]
    if len({k for k, _ in axes}) != len(axes):
        raise SpecError(f"a grid axis is given twice: {[k for k, _ in axes]}")
    cells: list[Cell] = []
    if axes:
        for combo in itertools.product(*[v for _, v in axes]):
            pairs = tuple((k, v) for (k, _), v in zip(axes, combo, strict=True))
            name = ",".join(f"{_short(k)}={v}" for k, v in pairs)
            cells.append(Cell(name=name, overrides=tuple((k, v) for k, v in pairs if not (k == "method" and v == "null")),
                              axes=pairs))
    for i, item in enumerate(data.get("cells") or []):
        if not isinstance(item, Mapping) or "name" not in item:
            raise SpecError(f"cells[{i}] must be a mapping with a name and its overrides under `set`, got {item!r}")
        extra = set(item) - {"name", "set"}
        if extra:
            raise SpecError(f"cells[{i}] ({item['name']}): unknown key(s) {sorted(extra)}; use name and set")
        cells.append(Cell(name=str(item["name"]), overrides=tuple(_overrides(item.get("set"), f"cells[{i}].set"))))
    if not cells:
        raise SpecError("the sweep has no cells: give a grid (grid: {axis: [values]} or --grid key=v1,v2) or cells")
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"duplicate cell name(s) {dupes}; give every cell its own name")
    if len({c.slug for c in cells}) != len(cells):
        raise SpecError("two cells map to the same folder name; rename them (letters, digits and ._=,+- are kept)")
    baseline = data.get("baseline")
    if baseline is not None:
        if isinstance(baseline, Mapping):
            if len(baseline) != 1:
                raise SpecError(f"baseline {dict(baseline)!r}: name one axis and its value, e.g. {{method: sft-teacher}}")
            (axis, value), = baseline.items()
            baseline = {str(axis): format_value(value)}
            if not any(dict(c.axes).get(str(axis)) == baseline[str(axis)] for c in cells):
                raise SpecError(f"baseline {axis}={baseline[str(axis)]}: no cell has that value on that axis")
        elif str(baseline) not in names:
            raise SpecError(f"baseline {baseline!r} is not a cell; the cells are {names}")
        else:
            baseline = str(baseline)
    pairs = []
    for item in data.get("pairs") or []:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
                and all(str(x) in names for x in item) and item[0] != item[1]):
            raise SpecError(f"pairs: {item!r} must be [cell, other cell] with two different cells of {names}")
        pairs.append((str(item[0]), str(item[1])))
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise SpecError(f"metrics must be a list of metric names (e.g. [after/accuracy]), got {metrics!r}")
    sample_eval = data.get("sample_eval", 0) or 0
    if not isinstance(sample_eval, int) or isinstance(sample_eval, bool) or sample_eval < 0:
        raise SpecError(f"sample_eval must be an integer >= 0 (completions per held-out prompt), got {sample_eval!r}")
    jobs = data.get("jobs")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise SpecError(f"jobs must be a positive integer, got {jobs!r}")
    config = data.get("config")
    return SweepSpec(
        name=str(data.get("name") or default_name), cells=cells, seeds=parse_seeds(data.get("seeds", 1)),
        config=None if config is None else str(config),
        base=[f"{k}={v}" for k, v in _overrides(data.get("base"), "base")],
        baseline=baseline, pairs=pairs, metrics=list(metrics), sample_eval=sample_eval, jobs=jobs,
    )


def load_spec(path: str | Path | None, *, extra_grid: Sequence[tuple[str, list[str]]] = ()) -> SweepSpec:
    """Read a spec file (None: an empty spec, for a grid given only with ``--grid``).

    A relative ``config:`` path is resolved against the spec file's folder.
    """
    if path is None:
        return spec_from_mapping({}, extra_grid=extra_grid)
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"sweep spec {p} does not exist")
    try:
        data = read_yaml(p.read_text(encoding="utf-8"), yaml12=False) or {}
    except yaml.YAMLError as err:  # a duplicate key included: it is refused, never silently the last value
        raise SpecError(f"{p} is not valid YAML{yaml_where(err)}") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"{p} must hold a mapping of sweep keys ({', '.join(_KEYS)})")
    spec = spec_from_mapping(data, default_name=p.stem, extra_grid=extra_grid)
    if spec.config is not None and not Path(spec.config).is_absolute():
        spec.config = str((p.parent / spec.config).resolve())
    return spec
