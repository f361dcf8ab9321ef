"""Failure detectors (docs/methods.md §3.8) and the run monitor that reports them once, with a recipe.

Each detector is a documented rule over the step metrics of a run (the loop's own keys and the
``diag/*`` keys of :mod:`opd.monitor.live`). Notation: ``W`` = ``monitor.window``; ``recent(x)`` is
the mean of ``x`` over the last ``W`` observed steps (all ``W`` must hold a finite value);
``baseline(x)`` its mean over the first ``W`` observed steps. A statistical rule is evaluated only
once ``max(monitor.warmup_steps, W)`` steps were observed, and a baseline rule only once ``2W``
were (baseline and recent windows disjoint), so a healthy run stays silent while the baselines form.
Steps skipped for NaN/Inf are not observed. Thresholds are ``monitor.*`` options; the rules and
defaults are **[INFER]** (the papers document the failures, not alarm thresholds).

====================  ================================================================================
detector              fires when
====================  ================================================================================
``length``            ``recent(truncation_rate) ≥ truncation_rate_max`` or
                      ``recent(length) ≥ length_growth_max · baseline(length)`` (Demystifying OPD)
``repetition``        ``recent(repetition_rate) ≥ repetition_rate_max`` (Demystifying OPD)
``entropy``           ``recent(H_S) ≤ entropy_ratio_min · recent(H_T)`` with ``recent(H_T) ≥ entropy_floor``;
                      without teacher entropy ``recent(H_S) ≤ entropy_ratio_min · baseline(H_S)`` with
                      ``baseline(H_S) ≥ entropy_floor`` (EOPD)
``reward_sign``       ``recent(frac r_t < 0) ≥ reward_neg_frac_max`` (Fu et al.)
``support``           ``recent(off-support fraction) ≥ support_off_frac_max`` (Fu et al.)
``grad_spike``        ``‖g‖ > grad_spike_factor · median(‖g‖ of up to 50 previous steps)`` (PowerOPD)
``nonfinite``         NaN/Inf in the loss, token statistics, teacher feedback or gradients — checked
                      before the optimizer step, which is then skipped (every step, no warm-up)
====================  ================================================================================
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from opd.config.schema import Config, MonitorConfig
from opd.monitor.live import batch_samples, nonfinite_evidence, sequence_metrics, token_metrics
from opd.monitor.recipes import recipe_for
from opd.types import Feedback, Rollouts

__all__ = ["DETECTORS", "Detector", "Event", "History", "Monitor"]

#: How many previous gradient norms the spike rule's median looks at.
GRAD_HISTORY = 50


@dataclass(frozen=True)
class Event:
    """One detector report: what tripped (``message``, ``evidence`` numbers) at ``step``, the
    suggested recipe, the configured ``action`` and what came of it (``outcome``)."""

    detector: str
    step: int
    title: str
    message: str
    evidence: dict[str, float]
    recipe: str
    overrides: tuple[str, ...]
    action: str
    outcome: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["overrides"] = list(self.overrides)
        out["evidence"] = {k: (v if math.isfinite(v) else str(v)) for k, v in self.evidence.items()}
        return out

    def format(self) -> str:
        """A few lines for the console."""
        lines = [f"[opd monitor] step {self.step}: {self.title} ({self.detector}, action={self.action})",
                 f"  {self.message}", f"  recipe: {self.recipe}"]
        if self.overrides:
            lines.append(f"  overrides: {' '.join(self.overrides)}")
        if self.outcome:
            lines.append(f"  -> {self.outcome}")
        return "\n".join(lines)


class History:
    """The observed step metrics of a run, with the window means the rules compare."""

    def __init__(self, records: Sequence[Mapping[str, float]], window: int):
        self.records = records
        self.window = window

    def __len__(self) -> int:
        return len(self.records)

    def _mean(self, rows: Sequence[Mapping[str, float]], key: str) -> float | None:
        values = [r.get(key) for r in rows]
        if len(values) < self.window or any(v is None or not math.isfinite(v) for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

    def recent(self, *keys: str) -> float | None:
        """Mean of the first key present over the last ``window`` steps (None if not all have it)."""
        for key in keys:
            value = self._mean(self.records[-self.window:], key)
            if value is not None:
                return value
        return None

    def baseline(self, *keys: str) -> float | None:
        """Mean over the first ``window`` steps; None until ``2·window`` steps were observed."""
        if len(self.records) < 2 * self.window:
            return None
        for key in keys:
            value = self._mean(self.records[:self.window], key)
            if value is not None:
                return value
        return None


Finding = tuple[str, dict[str, float]]


def _pick(h: History, keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        value = h.recent(key)
        if value is not None:
            out[f"recent {key}"] = value
    return out


def length_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Length inflation → truncation collapse (Luo et al., Demystifying OPD, arXiv 2604.08527).

    Fires when ``recent(diag/truncation_rate) ≥ monitor.truncation_rate_max`` (default 0.5: half the
    student's rollouts hit ``rollout.max_new_tokens`` without EOS), or when
    ``recent(diag/length_mean) ≥ monitor.length_growth_max · baseline(diag/length_mean)`` (default 2×).
    Both are over the student's own rollouts (a batch without on-policy rows is not judged).
    """
    trunc = h.recent("diag/truncation_rate")
    length = h.recent("diag/length_mean")
    base = h.baseline("diag/length_mean")
    evidence = _pick(h, ("diag/truncation_rate", "diag/length_mean", "diag/repetition_rate", "diag/eos_rate"))
    if base is not None:
        evidence["baseline diag/length_mean"] = base
    if trunc is not None and trunc >= m.truncation_rate_max:
        return (f"truncation collapse: {trunc:.0%} of the student's rollouts hit the length limit without EOS "
                f"(mean of the last {h.window} steps; threshold {m.truncation_rate_max:.0%})", evidence)
    if length is not None and base is not None and base > 0 and length >= m.length_growth_max * base:
        return (f"length inflation: mean completion length {length:.2f} is {length / base:.2f}× its baseline "
                f"{base:.2f} (threshold {m.length_growth_max:g}×)", evidence)
    return None


