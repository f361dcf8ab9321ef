"""``opd eval MODEL [MODEL ...]``: greedy verifier accuracy of checkpoints on a held-out set.

Scored exactly as a training run scores its evaluations (:func:`opd.evaluate.evaluate`): greedy
decoding, the task's verifier (user data: the completion is cut at each model's EOS token before it
is compared), the same ``max_new_tokens`` and batch size.

The held-out set is, in order of precedence: ``--prompts FILE`` (every row of a JSONL file, or the
first ``--size``; nothing is split off for training; rows holding a conversation — a ``messages`` list
and no ``prompt`` field — are read as ``data.format=chat``, rendered with each model's chat template,
the last assistant turn being the reference answer), ``--task arith``, or the held-out set of the
run the models come from; without a run, the built-in arith task.

Defaults come from a run's ``config.yaml`` when a model is a run folder (its ``final/`` model, else
its newest checkpoint), its ``final/`` folder or a checkpoint folder — or when ``--run`` names one:
field names (``data.prompt_field`` / ``answer_field``), the verifier, ``max_new_tokens``
(``eval.max_new_tokens``, else ``rollout.max_new_tokens``), the held-out size and batch size.
Explicit options always win. The settings actually used are printed above the results.

Without a run folder the completion length comes from the data (:func:`length_from_data`): a built-in
task's longest answer plus EOS, or — for a prompt file scored by exact match — the longest reference
answer in each model's tokens plus EOS and a little headroom; with any other verifier
``--max-new-tokens`` is required. Whenever more than 5 % of a model's completions were cut at the limit
before the model stopped, a warning says so (they score as wrong, so the accuracy is not the model's).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The built-in tasks ``--task`` accepts (opd/tasks/): their held-out sets and verifiers.
BUILTIN_TASKS = ("arith", "arith_chat", "fork", "route", "modes", "long", "reach")
#: Above this share of completions cut at ``max_new_tokens``, ``opd eval`` warns (they score as wrong).
TRUNCATION_WARNING = 0.05
NAME = "eval"
HELP = "evaluate checkpoints on a held-out set (a task, a run's own, or a whole prompt file)"


class FromRun:
    """An option's default that is decided at run time (mostly: a run's config value when there is
    a run), described in words; ``opd eval --help`` shows the words."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="model folders, hub ids, builtin:arith/<name>, or opd run folders (their final/ "
                             "model, else the newest checkpoint)")
    parser.add_argument("--prompts", metavar="FILE.jsonl", default=FromRun("the run's held-out set"),
                        help="score every row of this JSONL file (a held-out set: nothing is split off)")
    parser.add_argument("--run", metavar="RUN_DIR", default=FromRun("the run of the first MODEL that is in one"),
                        help="take the defaults below from this run folder's config.yaml")
    parser.add_argument("--task", choices=BUILTIN_TASKS, default=FromRun("the run's data.task, else arith"),
                        help="built-in task whose held-out set is scored (when --prompts is not given)")
    parser.add_argument("--digits", type=int, default=FromRun("the run's data.digits, else 3"),
                        help="arith operand digits")
    parser.add_argument("--prompt-field", default=FromRun("the run's data.prompt_field, else prompt"),
                        help="JSONL field holding the prompt text")
    parser.add_argument("--answer-field", default=FromRun("the run's data.answer_field, else answer"),
                        help="JSONL field holding the reference answer")
    parser.add_argument("--verifier", default=FromRun("the run's data.verifier, else auto"),
                        help="auto (exact_match when the rows have answers), exact_match, contains, "
                             "or python:module:function")
    parser.add_argument("--size", type=int,
                        default=FromRun("every row of --prompts; else the run's eval.size; else 500 for arith"),
                        help="score the first N prompts of the held-out set")
    parser.add_argument("--max-new-tokens", type=int,
                        default=FromRun("the run's eval.max_new_tokens or rollout.max_new_tokens; without a run: "
                                        "from the data (a built-in task's longest answer + EOS; a --prompts file's "
                                        "longest reference answer + EOS + headroom), required for other verifiers"),
                        help="greedy completion length limit")
    parser.add_argument("--batch-size", type=int, default=FromRun("the run's eval.batch_size, else 500"),
                        help="prompts per generation batch")
    parser.add_argument("--tokenizer", default=FromRun("each model's own"),
                        help="tokenizer folder / hub id for every model (e.g. when a model folder has none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--samples", type=int, default=0, metavar="N",
                        help="also print each model's first N held-out completions, marked ✓/✗ by the verifier")
    parser.add_argument("--json", metavar="FILE", default=FromRun("none: results are only printed"),
                        help="also write the results (and the settings) to this JSON file")


