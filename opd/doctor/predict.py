"""Which failure detectors a run of this configuration would fire, and why.

The prediction runs the monitor's own rules (:data:`opd.monitor.DETECTORS`, never a copy) on a
*projected* history of ``2·monitor.window`` steps: the first ``W`` records hold the values measured
on the first real step (the start of the run), the last ``W`` the values projected for later steps.
The projection **[INFER]** assumes on-policy distillation moves the student's sampling behaviour
toward the teacher's:

* ``diag/truncation_rate`` → ``max(student now, share of teacher answers the budget cuts)``;
* ``diag/length_mean`` → ``max(student now, teacher mean length in student tokens, capped at the
  budget)`` (length inflation, Demystifying OPD arXiv 2604.08527);
* ``diag/repetition_rate`` → ``max(student now, teacher's repetition rate)``;
* ``diag/student_entropy`` → ``min(student now, teacher now)`` (reverse KL is mode seeking,
  EOPD arXiv 2603.07079: the student does not become *less* certain than the teacher);
* reward sign, off-support fraction and the teacher's entropy keep their measured values (they
  are properties of the pair at the student's states, measured on the student's own samples);
* ``grad_norm``: the gradient-norm spike rule (PowerOPD arXiv 2606.17199) fires on one step whose
  norm exceeds ``grad_spike_factor ×`` the median of the previous ones. The measured step is split
  into row groups, each normalised like a whole batch; the projected last step's norm is the
  step's norm times ``max / median`` of the groups' norms: a group of rollouts whose gradient alone
  is that far above the others would, drawn again as a batch, spike a later step.

A detector whose ``monitor.<name>_action`` is ``off`` is not predicted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opd.config.schema import MonitorConfig
from opd.monitor import DETECTORS, History

__all__ = ["Prediction", "THRESHOLDS", "predict", "projected_records"]

#: The measured value each detector compares and the monitor option holding its threshold.
THRESHOLDS: dict[str, tuple[str, str]] = {
    "length": ("diag/truncation_rate", "truncation_rate_max"),
    "repetition": ("diag/repetition_rate", "repetition_rate_max"),
    "entropy": ("diag/student_entropy", "entropy_ratio_min"),
    "reward_sign": ("diag/reward_neg_frac", "reward_neg_frac_max"),
    "support": ("diag/teacher_offsupport_frac", "support_off_frac_max"),
    "grad_spike": ("grad_norm", "grad_spike_factor"),
}


@dataclass(frozen=True)
class Prediction:
    """Whether ``detector`` would fire, the rule's own message (``why``) and the numbers behind it."""

    detector: str
    title: str
    fires: bool
    why: str
    evidence: dict[str, float]


def projected_records(start: Mapping[str, float], *, teacher_cut_share: float | None,
                      teacher_mean_length: float | None, teacher_repetition: float | None, budget: int,
                      worst_row_grad_ratio: float | None, window: int) -> list[dict[str, float]]:
    """``window`` records of the measured start followed by ``window`` projected ones (see the module
    docstring); the last projected record carries the projected gradient-norm spike."""
    first = {k: float(v) for k, v in start.items()}
    end = dict(first)
    if "diag/truncation_rate" in first and teacher_cut_share is not None:
        end["diag/truncation_rate"] = max(first["diag/truncation_rate"], teacher_cut_share)
    if "diag/length_mean" in first and teacher_mean_length is not None:
        end["diag/length_mean"] = max(first["diag/length_mean"], min(teacher_mean_length, float(budget)))
    if "diag/repetition_rate" in first and teacher_repetition is not None:
        end["diag/repetition_rate"] = max(first["diag/repetition_rate"], teacher_repetition)
    if "diag/student_entropy" in first and "diag/teacher_entropy" in first:
        end["diag/student_entropy"] = min(first["diag/student_entropy"], first["diag/teacher_entropy"])
    records = [dict(first) for _ in range(window)] + [dict(end) for _ in range(window)]
    if "grad_norm" in first:
        g = first["grad_norm"]
        for r in records:
            r["grad_norm"] = g
        if worst_row_grad_ratio is not None:
            records[-1]["grad_norm"] = g * worst_row_grad_ratio
    return records


def _quiet_reason(name: str, records: list[dict[str, float]], m: MonitorConfig) -> tuple[str, dict[str, float]]:
    key, option = THRESHOLDS[name]
    threshold = float(getattr(m, option))
    if name == "grad_spike":
        g0, g1 = records[0].get("grad_norm"), records[-1].get("grad_norm")
        if g0 is None or g1 is None:
            return "no gradient norm was measured", {}
        if g0 <= 0:
            return "the gradient is 0 (the student already matches the teacher on these rollouts)", {"grad_norm": g0}
        return (f"worst projected step is {g1 / g0:.2f}× the typical gradient norm (fires above "
                f"{threshold:g}×)", {"projected ratio": g1 / g0})
    if name == "entropy" and "diag/teacher_entropy" in records[-1] and key in records[-1]:
        hs, ht = records[-1][key], records[-1]["diag/teacher_entropy"]
        if ht < m.entropy_floor:
            return (f"teacher entropy {ht:.3f} nats is below monitor.entropy_floor={m.entropy_floor:g}: a "
                    "near-deterministic teacher is never judged", {"H_S": hs, "H_T": ht})
        return (f"projected H_S/H_T = {hs / ht:.2f} (fires at or below {threshold:g})", {"H_S": hs, "H_T": ht})
    values = [r[key] for r in records if key in r]
    if not values:
        return f"{key} was not measured (teacher access or monitor.diagnostics too low)", {}
    top = max(values)
    return f"projected {key} ≤ {top:.3g} (fires at {threshold:g} or above)", {key: top}


def predict(records: list[dict[str, float]], m: MonitorConfig) -> list[Prediction]:
    """Each statistical detector's verdict on ``records`` (see :func:`projected_records`)."""
    history = History(records, m.window)
    out = []
    for name, det in DETECTORS.items():
        if getattr(m, f"{name}_action") == "off":
            continue
        found = det.rule(history, m)
        if found is not None:
            message, evidence = found
            out.append(Prediction(name, det.title, True, message, dict(evidence)))
        else:
            why, evidence = _quiet_reason(name, records, m)
            out.append(Prediction(name, det.title, False, why, evidence))
    return out
