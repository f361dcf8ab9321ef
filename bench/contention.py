"""opd on a shared CPU: the demo alone, two at once, and beside a served teacher, with opd's OpenMP
defaults (opd/threads.py) and with the old behaviour.

    python bench/contention.py                  # about 1.5 min on 2 quiet cores
    python bench/contention.py --steps 60       # 2 min on 2 quiet cores (docs/guarantees.md's table)
    python bench/contention.py --steps 12       # 13 min on 2 cores ~85 % busy with other work

Each scenario starts fresh ``opd distill`` processes on the demo (reduced: ``--steps`` steps, no
periodic evaluation, 50 held-out prompts, no report) and reads the distillation time of each run —
the sum of its steps' ``seconds`` in ``metrics.jsonl`` (no start-up, no evaluation). Scenarios:

* **alone** — one run;
* **two at once** — two runs started together on the same cores (each one's time is printed;
  the fair share is 2× alone on cores that one run fills);
* **beside a served teacher** — ``opd serve-teacher builtin:arith/teacher`` in its own process,
  the run scoring with it (``teacher.server=... teacher.protocol=opd``): the run waits for the
  server and the server for the run, on the same cores.

Each scenario runs twice: ``default`` (opd's settings: ``GOMP_SPINCOUNT`` left to the ``opd``
command, which sets a short spin; the thread count from the CPUs available, lowered while other
processes use some of them — opd.threads.ThreadGovernor) and ``old`` (a fixed count, so no
adaptation: ``GOMP_SPINCOUNT=300000``, libgomp's own default, as before opd set one, and
``train.threads`` = the affinity mask's size, torch's own choice, which ignores a cgroup quota; on a
machine without a quota the old and new thread choices are the same number). Printed: seconds per
run, the ratio to ``alone (default)``, and the share of the CPUs that processes outside this bench
used meanwhile. On a machine busy with other work every scenario
is already "shared" (``alone`` included): compare ratios within one run of this script, never
seconds across runs. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Neighbours, free_port, load1, machine_line, md_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"default": {}, "old": {"GOMP_SPINCOUNT": "300000"}}


def _old_threads() -> list[str]:
    """The thread choice before opd.threads: torch's default, libgomp's count of the affinity mask."""
    return [f"train.threads={len(os.sched_getaffinity(0))}"]


def _env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return {**env, **VARIANTS[variant]}


def _distill_cmd(run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "opd.cli", "distill", f"train.steps={steps}", "eval.every=0", "eval.size=50",
            "eval.teacher=false", "logging.report=false", "logging.progress=false", "logging.overwrite=true",
            f"logging.run_dir={run_dir}", *extra]


def _distill_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["seconds"] for r in records if r.get("kind") == "train"]
    if not steps:
        raise SystemExit(f"{run_dir}: no training steps recorded; see {run_dir / 'stderr.txt'}")
    return sum(steps)


def _run_together(dirs: list[Path], steps: int, env: dict[str, str], extra: list[str]) -> list[float]:
    procs = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        log = open(d.parent / f"{d.name}.stderr.txt", "w")
        procs.append((subprocess.Popen(_distill_cmd(d, steps, extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                       stderr=log), log))
    for proc, log in procs:
        rc = proc.wait()
        log.close()
        if rc != 0:
            raise SystemExit(f"opd distill failed (exit {rc}); see {log.name}")
    return [_distill_seconds(d) for d in dirs]


def _beside_teacher(run_dir: Path, steps: int, env: dict[str, str], extra: list[str]) -> list[float]:
    port = free_port()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.server.txt", "w")
    server = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve-teacher", "builtin:arith/teacher",
                               "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"opd serve-teacher exited (status {server.returncode}); see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"opd serve-teacher did not listen on port {port} within 180 s; see {log.name}")
        return _run_together([run_dir], steps, env,
                             [f"teacher.server=http://127.0.0.1:{port}", "teacher.protocol=opd", *extra])
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each run (default 30)")
    p.add_argument("--scenarios", default="alone,two,teacher", help="comma-separated: alone, two, teacher")
    p.add_argument("--variants", default="default,old", help="comma-separated: default, old")
    a = p.parse_args(argv)
    scenarios = [s for s in a.scenarios.split(",") if s]
    variants = [v for v in a.variants.split(",") if v]
    bad = [s for s in scenarios if s not in ("alone", "two", "teacher")] + [v for v in variants if v not in VARIANTS]
    if bad or a.steps < 1:
        p.error(f"unknown scenario/variant {bad} or --steps < 1")
    print(machine_line(), flush=True)
    print(f"workload: opd distill (the demo) train.steps={a.steps} eval.every=0 eval.size=50; affinity "
          f"{len(os.sched_getaffinity(0))} CPUs; load average {load1():.2f} at start\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="opd-contention-"))
    rows, alone = [], None
    for scenario in scenarios:
        for variant in variants:
            env, base = _env(variant), tmp / f"{scenario}-{variant}"
            extra = _old_threads() if variant == "old" else []
            with Neighbours() as nb:
                if scenario == "alone":
                    times = _run_together([base / "a"], a.steps, env, extra)
                elif scenario == "two":
                    times = _run_together([base / "a", base / "b"], a.steps, env, extra)
                else:
                    times = _beside_teacher(base / "a", a.steps, env, extra)
            if scenario == "alone" and variant == "default":
                alone = times[0]
            label = {"alone": "alone", "two": "two at once", "teacher": "beside a served teacher"}[scenario]
            seconds = " / ".join(f"{t:.1f}" for t in times)
            ratio = " / ".join(f"{t / alone:.2f}×" for t in times) if alone else "-"
            rows.append([label, variant, seconds, ratio, f"{nb.busy:.0%}"])
            print(f"{label:<24} {variant:<8} {seconds:>14} s  {ratio:>14}  (others used {nb.busy:.0%} of the CPUs)",
                  flush=True)
    shutil.rmtree(tmp, ignore_errors=True)  # kept when a run failed: its logs are named in the message
    print()
    print(md_table(["scenario", "settings", "seconds (each run)", "÷ alone (default)", "CPU used by others"], rows))
    print(f"\ndefault = opd's settings (GOMP_SPINCOUNT from opd.threads, threads from the CPUs available); "
          f"old = GOMP_SPINCOUNT=300000 (libgomp's default) and torch's thread choice (the affinity mask). "
          f"Load average {load1():.2f} at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
