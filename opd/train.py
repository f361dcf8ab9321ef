"""The training loop: rollout → feedback → objective → step → log / eval / save.

It never names a method: everything a method is lives in the config, turned into a loss by
:class:`opd.objective.Objective` and into rollouts by :func:`opd.collect.collect_rollouts`.
Multi-process runs go through ``accelerate launch`` (gradients are averaged explicitly after
the micro-batches, and the loss is normalised by global token counts, so one step equals the
single-process step on the same global batch).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from opd.build import build_reference, build_student, build_task, build_teacher, special_token_ids
from opd.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from opd.collect import collect_rollouts, step_seed
from opd.config.load import dump_config, load_config, with_overrides
from opd.config.schema import Config
from opd.config.validate import required_teacher_access
from opd.evaluate import EvalResult, evaluate, verify_rollouts
from opd.monitor import Monitor
from opd.objective import Objective
from opd.report.run_info import run_info, write_json
from opd.runlog import RunLog
from opd.step import StepBatch, accumulate_gradients, sync_gradients, token_counts


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant / linear-to-zero / cosine-to-zero over ``train.steps``."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_run_dir(cfg: Config) -> Path:
    name = cfg.method or "custom"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def distill(cfg: Config, *, resume: str | Path | None = None) -> RunSummary:
    """Run on-policy distillation as ``cfg`` says; ``resume`` continues a stopped run exactly."""
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_config(str(run_dir / "config.yaml"))
        cfg.train.stop_after = None  # a resumed run goes to the end unless told otherwise
    else:
        run_dir = Path(cfg.logging.run_dir) if cfg.logging.run_dir else default_run_dir(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator = Accelerator(cpu=t.device == "cpu", mixed_precision=t.precision)
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            dump_config(cfg, run_dir / "config.yaml")

    # ---- components (teacher/reference copies are taken from the *initial* student) ----------
    torch.manual_seed(cfg.seed)
    student, tokenizer = build_student(cfg, device)
    task = build_task(cfg, eos_token=tokenizer.eos_token)
    teacher = build_teacher(cfg, student, tokenizer, device)
    reference = build_reference(cfg, student, tokenizer, device)
    objective = Objective.from_config(cfg, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer),
                                      diagnostics=cfg.monitor.diagnostics)
    vocab = student.get_output_embeddings().weight.shape[0]
    chunked = objective.use_chunked(vocab)
    value_head = None
    if objective.needs_value_head:
        value_head = torch.nn.Linear(student.config.hidden_size, 1).to(device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    params = [p for p in student.parameters() if p.requires_grad]
    params += [] if value_head is None else list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    access = cfg.teacher.access if cfg.teacher.access != "auto" else required_teacher_access(cfg)
    teacher_model = getattr(teacher, "model", None)
    if main and resume is None:
        write_json(run_dir / "run_info.json", run_info(cfg, student=student, teacher=teacher, reference=reference,
                                                       vocab=vocab, device=device, world=world, access=access))

    def apply_recipe(overrides: tuple[str, ...]) -> Config:
        """monitor action=apply: the new config's objective, reference and teacher access."""
        nonlocal cfg, objective, reference, access, chunked
        new = with_overrides(cfg, list(overrides))
        obj = Objective.from_config(new, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer),
                                    diagnostics=new.monitor.diagnostics)
        if obj.needs_value_head and value_head is None:
            raise ValueError("the recipe needs a value head, which this run did not build")
        if reference is None:
            reference = build_reference(new, student, tokenizer, device)
        if new.train.lr != cfg.train.lr:  # the schedule keeps its shape around the new peak
            for g in optimizer.param_groups:
                g["lr"] *= new.train.lr / cfg.train.lr
            scheduler.base_lrs = [new.train.lr for _ in scheduler.base_lrs]
        cfg, objective, chunked = new, obj, obj.use_chunked(vocab)
        access = cfg.teacher.access if cfg.teacher.access != "auto" else required_teacher_access(cfg)
        if main:
            dump_config(cfg, run_dir / "config.applied.yaml")
        return cfg

    monitor = Monitor(cfg, run_dir, write=main, eos_ids=tokenizer.eos_token_id,
                      echo=tqdm.write if main else None, apply_fn=apply_recipe)

    start = 0
    log = RunLog(run_dir, enabled=main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb)
    if resume is not None:
        ckpt = latest_checkpoint(run_dir)
        state = load_trainer_state(ckpt)
        load_model_weights(student, ckpt)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if value_head is not None and state.value_head is not None:
            value_head.load_state_dict(state.value_head)
        start = state.step
        log.truncate_after(start)
        for overrides in monitor.resume(start):  # recipes applied before the checkpoint
            monitor.cfg = apply_recipe(overrides)

    eval_examples = task.eval_examples(cfg.eval.size)
    eval_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    def run_eval(step: int) -> EvalResult:
        result = evaluate(student, tokenizer, task, eval_examples, max_new_tokens=eval_tokens,
                          batch_size=cfg.eval.batch_size, teacher=teacher)
        log.write("eval", step, result.as_metrics("eval"))
        if main:
            monitor.write_samples(step, tokenizer)
        return result

    began = time.time()
    before = teacher_result = None
    if main and start == 0:
        before = run_eval(0)
        if cfg.eval.teacher and teacher_model is not None and cfg.teacher.model != "self":
            teacher_result = evaluate(teacher_model, tokenizer, task, eval_examples, max_new_tokens=eval_tokens,
                                      batch_size=cfg.eval.batch_size)
            log.write("eval_teacher", 0, teacher_result.as_metrics("teacher"))

    student.train()
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=not (main and cfg.logging.progress),
               desc="opd distill", dynamic_ncols=True)
    last_acc = before.accuracy if before else float("nan")
    stopped = False
    done = start
    history: list[dict[str, float]] = []
    for step in bar:
        tic = time.time()
        metrics = train_step(cfg, step, task=task, student=student, tokenizer=tokenizer, teacher=teacher,
                             teacher_model=teacher_model, reference=reference, objective=objective, access=access,
                             optimizer=optimizer, scheduler=scheduler, params=params, value_head=value_head,
                             chunked=chunked, world=world, rank=rank, autocast=accelerator.autocast,
                             monitor=monitor)
        done = step + 1
        metrics["seconds"] = time.time() - tic
        metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
        if main and (done % t.log_every == 0 or done == t.steps):
            log.write("train", done, metrics)
        history.append({"step": done, **metrics})
        events = monitor.observe(done, metrics) if main else []
        if world > 1:
            _follow_main_monitor(monitor, events, main, apply_recipe)
        if main and cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
            last_acc = run_eval(done).accuracy
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", teacher_kl=f"{metrics['teacher_kl']:.4f}",
                        acc=f"{last_acc:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        interrupt = (t.stop_after is not None and done >= t.stop_after and done < t.steps) or (
            monitor.stop_reason is not None and done < t.steps)
        if main and ((t.checkpoint_every and done % t.checkpoint_every == 0) or interrupt):
            save_checkpoint(run_dir, done, student, tokenizer, optimizer, scheduler, value_head,
                            keep=t.keep_checkpoints)
        if interrupt:
            stopped = True
            break
    bar.close()

    after = None
    if main and (not stopped or monitor.stop_reason is not None):
        after = run_eval(done)
    if main and not stopped:
        student.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
    log.close()
    summary = RunSummary(run_dir=run_dir, steps=t.steps, before=before, after=after, teacher=teacher_result,
                         seconds=time.time() - began, stopped_early=stopped, history=history,
                         stop_reason=monitor.stop_reason)
    if main:
        write_json(run_dir / "summary.json", {
            "steps": t.steps, "steps_done": done, "seconds": summary.seconds, "stopped_early": stopped,
            "stop_reason": monitor.stop_reason, "skipped_steps": monitor.skipped_steps,
            **{k: (None if r is None else r.as_metrics(k)) for k, r in
               (("before", before), ("after", after), ("teacher", teacher_result))}})
        if cfg.logging.report:
            summary.report_path = _write_report(run_dir)
    return summary


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
            monitor.cfg = apply_fn(tuple(overrides))


