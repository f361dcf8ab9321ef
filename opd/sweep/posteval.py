"""Sampled evaluation of finished runs: ``python -m opd.sweep.posteval RUN_DIR [RUN_DIR ...] --samples K``.

Greedy accuracy (what ``opd distill`` reports) says which answer the student prefers; it cannot
say how much probability the student puts on wrong answers, or which of several correct answers
it still produces. This evaluation samples ``K`` completions per held-out prompt from the run's
final student at temperature 1 (no top-k / top-p) and writes ``RUN_DIR/sample_eval.json``::

    {"samples": K, "sample/accuracy": …,                    # mean verifier score of the samples
     "sample/share/<strategy>": …, "greedy/share/<strategy>": …}   # tasks with a strategy()

``strategy(example, completion)`` (the case tasks of :mod:`opd.tasks.cases`) names which correct
answer a completion is, or ``wrong`` / ``truncated``; shares are fractions of all completions.
The held-out prompts, the task and the length limit are the run's own (``config.yaml``); sampling
is seeded by the run's ``seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "sampled_evaluation"]


def sampled_evaluation(run_dir: str | Path, samples: int, model_path: str | None = None) -> dict[str, float | int]:
    """The metrics described in the module docstring for the run folder ``run_dir`` — of its final
    student, or of ``model_path`` (e.g. ``builtin:fork/student``, the student before training) on the
    run's held-out set and settings."""
    import torch

    from opd.config.load import load_config
    from opd.evaluate import decode_completions
    from opd.factories import build_task
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer
    from opd.rollout import Sampling, generate_rollouts

    run = Path(run_dir)
    final = Path(resolve_model_path(model_path)) if model_path else run / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{final} does not hold a model: is {run} a finished opd run folder?")
    cfg = load_config(str(run / "config.yaml"))
    model, tokenizer = load_model(final).eval(), load_tokenizer(final)
    task = build_task(cfg, eos_token=tokenizer.eos_token)
    examples = task.eval_examples(cfg.eval.size)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    strategy = getattr(task, "strategy", None)
    out: dict[str, float | int] = {"samples": samples, "prompts": len(examples)}
    counts: dict[str, Counter] = {"sample": Counter(), "greedy": Counter()}
    scores: list[float] = []
    torch.manual_seed(cfg.seed)
    batch = max(1, cfg.eval.batch_size // max(1, samples))
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            for kind, sampling in (("sample", Sampling(max_new, samples_per_prompt=samples, temperature=1.0)),
                                   ("greedy", Sampling(max_new, greedy=True))):
                rollouts = generate_rollouts(model, tokenizer, chunk, sampling)
                texts = decode_completions(tokenizer, rollouts)
                for ex, text in zip(rollouts.examples, texts, strict=True):
                    if kind == "sample":
                        scores.append(float(task.verify(ex, text)))
                    if strategy is not None:
                        counts[kind][strategy(ex, text)] += 1
    out["sample/accuracy"] = sum(scores) / max(1, len(scores))
    for kind, counter in counts.items():
        total = sum(counter.values())
        for name, n in sorted(counter.items()):
            out[f"{kind}/share/{name}"] = n / total
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.sweep.posteval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="finished `opd distill` run folders")
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--model", help="evaluate this model (folder or builtin:<task>/<name>) instead of each run's "
                        "final student, on the run's held-out set; the metrics are printed as JSON, nothing is written")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar per run
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    status = 0
    for run_dir in args.run_dirs:
        try:
            metrics = sampled_evaluation(run_dir, args.samples, args.model)
        except (ValueError, OSError) as err:
            print(f"opd sampled evaluation: error: {run_dir}: {err}", file=sys.stderr)
            status = 2
            continue
        if args.model:
            print(json.dumps({"model": args.model, "run": str(run_dir), **metrics}), flush=True)
            continue
        path = Path(run_dir) / "sample_eval.json"
        path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        print(f"sampled evaluation: accuracy {metrics['sample/accuracy']:.3f} over "
              f"{metrics['prompts']} prompts x {args.samples}; written to {path}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
