"""Train the shipped cross-tokenizer demo teacher ``builtin:arith_bpe/teacher`` (:mod:`opd.tasks.arith_bpe`):
the arith teacher's recipe with its own BPE tokenizer.

``opd make-checkpoints arith_bpe`` (:func:`main`) trains it on the ground truth (prompt and answer
tokenized separately, as the cross-tokenizer teacher scores a completion) until 99 % greedy
held-out accuracy, through :func:`opd.shipped.sft.train_sft`, and writes
``opd/assets/arith_bpe/teacher`` with an ``opd_card.json``. Seeded; with a fixed thread count a
rerun writes the same weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from opd.rollout import Sampling, generate_rollouts
from opd.shipped.options import apply_options, family_parser
from opd.shipped.save import log, train_and_save
from opd.shipped.sft import SFTPhase, train_sft
from opd.tasks.arith import ArithTask
from opd.tasks.arith_bpe import arith_bpe_tokenizer
from opd.tasks.assets import ASSETS
from opd.tasks.base import Example

__all__ = ["TEACHER_PHASE", "greedy_accuracy", "main"]

TEACHER_PHASE = SFTPhase("teacher", layers=3, hidden=128, lr=1e-3, batch_size=128, warmup=100, max_steps=2500,
                         target=0.99, min_accuracy=0.97, eval_every=50, eval_every_rising=25)


def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example],
                    max_new_tokens: int) -> float:
    """Exact match of the greedy completion (decoded up to the EOS, which must be there)."""
    rollouts = generate_rollouts(model, tokenizer, list(examples), Sampling(max_new_tokens=max_new_tokens, greedy=True))
    eos = int(tokenizer.eos_token_id)
    correct = 0
    for ids, mask, e in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, examples, strict=True):
        row = ids[mask.bool()].tolist()
        if row and row[-1] == eos:
            correct += tokenizer.decode(row[:-1], skip_special_tokens=True) == e.answer
    return correct / len(examples)


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save ``opd/assets/arith_bpe/teacher``; 0 on success, 1 when it missed its range."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = family_parser("arith_bpe", "Train the arith teacher with its own BPE tokenizer (cross-tokenizer demo; "
                           "deterministic, a few minutes on 2 CPU cores).", out=ASSETS / "arith_bpe", threads=2)
    args = parser.parse_args(argv)
    command = apply_options(parser, args, "arith_bpe", argv)
    tokenizer = arith_bpe_tokenizer()
    task = ArithTask(digits=3, eval_size=500, seed=0)
    eos = int(tokenizer.eos_token_id)
    phase = SFTPhase(**{**TEACHER_PHASE.__dict__, "seed": args.seed})

    def batch(step: int):
        examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
        prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
        answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
        return prompts, answers

    held_out = task.eval_examples()

    def accuracy(model: PreTrainedModel) -> float:
        return greedy_accuracy(model, tokenizer, held_out, task.max_new_tokens)

    started = time.perf_counter()
    print(f"training arith_bpe/teacher: {phase.layers}x{phase.hidden}, BPE vocabulary {len(tokenizer)}", flush=True)
    done = train_and_save(
        lambda: train_sft(phase, tokenizer, batch, accuracy, log=log),
        tokenizer, args.out / "teacher", task=repr(task), heldout_size=len(held_out),
        tokenizer=f"BPE, {len(tokenizer)} tokens", command=command)
    if done is None:
        return 1
    _, card, size = done
    print(f"arith_bpe/teacher: {card['parameters']:,} parameters, {size / 1e6:.2f} MB, held-out accuracy "
          f"{card['heldout_accuracy']:.1%} after {card['steps']} steps ({card['train_seconds']:.0f} s training); "
          f"total {time.perf_counter() - started:.0f} s; written to {args.out / 'teacher'}")
    return 0
