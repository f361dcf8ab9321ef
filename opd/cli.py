"""The ``opd`` command.

    opd distill [CONFIG.yaml] [section.key=value ...]   run on-policy distillation
    opd distill --resume RUN_DIR                        continue a stopped run exactly
    opd eval MODEL [--task arith | --prompts FILE.jsonl] evaluate a checkpoint
    opd methods                                         list the method presets
    opd config-help [SECTION]                           every option with its documentation
    opd bias-lab [--vocab 3 --horizon 4 ...]            exact bias/variance of the estimators
    opd report RUN_DIR [RUN_DIR ...]                    HTML + Markdown report (compare runs)
    opd make-checkpoints                                regenerate the shipped arith checkpoints
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _print_summary(summary) -> None:
    rows = []
    if summary.teacher is not None:
        rows.append(("teacher", summary.teacher))
    if summary.before is not None:
        rows.append(("student before", summary.before))
    if summary.after is not None:
        rows.append(("student after", summary.after))
    if rows:
        print()
        print(f"{'model':<16} {'accuracy':>9} {'mean len':>9} {'trunc':>6} {'RKL(S‖T)':>9}")
        for name, r in rows:
            rkl = f"{r.teacher_rkl:9.4f}" if r.teacher_rkl is not None else f"{'-':>9}"
            print(f"{name:<16} {r.accuracy:9.3f} {r.mean_length:9.2f} {r.truncation_rate:6.3f} {rkl}")
    state = "stopped early (resume with `opd distill --resume DIR`)" if summary.stopped_early else "done"
    if getattr(summary, "stop_reason", None):
        print(f"\nthe monitor stopped the run: {summary.stop_reason} (a checkpoint was saved; see the report)")
        state = "stopped early"
    print(f"\n{state} in {summary.seconds:.1f} s; run folder: {summary.run_dir}")


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (``accelerate launch`` and
    ``torchrun`` set ``RANK``; the process group may already be gone when the run returns)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_distill(args: argparse.Namespace) -> int:
    from opd.config.load import load_config
    from opd.train import distill

    if args.resume:
        if args.config or args.overrides:
            print("opd distill --resume takes no config or overrides: the run folder's config.yaml is used",
                  file=sys.stderr)
            return 2
        summary = distill(load_config(None), resume=args.resume)
    else:
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config:  # `opd distill key=value` without a file
            overrides.insert(0, config)
            config = None
        summary = distill(load_config(config, overrides))
    if not _is_main_process():
        return 0  # under `accelerate launch` the first process prints the summary
    _print_summary(summary)
    report = getattr(summary, "report_path", None)
    if report:
        print(f"report: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opd.build import build_task, resolve_model_path
    from opd.config.load import load_config
    from opd.evaluate import evaluate
    from opd.models import load_model, load_tokenizer

    overrides = [f"eval.size={args.size}"]
    if args.prompts:
        overrides += ["data.task=jsonl", f"data.path={args.prompts}"]
    else:
        overrides += [f"data.task={args.task}", f"data.digits={args.digits}"]
    cfg = load_config(None, overrides)
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


def cmd_methods(args: argparse.Namespace) -> int:
    from opd.config.presets import format_methods

    print(format_methods())
    return 0


def cmd_config_help(args: argparse.Namespace) -> int:
    from opd.config.presets import format_config_help

    print(format_config_help(args.section))
    return 0


def cmd_bias_lab(rest: list[str]) -> int:
    from opd.lab.bias_lab import main

    return main(rest)


def cmd_report(args: argparse.Namespace) -> int:
    from opd.report import write_report

    paths = write_report([Path(p) for p in args.runs], out=Path(args.out) if args.out else None)
    for p in paths:
        print(p)
    return 0


def cmd_make_checkpoints(rest: list[str]) -> int:
    from opd.tasks.make_checkpoints import main

    return main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="run on-policy distillation (no arguments: the built-in arith demo)")
    p.add_argument("config", nargs="?", help="YAML config (sections mirror the design variables)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. route2.credit=gae route2.gamma=0.9")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="evaluate checkpoints on a task or a prompt file")
    p.add_argument("models", nargs="+", help="model folders, hub ids or builtin:arith/<name>")
    p.add_argument("--task", default="arith", help="built-in task (default arith)")
    p.add_argument("--digits", type=int, default=3, help="arith operand digits")
    p.add_argument("--prompts", help="JSONL file with prompt/answer fields instead of a built-in task")
    p.add_argument("--size", type=int, default=500, help="number of held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=500)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the method presets and the variables each sets")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("config-help", help="document every config option")
    p.add_argument("section", nargs="?")
    p.set_defaults(func=cmd_config_help)

    sub.add_parser("bias-lab", help="exact bias and variance of the temporal-credit estimators", add_help=False)
    p = sub.add_parser("report", help="write the HTML/Markdown report of one or more runs")
    p.add_argument("runs", nargs="+", help="run folders (several: a side-by-side comparison)")
    p.add_argument("--out", help="output folder (default: the run folder, or runs/compare-<time>)")
    p.set_defaults(func=cmd_report)
    sub.add_parser("make-checkpoints", help="regenerate the shipped arith checkpoints", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the run's own progress bar
    # sub-commands with their own argparse get the rest of the line untouched
    if argv and argv[0] == "bias-lab":
        return cmd_bias_lab(argv[1:])
    if argv and argv[0] == "make-checkpoints":
        return cmd_make_checkpoints(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad config / input / paths: say what and how, no traceback
        if os.environ.get("OPD_TRACEBACK") == "1":
            raise
        print(f"opd {args.command}: error: {err}", file=sys.stderr)
        print("(set OPD_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