def repetition_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Repetition saturation (Luo et al., Demystifying OPD, arXiv 2604.08527).

    Fires when ``recent(diag/repetition_rate) ≥ monitor.repetition_rate_max`` (default 0.5: half of a
    completion's n-grams, ``n = monitor.ngram``, repeat an earlier n-gram of the same completion).
    """
    rep = h.recent("diag/repetition_rate")
    if rep is None or rep < m.repetition_rate_max:
        return None
    evidence = _pick(h, ("diag/repetition_rate", "diag/length_mean", "diag/truncation_rate"))
    base = h.baseline("diag/repetition_rate")
    if base is not None:
        evidence["baseline diag/repetition_rate"] = base
    return (f"repetition saturation: {rep:.0%} of the {m.ngram}-grams of a completion repeat an earlier one "
            f"(threshold {m.repetition_rate_max:.0%})", evidence)


def entropy_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Entropy collapse from reverse KL's mode seeking (Jin et al., EOPD, arXiv 2603.07079).

    With teacher entropy (top-k or full access): fires when ``recent(H_S) ≤ monitor.entropy_ratio_min
    · recent(H_T)`` and ``recent(H_T) ≥ monitor.entropy_floor`` — the student is far more certain than
    the teacher at the same states (a near-deterministic teacher, ``H_T <`` floor, never counts).
    Sampled-only access: fires when ``recent(H_S) ≤ entropy_ratio_min · baseline(H_S)`` with
    ``baseline(H_S) ≥ entropy_floor``. ``H`` are per-token means in nats (``diag/student_entropy``,
    ``diag/teacher_entropy``; the top-k teacher entropy is a lower bound).
    """
    hs = h.recent("diag/student_entropy")
    if hs is None:
        return None
    ht = h.recent("diag/teacher_entropy")
    if ht is not None:
        if ht >= m.entropy_floor and hs <= m.entropy_ratio_min * ht:
            return (f"entropy collapse: student entropy {hs:.3f} nats is {hs / ht:.2f}× the teacher's {ht:.3f} at "
                    f"the same states (threshold {m.entropy_ratio_min:g}×)",
                    {"recent diag/student_entropy": hs, "recent diag/teacher_entropy": ht,
                     **_pick(h, ("diag/student_top1_prob", "diag/teacher_top1_prob"))})
        return None
    base = h.baseline("diag/student_entropy")
    if base is not None and base >= m.entropy_floor and hs <= m.entropy_ratio_min * base:
        return (f"entropy collapse: student entropy fell to {hs:.3f} nats, {hs / base:.2f}× its baseline "
                f"{base:.3f} (threshold {m.entropy_ratio_min:g}×; no teacher entropy with sampled access)",
                {"recent diag/student_entropy": hs, "baseline diag/student_entropy": base})
    return None


def reward_sign_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Imbalanced one-token signal (Fu et al., arXiv 2603.25562; heavy negative tail, AOPD 2605.06387).

    Fires when ``recent(diag/reward_neg_frac) ≥ monitor.reward_neg_frac_max`` (default 0.9), the
    fraction of counted tokens whose log-ratio reward ``r_t = log π_T(y_t) − log π_S(y_t)`` is negative.
    """
    neg = h.recent("diag/reward_neg_frac")
    if neg is None or neg < m.reward_neg_frac_max:
        return None
    return (f"reward sign imbalance: {neg:.0%} of sampled tokens get a negative reward r_t "
            f"(threshold {m.reward_neg_frac_max:.0%})",
            _pick(h, ("diag/reward_neg_frac", "diag/reward_p05", "diag/reward_p50", "diag/reward_p95",
                      "diag/reward_skew")))


def support_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Teacher support mismatch: the student samples off the teacher's support (Fu et al., arXiv
    2603.25562, unreliable teacher on student prefixes; prime-rl ``sampled_token_in_teacher_topk``).

    Fires when ``recent(diag/teacher_offsupport_frac) ≥ monitor.support_off_frac_max`` (default
    0.5). With top-k or full teacher access the off-support fraction is ``1 − mean 1[y_t ∈ TopK_T]``
    (``k = min(teacher.topk, V)``: with ``k ≥ V`` nothing is ever off-support); with sampled-only
    access it is the fraction of tokens with ``π_T(y_t) < monitor.support_prob_floor``.
    """
    off = h.recent("diag/teacher_offsupport_frac")
    if off is None or off < m.support_off_frac_max:
        return None
    return (f"teacher support mismatch: {off:.0%} of the student's sampled tokens are off the teacher's support "
            f"(threshold {m.support_off_frac_max:.0%})",
            _pick(h, ("diag/teacher_offsupport_frac", "diag/teacher_prob_sampled", "diag/overlap_ratio",
                      "diag/overlap_mass")))


def grad_spike_rule(h: History, m: MonitorConfig) -> Finding | None:
    """Gradient-norm spike (PowerOPD, Zhao et al., arXiv 2606.17199: the unbounded log-ratio reward
    gives extreme-variance gradients concentrated at early positions).

    Fires when the last step's pre-clip gradient norm ``‖g‖ > monitor.grad_spike_factor · median``
    of the up to 50 previous observed steps (default factor 10).
    """
    norms = [r.get("grad_norm") for r in h.records]
    if len(norms) < 2 or norms[-1] is None or not math.isfinite(norms[-1]):
        return None
    prev = [v for v in norms[-GRAD_HISTORY - 1:-1] if v is not None and math.isfinite(v)]
    if not prev:
        return None
    med = statistics.median(prev)
    g = norms[-1]
    if med <= 0 or g <= m.grad_spike_factor * med:
        return None
    last = h.records[-1]
    evidence = {"grad_norm": g, "median previous grad_norm": med, "ratio": g / med}
    for key in ("diag/teacher_kl_early", "diag/teacher_kl_late", "diag/reward_p05"):
        if key in last:
            evidence[key] = last[key]
    return (f"gradient-norm spike: ‖g‖ = {g:.3g} is {g / med:.1f}× the median {med:.3g} of the previous "
            f"{len(prev)} steps (threshold {m.grad_spike_factor:g}×)", evidence)


@dataclass(frozen=True)
class Detector:
    """A statistical detector: ``rule(history, monitor config) -> (message, evidence) | None``."""

    name: str
    title: str
    rule: Callable[[History, MonitorConfig], Finding | None]


DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("length", "length inflation / truncation collapse", length_rule),
    Detector("repetition", "repetition saturation", repetition_rule),
    Detector("entropy", "entropy collapse", entropy_rule),
    Detector("reward_sign", "reward sign imbalance", reward_sign_rule),
    Detector("support", "teacher support mismatch", support_rule),
    Detector("grad_spike", "gradient-norm spike", grad_spike_rule),
)}
NONFINITE_TITLE = "NaN/Inf in the step (update skipped)"


