"""Train the shipped ``arith_chat`` pair (:mod:`opd.tasks.arith_chat`): a teacher on the ground truth,
a student warm-started on the teacher's samples.

``opd make-checkpoints chat`` (:func:`main`) writes ``opd/assets/arith_chat/teacher``
(3 layers × 128) and ``student`` (2 × 64), each with an ``opd_card.json``. Both are trained on every
assistant turn (``train_turns=all``) with the conversation before the turn as the prompt — exactly
the prompt ids the chat data path produces — and the loss on the turn's tokens and its EOS only.
The teacher trains until 98 % greedy held-out accuracy (its best evaluation is kept); the student on
the teacher's samples at temperature 1 until its accuracy first reaches 50 %, leaving room for
distillation. Head dimension 32 throughout (vLLM's CPU attention supports it). Seeded; with a fixed
thread count a rerun writes the same weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.data import ArithChatTask
from opd.evaluate import verify_rollouts
from opd.models import load_model
from opd.rollout import Sampling, generate_rollouts
from opd.shipped.options import apply_options, family_parser
from opd.shipped.save import log, train_and_save
from opd.shipped.sft import SFTPhase, train_sft
from opd.tasks.arith_chat import arith_chat_tokenizer
from opd.tasks.assets import ASSETS

__all__ = ["PHASES", "greedy_accuracy", "main"]
#: Longest completion: a 3-digit answer and the end-of-turn token (one spare).
MAX_NEW_TOKENS = 5

PHASES: dict[str, SFTPhase] = {
    "teacher": SFTPhase("teacher", layers=3, hidden=128, heads=4, lr=1e-3, batch_size=128, warmup=100,
                        max_steps=2500, target=0.98, min_accuracy=0.95, eval_every=50, eval_every_rising=25),
    "student": SFTPhase("student", layers=2, hidden=64, heads=2, lr=1e-3, batch_size=128, warmup=50,
                        max_steps=3000, target=0.5, min_accuracy=0.35, max_accuracy=0.75, stop_at_first=True,
                        cosine=False, eval_every=50, eval_every_rising=10),
}


def greedy_accuracy(model: PreTrainedModel, task: ArithChatTask, tokenizer: PreTrainedTokenizerBase,
                    n: int = 500) -> float:
    """Held-out verifier accuracy of greedy turns, through opd's rollout engine (as ``opd distill`` evaluates)."""
    examples = task.eval_examples(n)
    rollouts = generate_rollouts(model, tokenizer, examples, Sampling(max_new_tokens=MAX_NEW_TOKENS, greedy=True))
    return float(verify_rollouts(task, tokenizer, rollouts).mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save the pair; 0 on success, 1 when a checkpoint missed its accuracy range."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = family_parser("chat", "Train the arith_chat teacher/student (deterministic; minutes on 2 CPU cores).",
                           out=ASSETS / "arith_chat", threads=2)
    parser.add_argument("--only", nargs="+", choices=list(PHASES), default=list(PHASES))
    args = parser.parse_args(argv)
    command = apply_options(parser, args, "chat", argv)
    tokenizer = arith_chat_tokenizer()
    task = ArithChatTask(tokenizer, train_turns="all", eval_size=500, seed=0)
    eos = int(tokenizer.eos_token_id)
    models: dict[str, PreTrainedModel] = {}
    started = time.perf_counter()
    for name in [n for n in PHASES if n in args.only]:
        phase = SFTPhase(**{**PHASES[name].__dict__, "seed": args.seed})
        if name == "teacher":
            def batch(step: int, phase=phase):
                examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
                prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
                answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
                return prompts, answers
        else:
            teacher = models.get("teacher")
            if teacher is None:
                path = args.out / "teacher"
                if not (path / "config.json").is_file():
                    parser.error(f"the student needs its teacher: add teacher to --only or train it into {path} first")
                teacher = load_model(path)

            def batch(step: int, phase=phase, teacher=teacher):
                examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
                with torch.no_grad():
                    samples = generate_rollouts(teacher, tokenizer, examples, Sampling(max_new_tokens=MAX_NEW_TOKENS))
                prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
                answers = [ids[m.bool()].tolist() for ids, m in zip(samples.completion_ids_BT,
                                                                     samples.completion_mask_BT, strict=True)]
                return prompts, answers
        print(f"training arith_chat/{name}: {phase.layers}x{phase.hidden}", flush=True)
        done = train_and_save(
            lambda: train_sft(phase, tokenizer, batch, lambda m: greedy_accuracy(m, task, tokenizer), log=log),
            tokenizer, args.out / name, task=repr(task), heldout_size=500, command=command,
            trained_on="ground truth" if name == "teacher" else "teacher samples (temperature 1)")
        if done is None:
            return 1
        model, card, size = done
        models[name] = model
        print(f"arith_chat/{name}: {card['parameters']:,} parameters, {size / 1e6:.2f} MB, held-out accuracy "
              f"{card['heldout_accuracy']:.1%} after {card['steps']} steps ({card['train_seconds']:.0f} s training)",
              flush=True)
    print(f"total {time.perf_counter() - started:.0f} s; written to {args.out}")
    return 0
