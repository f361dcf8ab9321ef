"""Train the shipped ``arith`` checkpoints: a teacher from scratch, a student warm-started on it.

``opd make-checkpoints arith`` (which calls :func:`main`) writes four checkpoints
into ``opd/assets/arith/``, each a ``save_pretrained`` folder (model + tokenizer, safetensors,
float32) with an ``opd_card.json`` (parameters, held-out accuracy, steps, seconds, the phase
settings and the command):

* ``teacher`` (3-digit, 3 layers x 128): supervised on the ground truth until its greedy exact
  match on the 500 held-out prompts reaches 99 % (the best evaluation is kept if it never does);
* ``student`` (3-digit, 2 x 64, 2 heads of 32 so that vLLM can run it): warm-started by supervised training on teacher samples
  (temperature 1) and stopped as soon as its held-out accuracy first reaches 50 %, so on-policy
  distillation has room to lift it towards the teacher;
* ``smoke_teacher`` (2 x 64) / ``smoke_student`` (1 x 32): the same for 2-digit addition, for
  fast tests.

Measured choices (2 CPU cores, see :data:`PHASES`):

* every model sits on a loss plateau (about 1.5 nats/token, 0 % accuracy) before a sudden
  breakthrough whose timing depends on the seed; a 3 x 96 teacher was still on a second plateau
  after 800 steps, 3 x 128 and 4 x 128 both reach 99 % in about 650 steps, and 3 x 128 keeps the
  file under 4 MB;
* a quarter of each student batch carries the teacher-only hint in front of the prompt
  (``hint_fraction``). Students trained without it sat at a fragile point where any further
  update (reverse-KL distillation even at lr 1e-4) first dropped their accuracy by 15-45 points;
  with it, two seeds rose smoothly from 54-55 % to 89-93 % in 150 reverse-KL steps at lr 3e-4.
  It also lets the student act as a privileged self-teacher (``heldout_accuracy_with_context``
  in the card). The smoke student is trained without it: the fast tests only need a student
  well below its teacher, and were calibrated on that checkpoint.

Everything is seeded and runs with a fixed number of threads, so a rerun on the same machine
writes the same weights; on other hardware the numerics, and so the exact stopping step, may
differ slightly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.shipped.options import apply_options, family_parser
from opd.shipped.save import log, train_and_save
from opd.shipped.sft import SFTPhase, train_sft
from opd.tasks.arith import ARITH_EOS, ArithTask, arith_tokenizer
from opd.tasks.assets import ASSETS
from opd.tasks.base import Example

__all__ = ["PHASES", "Phase", "generate_completions", "greedy_accuracy", "main", "train_phase"]


@dataclass(frozen=True, kw_only=True)
class Phase(SFTPhase):
    """How one checkpoint is trained: an :class:`~opd.shipped.sft.SFTPhase` of the ``digits``-digit task.

    ``teacher=None``: supervised on the ground truth, AdamW, ``warmup`` linear steps then cosine
    decay to ``0.1 * lr`` at ``max_steps``; stops when held-out accuracy >= ``target`` (the best
    evaluation is kept). ``teacher="name"``: supervised on that checkpoint's samples at temperature
    1, ``warmup`` then constant lr; stops when held-out accuracy first reaches ``target``. So
    ``stop_at_first`` and ``cosine`` follow from ``teacher`` (values passed for them are replaced).
    ``min_accuracy``/``max_accuracy``: the accepted range of the final accuracy (else an error).
    ``hint_fraction``: share of each batch whose prompt is preceded by the example's
    ``teacher_context`` (the target stays the answer to the bare prompt).
    ``heads``: attention heads (head dimension ``hidden // heads``; vLLM's CPU attention needs a
    head dimension of at least 32, so a model served or sampled by vLLM must keep ``hidden / heads
    >= 32``).
    """

    digits: int
    teacher: str | None = None
    eval_every_rising: int = 5  # once accuracy >= 5 % (students: catch the band on the way up)
    eval_size: int = 500  # held-out prompts used for stopping and for the card
    hint_fraction: float = 0.0  # share of each batch whose prompt carries the teacher-only hint

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_at_first", self.teacher is not None)
        object.__setattr__(self, "cosine", self.teacher is None)


#: The shipped checkpoints, in training order (a student's teacher comes first).
PHASES: dict[str, Phase] = {
    p.name: p
    for p in (
        Phase("teacher", digits=3, layers=3, hidden=128, lr=1e-3, batch_size=128, warmup=100,
              max_steps=800, target=0.99, min_accuracy=0.97, eval_every=50, eval_every_rising=25),
        Phase("student", digits=3, layers=2, hidden=64, lr=1e-3, batch_size=128, warmup=50,
              max_steps=2000, target=0.5, min_accuracy=0.4, max_accuracy=0.75, teacher="teacher",
              hint_fraction=0.25, heads=2),
        Phase("smoke_teacher", digits=2, layers=2, hidden=64, lr=3e-3, batch_size=128, warmup=50,
              max_steps=800, target=0.99, min_accuracy=0.97, eval_every=50, eval_every_rising=25),
        Phase("smoke_student", digits=2, layers=1, hidden=32, lr=3e-3, batch_size=128, warmup=20,
              max_steps=2000, target=0.5, min_accuracy=0.4, max_accuracy=0.75, teacher="smoke_teacher"),
    )
}


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    sample: bool,
    batch_size: int = 1024,
) -> list[list[int]]:
    """Completion token ids per prompt (KV-cached ``generate``), cut after the first EOS.

    ``sample=False`` is greedy; ``sample=True`` samples at temperature 1 from the full
    distribution (global torch RNG). A completion without EOS was truncated at ``max_new_tokens``.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        kwargs = {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": None} if sample else {"do_sample": False}
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs)
        for row in seqs[:, enc.input_ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: ArithTask,
    examples: Sequence[Example],
    *,
    with_context: bool = False,
) -> float:
    """Greedy exact-match accuracy of ``model`` on ``examples`` (the task's verifier).

    ``with_context=True`` prepends each example's ``teacher_context`` to its prompt, as a
    privileged self-teacher sees it.
    """
    prompts = [(e.teacher_context or "") + e.prompt if with_context else e.prompt for e in examples]
    completions = generate_completions(model, tokenizer, prompts, task.max_new_tokens, sample=False)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=False)
    return sum(task.verify(e, c) for e, c in zip(examples, texts)) / len(examples)



def train_phase(
    phase: Phase,
    teacher: PreTrainedModel | None = None,
    *,
    log: Callable[[str], None] = print,
) -> tuple[PreTrainedModel, dict]:
    """Train one checkpoint as ``phase`` says (through :func:`opd.shipped.sft.train_sft`); return the
    model and its card (a dict).

    A teacher phase (``teacher=None``) trains on the ground truth with a cosine schedule and keeps
    its best evaluation; a student phase trains on ``teacher``'s samples at temperature 1 (drawn 8
    steps at a time: ``generate``'s overhead is per call) with a constant rate and stops at its first
    ``target``. The first ``hint_fraction`` of each batch sees the teacher-only hint in front of the
    prompt (the module docstring says why); the target stays the answer to the bare prompt.

    Raises:
        ValueError: a student phase without its ``teacher`` model.
        RuntimeError: the final accuracy is outside ``[min_accuracy, max_accuracy]`` (the message
            says what to change: usually the seed or the step budget).
    """
    if phase.teacher is not None and teacher is None:
        raise ValueError(f"phase {phase.name!r} distils from {phase.teacher!r}: pass its model as teacher=")
    tokenizer = arith_tokenizer()
    task = ArithTask(digits=phase.digits, eval_size=phase.eval_size, context="answer")
    n_hint = round(phase.hint_fraction * phase.batch_size)
    eval_set = task.eval_examples()
    cache: list[list[int]] = []

    def batch(step: int) -> tuple[list[list[int]], list[list[int]]]:
        nonlocal cache
        examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
        if teacher is None:
            completions = [tokenizer(e.answer + ARITH_EOS, add_special_tokens=False).input_ids for e in examples]
        else:
            if not cache:
                prompts = [e.prompt for s in range(step, step + 8)
                           for e in task.train_examples(s, phase.batch_size, seed=phase.seed)]
                cache = generate_completions(teacher, tokenizer, prompts, task.max_new_tokens, sample=True)
            completions, cache = cache[: phase.batch_size], cache[phase.batch_size:]
        prompts = [e.teacher_context + e.prompt if i < n_hint else e.prompt for i, e in enumerate(examples)]
        return tokenizer(prompts).input_ids, completions

    model, sft_card = train_sft(phase, tokenizer, batch, lambda m: greedy_accuracy(m, tokenizer, task, eval_set), log=log)
    card = {
        "name": phase.name, "task": repr(task), "parameters": sft_card["parameters"],
        "layers": phase.layers, "hidden": phase.hidden, "heads": phase.heads,
        "heldout_accuracy": sft_card["heldout_accuracy"],
        "heldout_accuracy_with_context": greedy_accuracy(model, tokenizer, task, eval_set, with_context=True),
        "heldout_size": len(eval_set), "steps": sft_card["steps"], "train_seconds": sft_card["train_seconds"],
        "eval_seconds": sft_card["eval_seconds"], "threads": sft_card["threads"],
        "phase": asdict(phase), "history": sft_card["history"],
    }
    return model, card


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: train and save the shipped arith checkpoints; print a table.

    Returns the exit status: 0, or 1 when a checkpoint missed its accuracy range (the message on
    stderr says which and what to change).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = family_parser("arith", "Train the arith teacher/student checkpoints shipped in opd/assets/arith "
                           "(deterministic; a few minutes on 2 CPU cores).", out=ASSETS / "arith", threads=2)
    parser.add_argument("--only", nargs="+", choices=list(PHASES), default=list(PHASES),
                        help="checkpoints to (re)train; a student needs its teacher in --out or in this list")
    args = parser.parse_args(argv)
    command = apply_options(parser, args, "arith", argv)

    from opd.models import load_model  # here so that `--help` stays fast

    models: dict[str, PreTrainedModel] = {}
    rows = []
    t_start = time.perf_counter()
    for name in [n for n in PHASES if n in args.only]:
        phase = PHASES[name]
        if args.seed != phase.seed:
            phase = Phase(**{**asdict(phase), "seed": args.seed})
        teacher = None
        if phase.teacher is not None:
            teacher = models.get(phase.teacher)
            if teacher is None:
                path = args.out / phase.teacher
                if not (path / "config.json").is_file():
                    parser.error(f"{name} needs its teacher {phase.teacher!r}: add it to --only or train it into {path} first")
                teacher = load_model(path)
        print(f"training {name}: {phase.layers}x{phase.hidden}, {phase.digits}-digit, "
              f"{'teacher samples from ' + phase.teacher if phase.teacher else 'ground truth'}", flush=True)
        done = train_and_save(lambda: train_phase(phase, teacher, log=log), arith_tokenizer(), args.out / name,
                              command=command)
        if done is None:
            return 1
        model, card, size = done
        models[name] = model
        rows.append((name, card["parameters"], size, card["heldout_accuracy"], card["steps"], card["train_seconds"], card["eval_seconds"]))

    print(f"\n{'checkpoint':<14} {'params':>9} {'size':>9} {'held-out acc':>12} {'steps':>6} {'train s':>8} {'eval s':>7}")
    for name, params, size, acc, steps, train_s, eval_s in rows:
        print(f"{name:<14} {params:>9,} {size / 1e6:>7.2f}MB {acc:>12.1%} {steps:>6} {train_s:>8.1f} {eval_s:>7.1f}")
    print(f"total wall time {time.perf_counter() - t_start:.0f}s; written to {args.out}")
    return 0
