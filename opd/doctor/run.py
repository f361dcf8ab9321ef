"""``opd doctor``'s procedure: build the run's parts as ``opd distill`` would, measure, predict.

Nothing is written into a run folder: the parts are built over a temporary folder that is removed
at the end, and the only files written are the doctor's own (``doctor.html``, ``doctor.md``,
``doctor.json`` in ``out``). The student takes one real optimizer step (its seconds and memory are
measured); it is never saved.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from opd.assemble import build_components
from opd.components import Components
from opd.config.load import with_overrides
from opd.config.schema import Config
from opd.doctor.checks import Check
from opd.doctor.predict import Prediction, predict, projected_records
from opd.doctor.probe import (
    Probe,
    length_stats,
    peak_memory_mb,
    student_logprobs,
    student_rewards,
    teacher_lengths,
    timed,
)
from opd.doctor.recommend import Measured, Recommendation, overrides, recommend
from opd.doctor.selftest import run_self_test, teacher_parts
from opd.evaluate import verify_rollouts
from opd.preflight import check_context_lengths, check_environment
from opd.report.run_info import param_count
from opd.step import StepBatch, accumulate_gradients, micro_batches, prepare_batch, token_counts, train_step
from opd.teachers import LocalModel, teacher_prompt_texts

__all__ = ["DoctorResult", "run_doctor"]

STAGES = ("build", "rollouts", "self-test", "teacher samples", "gradients", "update", "predict")


@dataclass
class DoctorResult:
    """Everything ``opd doctor`` found (rendered by :mod:`opd.doctor.render`)."""

    cfg: Config
    checks: list[Check]
    probe: Probe
    predictions: list[Prediction]
    recommendations: list[Recommendation]
    seconds: float = 0.0
    served: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    @property
    def firing(self) -> list[Prediction]:
        return [p for p in self.predictions if p.fires]

    @property
    def overrides(self) -> list[str]:
        return overrides(self.recommendations)

    @property
    def exit_code(self) -> int:
        """1 when the teacher failed its self-test, else 0 (predicted warnings do not fail)."""
        return 1 if self.failed else 0

    def verdict(self) -> str:
        """One line: the self-test failures first, then the detectors that would fire, else healthy."""
        if self.failed:
            who = f"teacher server {self.served}" if self.served else "teacher"
            return f"FAIL: the {who} failed its self-test: " + "; ".join(
                f"{c.name} ({c.measured:.3g} > tolerance {c.tolerance:.3g})" if c.measured is not None else c.name
                for c in self.failed)
        if self.firing:
            return "WARN: a run would trip " + "; ".join(f"{p.detector} (projected {p.why})" for p in self.firing)
        return "OK: teacher self-test passed and no failure detector is predicted to fire"


def _accelerator(cfg: Config) -> Accelerator:
    """The accelerator ``opd distill`` would use (a second one in the same process with another device
    or precision needs accelerate's process-wide state cleared first)."""
    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    shared = AcceleratorState._shared_state
    if shared and (shared.get("_mixed_precision") != cfg.train.precision or shared.get("_cpu") != cpu):
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.precision)


def _check_context(parts: Components, teacher) -> None:
    cfg = parts.cfg
    examples = [*parts.task.train_examples(0, cfg.rollout.prompts_per_step, cfg.seed),
                *parts.task.eval_examples(cfg.eval.size)]
    tp = teacher_parts(cfg, teacher)
    teachers = []
    if tp.model is not None and tp.tokenizer is not None:
        own = tp.own_tokenizer
        teachers.append(("the teacher", tp.model, tp.tokenizer,
                         lambda ex: teacher_prompt_texts(ex, cfg.teacher.use_context, cfg.teacher.context_template,
                                                         tokenizer=tp.tokenizer if own else None)))
    check_context_lengths(cfg, examples, student=parts.student, student_tokenizer=parts.tokenizer, teachers=teachers)


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _chunk_grad_norms(parts: Components, batch: StepBatch, chunks: int, rows_per_chunk: int) -> list[float]:
    """Pre-clip gradient norm of each of the first ``chunks`` row groups of the batch (at most
    ``rows_per_chunk`` rows each, whole groups of ``G``), each normalised over its own tokens like a
    whole batch (no optimizer step; gradients are cleared afterwards)."""
    cfg = parts.cfg
    rows = batch.rollouts.batch_size
    size = min(max(1, math.ceil(rows / chunks)), rows_per_chunk)
    groups = micro_batches(rows, size, cfg.rollout.samples_per_prompt)[:chunks]
    norms = []
    parts.model.train()
    for idx in groups:
        sub = batch.rollouts.select(idx)
        piece = StepBatch(rollouts=sub, feedback=batch.feedback.select(idx),
                          reference=None if batch.reference is None else batch.reference.select(idx),
                          outcome_rewards_B=None if batch.outcome_rewards_B is None else batch.outcome_rewards_B[idx],
                          counts=token_counts(parts.objective, sub, 1))
        parts.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(parts.model, parts.objective, piece, micro_batch_size=cfg.train.micro_batch_size,
                             group_size=cfg.rollout.samples_per_prompt, chunked=parts.chunked,
                             accelerator=parts.accelerator)
        norms.append(_grad_norm(parts.params))
    parts.optimizer.zero_grad(set_to_none=True)
    return norms


class _Prepared:
    """Hands :func:`opd.step.train_step` the batch already prepared (the ``prefetch`` hook of
    :class:`~opd.components.Components`), so the measured update reuses the probe's rollouts."""

    def __init__(self, batch: StepBatch):
        self._batch = batch

    def batch(self, step: int) -> tuple[StepBatch, int]:
        return self._batch, 0

    def close(self) -> None:
        return None


