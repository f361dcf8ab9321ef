"""Reading a run folder for the report: config, metrics, events, samples, run info, summary.

A run folder (written by :func:`opd.train.distill`) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (``train`` / ``eval`` / ``eval_teacher`` records), ``events.jsonl`` (detector
reports), ``samples.jsonl`` (completions with per-token log-ratios), ``run_info.json`` (parameter
counts, device, versions), ``summary.json`` (wall time, stop reason) and, after a recipe was applied,
``config.applied.yaml``. Only ``metrics.jsonl`` is required; whatever else is absent is reported
as missing by the checklist.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opd.report.run_info import read_json

__all__ = ["RunData", "load_run", "series"]


def _number(v: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings; read them back as floats."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append({k: _number(v) for k, v in json.loads(line).items()})
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err}); remove or fix that line") from None
    return out


def _config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from opd.config.load import ConfigError, config_to_dict, load_config

    try:  # the schema fills options an older run folder did not write
        return config_to_dict(load_config(path))
    except ConfigError:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None


@dataclass
class RunData:
    """Everything the report reads from one run folder."""

    path: Path
    config: dict[str, Any] | None
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    teacher_eval: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    applied_config: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted path (``route2.gamma``), or ``default``."""
        obj: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(obj, dict) or part not in obj:
                return default
            obj = obj[part]
        return obj

    def has(self, key: str) -> bool:
        """Whether any train record logged ``key`` with a finite value."""
        return any(isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) for r in self.train)


def load_run(path: str | Path) -> RunData:
    """Read a run folder; raises ``FileNotFoundError`` naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a folder; pass the run folder that `opd distill` wrote "
                                "(it holds config.yaml and metrics.jsonl)")
    records = _jsonl(p / "metrics.jsonl")
    if not (p / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{p / 'metrics.jsonl'} does not exist: is {p} an opd run folder?")
    teacher = [r for r in records if r.get("kind") == "eval_teacher"]
    return RunData(
        path=p, config=_config(p / "config.yaml"),
        train=[r for r in records if r.get("kind") == "train"],
        evals=[r for r in records if r.get("kind") == "eval"],
        teacher_eval=teacher[-1] if teacher else None,
        events=_jsonl(p / "events.jsonl"), samples=_jsonl(p / "samples.jsonl"),
        info=read_json(p / "run_info.json"), summary=read_json(p / "summary.json"),
        applied_config=_config(p / "config.applied.yaml"),
    )


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over ``records`` (records without a numeric value are skipped)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(float(r.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys
