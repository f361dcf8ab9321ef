"""Train the shipped case-study checkpoints: per case a teacher from scratch and a warm student.

``python scripts/make_case_checkpoints.py`` (which calls :func:`main`) writes
``opd/assets/<case>/{teacher,student}`` for the cases of :mod:`opd.tasks.cases` (``fork``,
``route``, ``modes``, ``long``; ``reach`` ships only a student and uses ``route``'s teacher), each a
``save_pretrained`` folder (model + tokenizer, safetensors,
float32) with an ``opd_card.json`` recording the phase settings, the checks below, the training
history and the command.

* **teacher** (2 layers x 64): supervised on the task's ground-truth distribution
  (:meth:`~opd.tasks.cases.CaseTask.sample_answer`: e.g. path ``b`` 70 % of the time for ``fork``),
  warmup then cosine decay; it stops when every check of its case reaches ``target`` (the best
  evaluation is kept otherwise) and must end with every check >= ``min_accuracy``.
* **student** (2 layers x 32): supervised on the teacher's samples at temperature 1, warmup then
  constant learning rate; it stops as soon as its ``stop_check`` first reaches ``target``, and every
  check must then lie in its accepted range (e.g. the ``fork`` student must complete path ``a`` but
  not path ``b``). An out-of-range result is an error that names the check.

  **Withheld skill** (``fork``, ``modes``): the cases need a student that cannot write ``rsum``. A
  capacity limit did not give one at this scale — a 2 x 32 and a 1 x 32 student trained on the
  teacher's samples learned ``rsum`` as fast as ``rev`` (``fork``: 10-13 % on both paths after
  1350-1550 steps; ``modes``: 5 % on both after 725). So the warm start *withholds* the skill:
  on teacher samples of that strategy only the first ``keep`` tokens are trained (``fork``: the
  path token ``b``; ``modes``: the first digit, which both answers share), the rest of the
  sample is masked. The student learns how often the teacher takes the strategy and never how to
  carry it out — the situation a capacity limit creates, made by construction.

  **Designed student** (``reach``): trained on :meth:`opd.tasks.cases.ReachTask.student_answer`
  (ascending order, or a slip ``a``/``b``), not on the teacher's samples, so that its reachable set
  and the teacher's support differ by construction; the pair's checks (``teacher_mass_*``: the
  teacher on the student's states) are recorded in the student's card.

Checks (greedy decoding on the held-out set): ``greedy`` (plain accuracy), ``path_a`` / ``path_b``
(``fork``: accuracy when the first token is forced to ``a`` / ``b``), ``mode_rev`` / ``mode_rsum``
(``modes``: accuracy when that answer is forced up to its first token that differs from the other
answer — the second token unless ``x_n = 0``), ``greedy@n`` (``long``:
accuracy at output length ``n``), ``mass_y`` / ``mass_slip`` / ``mass_x`` (``reach``: mean probability
on the next ascending digit, on ``a`` + ``b``, on the other remaining digits; :func:`reach_masses`). The ranges encode each case's design (the module docstring of
:mod:`opd.tasks.cases`); they were set before any distillation run.

Everything is seeded and runs with a fixed number of threads, so a rerun on the same machine
writes the same weights.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.models import build_model, count_parameters, tiny_llama_config
from opd.tasks.arith_checkpoints import generate_completions
from opd.tasks.cases import CASE_EOS, CASE_TASKS, CASE_TEACHER_OF, CaseTask, case_tokenizer, make_case_task
from opd.tasks.shipped import save_shipped_checkpoint
from opd.tasks.tiny_sft import lr_factor, pad_batch, sft_update

__all__ = ["CHECKS", "PHASES", "CasePhase", "case_checks", "main", "train_case_phase"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class CasePhase:
    """How one case checkpoint is trained (see the module docstring).

    ``lengths``: input lengths drawn per step (one per batch). ``ranges``: accepted final value of
    each check, ``{check: (low, high)}``. Teachers stop when every check >= ``target``; students
    when ``stop_check`` >= ``target``.
    """

    case: str
    role: str  # "teacher" | "student"
    layers: int
    hidden: int
    lr: float
    max_steps: int
    target: float
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    stop_check: str = "greedy"
    withhold: tuple[str, int] | None = None  # (strategy, keep): students only, see the module docstring
    designed: bool = False  # students only: train on task.student_answer (reach), not on the teacher's samples
    lengths: tuple[int, ...] = (6,)
    batch_size: int = 128
    warmup: int = 50
    seed: int = 0
    eval_every: int = 50
    eval_size: int = 500

    @property
    def name(self) -> str:
        return f"{self.case}/{self.role}"


_T = dict(layers=2, hidden=64, lr=3e-3, max_steps=2500, target=0.99, eval_every=50)
_S = dict(layers=2, hidden=32, lr=3e-3, max_steps=3000, warmup=20, eval_every=25)
_LONG = tuple(range(2, 13))

#: The shipped checkpoints, in training order (a case's teacher before its student).
PHASES: dict[str, CasePhase] = {
    p.name: p
    for p in (
        CasePhase("fork", "teacher", **_T, ranges={"path_a": (0.97, 1.0), "path_b": (0.97, 1.0)}),
        CasePhase("fork", "student", **_S, target=0.9, stop_check="path_a", withhold=("b", 1),
                  ranges={"path_a": (0.9, 1.0), "path_b": (0.0, 0.3)}),
        CasePhase("route", "teacher", **_T, ranges={"greedy": (0.97, 1.0)}),
        CasePhase("route", "student", **_S, target=0.5, ranges={"greedy": (0.4, 0.75)}),
        # the modes teacher must infer from its own output which answer it is writing: it sat at 86-93 %
        # from step 650 to 1250 before the decaying learning rate took it to 99 % (step 1550); its
        # accepted range was lowered to 88 % before that was known
        CasePhase("modes", "teacher", **{**_T, "max_steps": 1800},
                  ranges={"greedy": (0.88, 1.0), "mode_rev": (0.88, 1.0), "mode_rsum": (0.88, 1.0)}),
        CasePhase("modes", "student", **_S, target=0.9, stop_check="mode_rev", withhold=("rsum", 1),
                  ranges={"mode_rev": (0.9, 1.0), "mode_rsum": (0.0, 0.3)}),
        # a random order of 12 digits is the hardest check: 38 % after 500 steps in an unpadded probe
        CasePhase("long", "teacher", **{**_T, "max_steps": 2000}, lengths=_LONG,
                  ranges={"greedy@4": (0.95, 1.0), "greedy@8": (0.9, 1.0), "greedy@12": (0.8, 1.0)}),
        CasePhase("long", "student", **_S, lengths=_LONG, target=0.5, stop_check="greedy@8",
                  ranges={"greedy@8": (0.4, 0.75)}),
        # reach: the route teacher; a designed student (ReachTask.student_answer: ascending order 50 %, slips
        # a/b 25 % each). Ranges set before training: the student reaches y and a/b, not the other remaining
        # digits X; the teacher supports X and not a/b (teacher_* are measured on the student's states). A
        # first design (40 % / 30 % / 30 %, ranges shifted by 0.1) missed greedy >= 0.8 (5-25 % at 500-1450 steps)
        CasePhase("reach", "student", **_S, target=0.9, designed=True,
                  ranges={"greedy": (0.8, 1.0), "mass_y": (0.4, 0.6), "mass_slip": (0.4, 0.6),
                          "mass_x": (0.0, 0.1), "teacher_mass_x": (0.4, 1.0), "teacher_mass_slip": (0.0, 0.01)}),
    )
}

#: The checks of each case (greedy accuracies; see the module docstring).
CHECKS: dict[str, tuple[str, ...]] = {
    "fork": ("greedy", "path_a", "path_b"),
    "route": ("greedy",),
    "modes": ("greedy", "mode_rev", "mode_rsum"),
    "long": ("greedy@4", "greedy@8", "greedy@12"),
    "reach": ("greedy", "mass_y", "mass_slip", "mass_x"),
}


@torch.no_grad()
def reach_masses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: CaseTask) -> dict[str, float]:
    """``reach`` checks: the model's mean probability, over the held-out inputs and the positions
    ``i`` of the ascending answer (teacher-forced on ``sorted(x)[:i]``), on ``y = sorted(x)[i]``
    (``mass_y``), on the slips ``a`` + ``b`` (``mass_slip``) and on the other remaining digits
    ``X = set(sorted(x)[i:]) − {y}`` (``mass_x``; 0 where ``X`` is empty)."""
    model.eval()
    examples = task.eval_examples()
    texts = [e.prompt + "".join(sorted(e.fields["x"])) for e in examples]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    probs = torch.softmax(model(**enc).logits.float(), dim=-1)
    slip_ids = [tokenizer.convert_tokens_to_ids(c) for c in ("a", "b")]
    digit_id = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    start = len(tokenizer(examples[0].prompt).input_ids) - 1  # the logits that predict answer position 0
    sums = {"mass_y": 0.0, "mass_slip": 0.0, "mass_x": 0.0}
    n = 0
    for row, e in enumerate(examples):
        s = sorted(e.fields["x"])
        for i, y in enumerate(s):
            p = probs[row, start + i]
            sums["mass_y"] += float(p[digit_id[y]])
            sums["mass_slip"] += float(p[slip_ids].sum())
            sums["mass_x"] += float(sum(p[digit_id[d]] for d in set(s[i:]) - {y}))
            n += 1
    return {k: v / n for k, v in sums.items()}


def _forced_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: CaseTask,
                     prefix: Callable[[str], str]) -> float:
    """Greedy accuracy on the held-out set when each completion starts with ``prefix(x)``."""
    examples = task.eval_examples()
    pre = [prefix(e.fields["x"]) for e in examples]
    ids = generate_completions(model, tokenizer, [e.prompt + p for e, p in zip(examples, pre)],
                               task.max_new_tokens - min(len(p) for p in pre), sample=False)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
    return sum(task.verify(e, p + t) for e, p, t in zip(examples, pre, texts)) / len(examples)


def _distinguishing_prefix(task: CaseTask, x: str, strategy: str) -> str:
    """The answer of ``strategy`` up to and including its first token that no other answer has there."""
    answers = dict((name, text) for text, name in task.answers(x))
    mine = answers[strategy]
    for i, c in enumerate(mine):
        if all(len(other) <= i or other[i] != c for name, other in answers.items() if name != strategy):
            return mine[: i + 1]
    return mine


def case_checks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, case: str,
                eval_size: int = 500) -> dict[str, float]:
    """The checks of ``case`` (:data:`CHECKS`) for ``model``, on the fixed held-out set (seed 0)."""
    model.eval()
    out: dict[str, float] = {}
    masses: dict[str, float] | None = None  # reach: one teacher-forced pass for every mass_* check
    for check in CHECKS[case]:
        name, _, n = check.partition("@")
        task = make_case_task(case, length=int(n) if n else None, eval_size=eval_size)
        if name == "greedy":
            out[check] = _forced_accuracy(model, tokenizer, task, lambda x: "")
        elif name.startswith("mass_"):
            masses = masses or reach_masses(model, tokenizer, task)
            out[check] = masses[name]
        elif name in ("path_a", "path_b"):
            out[check] = _forced_accuracy(model, tokenizer, task, lambda x, m=name[-1]: m)
        else:  # mode_<strategy>: force that answer up to the first token where the answers differ
            strategy = name.removeprefix("mode_")
            out[check] = _forced_accuracy(model, tokenizer, task, lambda x, s=strategy: _distinguishing_prefix(task, x, s))
    return out



def _batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[list[int]]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`opd.tasks.tiny_sft.pad_batch` of the tokenized ``prompts``."""
    return pad_batch(tokenizer(list(prompts)).input_ids, completions, tokenizer.pad_token_id)