def _given(value: Any) -> bool:
    return not isinstance(value, FromRun)


# ---------------------------------------------------------------------------------------------
# where a model comes from
@dataclass(frozen=True)
class Located:
    """A model argument resolved: what to load, and the run folder it belongs to (if any)."""

    arg: str
    path: str
    run: Path | None
    note: str | None = None  # e.g. "runs/x: no final/ model, using checkpoints/step-000040"


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file()


def _newest_checkpoint(run: Path) -> Path | None:
    steps = sorted((int(m.group(1)), p) for p in (run / "checkpoints").glob("step-*")
                   if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "model").is_dir())
    return steps[-1][1] / "model" if steps else None


def locate(arg: str) -> Located:
    """Resolve ``arg``: a run folder → its ``final/`` model (else its newest checkpoint); a run's
    ``final/``, ``checkpoints/step-N`` or ``checkpoints/step-N/model`` → that model and its run;
    anything else (a model folder, a hub id, ``builtin:...``) → itself, with no run.

    Raises:
        FileNotFoundError: a run folder that holds neither a final model nor a checkpoint.
    """
    p = Path(arg).expanduser()
    if arg.startswith("builtin:"):
        return Located(arg, arg, None)
    if not p.exists():
        if str(p.parent) not in (".", "") and p.parent.is_dir():  # meant as a local folder, not a hub id
            raise FileNotFoundError(f"model {arg}: no such folder ({p.parent} exists but holds no {p.name!r})")
        return Located(arg, arg, None)
    if _is_run(p):
        if (p / "final").is_dir():
            return Located(arg, str(p / "final"), p)
        ckpt = _newest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"run folder {p} holds no final/ model and no checkpoint (the run ended before "
                                    "saving one); pass a model folder instead")
        return Located(arg, str(ckpt), p, note=f"{p} has no final/ model: scoring {ckpt.relative_to(p)}")
    if p.parent.name == "checkpoints" and (p / "model").is_dir() and _is_run(p.parent.parent):
        return Located(arg, str(p / "model"), p.parent.parent)
    for run in (p.parent, p.parent.parent.parent if p.parent.parent.name == "checkpoints" else None):
        if run is not None and _is_run(run):
            return Located(arg, str(p), run)
    return Located(arg, str(p), None)


# ---------------------------------------------------------------------------------------------
# the settings
@dataclass
class Settings:
    """What the evaluation uses, after defaults and options are combined."""

    cfg: Any  # opd.config.schema.Config: data and eval sections as the task builder reads them
    eval_only: bool
    size: int | None
    max_new_tokens: int | None  # None: taken from the data (length_from_data) once the tasks are built
    batch_size: int
    source: str  # where the defaults came from
    run: Path | None = None  # the run folder whose config gave the defaults
    length_source: str = ""  # where max_new_tokens came from, for the header (empty: an option or the run)


