"""``opd doctor``: check a teacher–student pair before training (no arguments: the built-in arith demo).

Reads the same config and overrides as ``opd distill``, never writes into a run folder, and prints
a short verdict: the teacher self-test (determinism, batch and padding invariance, served vs
in-process, temperature, tokenizer and template), the pair measured on your prompts, the failure
detectors a run would fire and recommended settings with the overrides to paste into
``opd distill``. Writes doctor.html (with plots), doctor.md and doctor.json into --out.

Exit status: 0 (no self-test failed), 1 (the teacher failed a self-test check), 2 (bad input).

    opd doctor
    opd doctor rollout.max_new_tokens=3
    opd doctor my.yaml teacher.server=http://localhost:8000 --out doctor-run1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.commands.arguments import add_config_arguments

NAME = "doctor"
HELP = "check a teacher–student pair before training: self-test, measurements, predictions, advice"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, config_help="YAML config (the same as opd distill's)",
                         overrides_example="rollout.max_new_tokens=16")
    parser.add_argument("--out", default="doctor", help="folder for doctor.html, doctor.md and doctor.json")
    parser.add_argument("--teacher-samples", type=int, default=32,
                        help="prompts the teacher answers (lengths, cut share, teacher accuracy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _refuse_run_folder(out: Path, run_dir: str | None) -> None:
    """The doctor never writes into a run folder (one holding a run's config.yaml or metrics)."""
    if (out / "config.yaml").exists() or (out / "metrics.jsonl").exists() or (
            run_dir is not None and out.resolve() == Path(run_dir).resolve()):
        raise ValueError(f"--out {out} is a run folder; opd doctor never writes into one: choose another --out")


def run(args: argparse.Namespace) -> int:
    from opd.config.load import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `opd doctor key=value` without a file
        overrides.insert(0, config)
        config = None
    if args.teacher_samples < 1:
        raise ValueError(f"--teacher-samples must be at least 1, got {args.teacher_samples}")
    cfg = load_config(config, overrides)  # a bad config stops here, before torch loads
    out = Path(args.out)
    _refuse_run_folder(out, cfg.logging.run_dir)

    from opd.doctor.render import console_lines, write_outputs
    from opd.doctor.run import run_doctor

    result = run_doctor(cfg, sample_prompts=args.teacher_samples, progress=not args.no_progress)
    files = write_outputs(result, out)
    for line in console_lines(result, files):
        print(line, file=sys.stdout)
    return result.exit_code
