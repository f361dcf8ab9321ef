"""Reading a run folder for the report: config, metrics, events, samples, run info, summary.

A run folder (written by :func:`opd.train.distill`) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (``train`` / ``eval`` / ``eval_teacher`` records), ``events.jsonl`` (detector
reports), ``samples.jsonl`` (held-out and training completions with verifier scores and per-token
log-ratios), ``run_info.json`` (parameter counts, the device and precision that ran, versions),
``warnings.json`` (the configuration warnings printed at start), ``summary.json`` (how the run
ended: ``status``, wall time, stop reason) and, after a recipe was applied, ``config.applied.yaml``.
Only ``metrics.jsonl`` is required; whatever else is absent is reported as missing. A torn *last*
line of a log (a run killed while writing it) is dropped and noted; damage elsewhere is an error.

Run status (:func:`run_status`): ``summary.json``'s ``status`` (``done``, ``stopped``,
``interrupted``, ``stopped by monitor``, ``failed``, ``no updates``); for older summaries it is
inferred from ``stop_reason`` / ``stopped_early`` / ``steps_done``; without ``summary.json`` the
run is ``unfinished`` (still running, or killed before it could write one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opd.report.run_info import read_json

__all__ = ["FINISHED", "RunData", "fault_note", "load_run", "run_status", "series"]


def _number(v: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings; read them back as floats."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _jsonl(path: Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if i == last:  # a run killed while writing its last line
                    if notes is not None:
                        notes.append(f"{path.name}: dropped a torn last line (line {i + 1}; the run was killed "
                                     "while writing it)")
                    break
                raise ValueError(f"{path}:{i + 1} is not valid JSON ({err}); remove or fix that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
            out.append({k: _number(v) for k, v in record.items()})
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
    warnings: list[str] | None = None  # warnings.json: None when the run folder has none
    notes: list[str] = field(default_factory=list)  # what reading the folder had to work around
    faults: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl "fault" records (failed sessions)

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
    if not (p / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{p / 'metrics.jsonl'} does not exist: is {p} an opd run folder?")
    notes: list[str] = []
    records = _jsonl(p / "metrics.jsonl", notes)
    teacher = [r for r in records if r.get("kind") == "eval_teacher"]
    return RunData(
        path=p, config=_config(p / "config.yaml"),
        train=[r for r in records if r.get("kind") == "train"],
        evals=[r for r in records if r.get("kind") == "eval"],
        teacher_eval=teacher[-1] if teacher else None,
        events=_jsonl(p / "events.jsonl", notes), samples=_jsonl(p / "samples.jsonl", notes),
        info=read_json(p / "run_info.json"), summary=read_json(p / "summary.json"),
        applied_config=_config(p / "config.applied.yaml"), warnings=_warnings(p / "warnings.json"),
        notes=notes, faults=[r for r in records if r.get("kind") == "fault"],
    )


def _warnings(path: Path) -> list[str] | None:
    data = read_json(path)
    if data is None:
        return None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of strings (the configuration warnings), "
                         f"got {type(data).__name__}")
    return [str(w) for w in data]


#: Statuses of a run that reached ``train.steps`` normally.
FINISHED = ("done",)


def run_status(run: RunData) -> tuple[str, str]:
    """``(status, explanation)``: how the run ended, and one sentence a reader needs about it
    (empty for ``done``)."""
    s = run.summary
    if s is None:
        last = run.train[-1]["step"] if run.train else 0
        return "unfinished", (f"no summary.json: the run is still going, or was killed before it finished "
                              f"(last logged step {last})")
    done, planned = s.get("steps_done"), s.get("steps", run.cfg("train.steps"))
    at = f"after step {done} of {planned}"
    status = s.get("status")
    if status is None:  # summaries written before opd recorded a status
        if s.get("stop_reason"):
            status = "stopped by monitor"
        elif s.get("stopped_early"):
            status = "stopped"
        elif isinstance(done, int) and isinstance(planned, int) and done < planned:
            status = "unfinished"
        else:
            status = "done"
    resume = f"; continue it with `{s['resume']}`" if s.get("resume") else ""
    why = {
        "done": "",
        "stopped": f"stopped {at} (train.stop_after){resume}",
        "interrupted": f"interrupted {at} (signal{': ' + str(s['signal']) if s.get('signal') else ''}){resume}",
        "stopped by monitor": f"stopped by a failure detector {at}: {s.get('stop_reason')}{resume}",
        "failed": f"failed {at}: {s.get('error') or 'no error recorded'}{resume}",
        "no updates": f"no update was made: every one of the {done} steps was skipped for NaN/Inf values, so the "
                      "weights are the initial ones",
        "unfinished": f"ended {at} without saying why",
    }.get(status, f"{status} {at}")
    return status, why


def fault_note(run: RunData) -> str:
    """One sentence on the failures that stopped earlier sessions of a run that was then resumed
    (empty when there were none): a finished run's numbers are then those of several sessions."""
    if not run.faults:
        return ""
    s = run.summary or {}
    # the fault of the session that wrote summary.json is already its status; name only the earlier ones
    earlier = run.faults[:-1] if s.get("status") == "failed" and s.get("error") == run.faults[-1].get("error") \
        else run.faults
    if not earlier:
        return ""
    said = "; ".join(f"at step {f.get('steps_done', f.get('step'))}: {f.get('error')}" for f in earlier)
    return (f"This run failed {len(earlier)} time{'s' if len(earlier) > 1 else ''} and was resumed from its last "
            f"checkpoint ({said})")


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over ``records`` (records without a numeric value are skipped)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(float(r.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys
