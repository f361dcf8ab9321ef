"""The training loop: set up → steps (rollout → feedback → objective → update → log / eval / save)
→ finish.

It never names a method: everything a method is lives in the config, turned into a loss by
:class:`opd.objective.Objective` and into rollouts by :func:`opd.collect.collect_rollouts`; the
run's parts are one :class:`~opd.components.Components` object built in one place.
Multi-process runs go through ``accelerate launch`` (the loss is normalised by global token
counts, so one step equals the single-process step on the same global batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from opd.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    save_checkpoint,
)
from opd.components import Components, build_components
from opd.config.load import dump_config, load_config
from opd.config.schema import Config
from opd.evaluate import EvalResult, evaluate
from opd.monitor import Monitor
from opd.report.run_info import run_info, write_json
from opd.step import train_step

__all__ = ["RunSummary", "default_run_dir", "distill"]


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    before: EvalResult | None
    after: EvalResult | None
    teacher: EvalResult | None
    seconds: float
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None  # a failure detector ended the run (monitor.*_action=stop)
    report_path: Path | None = None


@dataclass
class _Progress:
    """What the loop accumulates between set-up and finish."""

    start: int = 0
    done: int = 0
    began: float = field(default_factory=time.time)
    before: EvalResult | None = None
    teacher: EvalResult | None = None
    last_accuracy: float = float("nan")
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def default_run_dir(cfg: Config) -> Path:
    name = cfg.method or "default"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def distill(cfg: Config, *, resume: str | Path | None = None) -> RunSummary:
    """Run on-policy distillation as ``cfg`` says; ``resume`` continues a stopped run exactly."""
    parts, progress = _set_up(cfg, resume)
    try:
        _loop(parts, progress)
        return _finish(parts, progress)
    finally:
        parts.close()


# ---------------------------------------------------------------------------------------------
def _set_up(cfg: Config, resume: str | Path | None) -> tuple[Components, _Progress]:
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_config(str(run_dir / "config.yaml"))
        cfg.train.stop_after = None  # a resumed run goes to the end unless told otherwise
    else:
        run_dir = Path(cfg.logging.run_dir) if cfg.logging.run_dir else default_run_dir(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    accelerator = Accelerator(cpu=cfg.train.device == "cpu", mixed_precision=cfg.train.precision)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            dump_config(cfg, run_dir / "config.yaml")
    parts = build_components(cfg, run_dir, accelerator, echo=tqdm.write if main else None)
    progress = _Progress()
    if main and resume is None:
        write_json(run_dir / "run_info.json", run_info(
            cfg, student=parts.student, teacher=parts.teacher, reference=parts.reference, vocab=parts.vocab,
            device=parts.device, world=parts.world, access=parts.access))
    if resume is not None:
        progress.start = progress.done = _restore(parts, run_dir)
    if main and progress.start == 0:
        progress.before = _evaluate(parts, 0)
        progress.last_accuracy = progress.before.accuracy
        teacher_model = parts.teacher_model
        if cfg.eval.teacher and teacher_model is not None and cfg.teacher.model != "self":
            progress.teacher = evaluate(teacher_model, parts.tokenizer, parts.task, _eval_examples(parts),
                                        max_new_tokens=_eval_tokens(parts), batch_size=cfg.eval.batch_size)
            parts.log.write("eval_teacher", 0, progress.teacher.as_metrics("teacher"))
    return parts, progress


def _restore(parts: Components, run_dir: Path) -> int:
    """Load the newest checkpoint into the parts; returns its step."""
    ckpt = latest_checkpoint(run_dir)
    state = load_trainer_state(ckpt)
    load_model_weights(parts.student, ckpt)
    parts.optimizer.load_state_dict(state.optimizer)
    parts.scheduler.load_state_dict(state.scheduler)
    if parts.value_head is not None and state.value_head is not None:
        parts.value_head.load_state_dict(state.value_head)
    parts.engine.sync_weights(parts.student)
    parts.log.truncate_after(state.step)
    for overrides in parts.monitor.resume(state.step):  # recipes applied before the checkpoint
        parts.apply_recipe(overrides)
    return state.step


def _loop(parts: Components, progress: _Progress) -> None:
    t = parts.cfg.train
    parts.student.train()
    bar = tqdm(range(progress.start, t.steps), initial=progress.start, total=t.steps,
               disable=not (parts.main and parts.cfg.logging.progress), desc="opd distill", dynamic_ncols=True)
    for step in bar:
        tic = time.time()
        metrics = train_step(parts, step)
        done = progress.done = step + 1
        metrics["seconds"] = time.time() - tic
        metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
        cfg = parts.cfg  # a recipe may have replaced it during the step's observation below
        if parts.main and (done % cfg.train.log_every == 0 or done == t.steps):
            parts.log.write("train", done, metrics)
        progress.history.append({"step": done, **metrics})
        events = parts.monitor.observe(done, metrics) if parts.main else []
        if parts.world > 1:
            _follow_main_monitor(parts.monitor, events, parts.main, parts.apply_recipe)
        cfg = parts.cfg
        if parts.main and cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
            progress.last_accuracy = _evaluate(parts, done).accuracy
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", teacher_kl=f"{metrics['teacher_kl']:.4f}",
                        acc=f"{progress.last_accuracy:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        interrupt = (t.stop_after is not None and done >= t.stop_after and done < t.steps) or (
            parts.monitor.stop_reason is not None and done < t.steps)
        if parts.main and ((t.checkpoint_every and done % t.checkpoint_every == 0) or interrupt):
            save_checkpoint(parts.run_dir, done, parts.student, parts.tokenizer, parts.optimizer, parts.scheduler,
                            parts.value_head, keep=t.keep_checkpoints)
        if interrupt:
            progress.stopped = True
            break
    bar.close()


def _finish(parts: Components, progress: _Progress) -> RunSummary:
    cfg, run_dir, monitor = parts.cfg, parts.run_dir, parts.monitor
    after = None
    if parts.main and (not progress.stopped or monitor.stop_reason is not None):
        after = _evaluate(parts, progress.done)
    if parts.main and not progress.stopped:
        parts.student.save_pretrained(run_dir / "final")
        parts.tokenizer.save_pretrained(run_dir / "final")
    summary = RunSummary(run_dir=run_dir, steps=cfg.train.steps, before=progress.before, after=after,
                         teacher=progress.teacher, seconds=time.time() - progress.began,
                         stopped_early=progress.stopped, history=progress.history, stop_reason=monitor.stop_reason)
    if parts.main:
        write_json(run_dir / "summary.json", {
            "steps": cfg.train.steps, "steps_done": progress.done, "seconds": summary.seconds,
            "stopped_early": progress.stopped, "stop_reason": monitor.stop_reason,
            "skipped_steps": monitor.skipped_steps,
            **{k: (None if r is None else r.as_metrics(k)) for k, r in
               (("before", progress.before), ("after", after), ("teacher", progress.teacher))}})
        if cfg.logging.report:
            parts.log.close()
            summary.report_path = _write_report(run_dir)
    return summary


# ---------------------------------------------------------------------------------------------
def _eval_examples(parts: Components):
    return parts.task.eval_examples(parts.cfg.eval.size)


def _eval_tokens(parts: Components) -> int:
    return parts.cfg.eval.max_new_tokens or parts.cfg.rollout.max_new_tokens


def _evaluate(parts: Components, step: int) -> EvalResult:
    """Held-out evaluation of the student (logged; the monitor keeps sample completions)."""
    result = evaluate(parts.student, parts.tokenizer, parts.task, _eval_examples(parts),
                      max_new_tokens=_eval_tokens(parts), batch_size=parts.cfg.eval.batch_size,
                      teacher=parts.teacher)
    parts.log.write("eval", step, result.as_metrics("eval"))
    if parts.main:
        parts.monitor.write_samples(step, parts.tokenizer)
    return result


def _write_report(run_dir: Path) -> Path | None:
    """The run's HTML report (a failure here must not lose the finished run: it is reported instead)."""
    from opd.report import write_report

    try:
        return write_report([run_dir])[0]
    except Exception as err:  # noqa: BLE001 — the run itself succeeded
        tqdm.write(f"opd: could not write the report ({type(err).__name__}: {err}); "
                   f"run `opd report {run_dir}` to retry (OPD_TRACEBACK=1 for the traceback)")
        return None


def _follow_main_monitor(monitor: Monitor, events: list, main: bool, apply_fn) -> None:
    """Data parallelism: every process takes the main process's monitor decisions (stop / apply)."""
    decision = [monitor.stop_reason, [ev.overrides for ev in events if ev.outcome.startswith("applied")]]
    torch.distributed.broadcast_object_list(decision, src=0)
    if not main:
        monitor.stop_reason = decision[0]
        for overrides in decision[1]:
            apply_fn(tuple(overrides))