def train_step(cfg: Config, step: int, *, task, student, tokenizer, teacher, teacher_model, reference,
               objective: Objective, access: str, optimizer, scheduler, params, value_head, chunked: bool,
               world: int = 1, rank: int = 0, autocast=None, monitor: Monitor | None = None) -> dict[str, float]:
    """One optimizer step (``updates_per_rollout`` passes over one rollout batch).

    With a ``monitor``: the step's metrics gain its ``diag/*`` diagnostics, and a pass whose loss,
    token statistics, teacher feedback or gradient norm hold NaN/Inf is skipped *before*
    ``optimizer.step()`` — gradients zeroed, weights and optimizer state untouched, ``skipped = 1``
    in the metrics. The LR scheduler still advances: the schedule is a function of the step number,
    and a skipped step is a step with no update.
    """
    r = cfg.rollout
    examples = task.train_examples(step, r.prompts_per_step, cfg.seed)
    per_rank = math.ceil(len(examples) / world)
    local = examples[rank * per_rank:(rank + 1) * per_rank]
    torch.manual_seed(step_seed(cfg.seed, step) + rank)
    student.eval()
    with torch.no_grad():
        rollouts = collect_rollouts(cfg, local, student, tokenizer, teacher_model=teacher_model,
                                    group_offset=rank * per_rank)
        feedback = teacher.score(rollouts, access=access, topk=cfg.teacher.topk)
        ref_fb = None
        if reference is not None:
            ref_access = "full" if cfg.regularization.ref_kl_estimator == "full" else "sampled"
            ref_fb = reference.score(rollouts, access=ref_access, topk=1)
        outcome = verify_rollouts(task, tokenizer, rollouts) if cfg.outcome.adv_tau > 0 else None
    student.train()
    batch = StepBatch(rollouts=rollouts, feedback=feedback, reference=ref_fb, outcome_rewards_B=outcome,
                      counts=token_counts(objective, rollouts, world))
    skipped = False
    for _ in range(r.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        sums, stats = accumulate_gradients(student, objective, batch, micro_batch_size=cfg.train.micro_batch_size,
                                           group_size=r.samples_per_prompt, chunked=chunked, value_head=value_head,
                                           autocast=autocast)
        sync_gradients(params, world)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if monitor is not None:
            bad = monitor.check_nonfinite(loss_terms=sums, stats=stats, feedback=feedback, grad_norm=grad_norm)
            if _on_any_process(bool(bad), world, params[0].device):
                optimizer.zero_grad(set_to_none=True)
                monitor.skip_step(step + 1, bad or {"another process": 1.0})
                skipped = True
                break
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a skipped first step calls the scheduler before any optimizer.step()
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
        scheduler.step()
    mask = stats["mask"]
    n_tok = mask.sum().clamp(min=1)
    metrics = dict(sums)
    metrics.update({
        "teacher_kl": float((stats["teacher_kl"] * mask).sum() / n_tok),
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": float(rollouts.completion_mask_BT.sum()),
        "mean_length": float(rollouts.lengths_B.float().mean()),
        "truncation_rate": float(rollouts.truncated_B.float().mean()),
    })
    if outcome is not None:
        metrics["outcome_reward"] = float(outcome.mean())
    if skipped:
        metrics["skipped"] = 1.0
    if monitor is not None:
        metrics.update(monitor.step_metrics(stats, rollouts))
    return metrics


def _on_any_process(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` OR-ed over processes (every process must skip the same step)."""
    if world <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)
