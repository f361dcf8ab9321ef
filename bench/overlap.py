"""Rollout–update overlap (``rollout.overlap``): step time with and without it, on the bench pairs.

    python bench/overlap.py                       # both pairs, 3 rounds, writes bench/results.md
    python bench/overlap.py --pairs demo --rounds 1 --steps 10 --no-write

The configuration of bench/end_to_end.py (same models, prompts, loss and optimizer), once with
``rollout.overlap=false`` and once with ``true``; each (pair, variant, round) runs in a fresh
process, the variants alternate within a round. Step time = the interval between consecutive
step ends after ``--warmup`` steps (generation, teacher, loss, backward, optimizer, logging; with
overlap the next batch's generation and scoring run in a background thread during the update).
Reported: the median step time of each variant over all rounds, the speed-up off/on, and the mean
policy lag (1 step with overlap after the first step). The CPU is shared by both threads of the
process (``--threads`` intra-op threads each), so on a 2-core machine overlap can only win the
time one phase leaves a core idle; on GPUs (vLLM engine) the two phases run on different devices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from end_to_end import model_paths, opd_overrides  # noqa: E402


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import opd.train as T
    from opd.config.load import load_config

    tmp = Path(tempfile.mkdtemp(prefix="opd-overlap-"))
    student, teacher = model_paths(a.pair, Path(a.models))
    extra = [f"rollout.overlap={'true' if a.overlap else 'false'}"]
    cfg = load_config(None, opd_overrides(a.pair, student, teacher, a.warmup + a.steps, str(tmp / "run"), a.threads,
                                          extra))
    marks: list[float] = []
    lags: list[float] = []
    original = T.train_step

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        if not marks:
            marks.append(time.perf_counter())
        out = original(*args, **kwargs)
        marks.append(time.perf_counter())
        lags.append(out.get("policy_lag", 0.0))
        return out

    T.train_step = timed
    T.distill(cfg)
    steps = [b - a_ for a_, b in zip(marks, marks[1:])][a.warmup:]
    return {"step_s": steps, "lag": statistics.fmean(lags[a.warmup:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; do not update bench/results.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    p.add_argument("--overlap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    common.add_machine_args(p)
    a = p.parse_args(argv)
    if a.worker:
        common.worker_print(worker(a))
        return 0
    models = Path(tempfile.mkdtemp(prefix="opd-overlap-models-"))
    rows = []
    for pair in a.pairs.split(","):
        times: dict[int, list[float]] = {0: [], 1: []}
        lag: dict[int, float] = {}
        busy: list[float] = []
        for r in range(a.rounds):
            for overlap in ((0, 1) if r % 2 == 0 else (1, 0)):
                common.wait_for_quiet(a.quiet_busy, a.quiet_timeout)
                out = common.run_worker(__file__, [f"--pair={pair}", f"--overlap={overlap}", f"--models={models}",
                                                   f"--steps={a.steps}", f"--warmup={a.warmup}",
                                                   f"--threads={a.threads}"])
                if "error" in out:
                    print(f"{pair} overlap={overlap}: {out['error']}", file=sys.stderr)
                    return 1
                times[overlap] += out["step_s"]
                lag[overlap] = out["lag"]
                busy.append(out["neighbours_busy"])
                print(f"{pair} round {r + 1} overlap={overlap}: median step "
                      f"{statistics.median(out['step_s']) * 1e3:.1f} ms", flush=True)
        off, on = statistics.median(times[0]), statistics.median(times[1])
        rows.append([pair, f"{off * 1e3:.1f}", f"{on * 1e3:.1f}", f"{off / on:.2f}×", f"{lag[1]:.2f}",
                     f"{100 * statistics.fmean(busy):.0f} %"])
    table = common.md_table(["pair", "step, overlap off (ms)", "step, overlap on (ms)", "speed-up", "mean policy lag",
                             "CPU used by others"], rows)
    print(table)
    if not a.no_write:
        body = (f"## Rollout–update overlap ({common.stamp()})\n\n`{common.command_line()}` — medians of "
                f"{a.rounds} × {a.steps} steps per variant (fresh process each, variants alternating), "
                f"{a.threads} threads; configuration of bench/end_to_end.py.\n\n{table}")
        common.write_section("overlap", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
