"""The report's sample completions, grouped by where they come from and marked by the verifier.

``samples.jsonl`` holds two kinds of record (:meth:`opd.monitor.Monitor.write_samples`):

* ``source: "heldout"`` — the evaluation's own greedy completions of the first held-out prompts,
  with the verifier's ``score`` (the same prompts at every evaluation);
* ``source: "train"`` — rows of the training batch of that step, sampled by ``policy`` (the
  student, a student/teacher mixture, the teacher, or a dataset answer) at ``temperature``, with
  per-token ``ℓ_t = log π_S(y_t) − log π_T(y_t)`` and the verifier's ``score``.

Records written before these fields existed (``source: "train batch"``, no ``score``) are shown as
training samples, not marked. A mark is ✓ for a score ≥ 1, ✗ for ≤ 0, the number in between, and
"not verified" when there is no score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from opd.report.load import RunData

__all__ = ["SampleGroup", "mark", "sample_groups"]


@dataclass(frozen=True)
class SampleGroup:
    """Samples shown under one heading."""

    title: str  # e.g. "held-out prompts, greedy decoding — step 300"
    note: str  # what they are and how many the verifier accepts
    samples: list[dict[str, Any]]
    kind: str  # "heldout" | "train"


def mark(score: Any) -> tuple[str, str]:
    """``(symbol, word)`` for a verifier score: ✓ correct, ✗ wrong, the score in between, or
    ``·`` not verified (no score recorded, or no verifier)."""
    if not isinstance(score, (int, float)) or isinstance(score, bool) or math.isnan(float(score)):
        return "·", "not verified"
    if score >= 1:
        return "✓", "correct"
    if score <= 0:
        return "✗", "wrong"
    return f"{float(score):.2f}", f"score {float(score):.2f}"


def _tally(samples: list[dict[str, Any]]) -> str:
    scored = [s["score"] for s in samples if mark(s.get("score"))[0] != "·"]
    if not scored:
        return "not marked: no verifier score recorded (a run without a verifier, or written before opd marked samples)"
    right = sum(1 for x in scored if x >= 1)
    return f"{right} of {len(scored)} shown are correct by the task's verifier"


def _eval_accuracy(run: RunData, step: int) -> float | None:
    for r in run.evals:
        if int(r.get("step", -1)) == step and isinstance(r.get("eval/accuracy"), (int, float)):
            return float(r["eval/accuracy"])
    return None


def _sampler(run: RunData, s: dict[str, Any]) -> str:
    """How a training row was produced, in words."""
    policy = s.get("policy") or ("student" if s.get("on_policy", True) else "off-policy")
    temp = s.get("temperature", run.cfg("rollout.temperature"))
    top_p = s.get("top_p", run.cfg("rollout.top_p"))
    top_k = s.get("top_k", run.cfg("rollout.top_k"))
    knobs = f"temperature {temp}" + (f", top-p {top_p}" if top_p not in (None, 1, 1.0) else "") + (
        f", top-k {top_k}" if top_k else "")
    return {
        "student": f"student samples at {knobs}",
        "mixture": f"samples from the student/teacher mixture (α = {s.get('teacher_mix')}) at {knobs}",
        "teacher": f"teacher samples (off-policy rows) at {knobs}",
        "dataset": "dataset answers (off-policy rows, not sampled)",
        "off-policy": "off-policy rows (teacher samples or dataset answers)",
    }.get(policy, f"{policy} samples at {knobs}")


def sample_groups(run: RunData, limit: int = 8) -> list[SampleGroup]:
    """The groups the report shows: held-out greedy samples at the first and the last evaluation
    that saved some, then the training batch at the last step that saved one (one group per way
    its rows were produced), at most ``limit`` samples per group."""
    held = [s for s in run.samples if s.get("source") == "heldout"]
    train = [s for s in run.samples if s.get("source") != "heldout"]
    groups: list[SampleGroup] = []
    steps = sorted({int(s["step"]) for s in held})
    for step in [steps[0], steps[-1]] if len(steps) > 1 else steps:
        shown = [s for s in held if int(s["step"]) == step][:limit]
        acc = _eval_accuracy(run, step)
        groups.append(SampleGroup(
            title=f"held-out prompts, greedy decoding — step {step}",
            note=f"the evaluation's own completions of the first held-out prompts; {_tally(shown)}"
                 + (f" (held-out accuracy at this step: {acc:.3f} on {_eval_n(run, step)} prompts)"
                    if acc is not None else ""),
            samples=shown, kind="heldout"))
    if train:
        last = max(int(s["step"]) for s in train)
        rows = [s for s in train if int(s["step"]) == last]
        by_sampler: dict[str, list[dict[str, Any]]] = {}
        for s in rows:
            by_sampler.setdefault(_sampler(run, s), []).append(s)
        for sampler, shown in by_sampler.items():
            shown = shown[:limit]
            groups.append(SampleGroup(
                title=f"training batch, step {last} — {sampler}",
                note="what the update at this step trained on, not an evaluation: sampled, not greedy, so "
                     f"their accuracy is not the held-out accuracy; {_tally(shown)}",
                samples=shown, kind="train"))
    return groups


def _eval_n(run: RunData, step: int) -> str:
    for r in run.evals:
        if int(r.get("step", -1)) == step and isinstance(r.get("eval/n"), (int, float)):
            return str(int(r["eval/n"]))
    return "?"
