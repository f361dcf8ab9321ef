"""``opd sweep``: a grid or list of config overrides × seeds, run as separate ``opd distill`` processes,
resumable, then one aggregate with 95 % confidence intervals.

    from opd.sweep import load_spec, run_sweep
    outcome = run_sweep(load_spec("docs/evidence/fork-credit.yaml"), out=Path("runs/sweep-fork-credit"), jobs=2)

Modules: :mod:`~opd.sweep.spec` (the specification), :mod:`~opd.sweep.execute` (planning, resuming,
the local pool and Ray), :mod:`~opd.sweep.posteval` (sampled evaluation of a finished run),
:mod:`~opd.sweep.aggregate` (final metrics and curves per cell), :mod:`~opd.sweep.stats`
(Student-t intervals); the pages are written by :mod:`opd.sweep.report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opd.sweep.aggregate import CellResult, Comparison, aggregate, compare, results_dict
from opd.sweep.execute import Run, RunResult, default_jobs, execute, plan_runs, run_finished, sweep_lock
from opd.sweep.spec import Cell, SpecError, SweepSpec, load_spec, parse_grid_arg, spec_from_mapping
from opd.sweep.stats import Summary, paired_difference, summarize, t_quantile

__all__ = [
    "Cell", "CellResult", "Comparison", "Run", "RunResult", "SpecError", "Summary", "SweepOutcome", "SweepSpec",
    "aggregate", "compare", "default_jobs", "execute", "load_spec", "paired_difference", "parse_grid_arg", "plan_runs",
    "run_finished", "run_sweep", "spec_from_mapping", "summarize", "t_quantile", "write_aggregate",
]


@dataclass
class SweepOutcome:
    """What a sweep did: every run's result, the aggregate, and the files written."""

    results: list[RunResult]
    cells: list[CellResult]
    files: list[Path]

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if not r.ok]


def write_aggregate(spec: SweepSpec, runs: list[Run], out: Path, *, command: str | None = None
                    ) -> tuple[list[CellResult], list[Path]]:
    """Aggregate the finished runs into ``sweep_results.json``, ``sweep.html`` and ``sweep.md`` in ``out``."""
    from opd.sweep.report import write_sweep_report

    cells = aggregate(spec, runs)
    data = results_dict(spec, cells)
    data["command"] = command
    path = out / "sweep_results.json"
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return cells, [path, *write_sweep_report(out, spec, cells, command=command)]


def run_sweep(spec: SweepSpec, out: Path, *, jobs: int | None = None, threads: int | None = None,
              ray_address: str | None = None, progress: bool = True, command: str | None = None,
              echo: Callable[[str], None] | None = None) -> SweepOutcome:
    """Run every unfinished run of ``spec`` into ``out``, then write the aggregate.

    ``jobs``: parallel runs (default: the spec's ``jobs``, else the number of cores); ``threads``:
    torch threads per run (default: cores // jobs, at least 1). A progress bar counts runs; each
    finished run prints one line (cell, seed, its first table metric, seconds).
    """
    jobs = jobs or spec.jobs or default_jobs()
    threads = threads or max(1, default_jobs() // jobs)
    runs = plan_runs(spec, out, threads=threads)
    from tqdm import tqdm

    say = echo or tqdm.write
    with sweep_lock(out):
        (out / "sweep_spec.json").write_text(json.dumps({**spec.as_dict(), "command": command}, indent=1) + "\n",
                                             encoding="utf-8")
        finished = sum(run_finished(r) for r in runs)
        say(f"opd sweep {spec.name}: {len(spec.cells)} cells x {len(spec.seeds)} seeds = {len(runs)} runs"
            f" ({finished} already finished, skipped); {'Ray at ' + ray_address if ray_address else f'{jobs} parallel'}"
            f", {threads} thread(s) each; output {out}")
        bar = tqdm(total=len(runs), initial=finished, desc="opd sweep", unit="run", disable=not progress,
                   dynamic_ncols=True)
        started = time.time()
        count = [finished]

        def on_done(result: RunResult) -> None:
            count[0] += 1
            bar.update(1)
            run = result.run
            if result.ok:  # distilled (the sampled evaluation, when asked for, comes after all runs)
                metrics = _one_line_metrics(run)
                say(f"[{count[0]}/{len(runs)}] {run.label}: {metrics} ({result.seconds:.1f} s)")
            else:
                say(f"[{count[0]}/{len(runs)}] {run.label}: FAILED — {result.message}")

        def on_sample_eval(n: int, seconds: float) -> None:
            say(f"sampled evaluation ({spec.sample_eval} completions per held-out prompt) of {n} runs: {seconds:.0f} s")

        try:
            results = execute(runs, jobs=jobs, threads=threads, ray_address=ray_address, on_done=on_done,
                              on_sample_eval=on_sample_eval)
        finally:
            bar.close()
        cells, files = write_aggregate(spec, runs, out, command=command)
        failed = [r for r in results if not r.ok]
        say(f"opd sweep {spec.name}: {sum(r.ok and not r.skipped for r in results)} runs done, "
            f"{sum(r.skipped for r in results)} skipped, {len(failed)} failed in {time.time() - started:.0f} s; "
            f"aggregate: {files[2] if len(files) > 2 else files[0]}")
    return SweepOutcome(results, cells, files)


def _one_line_metrics(run: Run) -> str:
    from opd.sweep.aggregate import final_metrics

    m = final_metrics(run.run_dir)
    shown = [k for k in ("after/accuracy", "sample/accuracy", "after/teacher_rkl") if k in m]
    return ", ".join(f"{k} {m[k]:.3f}" for k in shown) or "finished"
