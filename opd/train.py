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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from opd.build import build_reference, build_student, build_task, build_teacher, special_token_ids
from opd.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from opd.collect import collect_rollouts, step_seed
from opd.config.load import dump_config, load_config
from opd.config.schema import Config
from opd.config.validate import required_teacher_access
from opd.evaluate import EvalResult, evaluate, verify_rollouts
from opd.objective import Objective
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
    objective = Objective.from_config(cfg, eos_id=tokenizer.eos_token_id, special_ids=special_token_ids(tokenizer))
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

    eval_examples = task.eval_examples(cfg.eval.size)
    eval_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    def run_eval(step: int) -> EvalResult:
        result = evaluate(student, tokenizer, task, eval_examples, max_new_tokens=eval_tokens,
                          batch_size=cfg.eval.batch_size, teacher=teacher)
        log.write("eval", step, result.as_metrics("eval"))
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
    history: list[dict[str, float]] = []
    for step in bar:
        tic = time.time()
        metrics = train_step(cfg, step, task=task, student=student, tokenizer=tokenizer, teacher=teacher,
                             teacher_model=teacher_model, reference=reference, objective=objective, access=access,
                             optimizer=optimizer, scheduler=scheduler, params=params, value_head=value_head,
                             chunked=chunked, world=world, rank=rank, autocast=accelerator.autocast)
        done = step + 1
        metrics["seconds"] = time.time() - tic
        metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
        if main and (done % t.log_every == 0 or done == t.steps):
            log.write("train", done, metrics)
        history.append({"step": done, **metrics})
        if main and cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
            last_acc = run_eval(done).accuracy
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", teacher_kl=f"{metrics['teacher_kl']:.4f}",
                        acc=f"{last_acc:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        interrupt = t.stop_after is not None and done >= t.stop_after and done < t.steps
        if main and ((t.checkpoint_every and done % t.checkpoint_every == 0) or interrupt):
            save_checkpoint(run_dir, done, student, tokenizer, optimizer, scheduler, value_head,
                            keep=t.keep_checkpoints)
        if interrupt:
            stopped = True
            break
    bar.close()

    after = None
    if main and not stopped:
        after = run_eval(t.steps)
        student.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
    log.close()
    return RunSummary(run_dir=run_dir, steps=t.steps, before=before, after=after, teacher=teacher_result,
                      seconds=time.time() - began, stopped_early=stopped, history=history)


def train_step(cfg: Config, step: int, *, task, student, tokenizer, teacher, teacher_model, reference,
               objective: Objective, access: str, optimizer, scheduler, params, value_head, chunked: bool,
               world: int = 1, rank: int = 0, autocast=None) -> dict[str, float]:
    """One optimizer step (``updates_per_rollout`` passes over one rollout batch)."""
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
    for _ in range(r.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        sums, stats = accumulate_gradients(student, objective, batch, micro_batch_size=cfg.train.micro_batch_size,
                                           group_size=r.samples_per_prompt, chunked=chunked, value_head=value_head,
                                           autocast=autocast)
        sync_gradients(params, world)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
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
    return metrics
