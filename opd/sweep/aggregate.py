"""Aggregating a sweep: final metrics and curves per cell, mean ± 95 % CI over seeds.

Final metrics of a run (all numbers, flattened): ``before/*``, ``after/*``, ``teacher/*`` and
``seconds`` from ``summary.json``; ``sample/*`` and ``greedy/share/*`` from ``sample_eval.json``;
``gain/accuracy = after/accuracy − before/accuracy``. Curves: ``eval/*`` records and the
``train`` records' ``teacher_kl`` and ``loss`` of ``metrics.jsonl``, averaged over seeds at the
steps every finished seed logged. Differences (each cell against its baseline, and the spec's
``pairs``) are paired by seed. A strategy share that a run's sampled evaluation never saw counts 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.sweep.execute import SAMPLE_EVAL, Run, run_finished
from opd.sweep.spec import Cell, SweepSpec
from opd.sweep.stats import Summary, paired_difference, summarize

__all__ = ["CURVE_KEYS", "CellResult", "Comparison", "DEFAULT_METRICS", "aggregate", "compare", "final_metrics",
           "read_curves", "results_dict", "table_metrics"]

#: Final metrics shown by default, in this order, when the runs logged them.
DEFAULT_METRICS: tuple[str, ...] = (
    "after/accuracy", "sample/accuracy", "gain/accuracy", "after/teacher_rkl", "after/mean_length",
    "after/truncation_rate",
)
#: Curves drawn with bands (eval records, then train records).
CURVE_KEYS: tuple[str, ...] = ("eval/accuracy", "eval/teacher_rkl", "teacher_kl", "loss")


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The final metrics of one run folder (see the module docstring)."""
    out: dict[str, float] = {}
    summary = _read(run_dir / "summary.json")
    for part in ("before", "after", "teacher"):
        for k, v in (summary.get(part) or {}).items():
            if (x := _number(v)) is not None:
                out[k] = x
    if (x := _number(summary.get("seconds"))) is not None:
        out["seconds"] = x
    for k, v in _read(run_dir / SAMPLE_EVAL).items():
        if "/" in k and (x := _number(v)) is not None:
            out[k] = x
    if "after/accuracy" in out and "before/accuracy" in out:
        out["gain/accuracy"] = out["after/accuracy"] - out["before/accuracy"]
    return out


def read_curves(run_dir: Path, keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` from ``metrics.jsonl`` (eval keys from eval records, others from train)."""
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        kind = rec.get("kind")
        for k in keys:
            if (kind == "eval") == k.startswith("eval/") and kind in ("eval", "train"):
                x = _number(rec.get(k))
                if x is not None and math.isfinite(x):
                    out[k].append((int(rec.get("step", 0)), x))
    return out


@dataclass
class CellResult:
    """One cell's finished runs: per-seed final metrics and curves, their summaries."""

    cell: Cell
    finals: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> metric -> value
    curves: dict[int, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.finals)

    def values(self, metric: str) -> dict[int, float]:
        share = metric.startswith(("sample/share/", "greedy/share/"))
        return {s: m.get(metric, 0.0) for s, m in self.finals.items()
                if metric in m or (share and "sample/accuracy" in m)}

    def summary(self, metric: str) -> Summary:
        return summarize(self.values(metric).values())

    def metrics(self) -> list[str]:
        return sorted({k for m in self.finals.values() for k in m})

    def curve(self, key: str) -> list[tuple[int, Summary]]:
        """``[(step, summary over seeds)]`` at the steps every seed logged."""
        per_seed = [dict(c.get(key, [])) for c in self.curves.values()]
        if not per_seed or not all(per_seed):
            return []
        steps = sorted(set.intersection(*(set(p) for p in per_seed)))
        return [(s, summarize(p[s] for p in per_seed)) for s in steps]


def table_metrics(spec: SweepSpec, cells: list[CellResult]) -> list[str]:
    """The spec's ``metrics`` (those the runs logged); without them, the default ones and the strategy
    shares. (``sweep_results.json`` holds every metric.)"""
    logged = {m for c in cells for m in c.metrics()}
    if spec.metrics:
        return [m for m in spec.metrics if m in logged]
    out = [m for m in DEFAULT_METRICS if m in logged]
    return out + sorted(m for m in logged if m.startswith(("sample/share/", "greedy/share/")))


@dataclass(frozen=True)
class Comparison:
    """``cell − other``, paired by seed, for every metric both logged."""

    cell: str
    other: str
    diffs: dict[str, Summary]


def aggregate(spec: SweepSpec, runs: list[Run]) -> list[CellResult]:
    """Read every finished run of ``runs`` into one :class:`CellResult` per cell (spec order)."""
    by_cell = {c.name: CellResult(c) for c in spec.cells}
    for run in runs:
        if not run_finished(run):
            continue
        result = by_cell[run.cell.name]
        result.finals[run.seed] = final_metrics(run.run_dir)
        result.curves[run.seed] = read_curves(run.run_dir)
    return list(by_cell.values())


def compare(spec: SweepSpec, cells: list[CellResult]) -> list[Comparison]:
    """The spec's comparisons (:meth:`SweepSpec.comparisons`) over the aggregated cells."""
    by_name = {c.cell.name: c for c in cells}
    out = []
    for name, other in spec.comparisons():
        a, b = by_name[name], by_name[other]
        diffs = {}
        for metric in sorted(set(a.metrics()) | set(b.metrics())):
            d = paired_difference(a.values(metric), b.values(metric))
            if d.n:
                diffs[metric] = d
        out.append(Comparison(name, other, diffs))
    return out


def results_dict(spec: SweepSpec, cells: list[CellResult]) -> dict[str, Any]:
    """Everything the aggregate shows, as JSON-ready data (``sweep_results.json``)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean({
        "spec": spec.as_dict(),
        "cells": [{
            "name": c.cell.name, "overrides": c.cell.override_args(), "seeds": c.seeds,
            "final": {m: {"values": {str(s): v for s, v in c.values(m).items()}, **c.summary(m).as_dict()}
                      for m in c.metrics()},
            "curves": {k: [{"step": s, **summ.as_dict()} for s, summ in c.curve(k)] for k in CURVE_KEYS},
        } for c in cells],
        "differences": [{"cell": d.cell, "minus": d.other, "paired_by_seed": {m: x.as_dict() for m, x in d.diffs.items()}}
                        for d in compare(spec, cells)],
    })