def settings(args: argparse.Namespace, located: list[Located]) -> Settings:
    """Combine the options with the defaults of the run (``--run``, else the first model's run).

    Raises:
        ConfigError: the run's config.yaml is invalid. FileNotFoundError: ``--run`` is not a run
        folder, or ``--prompts`` does not exist. ValueError: a size or length below 1.
    """
    from opd.config.load import load_config

    for name in ("size", "max_new_tokens", "batch_size", "digits"):
        value = getattr(args, name)
        if _given(value) and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    run: Path | None = None
    if _given(args.run):
        run = Path(args.run).expanduser()
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--run {args.run}: no config.yaml there; pass the folder `opd distill` wrote")
    else:
        run = next((loc.run for loc in located if loc.run is not None), None)
    cfg = load_config(run / "config.yaml") if run is not None else load_config(None, [])
    cfg = copy.deepcopy(cfg)
    d, e = cfg.data, cfg.eval
    run_task = d.task if run is not None else None
    eval_only = _given(args.prompts)
    if eval_only:
        prompts = Path(args.prompts).expanduser()
        if not prompts.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file; pass a JSONL file with one JSON "
                                    "object per line")
        d.task, d.path, d.eval_path, d.eval_split = "jsonl", str(prompts), None, None
        prompt_field = args.prompt_field if _given(args.prompt_field) else d.prompt_field
        if chat_rows(prompts, messages_field=d.messages_field, prompt_field=prompt_field):
            d.format = "chat"
        d.context_field = d.route_field = None  # the student never reads them; a held-out file need not have them
        size = args.size if _given(args.size) else None
    elif _given(args.task) or run is None:
        d.task = args.task if _given(args.task) else "arith"
        size = args.size if _given(args.size) else (e.size if run_task == d.task else None) or 500
    else:
        size = args.size if _given(args.size) else e.size
    if _given(args.digits):
        d.digits = args.digits
    if _given(args.prompt_field):
        d.prompt_field = args.prompt_field
    if _given(args.answer_field):
        d.answer_field = args.answer_field
    if _given(args.verifier):
        if d.task not in ("jsonl", "hf") and args.verifier != "auto":  # never ignored silently (as opd distill)
            raise ValueError(f"--verifier {args.verifier} is not used by the built-in task {d.task}: it scores "
                             "completions with its own verifier; drop --verifier, or pass --prompts FILE to score "
                             "your own prompts with it")
        d.verifier = args.verifier
    e.size = size
    if _given(args.max_new_tokens):
        max_new: int | None = args.max_new_tokens
    elif run is not None:
        max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    else:  # no run: the length comes from the data (run() sets it once the held-out sets are built)
        max_new = None
    batch = args.batch_size if _given(args.batch_size) else e.batch_size
    source = f"defaults from {run / 'config.yaml'}" if run is not None else "opd's defaults (no run folder)"
    return Settings(cfg=cfg, eval_only=eval_only, size=size, max_new_tokens=max_new, batch_size=batch, source=source,
                    run=run)


def chat_rows(path: Path, *, messages_field: str, prompt_field: str) -> bool:
    """Whether the first record of the JSONL file ``path`` is a conversation: it has ``messages_field``
    and no ``prompt_field`` (a file that is not JSON is left to the data loader's own error)."""
    import json

    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and messages_field in row and prompt_field not in row
    return False


