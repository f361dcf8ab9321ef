"""The runs-at-a-glance table (one row per run) and the config options that differ between runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from opd.report.load import FINISHED, RunData, run_status, series

__all__ = ["SUMMARY_COLUMNS", "config_differences", "legacy_teacher_kl", "summary_rows", "teacher_kl_cell"]

SUMMARY_COLUMNS: tuple[str, ...] = (
    "run", "method", "status", "steps", "wall time", "accuracy before", "accuracy after", "teacher accuracy",
    "teacher_kl (last 10)", "off-policy log π_S − log π_T (last 10)", "eval RKL after", "events",
)


def _tail_mean(run: RunData, key: str, n: int = 10) -> float | None:
    ys = [y for y in series(run.train, key)[1] if math.isfinite(y)][-n:]
    return sum(ys) / len(ys) if ys else None


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def legacy_teacher_kl(run: RunData) -> bool:
    """True when the run's ``teacher_kl`` includes off-policy rows: logs written before opd split
    ``offpolicy_logratio`` out, by a run that trained on teacher samples or dataset answers."""
    return not run.has("offpolicy_logratio") and (run.cfg("rollout.on_policy_fraction", 1.0) or 0.0) < 1.0


def teacher_kl_cell(run: RunData) -> str:
    """teacher_kl (mean of the last 10 logged steps) labelled for what it measured."""
    value = _tail_mean(run, "teacher_kl")
    if value is None:
        return "– (no student samples)" if run.has("offpolicy_logratio") else "–"
    if legacy_teacher_kl(run):
        return f"{value:.4f} (incl. off-policy rows: log π_S − log π_T, not a KL)"
    return f"{value:.4f}"


def summary_rows(runs: Sequence[RunData]) -> list[list[str]]:
    """One row of :data:`SUMMARY_COLUMNS` per run. A run that did not finish says so in ``status``,
    and its "accuracy after" names the step of its last evaluation."""
    rows = []
    for run in runs:
        s = run.summary or {}
        status, _ = run_status(run)
        evals = [r for r in run.evals if isinstance(r.get("eval/accuracy"), (int, float))]
        first, last = (evals[0], evals[-1]) if evals else (None, None)
        done = s.get("steps_done", run.train[-1]["step"] if run.train else 0)
        planned = s.get("steps", run.cfg("train.steps"))
        secs = s.get("seconds")
        after = "–"
        if last is not None and last is not first:
            after = _f(last["eval/accuracy"]) + ("" if status in FINISHED else f" (step {int(last['step'])})")
        off = _tail_mean(run, "offpolicy_logratio")
        rows.append([
            run.name, str(run.cfg("method") or "default"), status, f"{done}/{planned}",
            "–" if secs is None else f"{secs:.0f} s" if secs >= 10 else f"{secs:.1f} s",
            _f(first and first["eval/accuracy"]), after,
            _f(run.teacher_eval and run.teacher_eval.get("teacher/accuracy")),
            teacher_kl_cell(run), "–" if off is None else f"{off:.4f} (not a KL)",
            _f(last and last.get("eval/teacher_rkl"), 4), str(len(run.events)),
        ])
    return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "routes":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(runs: Sequence[RunData]) -> list[tuple[str, list[str]]]:
    """``(option, value per run)`` for every option whose value is not the same in all runs
    (``logging.*`` left out)."""
    flat = [_flatten(r.config or {}) for r in runs]
    keys = sorted({k for f in flat for k in f if not k.startswith("logging.")})
    out = []
    for k in keys:
        values = [repr(f.get(k, "–")) if isinstance(f.get(k), str) else str(f.get(k, "–")) for f in flat]
        if len(set(values)) > 1:
            out.append((k, values))
    return out
