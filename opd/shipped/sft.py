"""Supervised training of the small shipped checkpoints (arith, cross-tokenizer and chat families).

One loop for every phase: a fresh tiny Llama (:func:`opd.models.tiny_llama_config`) trained with
AdamW on ``(prompt ids, completion ids)`` batches that the caller draws per step, cross-entropy on
the completion tokens only, linear warmup then cosine decay to ``0.1·lr`` (or a constant rate), and
a greedy held-out evaluation through opd's own rollout engine every few steps. A teacher phase stops
at ``target`` accuracy (keeping its best evaluation); a student phase stops as soon as it first
reaches ``target`` (a warm start that leaves room for distillation). Everything is seeded; with a
fixed thread count a rerun writes the same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.models import build_model, count_parameters, tiny_llama_config

__all__ = ["SFTPhase", "lr_factor", "pad_batch", "sft_update", "train_sft"]

#: ``step -> (prompt id lists, completion id lists)`` of one training batch.
BatchFn = Callable[[int], tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]]


@dataclass(frozen=True)
class SFTPhase:
    """How one checkpoint is trained (see the module docstring).

    ``stop_at_first``: stop as soon as held-out accuracy reaches ``target`` (students); otherwise
    stop at ``target`` but keep the best evaluation seen (teachers). ``cosine``: cosine decay after
    warmup (else a constant rate). ``[min_accuracy, max_accuracy]``: the accepted final accuracy.
    """

    name: str
    layers: int
    hidden: int
    lr: float
    batch_size: int
    warmup: int
    max_steps: int
    target: float
    min_accuracy: float
    max_accuracy: float = 1.0
    stop_at_first: bool = False
    cosine: bool = True
    seed: int = 0
    eval_every: int = 25
    eval_every_rising: int = 10
    max_positions: int = 64
    heads: int = 4


def pad_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside completions)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, len(p):len(r)] = ids[i, len(p):len(r)]
    return ids, mask, labels


def lr_factor(step: int, *, warmup: int, max_steps: int, cosine: bool) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then constant, or
    (``cosine``) a cosine decay from 1 to 0.1 at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_update(model: PreTrainedModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """One supervised step: next-token cross-entropy on the ``labels`` positions (−100 elsewhere),
    gradient clipped to norm 1, optimizer step. Returns the (detached-use) loss."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def train_sft(phase: SFTPhase, tokenizer: PreTrainedTokenizerBase, batch_fn: BatchFn,
              evaluate: Callable[[PreTrainedModel], float], *,
              log: Callable[[str], None] = print) -> tuple[PreTrainedModel, dict]:
    """Train one checkpoint; return the model (eval mode) and its card.

    Raises:
        RuntimeError: the final accuracy is outside ``[min_accuracy, max_accuracy]`` (the message
            says what to change).
    """
    config = tiny_llama_config(len(tokenizer), layers=phase.layers, hidden=phase.hidden, heads=phase.heads,
                               max_positions=phase.max_positions, tokenizer=tokenizer)
    model = build_model(config, seed=phase.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)
    torch.manual_seed(phase.seed)
    train_s = eval_s = 0.0
    history: list[tuple[int, float, float]] = []
    best: tuple[float, int, dict | None] = (-1.0, 0, None)
    accuracy, step, loss_avg, next_eval = 0.0, 0, float("nan"), phase.eval_every
    while step < phase.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * lr_factor(step, warmup=phase.warmup, max_steps=phase.max_steps,
                                                       cosine=phase.cosine)
        t0 = time.perf_counter()
        model.train()
        prompts, completions = batch_fn(step)
        loss = sft_update(model, optimizer, *pad_batch(prompts, completions, int(tokenizer.pad_token_id)))
        step += 1
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
        train_s += time.perf_counter() - t0
        if step == next_eval or step == phase.max_steps:
            t0 = time.perf_counter()
            model.eval()
            accuracy = evaluate(model)
            eval_s += time.perf_counter() - t0
            history.append((step, round(train_s, 2), accuracy))
            log(f"  [{phase.name}] step {step:5d}  loss {loss_avg:.3f}  held-out acc {accuracy:6.1%}  "
                f"train {train_s:6.1f}s  eval {eval_s:5.1f}s")
            next_eval = step + (phase.eval_every_rising if accuracy >= 0.05 else phase.eval_every)
            if not phase.stop_at_first and accuracy > best[0]:
                best = (accuracy, step, {k: v.clone() for k, v in model.state_dict().items()})
            if accuracy >= phase.target:
                break
    if not phase.stop_at_first and best[2] is not None and best[0] > accuracy:
        log(f"  [{phase.name}] keeping the best evaluation: step {best[1]} ({best[0]:.1%})")
        accuracy, step = best[0], best[1]
        model.load_state_dict(best[2])
    model.eval()
    if not phase.min_accuracy <= accuracy <= phase.max_accuracy:
        raise RuntimeError(
            f"{phase.name}: held-out accuracy {accuracy:.1%} after {step} steps is outside the accepted range "
            f"[{phase.min_accuracy:.0%}, {phase.max_accuracy:.0%}]; retry with another --seed or raise max_steps")
    card = {"name": phase.name, "parameters": count_parameters(model), "layers": phase.layers,
            "hidden": phase.hidden, "heldout_accuracy": accuracy, "steps": step,
            "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
            "threads": torch.get_num_threads(), "phase": asdict(phase), "history": history}
    return model, card