def train_case_phase(phase: CasePhase, teacher: PreTrainedModel | None = None, *,
                     log: Callable[[str], None] = print) -> tuple[PreTrainedModel, dict]:
    """Train one case checkpoint as ``phase`` says; return the model and its card.

    Raises:
        ValueError: a student phase without its teacher model.
        RuntimeError: a final check outside its accepted range (the message names it).
    """
    if phase.role == "student" and teacher is None:
        raise ValueError(f"{phase.name} distils from {phase.case}/teacher: pass its model as teacher=")
    tokenizer = case_tokenizer()
    tasks = {n: CASE_TASKS[phase.case](length=n, eval_size=min(phase.eval_size, 10**n // 2)) for n in phase.lengths}
    config = tiny_llama_config(len(tokenizer), layers=phase.layers, hidden=phase.hidden, tokenizer=tokenizer)
    model = build_model(config, seed=phase.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)
    torch.manual_seed(phase.seed)
    rng = random.Random(f"case-phase:{phase.name}:{phase.seed}")
    eos = tokenizer.convert_tokens_to_ids(CASE_EOS)

    train_seconds = eval_seconds = 0.0
    history: list[dict] = []
    best: tuple[float, int, dict | None, dict] = (-1.0, 0, None, {})
    checks: dict[str, float] = {}
    step, loss_avg = 0, float("nan")
    while step < phase.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * lr_factor(step, warmup=phase.warmup, max_steps=phase.max_steps,
                                                cosine=phase.role != "student")
        t0 = time.perf_counter()
        model.train()
        task = tasks[phase.lengths[rng.randrange(len(phase.lengths))]]
        examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
        if teacher is None or phase.designed:
            draw = task.student_answer if phase.designed else task.sample_answer
            completions = [tokenizer(draw(e.fields["x"], rng) + CASE_EOS,
                                     add_special_tokens=False).input_ids for e in examples]
        else:
            completions = generate_completions(teacher, tokenizer, [e.prompt for e in examples],
                                               task.max_new_tokens, sample=True)
            completions = [c if c and c[-1] == eos else c + [eos] for c in completions]
        ids, mask, labels = _batch(tokenizer, [e.prompt for e in examples], completions)
        if phase.withhold is not None:  # the withheld strategy's tokens after the first `keep` are not trained
            name, keep = phase.withhold
            texts = tokenizer.batch_decode(completions, skip_special_tokens=False)
            start = len(tokenizer(examples[0].prompt).input_ids)  # every prompt of a batch has one length
            for i, (e, text) in enumerate(zip(examples, texts)):
                if task.strategy(e, text) == name:
                    labels[i, start + keep:] = -100
        loss = sft_update(model, optimizer, ids, mask, labels)
        step += 1
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
        train_seconds += time.perf_counter() - t0

        if step % phase.eval_every == 0 or step == phase.max_steps:
            t0 = time.perf_counter()
            checks = case_checks(model, tokenizer, phase.case, phase.eval_size)
            eval_seconds += time.perf_counter() - t0
            history.append({"step": step, "train_seconds": round(train_seconds, 1), **checks})
            log(f"  [{phase.name}] step {step:5d}  loss {loss_avg:.3f}  "
                + "  ".join(f"{k} {v:6.1%}" for k, v in checks.items())
                + f"  train {train_seconds:6.1f}s  eval {eval_seconds:5.1f}s")
            if phase.role == "teacher":
                score = min(checks.values())
                if score > best[0]:
                    best = (score, step, {k: v.clone() for k, v in model.state_dict().items()}, checks)
                if score >= phase.target:
                    break
            elif checks[phase.stop_check] >= phase.target:
                break
    if phase.role == "teacher" and best[2] is not None and best[0] > min(checks.values()):
        log(f"  [{phase.name}] keeping the best evaluation: step {best[1]}")
        step, checks = best[1], best[3]
        model.load_state_dict(best[2])
    model.eval()
    if phase.case == "reach" and teacher is not None:  # the pair's checks: the teacher on the student's states
        t_mass = reach_masses(teacher, tokenizer, tasks[phase.lengths[0]])
        checks = {**checks, "teacher_mass_x": t_mass["mass_x"], "teacher_mass_slip": t_mass["mass_slip"]}
    bad = [f"{k} = {checks.get(k, float('nan')):.1%} (accepted {lo:.0%}-{hi:.0%})"
           for k, (lo, hi) in phase.ranges.items() if not lo <= checks.get(k, float("nan")) <= hi]
    if bad:
        raise RuntimeError(f"{phase.name} after {step} steps: " + "; ".join(bad) + ". The loss plateaus depend on "
                           "the seed and the machine's numerics: retry with another --seed or change max_steps.")
    card = {
        "name": phase.name, "task": repr(tasks[phase.lengths[0]]), "parameters": count_parameters(model),
        "layers": phase.layers, "hidden": phase.hidden, "checks": checks, "steps": step,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "threads": torch.get_num_threads(), "phase": asdict(phase), "history": history,
    }
    return model, card


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: train and save the case checkpoints; print a table. Exit status 0, or 1
    when a checkpoint missed its accepted range (stderr says which check)."""
    parser = argparse.ArgumentParser(
        prog="make_case_checkpoints",
        description="Train the case-study teacher/student checkpoints shipped in opd/assets/<case> (deterministic).")
    parser.add_argument("--only", nargs="+", choices=sorted({p.case for p in PHASES.values()}),
                        default=sorted({p.case for p in PHASES.values()}), help="cases to (re)train")
    parser.add_argument("--role", choices=("teacher", "student", "both"), default="both",
                        help="train only the teachers or only the students (a student needs its teacher in --out)")
    parser.add_argument("--out", type=Path, default=_ASSETS, help="assets folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every phase (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; changes the numerics)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    command = "python scripts/make_case_checkpoints.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from opd.models import load_model

    rows, t_start = [], time.perf_counter()
    for phase in PHASES.values():
        if phase.case not in args.only or args.role not in ("both", phase.role):
            continue
        if args.seed != phase.seed:
            phase = CasePhase(**{**asdict(phase), "seed": args.seed, "lengths": tuple(phase.lengths)})
        teacher = None
        if phase.role == "student":
            path = args.out / CASE_TEACHER_OF.get(phase.case, phase.case) / "teacher"
            if not (path / "config.json").is_file():
                parser.error(f"{phase.name} needs its teacher at {path}: train it first")
            teacher = load_model(path).eval()
        print(f"training {phase.name}: {phase.layers}x{phase.hidden}", flush=True)
        try:
            model, card = train_case_phase(phase, teacher, log=lambda s: print(s, flush=True))
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        card["command"] = command.strip()
        size = save_shipped_checkpoint(model, case_tokenizer(), card, args.out / phase.case / phase.role)
        rows.append((phase.name, card["parameters"], size, card["checks"], card["steps"], card["train_seconds"]))
    print(f"\n{'checkpoint':<16} {'params':>8} {'size':>8} {'steps':>6} {'train s':>8}  checks")
    for name, params, size, checks, steps, secs in rows:
        print(f"{name:<16} {params:>8,} {size / 1e6:>6.2f}MB {steps:>6} {secs:>8.1f}  "
              + " ".join(f"{k}={v:.1%}" for k, v in checks.items()))
    print(f"total wall time {time.perf_counter() - t_start:.0f}s; written to {args.out}")
    return 0
