"""Whole training steps with the in-process vLLM engine on the real pair: does pushing the student's
weights less often (``rollout.sync_every``) pay, and how much does each engine slow down beside a busy process?

    python bench/vllm_steps.py                  # hf, then vllm with sync_every 1, 2, 4; writes results.md
    python bench/vllm_steps.py --neighbour both # also hf and vllm (sync_every 1) beside a busy process
    python bench/vllm_steps.py --every 1,4 --steps 6 --no-write

Each row is a fresh ``opd distill`` process on the ``real`` pair of bench/end_to_end.py (SmolLM2-135M-Instruct
teacher, its uniform 20-of-30-layer student, 16 chat prompts a step, completions ≤ 24 tokens, the same loss and
optimizer as there), ``--warmup`` + ``--steps`` steps, seed 0. Step time is the median of the timed steps'
``seconds`` in ``metrics.jsonl`` (the whole step: rollout, weight push when due, teacher, loss, backward,
optimizer). With ``sync_every = k`` the engine samples from weights up to k − 1 updates old, so the table
also gives the teacher KL of the sampled tokens (``teacher_kl``, mean over the timed steps; all rows see the
same prompts) — what staleness costs in learning over this short horizon — and the push itself is timed
in bench/rollout_engines.py (``sync s``). With ``--neighbour on|both`` the hf row and the vllm row with
``sync_every = 1`` run (again) beside a second process that keeps one core busy (bench/rollout_engines.py's
:class:`BusyNeighbour`), with opd's own thread handling (train.threads unset, so opd.threads decides), as a
user's run on a shared machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from end_to_end import build_real_pair, opd_overrides  # noqa: E402
from rollout_engines import BusyNeighbour  # noqa: E402

DATA = common.ROOT / "bench" / "data" / "vllm_steps.json"


def run(student: str, teacher: str, engine: str, every: int, steps: int, threads: int | None, tmp: Path,
        neighbour: bool = False) -> dict[str, Any]:
    """One fresh ``opd distill``; its per-step seconds and teacher KL from ``metrics.jsonl``. ``threads``
    None: opd chooses (and adapts) the count, as for a user who leaves train.threads unset."""
    run_dir = tmp / f"{engine}-{every}-{'busy' if neighbour else 'alone'}"
    extra = [f"rollout.engine={engine}"] + ([f"rollout.sync_every={every}"] if engine == "vllm" else [])
    args = opd_overrides("real", student, teacher, steps, str(run_dir), threads or 1, extra)
    if threads is None:
        args = [a for a in args if not a.startswith("train.threads=")]
    with BusyNeighbour(neighbour), common.Neighbours() as nb:
        done = subprocess.run(["opd", "distill", *args], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    return {"seconds": [r["seconds"] for r in train], "teacher_kl": [r["teacher_kl"] for r in train],
            "neighbours_busy": nb.busy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", default="1,2,4", help="the sync_every values of the vllm rows")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--neighbour", choices=("off", "on", "both"), default="off",
                   help="also run hf and vllm (sync_every 1) beside a process that keeps one core busy "
                        "(on: only beside it, for those two rows)")
    p.add_argument("--opd-threads", action="store_true",
                   help="leave train.threads unset (opd chooses and adapts the count) instead of --threads")
    common.add_machine_args(p)
    a = p.parse_args(argv)
    print(f"# vllm steps — {common.machine_line()}\n", flush=True)
    threads = None if a.opd_threads else a.threads
    plan = [] if a.neighbour == "on" else [("hf", 1, False)] + [("vllm", int(k), False) for k in a.every.split(",")]
    if a.neighbour != "off":
        plan += [("hf", 1, True), ("vllm", 1, True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="opd-vllm-steps-") as tmp:
        student, teacher = build_real_pair(Path(tmp))
        for engine, every, neighbour in plan:
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
            r = run(student, teacher, engine, every, a.warmup + a.steps, threads, Path(tmp), neighbour)
            if "error" in r:
                print(f"  {engine} sync_every={every}: {r['error']}", flush=True)
                continue
            timed = r["seconds"][a.warmup:]
            row = {"engine": engine, "sync_every": every, "neighbour": neighbour, "step_s": statistics.median(timed),
                   "teacher_kl": statistics.mean(r["teacher_kl"][a.warmup:]), "neighbours_busy": r["neighbours_busy"],
                   "seconds": r["seconds"], "teacher_kl_steps": r["teacher_kl"]}
            rows.append(row)
            print(f"  {engine} sync_every={every}{' beside a busy process' if neighbour else ''}: median step "
                  f"{row['step_s']:.2f} s, teacher KL {row['teacher_kl']:.3f}, others {row['neighbours_busy']:.0%}",
                  flush=True)
    text = render(rows, a)
    print("\n" + text)
    if not a.no_write:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps({"command": common.command_line(), "when": common.stamp(),
                                    "machine": common.machine_line(), "rows": rows}, indent=1))
        common.write_section("vllm_steps", text)
    return 0


def render(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    base = next((r for r in rows if r["engine"] == "vllm" and r["sync_every"] == 1 and not r["neighbour"]), None)
    table = [[r["engine"], r["sync_every"] if r["engine"] == "vllm" else "–", "busy" if r["neighbour"] else "none",
              f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}×" if base else "–", f"{r['teacher_kl']:.3f}",
              f"{r['neighbours_busy']:.0%}"] for r in rows]
    slow = []
    for r in rows:
        alone = next((q for q in rows if q["engine"] == r["engine"] and q["sync_every"] == r["sync_every"]
                      and not q["neighbour"]), None) if r["neighbour"] else None
        if alone is not None:
            slow.append(f"- {r['engine']}: a step beside a busy process takes {r['step_s'] / alone['step_s']:.2f}× "
                        "its time alone")
    threads = "opd's choice (train.threads unset, adapted to other work)" if a.opd_threads else f"{a.threads} threads"
    return "\n".join([
        "## vLLM in whole training steps: sync_every and a busy neighbour (bench/vllm_steps.py)", "",
        f"`{common.command_line()}` — {common.stamp()}; {a.warmup} warm-up + {a.steps} timed steps per fresh "
        f"`opd distill`, {threads}, the real pair of bench/end_to_end.py.", "",
        common.md_table(["engine", "sync_every", "neighbour", "s / step (median)", "vs vllm k = 1 alone",
                         "teacher KL (mean, timed steps)", "CPU used by others"], table, "lllrrrr"),
        *(["", "Beside a process that keeps one core busy (same run):", "", *slow] if slow else []),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
