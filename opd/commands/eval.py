"""``opd eval MODEL [MODEL ...]``: greedy verifier accuracy of checkpoints on a task or a prompt file."""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "evaluate checkpoints on a task or a prompt file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="model folders, hub ids or builtin:arith/<name>")
    parser.add_argument("--task", default="arith", help="built-in task (default arith)")
    parser.add_argument("--digits", type=int, default=3, help="arith operand digits")
    parser.add_argument("--prompts", help="JSONL file with prompt/answer fields instead of a built-in task")
    parser.add_argument("--size", type=int, default=500, help="number of held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=500)


def run(args: argparse.Namespace) -> int:
    from opd.config.load import load_config

    overrides = [f"eval.size={args.size}"]
    if args.prompts:
        overrides += ["data.task=jsonl", f"data.path={args.prompts}"]
    else:
        overrides += [f"data.task={args.task}", f"data.digits={args.digits}"]
    cfg = load_config(None, overrides)

    from opd.build import build_task, resolve_model_path
    from opd.evaluate import evaluate
    from opd.models import load_model, load_tokenizer

    task = build_task(cfg)
    examples = task.eval_examples(cfg.eval.size)
    print(f"{'model':<40} {'accuracy':>9} {'mean len':>9} {'trunc':>6} {'n':>5}")
    for name in args.models:
        path = resolve_model_path(name)
        model, tokenizer = load_model(path), load_tokenizer(path)
        r = evaluate(model, tokenizer, task, examples, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size)
        print(f"{name:<40} {r.accuracy:9.3f} {r.mean_length:9.2f} {r.truncation_rate:6.3f} {r.n:5d}")
    return 0
