"""One optimizer step: rollout → feedback → objective → update. Knows no method by name.

:func:`train_step` takes the run's :class:`~opd.components.Components` and a step number; the
pieces it is made of are free functions so that tests can drive a single step (the
multi-process gradient test does) and the loop in :mod:`opd.train` stays short. The update goes
through ``accelerate``'s objects: the prepared :class:`PolicyModule` (DDP / FSDP / DeepSpeed),
``accelerator.no_sync`` between micro-batches, ``accelerator.backward``,
``accelerator.clip_grad_norm_`` and the prepared optimizer — no hand-written collectives for
gradients.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from opd.collect import collect_rollouts, step_seed
from opd.config.validate import scores_student_topk
from opd.errors import RunFault
from opd.evaluate import verify_rollouts
from opd.objective import Objective, ObjectiveOutput, StudentOutputs, TokenCounts
from opd.rollout import completion_forward, lm_head_of
from opd.sharding import gathered
from opd.teachers.student_support import add_student_topk
from opd.types import Feedback, Rollouts
from opd.xtok.diagnostics import alignment_metrics

if TYPE_CHECKING:
    from opd.components import Components


@dataclass
class StepBatch:
    """Everything the update needs, computed once per rollout batch (teacher runs once)."""

    rollouts: Rollouts
    feedback: Feedback
    reference: Feedback | None
    outcome_rewards_B: Tensor | None
    counts: TokenCounts


def student_forward(model: torch.nn.Module, rollouts: Rollouts, *, chunked: bool,
                    value_head: torch.nn.Module | None = None) -> StudentOutputs:
    """One student forward over the completion positions; it feeds the loss and the diagnostics."""
    args = (rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
            rollouts.completion_mask_BT)
    if not chunked and value_head is None:
        return StudentOutputs(logits_BTV=completion_forward(model, *args, output="logits"))
    hidden_BTH = completion_forward(model, *args, output="hidden")
    weight_VH, bias_V = lm_head_of(model)
    # the value head reads detached features: it estimates the policy's value, it does not shape it
    continuation_BT = None if value_head is None else value_head(hidden_BTH.detach().float()).squeeze(-1)
    if chunked:
        return StudentOutputs(hidden_BTH=hidden_BTH, head_weight_VH=weight_VH, head_bias_V=bias_V,
                              continuation_BT=continuation_BT)
    return StudentOutputs(logits_BTV=F.linear(hidden_BTH, weight_VH, bias_V), continuation_BT=continuation_BT)


def token_counts(objective: Objective, rollouts: Rollouts, world_size: int = 1) -> TokenCounts:
    """Normaliser counts over this process's rollouts, summed over all processes."""
    mask = objective.base_mask(rollouts)
    local = torch.tensor([float(mask.sum()), float((mask.sum(1) > 0).sum())], dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(local)
    return TokenCounts(num_tokens=float(local[0]), num_sequences=float(local[1]), world_size=world_size)


def micro_batches(batch_size: int, micro_batch_size: int | None, group_size: int) -> list[list[int]]:
    """Row indices per micro-batch; groups of ``G`` samples of one prompt stay together."""
    if micro_batch_size is None or micro_batch_size >= batch_size:
        return [list(range(batch_size))]
    size = max(group_size, (micro_batch_size // group_size) * group_size)
    return [list(range(s, min(s + size, batch_size))) for s in range(0, batch_size, size)]


class PolicyModule(torch.nn.Module):
    """What ``accelerator.prepare`` wraps: the student and, for GAE-OPD, its value head.

    Its forward runs the student over a micro-batch *and* evaluates the objective, so every use of
    a trainable parameter — the LM head of the memory-efficient route-1 path included — happens
    inside the wrapped forward, as DDP, FSDP and DeepSpeed require.
    """

    def __init__(self, student: torch.nn.Module, value_head: torch.nn.Module | None = None):
        super().__init__()
        self.student = student
        self.value_head = value_head

    def forward(self, rollouts: Rollouts, feedback: Feedback, *, objective: Objective, chunked: bool,
                reference: Feedback | None = None, outcome_rewards_B: Tensor | None = None,
                counts: TokenCounts | None = None) -> ObjectiveOutput:
        outputs = student_forward(self.student, rollouts, chunked=chunked, value_head=self.value_head)
        return objective(outputs, feedback, rollouts, reference=reference, outcome_rewards_B=outcome_rewards_B,
                         counts=counts)


def accumulate_gradients(
    model: torch.nn.Module,
    objective: Objective,
    batch: StepBatch,
    *,
    micro_batch_size: int | None,
    group_size: int,
    chunked: bool,
    accelerator: Any = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Forward/backward over micro-batches of ``batch``; gradients accumulate in ``.grad``.

    ``model`` is a :class:`PolicyModule` (prepared by ``accelerator``: its gradients are averaged
    over processes at the last micro-batch, the others run under ``accelerator.no_sync``; the loss
    is normalised by the global token counts times the number of processes, so the average is the
    single-process gradient of the global batch). Without an accelerator, plain autograd.

    Returns the summed loss terms and the batch's per-token statistics (concatenated in row
    order) for diagnostics.
    """
    sums: dict[str, float] = {}
    parts: list[tuple[list[int], dict[str, Tensor]]] = []
    chunks = micro_batches(batch.rollouts.batch_size, micro_batch_size, group_size)
    for i, rows in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = nullcontext() if accelerator is None or last else accelerator.no_sync(model)
        autocast = nullcontext() if accelerator is None else accelerator.autocast()
        with sync:
            with autocast:
                out: ObjectiveOutput = model(
                    batch.rollouts.select(rows), batch.feedback.select(rows), objective=objective, chunked=chunked,
                    reference=None if batch.reference is None else batch.reference.select(rows),
                    outcome_rewards_B=None if batch.outcome_rewards_B is None else batch.outcome_rewards_B[rows],
                    counts=batch.counts)
            if accelerator is None:
                out.loss.backward()
            else:
                accelerator.backward(out.loss)
        for key, value in out.metrics.items():
            if key.startswith("loss"):
                sums[key] = sums.get(key, 0.0) + value
        parts.append((rows, out.token_stats))
    return sums, _concat_stats(parts, batch.rollouts.batch_size)


def _concat_stats(parts: list[tuple[list[int], dict[str, Tensor]]], batch_size: int) -> dict[str, Tensor]:
    if len(parts) == 1:
        return {k: v.detach() for k, v in parts[0][1].items()}
    keys = set.intersection(*(set(p.keys()) for _, p in parts))
    out = {}
    for key in keys:
        first = parts[0][1][key]
        full = torch.zeros((batch_size, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for rows, stats in parts:
            full[rows] = stats[key].detach()
        out[key] = full
    return out


def prepare_batch(parts: "Components", step: int, *, sync: bool = True) -> StepBatch:
    """This process's share of step ``step``: prompts, rollouts, teacher (and reference) feedback,
    verifier rewards when the objective mixes them in. Seeded by ``(seed, step, rank)``.

    With ``sync`` the engine is first brought up to date with the student's weights (the previous
    step's update); the overlap prefetcher (:mod:`opd.overlap`) syncs it itself and passes False.
    A :class:`~opd.errors.RunFault` raised here (a server that failed) leaves the weights untouched.
    Nothing here touches the student's train/eval mode (the samplers and teachers restore it), so it
    may run in a background thread while the student trains.
    """
    cfg, r = parts.cfg, parts.cfg.rollout
    world, rank = parts.world, parts.rank
    examples = parts.task.train_examples(step, r.prompts_per_step, cfg.seed)
    per_rank = math.ceil(len(examples) / world)
    local = examples[rank * per_rank:(rank + 1) * per_rank]
    # a sharded student is gathered while it is read outside the prepared forward (main thread only;
    # the background sampler of rollout.overlap reads its own copy, refreshed by the prefetcher)
    full = gathered(parts.accelerator, parts.model) if sync else nullcontext()
    # train.precision applies to sampling and scoring as to the update (autocast is thread-local)
    with full, torch.no_grad(), parts.accelerator.autocast():
        if sync:
            parts.engine.sync_weights(parts.student)
        torch.manual_seed(step_seed(cfg.seed, step) + rank)
        rollouts = collect_rollouts(cfg, local, parts.engine, parts.tokenizer, student=parts.student,
                                    teacher_model=parts.teacher_model, group_offset=rank * per_rank)
        feedback = parts.teacher.score(rollouts, access=parts.access, topk=cfg.teacher.topk)
        if scores_student_topk(cfg):  # the server scores the student's top-k ids (opd.teachers.student_support)
            feedback = add_student_topk(parts.teacher, feedback, rollouts, _sampling_student(parts, sync),
                                        cfg.support.k, temperature=cfg.support.student_temperature,
                                        chunked=parts.chunked, micro_batch_size=cfg.train.micro_batch_size)
        ref_fb = None
        if parts.reference is not None:
            ref_access = "full" if cfg.regularization.ref_kl_estimator == "full" else "sampled"
            ref_fb = parts.reference.score(rollouts, access=ref_access, topk=1)
        if parts.value_source is not None:  # route2.value=exact_mc/critic, value probe (opd/value_source.py)
            feedback = parts.value_source.attach(parts, rollouts, feedback, step)
        needs_outcome = parts.objective.needs_outcome_rewards
        outcome = verify_rollouts(parts.task, parts.tokenizer, rollouts) if needs_outcome else None
    return StepBatch(rollouts=rollouts, feedback=feedback, reference=ref_fb, outcome_rewards_B=outcome,
                     counts=TokenCounts(0.0, 0.0, world))


def _sampling_student(parts: Components, sync: bool) -> torch.nn.Module:
    """The student as it sampled this batch: the live module, or (``rollout.overlap``, in the background)
    the engine's snapshot of the weights — the live module may be training meanwhile."""
    if sync:
        return parts.student
    snapshot = getattr(parts.engine, "model", None)
    if snapshot is None:
        raise ValueError(f"rollout.overlap with support.kind=student_topk and a teacher server needs the sampler's "
                         f"copy of the student, which the {type(parts.engine).__name__} engine does not expose; set "
                         "rollout.overlap=false")
    return snapshot


def train_step(parts: "Components", step: int) -> dict[str, float]:
    """One optimizer step (``updates_per_rollout`` passes over one rollout batch).

    The step's metrics carry the monitor's ``diag/*`` diagnostics; a pass whose loss, token
    statistics, teacher feedback or gradient norm hold NaN/Inf is skipped *before*
    ``optimizer.step()`` — gradients zeroed, weights and optimizer state untouched, ``skipped = 1``
    in the metrics. The LR scheduler still advances: the schedule is a function of the step number,
    and a skipped step is a step with no update. Weights that are not finite *after* the update
    (an infinite learning rate, an optimizer overflow) raise a :class:`~opd.errors.RunFault` naming
    the first such parameter.

    Under data parallelism every process learns whether any process failed to prepare its batch
    before the first collective of the update, so all stop together.
    """
    cfg, r = parts.cfg, parts.cfg.rollout
    lag = 0
    try:
        if parts.prefetch is not None:
            batch, lag = parts.prefetch.batch(step)
        else:
            batch = prepare_batch(parts, step)
        fault = None
    except RunFault as err:
        batch, fault = None, err
    if sync_flag(fault is not None, parts.world, parts.device):
        raise fault or RunFault(f"another process failed at step {step + 1} (see its output)")
    batch = replace(batch, counts=token_counts(parts.objective, batch.rollouts, parts.world))
    rollouts, monitor, optimizer, params = batch.rollouts, parts.monitor, parts.optimizer, parts.params
    parts.model.train()  # the update runs in training mode (samplers and teachers restore the mode they found)
    skipped = False
    for _ in range(r.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        sums, stats = accumulate_gradients(parts.model, parts.objective, batch,
                                           micro_batch_size=cfg.train.micro_batch_size,
                                           group_size=r.samples_per_prompt, chunked=parts.chunked,
                                           accelerator=parts.accelerator)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip is not None else float("inf")
        grad_norm = float(parts.accelerator.clip_grad_norm_(params, max_norm))
        bad = monitor.check_nonfinite(loss_terms=sums, stats=stats, feedback=batch.feedback, grad_norm=grad_norm)
        if sync_flag(bool(bad), parts.world, parts.device):
            optimizer.zero_grad(set_to_none=True)
            monitor.skip_step(step + 1, bad or {"another process": 1.0})
            skipped = True
            break
        optimizer.step()
        _check_finite_weights(parts, step + 1)
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a skipped first step calls the scheduler before any optimizer.step()
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
        parts.scheduler.step()
    metrics = dict(sums)
    metrics.update(_token_metrics(stats, rollouts))
    metrics.update({
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": float(rollouts.completion_mask_BT.sum()),
        "mean_length": float(rollouts.lengths_B.float().mean()),
        "truncation_rate": float(rollouts.truncated_B.float().mean()),
    })
    if batch.outcome_rewards_B is not None:
        metrics["outcome_reward"] = float(batch.outcome_rewards_B.mean())
    if skipped:
        metrics["skipped"] = 1.0
    if parts.value_source is not None and not skipped:  # trains the separate critic; value-probe metrics
        metrics.update(parts.value_source.after_step(rollouts, batch.feedback, stats))
    if parts.prefetch is not None:
        metrics["policy_lag"] = float(lag)  # steps between the sampling weights and the updated ones
    metrics.update(alignment_metrics(batch.feedback, rollouts.completion_mask_BT))  # teacher.tokenizer=own
    metrics.update(monitor.step_metrics(stats, rollouts))
    return metrics


def _token_metrics(stats: dict[str, Tensor], rollouts: Rollouts) -> dict[str, float]:
    """``teacher_kl``: mean of ``log π_S(y_t) − log π_T(y_t)`` over the student's own samples, whose
    expectation under the student is the per-token reverse KL; ``offpolicy_logratio``: the same
    quantity over off-policy rows (teacher samples, dataset answers), where it is *not* a KL
    (it is negative when the teacher likes its own samples more than the student does)."""
    mask = stats["mask"]
    on_BT = rollouts.on_policy_B.to(mask.device)[:, None] & mask
    out = {}
    for name, keep in (("teacher_kl", on_BT), ("offpolicy_logratio", mask & ~on_BT)):
        if bool(keep.any()):
            out[name] = float((stats["teacher_kl"] * keep).sum() / keep.sum())
    return out


def _check_finite_weights(parts: "Components", step: int) -> None:
    """Raise a RunFault when a trainable weight holds NaN/Inf after ``optimizer.step()``."""
    norms = torch._foreach_norm([p.detach() for p in parts.params])
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return
    named = [(n, p) for n, p in parts.student.named_parameters() if p.requires_grad]
    if parts.value_head is not None:
        named += [(f"value_head.{n}", p) for n, p in parts.value_head.named_parameters()]
    name = next((n for n, p in named if not bool(torch.isfinite(p).all())), "a parameter")
    raise RunFault(
        f"the weights are not finite after the update of step {step} ({name}); the gradients were finite, so the "
        f"update itself overflowed (train.lr={parts.cfg.train.lr:g}): lower train.lr or clip gradients "
        "(train.grad_clip); no checkpoint of these weights was written", state_intact=False)


def sync_flag(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` OR-ed over processes (every process must take the same decision)."""
    if world <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)