def run_doctor(cfg: Config, *, sample_prompts: int = 32, budget_factor: int = 4, chunks: int = 4,
               rows_per_chunk: int = 16, self_test_rows: int = 8, progress: bool = True) -> DoctorResult:
    """Measure the pair of ``cfg`` and predict its run (module docstring). Raises the errors of
    ``opd distill``'s set-up (:class:`opd.config.ConfigError`, :class:`opd.preflight.PreflightError`,
    a model or data that does not load) before anything is measured."""
    began = time.time()
    cfg = with_overrides(cfg, ["monitor.diagnostics=true", "logging.progress=false", "logging.report=false"])
    check_environment(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bar = tqdm(total=len(STAGES), desc="opd doctor", disable=not progress, dynamic_ncols=True)

    def stage(name: str) -> None:
        bar.set_postfix_str(name, refresh=True)

    with tempfile.TemporaryDirectory(prefix="opd-doctor-") as tmp:
        stage("build")
        accelerator = _accelerator(cfg)
        parts = build_components(cfg, Path(tmp) / "run", accelerator, echo=None)
        try:
            teacher = parts.teacher
            _check_context(parts, teacher)
            bar.update()
            stage("rollouts")
            batch, rollout_s = timed(prepare_batch, parts, 0)
            on_policy = torch.nonzero(batch.rollouts.on_policy_B).flatten().tolist()
            rollouts = batch.rollouts.select(on_policy)
            on_rows = rollouts.batch_size
            student_acc = float(verify_rollouts(parts.task, parts.tokenizer, rollouts).mean()) if on_rows else None
            bar.update()
            stage("self-test")
            with torch.no_grad():
                checks = run_self_test(cfg, teacher, parts.student, parts.tokenizer,
                                       rollouts if on_rows else batch.rollouts, device=parts.device,
                                       rows=self_test_rows)
            bar.update()
            stage("teacher samples")
            tp = teacher_parts(cfg, teacher)
            budget = cfg.rollout.prefix_tokens or cfg.rollout.max_new_tokens
            teacher_len, teacher_rep, teacher_acc = None, None, None
            if tp.model is not None and cfg.teacher.model != "self":
                seen: dict[int, object] = {}
                for e in batch.rollouts.examples:
                    seen.setdefault(id(e), e)
                examples = list(seen.values())[:sample_prompts]
                with torch.no_grad():
                    sampler = LocalModel(tp.teacher, tp.model, tp.tokenizer if tp.own_tokenizer else parts.tokenizer,
                                         tp.own_tokenizer, cfg.teacher.use_context, cfg.teacher.context_template)
                    teacher_len, teacher_rep, teacher_acc = teacher_lengths(
                        sampler, parts.tokenizer, examples, parts.task, budget=budget,
                        sample_budget=budget * budget_factor, temperature=cfg.rollout.temperature)
            with torch.no_grad():
                before = student_logprobs(parts.student, rollouts) if on_rows else torch.zeros(0)
                rewards = student_rewards(before, rollouts, batch.feedback.select(on_policy)) if on_rows else before
            bar.update()
            stage("gradients")
            chunk_norms = _chunk_grad_norms(parts, batch, chunks, rows_per_chunk)
            bar.update()
            stage("update")
            if parts.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(parts.device)
            own_prefetch, parts.prefetch = parts.prefetch, _Prepared(batch)
            try:  # the real step 1 on the probe's batch: its rollouts + scoring were timed above
                metrics, update_s = timed(train_step, parts, 0)
            finally:
                parts.prefetch = own_prefetch
            metrics.pop("policy_lag", None)
            memory = peak_memory_mb(parts.device)
            shift = float((student_logprobs(parts.student, rollouts) - before).abs().mean()) if on_rows else None
            bar.update()
        finally:
            parts.close()
    stage("predict")
    probe = Probe(student=length_stats(rollouts, budget), teacher=teacher_len, teacher_repetition=teacher_rep,
                  rewards=[float(r) for r in rewards], step_metrics={k: float(v) for k, v in metrics.items()},
                  step_seconds=rollout_s + update_s, rollout_seconds=rollout_s, update_seconds=update_s,
                  peak_memory_mb=memory,
                  memory_kind="CUDA allocated" if parts.device.type == "cuda" else "process RSS",
                  batch_rows=batch.rollouts.batch_size, student_accuracy=student_acc, teacher_accuracy=teacher_acc,
                  student_params=param_count(parts.student), step_shift=shift,
                  teacher_params=None if tp.model is None else param_count(tp.model))
    grad = metrics.get("grad_norm")
    ratio = None
    if chunk_norms and grad and math.isfinite(grad) and grad > 0:
        ratio = max(chunk_norms) / statistics.median(chunk_norms) if len(chunk_norms) > 1 else None
    records = projected_records(
        {k: v for k, v in probe.step_metrics.items() if k.startswith("diag/") or k == "grad_norm"},
        teacher_cut_share=None if teacher_len is None else teacher_len.cut_share,
        teacher_mean_length=None if teacher_len is None else teacher_len.mean,
        teacher_repetition=teacher_rep, budget=budget, worst_row_grad_ratio=ratio, window=cfg.monitor.window)
    predictions = predict(records, cfg.monitor)
    m = probe.step_metrics
    measured = Measured(
        teacher_p95_length=None if teacher_len is None else teacher_len.quantile(0.95),
        teacher_cut_share=None if teacher_len is None else teacher_len.cut_share,
        student_cut_share=probe.student.cut_share, mean_length=probe.student.mean,
        student_entropy=m.get("diag/student_entropy"), teacher_entropy=m.get("diag/teacher_entropy"),
        offsupport_frac=m.get("diag/teacher_offsupport_frac"), overlap_mass=m.get("diag/overlap_mass"),
        grad_norm=grad, step_shift=probe.step_shift,
        grad_spike_predicted=any(p.fires for p in predictions if p.detector == "grad_spike"))
    result = DoctorResult(cfg=cfg, checks=checks, probe=probe, predictions=predictions,
                          recommendations=recommend(cfg, measured), served=cfg.teacher.server)
    if ratio is not None:
        result.notes.append(f"gradient norms of {len(chunk_norms)} row groups: "
                            + ", ".join(f"{g:.3g}" for g in chunk_norms) + f" (whole batch {grad:.3g})")
    bar.update()
    bar.close()
    result.seconds = time.time() - began
    return result

