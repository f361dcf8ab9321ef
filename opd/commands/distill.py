"""``opd distill``: run on-policy distillation (no arguments: the built-in arith demo)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from opd.commands.arguments import add_config_arguments

NAME = "distill"
HELP = "run on-policy distillation (no arguments: the built-in arith demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, config_help="YAML config (sections mirror the design variables)",
                         overrides_example="route2.credit=gae route2.gamma=0.9")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (``accelerate launch`` and
    ``torchrun`` set ``RANK``; the process group may already be gone when the run returns)."""
    return int(os.environ.get("RANK", "0")) == 0


def print_summary(summary) -> None:
    """The before/after table and one line saying how the run ended (and how to resume it)."""
    rows = [(name, r) for name, r in (("teacher", summary.teacher), ("student before", summary.before),
                                      ("student after", summary.after)) if r is not None]
    if rows:
        print()
        print(f"{'model':<16} {'accuracy':>9} {'mean len':>9} {'trunc':>6} {'RKL(S‖T)':>9}")
        for name, r in rows:
            rkl = f"{r.teacher_rkl:9.4f}" if r.teacher_rkl is not None else f"{'-':>9}"
            if getattr(r, "decoding", "greedy") != "greedy":  # a served teacher, scored on the reference answers
                name = "teacher (forced)"
            print(f"{name:<16} {r.accuracy:9.3f} {r.mean_length:9.2f} {r.truncation_rate:6.3f} {rkl}")
        if any(getattr(r, "decoding", "greedy") != "greedy" for _, r in rows):
            print("teacher (forced): a served teacher's greedy accuracy from its argmax on the reference answers")
    for fault in getattr(summary, "faults", []):
        print(f"resumed after a failure at {fault}")
    where = f"run folder: {summary.run_dir}"
    at = f"after step {summary.steps_done} of {summary.steps}"
    status = summary.status
    if status == "done":
        print(f"\ndone in {summary.seconds:.1f} s; {where}")
    elif status == "failed":
        print(f"\nopd distill: error: {summary.error}", file=sys.stderr)
        print(f"the run failed {at}; {where}", file=sys.stderr)
    elif status == "no updates":
        print(f"\nno update was made: every step was skipped because of NaN/Inf values (see events.jsonl and the "
              f"report); {where}")
    else:
        why = {"interrupted": "interrupted", "stopped": "stopped (train.stop_after)",
               "stopped by monitor": f"stopped by the monitor: {summary.stop_reason}"}[status]
        print(f"\n{why} {at}; {where}")
    if summary.resume_command:
        print(f"checkpoint: {summary.checkpoint}; continue with: {summary.resume_command}")


def _resume_hint(run_dir: Path | None) -> str:
    """'; continue from step-N with: opd distill --resume RUN' when the run has a checkpoint."""
    from opd.checkpoint import list_checkpoints

    if run_dir is None:
        return ""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return (f"; {run_dir} holds no checkpoint yet: start the run again (logging.overwrite=true reuses "
                "that folder)")
    return f"; continue from its last checkpoint ({ckpts[-1].name}) with: opd distill --resume {run_dir}"


def run(args: argparse.Namespace) -> int:
    from opd.config.load import load_config

    if args.resume:
        if args.config or args.overrides:
            print("opd distill --resume takes no config or overrides: the run folder's config.yaml is used",
                  file=sys.stderr)
            return 2
        cfg, resume = None, args.resume
    else:
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config:  # `opd distill key=value` without a file
            overrides.insert(0, config)
            config = None
        cfg, resume = load_config(config, overrides), None  # a bad config stops here, before torch loads

    from opd.interrupts import RunAborted
    from opd.train import distill

    try:
        summary = distill(load_config(None) if cfg is None else cfg, resume=resume)
    except RunAborted as err:  # a second Ctrl-C: one line and how to go on, not the traceback of wherever it hit
        print(f"\nopd distill: {err}{_resume_hint(err.run_dir)}", file=sys.stderr)
        return 130
    if not _is_main_process():
        return summary.exit_code  # under `accelerate launch` the first process prints the summary
    print_summary(summary)
    if summary.report_path:
        print(f"report: {summary.report_path}")
    return summary.exit_code