def _scoring_options(cfg: Any) -> dict[str, Any]:
    """The options of a run's config that change how its held-out completions are scored."""
    d = cfg.data
    return {"data.prompt_field": d.prompt_field, "data.answer_field": d.answer_field, "data.verifier": d.verifier,
            "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens}


def other_run_notes(s: Settings, located: list[Located]) -> list[str]:
    """One note per other run among the models whose scoring options differ from the defaults used:
    every model is scored the same way, and the reader should know it is not each run's own way."""
    from opd.config.load import load_config

    if s.run is None:
        return []
    mine = _scoring_options(load_config(s.run / "config.yaml"))
    notes = []
    for run in dict.fromkeys(loc.run for loc in located if loc.run is not None and loc.run != s.run):
        theirs = _scoring_options(load_config(run / "config.yaml"))
        diff = ", ".join(f"{k}={v}" for k, v in theirs.items() if mine[k] != v)
        if diff:
            notes.append(f"{run} was trained with {diff}; every model here is scored with the settings above "
                         f"(pass --run {run} to use that run's)")
    return notes


def length_from_data(s: Settings, held_out: list[tuple[Any, list]], tokenizers: list[Any]) -> tuple[int, str]:
    """``max_new_tokens`` for an evaluation without a run folder, and a note saying where it came from.

    * a built-in task that states its longest completion (``task.max_new_tokens``: answer + EOS) → that,
      or more where a model's tokenizer spells an answer in more tokens;
    * reference answers scored by exact match (``auto`` / ``exact_match``; e.g. ``--prompts FILE``,
      ``arith_chat``) → ``L + 1 + max(2, (L + 1) // 4)`` with ``L`` the longest answer in tokens of any
      of the models' tokenizers: room for the answer and EOS, plus headroom for whitespace the
      verifier strips (a longer completion cannot match anyway).

    Raises:
        ValueError: any other verifier (``contains``, ``python:...``, ``none``): the data says nothing
            about how long a completion may be; the message asks for ``--max-new-tokens``.
    """
    task, examples = held_out[0]
    answers = [ex.answer for _, exs in held_out for ex in exs]
    declared = getattr(task, "max_new_tokens", None)
    if isinstance(declared, int) and declared > 0:  # counted in the task's own tokens: a model's may need more
        own = max((len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for tok in tokenizers
                   for a in set(answers) if a is not None), default=0)
        return max(declared, own), "the task's longest answer + EOS"
    d = s.cfg.data
    exact = d.verifier in ("auto", "exact_match")
    if not exact or not answers or any(a is None for a in answers):
        what = d.path if s.eval_only else f"the task {d.task}"
        raise ValueError(f"opd eval without a run folder takes the completion length from the reference answers, but "
                         f"{what} is scored with verifier {d.verifier} (no answer bounds a completion's length); "
                         "pass --max-new-tokens N")
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for tok in tokenizers for a in set(answers))
    need = longest + 1
    value = need + max(2, need // 4)
    return value, f"from the data: longest answer {longest} tokens + EOS + headroom"


def truncation_warning(model: str, rate: float, max_new_tokens: int) -> str | None:
    """The warning printed when more than :data:`TRUNCATION_WARNING` of a model's completions were cut."""
    if rate <= TRUNCATION_WARNING:
        return None
    return (f"opd eval: warning: {rate:.1%} of {model}'s completions hit max_new_tokens={max_new_tokens} before the "
            "model stopped and score as wrong; raise --max-new-tokens")


def describe(s: Settings, n: int, eos_tokens: list[str | None]) -> str:
    """One line saying what is scored and how."""
    d = s.cfg.data
    if s.eval_only:
        rows = f"all {n} rows" if s.size is None else f"the first {n} rows"
        fields = (f"conversations in {d.messages_field!r}, rendered with each model's chat template; the last "
                  "assistant turn is the answer" if d.format == "chat" else f"fields {d.prompt_field} / {d.answer_field}")
        what = f"{d.path}, {rows} ({fields})"
    elif d.task == "arith":
        what = f"arith, {d.digits} digits, {n} held-out prompts (data.eval_seed={d.eval_seed})"
    elif d.task in BUILTIN_TASKS:
        what = f"the built-in task {d.task}, {n} held-out prompts (data.eval_seed={d.eval_seed})"
    else:
        what = f"the run's held-out set of {d.path}{f' ({d.eval_path})' if d.eval_path else ''}: {n} prompts"
    eos = ", ".join(sorted({repr(t) for t in eos_tokens if t is not None})) or "none"
    builtin = d.task in BUILTIN_TASKS
    verifier = "the task's own" if builtin else "exact_match (auto)" if d.verifier == "auto" else d.verifier
    cut = f", completion cut at EOS {eos}" if builtin or d.verifier in ("auto", "exact_match",
                                                                                 "contains") else ""
    length = f" ({s.length_source})" if s.length_source else ""
    return (f"held-out: {what} · verifier: {verifier}{cut} · greedy, max_new_tokens {s.max_new_tokens}{length}, "
            f"batch {s.batch_size} · {s.source}")


# ---------------------------------------------------------------------------------------------
def _check_answers(s: Settings, build_task: Any, cfg: Any) -> None:
    """Answer-based verifiers (auto, exact_match, contains) need an answer on every held-out row:
    name the first row without one (file, line, field) instead of scoring nothing (``cfg``: the
    settings' config, for chat rows with the scored model as the student)."""
    d = cfg.data
    if d.task == "arith" or d.verifier not in ("auto", "exact_match", "contains"):
        return
    if d.answer_field is None:
        raise ValueError(f"verifier {d.verifier} compares completions with reference answers, but no answer field is "
                         "set (data.answer_field); pass --answer-field, or --verifier python:module:function / none")
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.data.verifier = "none"
    probe = build_task(probe_cfg, eval_only=s.eval_only)
    examples = probe.eval_examples() if s.eval_only else probe.eval_examples(s.cfg.eval.size)
    missing = next((ex for ex in examples if ex.answer is None), None)
    if missing is not None:
        where = getattr(missing, "origin", None) or d.path
        raise ValueError(f"{where}: missing field {d.answer_field!r}; the record has fields {sorted(missing.fields)}. "
                         "opd eval compares completions with it: set --answer-field, or --verifier "
                         "python:module:function")


def _mark(score: float | None) -> str:
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "·"
    return "✓" if score >= 1 else "✗" if score <= 0 else f"{score:.2f}"


def run(args: argparse.Namespace) -> int:
    located = [locate(arg) for arg in args.models]
    s = settings(args, located)  # config and file errors stop here, before torch loads

    import torch

    from opd.evaluate import evaluate
    from opd.factories import build_task
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    tasks: dict[tuple[str | None, str | None], tuple[Any, list]] = {}
    chat = s.cfg.data.format == "chat"

    def task_for(eos: str | None, model_path: str) -> tuple[Any, list]:
        """The held-out task whose verifier cuts completions at ``eos`` (one per EOS string; with chat
        rows one per model too, since each model's own chat template renders the conversations)."""
        key = (eos, model_path if chat else None)
        if key not in tasks:
            cfg = s.cfg
            if chat:
                cfg = copy.deepcopy(s.cfg)
                cfg.student.model = model_path
                cfg.student.tokenizer = resolve_model_path(args.tokenizer) if _given(args.tokenizer) else None
            if not tasks:
                _check_answers(s, build_task, cfg)
            task = build_task(cfg, eos_token=eos, eval_only=s.eval_only)
            examples = task.eval_examples() if s.eval_only else task.eval_examples(s.cfg.eval.size)
            if s.eval_only and s.size is not None and s.size > len(examples):
                raise ValueError(f"--size {s.size}, but {s.cfg.data.path} holds {len(examples)} prompts; drop --size "
                                 "to score every row")
            tasks[key] = (task, examples)
        return tasks[key]

    paths = [resolve_model_path(loc.path) for loc in located]
    tokenizers = [load_tokenizer(resolve_model_path(args.tokenizer) if _given(args.tokenizer) else p) for p in paths]
    for tok, path in zip(tokenizers, paths, strict=True):  # every task is built (its file checked) before any model
        task_for(tok.eos_token, path)
    n = len(next(iter(tasks.values()))[1])
    if s.max_new_tokens is None:
        s.max_new_tokens, s.length_source = length_from_data(s, list(tasks.values()), tokenizers)
    print(describe(s, n, [tok.eos_token for tok in tokenizers]))
    for note in [loc.note for loc in located if loc.note] + other_run_notes(s, located):
        print(f"note: {note}")
    results = []
    width = max(40, *(len(loc.arg) for loc in located))
    print(f"{'model':<{width}} {'accuracy':>9} {'mean len':>9} {'trunc':>6} {'n':>5}")
    for loc, path, tok in zip(located, paths, tokenizers, strict=True):
        task, examples = task_for(tok.eos_token, path)
        model = load_model(path, device=device)
        r = evaluate(model, tok, task, examples, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                     samples=args.samples)
        acc = f"{r.accuracy:9.3f}" if not math.isnan(r.accuracy) else f"{'n/a':>9}"
        print(f"{loc.arg:<{width}} {acc} {r.mean_length:9.2f} {r.truncation_rate:6.3f} {r.n:5d}", flush=True)
        warning = truncation_warning(loc.arg, r.truncation_rate, s.max_new_tokens)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        results.append({"model": loc.arg, "path": path, "run": None if loc.run is None else str(loc.run),
                        **r.as_metrics("eval"), "samples": list(r.samples)})
        for sample in r.samples:
            answer = f"  (answer {sample['answer']!r})" if sample.get("answer") is not None else ""
            print(f"    {_mark(sample['score'])} {sample['prompt']!r} → {sample['completion']!r}{answer}")
        del model
    if _given(args.json):
        from opd.report.run_info import write_json

        d = s.cfg.data
        write_json(Path(args.json), {
            "settings": {"task": d.task, "path": d.path if d.task != "arith" else None, "eval_only": s.eval_only,
                         "prompt_field": d.prompt_field, "answer_field": d.answer_field, "verifier": d.verifier,
                         "size": s.size, "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
                         "decoding": "greedy", "source": s.source},
            "results": results})
    return 0
