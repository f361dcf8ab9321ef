"""Running a sweep's runs: planning, skipping finished runs, and a local pool or Ray.

Each run is one folder, ``<out>/<cell>/seed-<s>/``, made by an ``opd distill`` process of its own
(started through :mod:`opd.sweep.child`). When the spec asks for a sampled evaluation
(:mod:`opd.sweep.posteval`), it runs after the distillations, on many run folders per process
(a process start costs more than the evaluation). A run is *finished* when its ``summary.json``
says it ran to the end (and ``sample_eval.json`` exists when asked for); a resumed sweep skips
finished runs, does only the missing sampled evaluations, and starts unfinished runs again from
scratch (runs are short; their folder is cleared first). ``<cell>/seed-<s>.json`` records each
run's arguments (and ``seed-<s>.log`` its output): if the spec changed, the sweep stops and says so
rather than mixing runs of two specs in one folder.

Backends: a local pool of ``jobs`` worker threads (:class:`concurrent.futures.ThreadPoolExecutor`),
each waiting on one child process; or Ray (``ray.init(address=...)``: ``"local"`` starts a private
local instance, ``"auto"`` or ``host:port`` joins a cluster — the output folder must then be on a
filesystem every node sees), one task per process reserving ``threads`` CPUs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from opd.sweep.spec import Cell, SpecError, SweepSpec

__all__ = ["Run", "RunResult", "default_jobs", "execute", "plan_runs", "run_distill", "run_finished",
           "run_sample_evals", "sweep_lock"]

SAMPLE_EVAL = "sample_eval.json"


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its cell, seed, folder and the argument lists of its steps."""

    cell: Cell
    seed: int
    run_dir: Path
    distill_args: tuple[str, ...]
    samples: int = 0  # sampled evaluation: completions per held-out prompt (0 = none)

    @property
    def record_path(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.log"

    @property
    def label(self) -> str:
        return f"{self.cell.name} seed {self.seed}"

    def record(self) -> dict:
        return {"cell": self.cell.name, "seed": self.seed, "distill": list(self.distill_args),
                "samples": self.samples}


@dataclass(frozen=True)
class RunResult:
    run: Run
    ok: bool
    seconds: float
    message: str = ""
    skipped: bool = False


def default_jobs() -> int:
    """Parallel runs when the spec does not say: the number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_runs(spec: SweepSpec, out: Path, *, threads: int) -> list[Run]:
    """Every (cell, seed) run with its folder and its command lines.

    ``opd distill`` gets, in this order: the spec's config file, ``train.threads=<threads>``,
    ``logging.report=false``, ``logging.progress=false`` (each overridable in ``base``), the base
    overrides, the cell's overrides, ``seed=<s>`` and ``logging.run_dir=<folder>``.
    """
    runs = []
    for cell in spec.cells:
        for seed in spec.seeds:
            run_dir = out / cell.slug / f"seed-{seed}"
            args = ["distill", *([spec.config] if spec.config else []), f"train.threads={threads}",
                    "logging.report=false", "logging.progress=false", *spec.base, *cell.override_args(),
                    f"seed={seed}", f"logging.run_dir={run_dir}"]
            runs.append(Run(cell, seed, run_dir, tuple(args), spec.sample_eval))
    return runs


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _distill_finished(run_dir: Path) -> bool:
    s = _read_json(run_dir / "summary.json")
    return bool(s) and not s.get("stopped_early") and s.get("steps_done") == s.get("steps")


def run_finished(run: Run) -> bool:
    """Whether ``run`` needs nothing more (distillation ran to the end; sampled evaluation if asked)."""
    return _distill_finished(run.run_dir) and not _needs_sample_eval(run)


def _needs_sample_eval(run: Run) -> bool:
    if not run.samples:
        return False
    post = _read_json(run.run_dir / SAMPLE_EVAL)
    return not post or post.get("samples") != run.samples


def _check_record(run: Run) -> None:
    """Stop when a run folder was made by a different spec (its recorded arguments differ)."""
    old = _read_json(run.record_path)
    if old is not None and old.get("distill") != list(run.distill_args):
        raise SpecError(f"{run.run_dir} was made with other arguments ({' '.join(old.get('distill') or [])}); the "
                        "spec changed since: write this sweep to a new --out folder")


def _child(module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "opd.sweep.child", module, *args]


def run_distill(run: Run, env: dict[str, str] | None = None) -> tuple[bool, float, str]:
    """Run ``opd distill`` for ``run`` from scratch (its folder is cleared first); output to ``run.log_path``.

    Returns ``(ok, seconds, message)``; the message names the log.
    """
    t0 = time.time()
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    run.record_path.write_text(json.dumps(run.record(), indent=1) + "\n", encoding="utf-8")
    rc = _logged(_child("opd.cli", run.distill_args), run.log_path, env)
    if rc != 0:
        return False, time.time() - t0, f"opd distill exited with status {rc}; see {run.log_path}"
    return True, time.time() - t0, ""


def run_sample_evals(run_dirs: Sequence[str], samples: int, threads: int, log: str,
                     env: dict[str, str] | None = None) -> tuple[bool, float, str]:
    """One process evaluating the final students of ``run_dirs`` by sampling (:mod:`opd.sweep.posteval`)."""
    t0 = time.time()
    args = [*run_dirs, "--samples", str(samples), "--threads", str(threads)]
    rc = _logged(_child("opd.sweep.posteval", args), Path(log), env)
    if rc != 0:
        return False, time.time() - t0, f"the sampled evaluation exited with status {rc}; see {log}"
    return True, time.time() - t0, ""


def _logged(argv: list[str], log: Path, env: dict[str, str] | None) -> int:
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.sweep.lock`` (released when this process ends, even by SIGKILL)."""
    out.mkdir(parents=True, exist_ok=True)
    f = (out / ".sweep.lock").open("a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"another `opd sweep` is writing to {out}; wait for it or use another --out") from None
        yield
    finally:
        f.close()


Task = tuple[Callable[..., tuple[bool, float, str]], tuple]


def _local(tasks: Sequence[Task], jobs: int, on_done: Callable[[int, bool, float, str], None]) -> None:
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="opd-sweep") as pool:
        pending: dict[Future, int] = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(tasks)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    on_done(pending.pop(fut), *fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _ray(tasks: Sequence[Task], address: str, threads: int, on_done: Callable[[int, bool, float, str], None]) -> None:
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: pip install 'opd[ray]' (or pip install ray)") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"num_cpus": default_jobs()} if address == "local" else {}
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, **kwargs)
    try:
        refs = {ray.remote(num_cpus=threads)(fn).remote(*args): i for i, (fn, args) in enumerate(tasks)}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                on_done(refs.pop(ref), *ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def execute(runs: Sequence[Run], *, jobs: int, threads: int, ray_address: str | None = None,
            on_done: Callable[[RunResult], None] | None = None,
            on_sample_eval: Callable[[int, float], None] | None = None) -> list[RunResult]:
    """Make every run finished: distill the unfinished ones (finished ones are returned as skipped;
    ``on_done`` sees each distillation's result), then the missing sampled evaluations, ``jobs``
    processes sharing the runs (``on_sample_eval(n_runs, seconds)`` when they are done).

    Raises:
        SpecError: a run folder made by another spec, or Ray asked for but not installed.
    """
    for run in runs:
        _check_record(run)
    results: list[RunResult] = [RunResult(r, True, 0.0, skipped=True) for r in runs if run_finished(r)]
    todo = [r for r in runs if not _distill_finished(r.run_dir)]
    callback = on_done or (lambda _: None)

    def backend(tasks: Sequence[Task], done: Callable[[int, bool, float, str], None]) -> None:
        if ray_address:
            _ray(tasks, ray_address, threads, done)
        else:
            _local(tasks, max(1, min(jobs, len(tasks))), done)

    distilled: dict[int, RunResult] = {}

    def distill_done(i: int, ok: bool, secs: float, msg: str) -> None:
        distilled[i] = RunResult(todo[i], ok, secs, msg)
        callback(distilled[i])

    if todo:
        backend([(run_distill, (r,)) for r in todo], distill_done)
    failed = {id(r.run) for r in distilled.values() if not r.ok}
    missing = [r for r in runs if id(r) not in failed and _distill_finished(r.run_dir) and _needs_sample_eval(r)]
    errors: list[str] = []
    if missing:
        t0 = time.time()
        n_proc = max(1, min(jobs, len(missing)))
        chunks = [missing[i::n_proc] for i in range(n_proc)]
        out = missing[0].run_dir.parent.parent
        tasks = [(run_sample_evals, ([str(r.run_dir) for r in chunk], chunk[0].samples, threads,
                                     str(out / f"sample_eval-{i}.log"))) for i, chunk in enumerate(chunks)]
        backend(tasks, lambda i, ok, secs, msg: None if ok else errors.append(msg))
        if on_sample_eval is not None:
            on_sample_eval(len(missing), time.time() - t0)
    out_results = list(results)
    for i, run in enumerate(todo):
        res = distilled[i]
        if res.ok and _needs_sample_eval(run):
            res = RunResult(run, False, res.seconds, "; ".join(errors) or "no sample_eval.json was written")
        out_results.append(res)
    for run in missing:  # distilled before this sweep, evaluated now
        if run not in todo and _needs_sample_eval(run):
            out_results.append(RunResult(run, False, 0.0, "; ".join(errors) or "no sample_eval.json was written"))
    return out_results
