"""``opd sweep [SPEC.yaml] [key=value ...]``: a grid or list of overrides × seeds, run as separate
``opd distill`` processes (a local pool bounded by the cores, or Ray), resumable, then one aggregate
(per cell mean ± 95 % CI over seeds, curves with bands, Markdown + HTML).

    opd sweep docs/evidence/fork-credit.yaml --jobs 2
    opd sweep --grid method=null,sft-teacher --grid train.lr=1e-4,3e-4 --seeds 3 train.steps=100
    opd sweep docs/evidence/fork-credit.yaml --aggregate-only        # rewrite the aggregate from the runs on disk

Run it again with the same arguments to continue a stopped sweep: finished runs are skipped.
The spec format is described in :mod:`opd.sweep.spec`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

NAME = "sweep"
HELP = "run a grid of overrides x seeds (resumable) and aggregate them with confidence intervals"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="sweep spec YAML (grid / cells / seeds / base / baseline / ...)")
    parser.add_argument("overrides", nargs="*", help="overrides added to every run's base, e.g. train.steps=100")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (repeatable); combined with the spec's grid")
    parser.add_argument("--seeds", help="seed count (5) or list (0,1,2); replaces the spec's seeds")
    parser.add_argument("--config", help="an `opd distill` config file every run starts from")
    parser.add_argument("--out", help="output folder (default: runs/sweep-<spec name>)")
    parser.add_argument("--jobs", type=int, help="parallel runs (default: the spec's jobs, else the number of cores)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores // jobs)")
    parser.add_argument("--sample-eval", type=int, metavar="K",
                        help="sampled evaluation with K completions per held-out prompt (0 = off)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run through Ray: 'local' (a private local instance), 'auto' or host:port of a cluster")
    parser.add_argument("--aggregate-only", action="store_true", help="only rewrite the aggregate of finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per run still)")


def run(args: argparse.Namespace) -> int:
    from opd.sweep.spec import SpecError, load_spec, parse_grid_arg, parse_seeds

    spec_path, overrides = args.spec, list(args.overrides)
    if spec_path is not None and "=" in spec_path:  # `opd sweep key=value ...` without a spec file
        overrides.insert(0, spec_path)
        spec_path = None
    try:
        spec = load_spec(spec_path, extra_grid=[parse_grid_arg(g) for g in args.grid])
        if args.seeds:
            spec.seeds = parse_seeds(args.seeds)
        if args.config:
            spec.config = str(Path(args.config).resolve())
        if args.sample_eval is not None:
            if args.sample_eval < 0:
                raise SpecError(f"--sample-eval must be >= 0, got {args.sample_eval}")
            spec.sample_eval = args.sample_eval
        for o in overrides:
            if "=" not in o:
                raise SpecError(f"{o!r} is not a key=value override")
        spec.base += overrides
        for label, value in (("--jobs", args.jobs), ("--threads", args.threads)):
            if value is not None and value < 1:
                raise SpecError(f"{label} must be >= 1, got {value}")
        _check_configs(spec)
    except SpecError as err:
        print(f"opd sweep: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{spec.name}"
    command = "opd sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["sweep"] else None

    from opd.sweep import default_jobs, plan_runs, run_sweep, write_aggregate

    if args.dry_run or args.aggregate_only:
        jobs = args.jobs or spec.jobs or default_jobs()
        runs = plan_runs(spec, out, threads=args.threads or max(1, default_jobs() // jobs))
        if args.dry_run:
            for r in runs:
                print(f"{r.label}: opd {' '.join(shlex.quote(a) for a in r.distill_args)}")
            return 0
        recorded = out / "sweep_spec.json"  # keep the command that made the runs
        if recorded.is_file():
            import json

            command = json.loads(recorded.read_text(encoding="utf-8")).get("command") or command
        _, files = write_aggregate(spec, runs, out, command=command)
        for f in files:
            print(f)
        return 0
    try:
        outcome = run_sweep(spec, out, jobs=args.jobs, threads=args.threads, ray_address=args.ray,
                            progress=not args.no_progress, command=command)
    except SpecError as err:
        print(f"opd sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the runs too: each saves what it can; say how to go on
        print(f"\nopd sweep: interrupted; the finished runs in {out} are kept: run the same command again to "
              "continue (finished runs are skipped, unfinished ones start again)", file=sys.stderr)
        return 130
    for f in outcome.files:
        print(f)
    return 1 if outcome.failed else 0


def _check_configs(spec) -> None:
    """Every cell's configuration must load (a bad override stops the sweep before any run starts)."""
    from opd.config.load import load_config
    from opd.sweep.spec import SpecError

    for cell in spec.cells:
        try:
            load_config(spec.config, [*spec.base, *cell.override_args()])
        except ValueError as err:
            raise SpecError(f"cell {cell.name!r}: {err}") from None