@dataclass
class Monitor:
    """Live diagnostics and failure detectors of one run.

    The loop calls :meth:`step_metrics` after the backward pass, :meth:`check_nonfinite` before
    the optimizer step (and skips the update when it returns evidence, reporting it with
    :meth:`skip_step`), and :meth:`observe` once per step with the step's metrics. Each detector
    reports at most once per run: the event is printed (``echo``), appended to
    ``<run>/events.jsonl`` and acted on — ``stop`` sets :attr:`stop_reason`; ``apply`` calls
    ``apply_fn(overrides)``, which rebuilds what the new config changes and returns the new config
    (a ``ValueError`` from it is reported and the run continues as with ``warn``).
    """

    cfg: Config
    run_dir: Path | None = None
    write: bool = True  # False on the non-main processes of a data-parallel run (they read, never write)
    eos_ids: int | Sequence[int] | None = None
    echo: Callable[[str], None] | None = print
    apply_fn: Callable[[tuple[str, ...]], Config] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    fired: set[str] = field(default_factory=set)
    stop_reason: str | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0
    _last_batch: tuple[Rollouts, dict[str, Tensor]] | None = None
    _pending: list[Event] = field(default_factory=list)

    @property
    def events_path(self) -> Path | None:
        return None if self.run_dir is None or not self.write else Path(self.run_dir) / "events.jsonl"

    def resume(self, step: int) -> list[tuple[str, ...]]:
        """Continue a run from ``step``: events and samples past it are dropped (the file is replaced
        atomically, so other processes may read it meanwhile); the events kept count as reported
        (each detector reports once per run). Returns the overrides of the recipes applied up to
        ``step``, which the loop applies again (a resume starts from ``config.yaml``)."""
        if self.run_dir is None:
            return []
        applied: list[tuple[str, ...]] = []
        for name in ("events.jsonl", "samples.jsonl"):
            path = Path(self.run_dir) / name
            if not path.exists():
                continue
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            if name == "events.jsonl":
                for record in map(json.loads, kept):
                    self.fired.add(record["detector"])
                    if str(record.get("outcome", "")).startswith("applied"):
                        applied.append(tuple(record["overrides"]))
            if self.write:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
        return applied

    # ------------------------------------------------------------------------------ per step
    def step_metrics(self, stats: Mapping[str, Tensor], rollouts: Rollouts) -> dict[str, float]:
        """The step's ``diag/*`` metrics (per-token ones only with ``monitor.diagnostics``)."""
        m = self.cfg.monitor
        self._last_batch = (rollouts, dict(stats))
        out = sequence_metrics(rollouts, eos_ids=self.eos_ids, ngram=m.ngram)
        if m.diagnostics:
            out.update(token_metrics(stats, support_prob_floor=m.support_prob_floor))
        return out

    def check_nonfinite(self, *, loss_terms: Mapping[str, float], stats: Mapping[str, Tensor],
                        feedback: Feedback | None, grad_norm: float) -> dict[str, float]:
        """NaN/Inf evidence of the step about to update the weights (``{}``: clean)."""
        return nonfinite_evidence(loss_terms=loss_terms, stats=stats, feedback=feedback, grad_norm=grad_norm)

    def skip_step(self, step: int, evidence: Mapping[str, float]) -> None:
        """Record a skipped (non-finite) step: reported the first time; ``monitor.nonfinite_max_skips``
        consecutive skips stop the run."""
        m = self.cfg.monitor
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if "nonfinite" not in self.fired:
            where = ", ".join(f"{k}={v:g}" for k, v in evidence.items())
            self._pending.append(self._event("nonfinite", NONFINITE_TITLE, step, m.nonfinite_action,
                                             f"non-finite values before the optimizer step ({where}); the gradients "
                                             "were zeroed and optimizer.step() was not called", dict(evidence)))
        if self.consecutive_skips >= m.nonfinite_max_skips and "nonfinite_repeated" not in self.fired:
            self._pending.append(self._event(
                "nonfinite_repeated", "repeated NaN/Inf: stopping", step, "stop",
                f"{self.consecutive_skips} consecutive steps were skipped (monitor.nonfinite_max_skips="
                f"{m.nonfinite_max_skips}); the run cannot make progress", dict(evidence), recipe_of="nonfinite"))

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[Event]:
        """Feed one step's metrics to the detectors; returns the events reported at this step."""
        if not metrics.get("skipped"):
            self.consecutive_skips = 0
            self.history.append({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        m = self.cfg.monitor
        h = History(self.history, m.window)
        if not metrics.get("skipped") and len(h) >= max(m.warmup_steps, m.window):
            for det in DETECTORS.values():
                action = getattr(m, f"{det.name}_action")
                if action == "off" or det.name in self.fired:
                    continue
                found = det.rule(h, m)
                if found is not None:
                    self._pending.append(self._event(det.name, det.title, step, action, *found))
        new, self._pending = self._pending, []
        return [self._act(ev) for ev in new]

    # ------------------------------------------------------------------------------ events
    def _event(self, name: str, title: str, step: int, action: str, message: str, evidence: dict[str, float],
               recipe_of: str | None = None) -> Event:
        self.fired.add(name)
        recipe = recipe_for(recipe_of or name, self.cfg)
        return Event(detector=name, step=step, title=title, message=message, evidence=evidence,
                     recipe=recipe.text, overrides=recipe.overrides, action=action)

    def _act(self, ev: Event) -> Event:
        if ev.action == "stop":
            self.stop_reason = self.stop_reason or f"{ev.title} at step {ev.step} (monitor: {ev.detector})"
            ev = replace(ev, outcome="stopping the run: checkpoint, final evaluation and report")
        elif ev.action == "apply":
            if not ev.overrides:
                ev = replace(ev, outcome="no automatic recipe applies to this configuration; continuing")
            elif self.apply_fn is None:
                ev = replace(ev, outcome="apply requested but this loop cannot rebuild its objective; continuing")
            else:
                try:
                    self.cfg = self.apply_fn(ev.overrides)
                    ev = replace(ev, outcome=f"applied {' '.join(ev.overrides)}; objective rebuilt")
                except ValueError as err:
                    ev = replace(ev, outcome=f"could not apply the recipe ({err}); continuing unchanged")
        elif ev.action == "warn" and ev.detector == "nonfinite":
            ev = replace(ev, outcome="step skipped; continuing (further skipped steps are counted, not reported)")
        self.record(ev)
        return ev

    def record(self, ev: Event) -> None:
        """Print the event and append it to ``events.jsonl``."""
        self.events.append(ev)
        if self.echo is not None:
            self.echo(ev.format())
        path = self.events_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **ev.to_json()}) + "\n")

    # ------------------------------------------------------------------------------ samples
    def write_samples(self, step: int, tokenizer: Any, *, task: Any = None,
                      heldout: Sequence[Mapping[str, Any]] = ()) -> int:
        """Append the samples of the evaluation at ``step`` to ``<run>/samples.jsonl``; returns how
        many were written (at most ``monitor.samples`` of each kind).

        * ``heldout``: the evaluation's own greedy completions (:attr:`opd.evaluate.EvalResult.samples`,
          already scored by the verifier), written with ``source: "heldout"``;
        * the last training batch (the batch of update ``step``), with per-token ``ℓ_t`` and, when
          ``task`` is given, the verifier's ``score`` of each completion, written with
          ``source: "train"``, ``policy`` (who wrote it: ``student``, ``mixture`` for teacher-mixed
          sampling, ``teacher`` or ``dataset`` for off-policy rows) and the sampler's
          ``temperature`` / ``top_p`` / ``top_k`` (none for dataset answers).
        """
        n = self.cfg.monitor.samples
        if self.events_path is None or n == 0:
            return 0
        rows = [{"step": step, **dict(r), "source": "heldout", "decoding": "greedy"} for r in list(heldout)[:n]]
        if self._last_batch is not None:
            r = self.cfg.rollout
            rollouts, stats = self._last_batch
            for record in batch_samples(rollouts, stats, tokenizer, n, task=task):
                policy = ("mixture" if r.teacher_mix > 0 else "student") if record["on_policy"] else (
                    "teacher" if r.off_policy_source == "teacher" else "dataset")
                sampler = {} if policy == "dataset" else {"temperature": r.temperature, "top_p": r.top_p,
                                                          "top_k": r.top_k}
                if policy == "mixture":
                    sampler["teacher_mix"] = r.teacher_mix
                rows.append({"step": step, "source": "train", "policy": policy, **sampler, **record})
        if rows:
            with (Path(self.run_dir) / "samples.jsonl").open("a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return len(rows)
