"""The training loop: set up → steps (rollout → feedback → objective → update → log / eval / save)
→ finish.

It never names a method: everything a method is lives in the config, turned into a loss by
:class:`opd.objective.Objective` and into rollouts by :func:`opd.collect.collect_rollouts`; the
run's parts are one :class:`~opd.components.Components` object built in one place.
Multi-process runs go through ``accelerate launch`` (the loss is normalised by global token
counts, so one step equals the single-process step on the same global batch).

What the loop guarantees (docs/guarantees.md):

* **nothing is written before the run can start** — config, environment (device, precision,
  optional packages), models, data and context lengths are checked first;
* **a run folder belongs to one run** — it is locked while the run is live, and a folder that
  holds another run is refused unless resumed or ``logging.overwrite=true`` (:mod:`opd.run_lock`);
* **interrupts save** — SIGINT / SIGTERM finish the step in progress, write a checkpoint, the
  summary and the report, and print the ``--resume`` command (:mod:`opd.interrupts`);
* **faults stop cleanly** — a :class:`~opd.errors.RunFault` (a server that failed, weights gone
  non-finite) or a failed write ends the run with one line naming what and where; the last
  completed step is checkpointed when the weights are still sound;
* **every whole file is written atomically** (:mod:`opd.io`); resume falls back to the newest
  intact checkpoint and says so (:mod:`opd.checkpoint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from opd.assemble import apply_recipe, build_components
from opd.checkpoint import last_checkpoint_step, list_checkpoints, restore, save_final, save_step
from opd.components import Components
from opd.config.advice import config_warnings
from opd.config.load import dump_config, load_config
from opd.config.schema import Config
from opd.data import RecordTask
from opd.errors import RunFault
from opd.evaluate import EvalResult, evaluate, evaluate_teacher_forced
from opd.interrupts import StopRequest
from opd.io import write_json
from opd.monitor import Monitor
from opd.preflight import check_context_lengths, check_environment
from opd.report.run_info import run_info
from opd.run_lock import acquire_run_folder, check_run_folder
from opd.sharding import gathered
from opd.step import sync_flag, train_step
from opd.threads import ThreadGovernor, apply_threads, choose_threads, may_adapt_threads

__all__ = ["EXIT_CODES", "RunSummary", "default_run_dir", "distill"]

#: Final states of a run (``summary.json`` "status") and the exit status of ``opd distill``.
EXIT_CODES: dict[str, int] = {"done": 0, "stopped": 0, "stopped by monitor": 0, "failed": 2, "no updates": 1}


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    before: EvalResult | None
    after: EvalResult | None
    teacher: EvalResult | None
    seconds: float
    status: str = "done"  # done | stopped | interrupted | stopped by monitor | failed | no updates
    steps_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None  # a failure detector ended the run (monitor.*_action=stop)
    error: str | None = None  # status failed: what went wrong, in one line
    checkpoint: Path | None = None  # the checkpoint a resume starts from (None: none written)
    report_path: Path | None = None
    exit_code: int = 0
    faults: list[str] = field(default_factory=list)  # failures of earlier sessions this run was resumed after

    @property
    def stopped_early(self) -> bool:
        return self.status != "done"

    @property
    def resume_command(self) -> str | None:
        return None if self.checkpoint is None else f"opd distill --resume {self.run_dir}"


@dataclass
class _Progress:
    """What the loop accumulates between set-up and finish."""

    start: int = 0
    done: int = 0
    began: float = field(default_factory=time.time)
    before: EvalResult | None = None
    teacher: EvalResult | None = None
    after: EvalResult | None = None
    last_accuracy: float = float("nan")
    stopped: str | None = None  # why the loop ended before train.steps: stop_after | monitor | signal
    fault: RunFault | OSError | None = None  # what ended the run early (a failed write is an OSError)
    skipped_here: int = 0  # steps of this session whose update was skipped (non-finite values)
    history: list[dict[str, float]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # failures of earlier sessions (metrics.jsonl "fault")
    governor: ThreadGovernor | None = None  # adapts the thread count to other work (train.threads unset)


def default_run_dir(cfg: Config) -> Path:
    name = cfg.method or "default"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def distill(cfg: Config, *, resume: str | Path | None = None) -> RunSummary:
    """Run on-policy distillation as ``cfg`` says; ``resume`` continues a stopped run exactly.

    Raises (before anything is written): :class:`opd.config.ConfigError`,
    :class:`opd.preflight.PreflightError`, :class:`opd.run_lock.RunFolderError`, and the errors of
    loading models and data. Faults during the run do not raise: the summary's ``status`` is
    ``failed`` and ``error`` says why.
    """
    parts, progress = _set_up(cfg, resume)
    try:
        with StopRequest(echo=tqdm.write if parts.main else None, run_dir=parts.run_dir) as stop:
            if progress.fault is None:
                _loop(parts, progress, stop)
        return _finish(parts, progress, stop)
    finally:
        parts.close()


# ---------------------------------------------------------------------------------------------
# set up
def _accelerator(*, cpu: bool, precision: str) -> Accelerator:
    """accelerate keeps one process-wide state; a second run in the same process (a notebook, a test, a
    benchmark) with another precision or device would be refused, so that part of the state is cleared
    first. The process group (accelerate's PartialState) is kept."""
    shared = AcceleratorState._shared_state
    if shared and (shared.get("_mixed_precision") != precision or shared.get("_cpu") != cpu):
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _set_up(cfg: Config, resume: str | Path | None) -> tuple[Components, _Progress]:
    if resume is not None:
        run_dir = Path(resume)
        check_run_folder(run_dir, resume=True, overwrite=False)
        cfg = load_config(str(run_dir / "config.yaml"))
        cfg.train.stop_after = None  # a resumed run goes to the end unless told otherwise
    else:
        run_dir = Path(cfg.logging.run_dir) if cfg.logging.run_dir else default_run_dir(cfg)
        check_run_folder(run_dir, resume=False, overwrite=cfg.logging.overwrite)
    check_environment(cfg)
    threads = choose_threads(cfg.train.threads, recorded=_recorded_threads(run_dir) if resume is not None else None)
    apply_threads(threads.threads)
    if threads.warning:
        tqdm.write(f"opd: warning: {threads.warning}")
    # on a machine without GPUs accelerate needs cpu=True to see a multi-process launch (gloo) at all
    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    accelerator = _accelerator(cpu=cpu, precision=cfg.train.precision)
    echo = tqdm.write if accelerator.is_main_process else None
    parts = build_components(cfg, run_dir, accelerator, echo=echo)
    try:
        _check_context(parts)
        if parts.main:
            parts.lock = acquire_run_folder(run_dir, resume=resume is not None, overwrite=cfg.logging.overwrite)
        warnings = config_warnings(cfg)
        if parts.main:
            for message in warnings:
                tqdm.write(f"opd: warning: {message}")
            if resume is None:
                dump_config(cfg, run_dir / "config.yaml")
                write_json(run_dir / "warnings.json", warnings)
                write_json(run_dir / "run_info.json", {
                    **run_info(cfg, student=parts.student, teacher=parts.teacher, reference=parts.reference,
                               vocab=parts.vocab, device=parts.device, world=parts.world, access=parts.access),
                    "precision": accelerator.mixed_precision})
        adaptive = may_adapt_threads(threads.adaptive, overlap=cfg.rollout.overlap)
        progress = _Progress(governor=ThreadGovernor(threads.threads, enabled=adaptive))
        if resume is not None:
            progress.start = progress.done = restore(parts, run_dir, echo)
            for overrides in parts.monitor.resume(progress.start):  # recipes applied before the checkpoint
                apply_recipe(parts, overrides)
            _resume_evaluations(parts, progress)
            if progress.fault is not None:
                return parts, progress
        if progress.start == 0:
            try:
                progress.before = _evaluate(parts, 0)  # every process takes part (sharded students), main evaluates
            except RunFault as err:  # e.g. a served teacher that is down: keep the run, resumable from step 0
                progress.fault = err
                return parts, progress
        if parts.main and progress.start == 0:
            progress.last_accuracy = progress.before.accuracy
            try:
                progress.teacher = _evaluate_teacher(parts) if cfg.eval.teacher else None
            except RunFault as err:  # a served teacher that is down: as above
                progress.fault = err
                return parts, progress
            if progress.teacher is not None:
                decoding = {} if progress.teacher.decoding == "greedy" else {"decoding": progress.teacher.decoding}
                parts.log.write("eval_teacher", 0, {**progress.teacher.as_metrics("teacher"), **decoding})
    except BaseException:
        parts.close()
        raise
    return parts, progress


def _recorded_threads(run_dir: Path) -> int | None:
    """The torch thread count the run in ``run_dir`` started with (``run_info.json``), if known."""
    try:
        value = json.loads((run_dir / "run_info.json").read_text()).get("torch_threads")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def _check_context(parts: Components) -> None:
    task = parts.task
    examples = task.all_examples() if isinstance(task, RecordTask) else [
        *task.train_examples(0, parts.cfg.rollout.prompts_per_step, parts.cfg.seed), *_eval_examples(parts)]
    teachers = [(f"the teacher ({type(m.teacher).__name__})", m.model, m.tokenizer, m.prompt_texts)
                for m in parts.teacher.local_models()]
    check_context_lengths(parts.cfg, examples, student=parts.student, student_tokenizer=parts.tokenizer,
                          teachers=teachers)


def _resume_evaluations(parts: Components, progress: _Progress) -> None:
    """A resumed run: the first session's "before" and teacher results come back from metrics.jsonl
    (for the final table and summary.json), so do the failures that stopped earlier sessions; and an
    evaluation that was due at the resumed step but never logged (the fault that stopped the run hit
    it) is made now. Every process takes part (:func:`_evaluate` is collective)."""
    from opd.metrics_log import read_metrics

    records = read_metrics(parts.run_dir) if (parts.run_dir / "metrics.jsonl").is_file() else []
    evals = [r for r in records if r.get("kind") == "eval" and "eval/accuracy" in r]
    first = next((r for r in evals if r.get("step") == 0), None)
    teacher = next((r for r in records if r.get("kind") == "eval_teacher" and "teacher/accuracy" in r), None)
    progress.before = EvalResult.from_metrics(first) if first else None
    progress.teacher = EvalResult.from_metrics(teacher, "teacher") if teacher else None
    progress.faults = [f"step {r.get('steps_done', r['step'])}: {r.get('error')}" for r in records
                       if r.get("kind") == "fault"]
    if evals:
        progress.last_accuracy = float(evals[-1]["eval/accuracy"])
    every, start = parts.cfg.eval.every, progress.start
    if (start > 0 and every and start % every == 0 and start != parts.cfg.train.steps
            and not any(r.get("step") == start for r in evals)):
        try:
            result = _evaluate(parts, start)
        except RunFault as err:
            progress.fault = err
            return
        if result is not None:
            progress.last_accuracy = result.accuracy


def _evaluate_teacher(parts: Components) -> EvalResult | None:
    """The teacher's held-out accuracy, once (with its own tokenizer when it has one); a served
    teacher, which nothing here can sample, is scored on the reference answers
    (:func:`opd.evaluate.evaluate_teacher_forced`); None for a self-teacher or several routed ones."""
    found = parts.teacher.local_models()
    if parts.cfg.teacher.model == "self":
        return None
    if not found and parts.cfg.teacher.server and not parts.cfg.teacher.routes:
        return evaluate_teacher_forced(parts.teacher, parts.tokenizer, _eval_examples(parts),
                                       max_new_tokens=_eval_tokens(parts), batch_size=parts.cfg.eval.batch_size)
    if len(found) != 1:
        return None
    local = found[0]
    return evaluate(local.model, local.tokenizer if local.own_tokenizer else parts.tokenizer, parts.task,
                    _eval_examples(parts),
                    max_new_tokens=_eval_tokens(parts), batch_size=parts.cfg.eval.batch_size)


# ---------------------------------------------------------------------------------------------
# the loop
def _loop(parts: Components, progress: _Progress, stop: StopRequest) -> None:
    t = parts.cfg.train
    parts.student.train()
    bar = tqdm(range(progress.start, t.steps), initial=progress.start, total=t.steps,
               disable=not (parts.main and parts.cfg.logging.progress), desc="opd distill", dynamic_ncols=True)
    try:
        for step in bar:
            if not _one_step(parts, progress, stop, step, bar):
                break
        if progress.fault is None and (progress.stopped is None or progress.stopped == "monitor"):
            progress.after = _evaluate(parts, progress.done)
            if progress.after is not None:  # the bar shows the final accuracy, not the last periodic one
                bar.set_postfix(acc=f"{progress.after.accuracy:.3f}", refresh=True)
    except (OSError, RunFault) as err:  # a failed write (disk full) or a fault in an evaluation (a server)
        progress.fault = err
    finally:
        bar.close()


def _adapt_threads(parts: Components, progress: _Progress, done: int) -> None:
    """Follow the CPUs other processes leave free (opd.threads.ThreadGovernor); each change is logged."""
    governor = progress.governor
    changed = governor.poll() if governor is not None else None
    if changed is None:
        return
    apply_threads(changed)
    if parts.main:
        parts.log.write("threads", done, {"threads": changed, "others_cpus": round(governor.others, 2)})
        tqdm.write(f"opd: warning: other processes used {governor.others:.1f} of {governor.ceiling} CPUs; opd "
                   f"continues on {changed} thread{'s' if changed > 1 else ''} (train.threads=N fixes the count)")


def _one_step(parts: Components, progress: _Progress, stop: StopRequest, step: int, bar) -> bool:
    """Run step ``step``; False when the loop must end (interrupt, stop, fault)."""
    t = parts.cfg.train
    tic = time.time()
    try:
        metrics = train_step(parts, step)
    except RunFault as err:
        progress.fault = err
        return False
    done = progress.done = step + 1
    progress.skipped_here += int(bool(metrics.get("skipped")))
    metrics["seconds"] = time.time() - tic
    metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
    if parts.main and (done % parts.cfg.train.log_every == 0 or done == t.steps):
        parts.log.write("train", done, metrics)
    progress.history.append({"step": done, **metrics})
    _adapt_threads(parts, progress, done)
    events = parts.monitor.observe(done, metrics) if parts.main else []
    if parts.world > 1:
        _follow_main_monitor(parts.monitor, events, parts.main, partial(apply_recipe, parts))
    cfg = parts.cfg  # a recipe may have replaced it
    if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
        result = _evaluate(parts, done)
        if result is not None:
            progress.last_accuracy = result.accuracy
    shown = {"loss": f"{metrics['loss']:.4f}"}
    if "teacher_kl" in metrics:
        shown["teacher_kl"] = f"{metrics['teacher_kl']:.4f}"
    bar.set_postfix(**shown, acc=f"{progress.last_accuracy:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    signalled = sync_flag(stop.requested is not None, parts.world, parts.device)
    if signalled:
        progress.stopped = "signal"
    elif t.stop_after is not None and t.stop_after <= done < t.steps:
        progress.stopped = "stop_after"
    elif parts.monitor.stop_reason is not None and done < t.steps:
        progress.stopped = "monitor"
    if (t.checkpoint_every and done % t.checkpoint_every == 0) or progress.stopped:
        save_step(parts, done)
    return progress.stopped is None


# ---------------------------------------------------------------------------------------------
# finish
def _status(parts: Components, progress: _Progress, stop: StopRequest) -> str:
    if progress.fault is not None:
        return "failed"
    if progress.stopped == "signal":
        return "interrupted"
    if progress.stopped == "monitor":
        return "stopped by monitor"
    if progress.stopped == "stop_after":
        return "stopped"
    ran = progress.done - progress.start
    if ran > 0 and progress.skipped_here == ran and progress.start == 0:
        return "no updates"
    return "done"


def _finish(parts: Components, progress: _Progress, stop: StopRequest) -> RunSummary:
    cfg, run_dir, monitor = parts.cfg, parts.run_dir, parts.monitor
    status = _status(parts, progress, stop)
    error = None if progress.fault is None else str(progress.fault)
    try:
        if (isinstance(progress.fault, RunFault) and progress.fault.state_intact
                and progress.done > last_checkpoint_step(run_dir)):
            save_step(parts, progress.done)  # keep the completed steps (a server fault happens before an update)
        if status == "done":
            save_final(parts)
    except OSError as err:
        status, error = "failed", str(err)
    checkpoints = list_checkpoints(run_dir)
    summary = RunSummary(
        run_dir=run_dir, steps=cfg.train.steps, steps_done=progress.done, status=status, before=progress.before,
        after=progress.after, teacher=progress.teacher, seconds=time.time() - progress.began,
        history=progress.history, stop_reason=monitor.stop_reason, error=error,
        checkpoint=checkpoints[-1] if checkpoints and status != "done" else None,
        exit_code=stop.exit_code if status == "interrupted" else EXIT_CODES[status])
    summary.faults = progress.faults
    if parts.main:
        try:  # the failure stays on record in metrics.jsonl (kept by a resume: it is at the resumed step)
            if progress.fault is not None:
                parts.log.write("fault", max(last_checkpoint_step(run_dir), 0),
                                {"error": error, "steps_done": progress.done})
        except OSError:
            pass  # a full disk: summary.json below still says it
        parts.log.close()
        try:
            write_json(run_dir / "summary.json", {
                "status": status, "error": error, "steps": cfg.train.steps, "steps_done": progress.done,
                "seconds": summary.seconds, "stopped_early": summary.stopped_early, "stop_reason": monitor.stop_reason,
                "skipped_steps": monitor.skipped_steps, "signal": stop.requested,
                "resume": summary.resume_command,
                **{k: (None if r is None else r.as_metrics(k)) for k, r in
                   (("before", progress.before), ("after", progress.after), ("teacher", progress.teacher))}},
                what="the run summary")
        except OSError as err:
            summary.status, summary.error, summary.exit_code = "failed", str(err), EXIT_CODES["failed"]
            return summary
        if cfg.logging.report:
            summary.report_path = _write_report(run_dir)
    return summary


# ---------------------------------------------------------------------------------------------
def _eval_examples(parts: Components):
    return parts.task.eval_examples(parts.cfg.eval.size)


def _eval_tokens(parts: Components) -> int:
    return parts.cfg.eval.max_new_tokens or parts.cfg.rollout.max_new_tokens


def _evaluate(parts: Components, step: int) -> EvalResult | None:
    """Held-out evaluation of the student on the main process (logged; the monitor keeps sample
    completions); None on the others. Every process calls it: a sharded student is gathered first."""
    # train.precision applies to evaluation too
    with gathered(parts.accelerator, parts.model), parts.accelerator.autocast():
        if not parts.main:
            return None
        result = evaluate(parts.student, parts.tokenizer, parts.task, _eval_examples(parts),
                          max_new_tokens=_eval_tokens(parts), batch_size=parts.cfg.eval.batch_size,
                          teacher=parts.teacher, samples=parts.cfg.monitor.samples)
    parts.log.write("eval", step, result.as_metrics("eval"))
    # held-out greedy samples and the last training batch, each marked by the verifier
    parts.monitor.write_samples(step, parts.tokenizer, task=parts.task, heldout=result.samples)
    return result


def _write_report(run_dir: Path) -> Path | None:
    """The run's HTML report (a failure here must not lose the finished run: it is reported instead)."""
    from opd.report import write_report

    try:
        return write_report([run_dir])[0]
    except Exception as err:  # noqa: BLE001 — the run itself is saved
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

