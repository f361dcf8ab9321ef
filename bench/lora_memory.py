"""LoRA vs full fine-tuning of the student: peak memory and step time of one OPD step, on CPU.

    python bench/lora_memory.py                     # the larger bench pair, 2 alternating rounds
    python bench/lora_memory.py --rank 64 --rounds 1
    python bench/lora_memory.py --quick             # smoke: demo pair, 1 warm-up + 2 steps, prints only

Pair and settings: the ``large`` pair of bench/end_to_end.py (random-init Llama student 6 × 256,
teacher 6 × 512, V = 32000, 16 prompts × 64 completion tokens, full-vocabulary reverse KL, AdamW,
fp32, 2 threads) — everything but the student's trainable parameters is the same in every variant:

* **full** — every student parameter trains (AdamW keeps two fp32 moments per parameter);
* **lora** — ``student.lora_rank=R`` (default 16), ``lora_alpha=2R``, ``all-linear`` targets: only the
  adapters train (opd/lora.py);
* **self/full** and **self/lora** — the same with ``teacher.model=self`` (frozen, the arith hint as
  privileged context): without LoRA the teacher is a deep copy of the student; with LoRA it is the
  student's own module with the adapter switched off (no second copy of the weights).

Each variant runs the real loop (``opd.train.distill``, bench/opd_steps.py) in a fresh process:
``--warmup`` steps, then ``--steps`` timed steps. Memory, per variant: the exact bytes of the
gradients and AdamW moments of the trainable parameters; the resident set when training starts
(models loaded, first evaluation done, glibc's free memory handed back with ``malloc_trim``); the
peak during training above it (``VmHWM`` reset when training starts); and the resident-set growth
from before loading to the end (bench/end_to_end.py's figure). The workers run with glibc's
``MALLOC_MMAP_THRESHOLD_=131072`` (``--mmap-threshold``): with glibc's default, memory freed after
loading and between steps stays in the heap and is reused, so the resident set hides most of the
training state (bench/results.md gives both measurements of the larger pair). ``--rounds`` alternates the
variants; medians pool every round's steps, peaks take the largest round. Ratios compare variants
of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

DATA = common.ROOT / "bench" / "data" / "lora_memory.json"
VARIANTS = ("full", "lora", "self/full", "self/lora")


def overrides(pair: str, variant: str, rank: int, folder: Path, steps: int, threads: int, run_dir: str) -> list[str]:
    from end_to_end import model_paths, opd_overrides

    student, teacher = model_paths(pair, folder)
    extra = []
    if variant.endswith("lora"):
        extra += [f"student.lora_rank={rank}", f"student.lora_alpha={2 * rank}"]
    if variant.startswith("self/"):
        extra += ["teacher.model=self", "teacher.self_mode=frozen", "teacher.use_context=true"]
    return opd_overrides(pair, student, teacher, steps, run_dir, threads, extra)


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from opd_steps import run_steps

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="opd-lora-"))
    ov = overrides(a.pair, a.variant, a.rank, Path(a.models), a.warmup + a.steps, a.threads, str(tmp / "run"))
    return run_steps(ov, warmup=a.warmup, steps=a.steps)


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    step_s = [s for r in runs for s in r["step_s"]]
    return {"step_s": statistics.median(step_s), "n_steps": len(step_s),
            **{k: max(r[k] for r in runs) for k in ("peak_mb", "loaded_mb", "train_peak_mb")},
            "state_mb": runs[0]["grad_mb"] + runs[0]["optimizer_mb"],
            "trainable": runs[0]["trainable"], "total": runs[0]["total"],
            "neighbours_busy": max(r.get("neighbours_busy", 0.0) for r in runs)}


def render(results: dict[str, dict[str, Any]], rank: int) -> str:
    rows = []
    for variant, r in results.items():
        ref = results.get("self/full" if variant.startswith("self/") else "full")

        def vs(key: str) -> str:
            return f"{r[key] - ref[key]:+,.0f}".replace("-", "−") if ref and ref is not r else "–"

        rows.append([
            variant, f"{r['trainable']:,}", f"{r['trainable'] / r['total']:.2%}", f"{r['step_s']:.3f}",
            f"{r['step_s'] / ref['step_s']:.2f}" if ref else "–",
            f"{r['state_mb']:,.1f}", common.fmt_mb(r["loaded_mb"]), vs("loaded_mb"), common.fmt_mb(r["train_peak_mb"]),
            vs("train_peak_mb"), common.fmt_mb(r["peak_mb"]), vs("peak_mb"), r["n_steps"],
            f"{r['neighbours_busy']:.0%}"])
    headers = ["variant", "trainable params", "of all", "s / step (median)", "time vs full",
               "gradients + AdamW state MB (exact)", "resident after loading MB", "vs full",
               "peak during training MB (above loading)", "vs full", "peak RSS MB (loading + training)", "vs full",
               "steps timed", "CPU used by others"]
    return (f"LoRA rank {rank}, α = {2 * rank}, all-linear targets; \"full\" rows train every student parameter. "
            "The self rows use `teacher.model=self` (frozen): a deep copy of the student without LoRA, the student's "
            "own module with the adapter switched off with LoRA. \"vs full\" columns: this row minus the full row above it "
            "(− = less memory).\n\n" + common.md_table(headers, rows, "l" + "r" * 13))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    common.add_machine_args(p)
    p.add_argument("--max-neighbours", type=float, default=0.1,
                   help="rerun a process when other processes used more than this share of the CPUs")
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="MALLOC_MMAP_THRESHOLD_ of the measuring processes (bytes; 0 = glibc's default): allocations "
                        "above it are returned to the OS when freed, so the resident set follows live memory")
    p.add_argument("--quick", action="store_true", help="demo pair, 1 warm-up + 2 steps, one round; prints only")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pair", default="large", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--render-only", action="store_true", help="rebuild the results.md section from "
                                                               "bench/data/lora_memory.json")
    a = p.parse_args(argv)
    if a.worker:
        common.worker_print(worker(a))
        return 0
    if a.render_only:
        write_results(load_store())
        return 0
    if a.quick:
        a.pair, a.steps, a.warmup, a.rounds, a.attempts = "demo", 2, 1, 1, 1
    info = common.machine_info()
    print(f"# LoRA vs full fine-tuning ({a.pair} pair) — {common.machine_line(info)}\n", flush=True)
    from opd_steps import models_folder

    if a.mmap_threshold:  # read by glibc when each worker starts (this process keeps its own setting)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    models = models_folder(None)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(a.rounds):
        for variant in a.variants.split(","):
            best = None
            for _attempt in range(a.attempts):  # keep the least disturbed run
                common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
                r = common.run_worker(__file__, ["--pair", a.pair, "--variant", variant, "--rank", str(a.rank),
                                                 "--models", str(models), "--steps", str(a.steps), "--warmup",
                                                 str(a.warmup), "--threads", str(a.threads)])
                if "error" in r:
                    print(f"  {variant}: {r['error']}", flush=True)
                    break
                if best is None or r["neighbours_busy"] < best["neighbours_busy"]:
                    best = r
                if r["neighbours_busy"] <= a.max_neighbours:
                    break
                print(f"  ({variant}: other processes used {r['neighbours_busy']:.0%} of the CPUs; rerun)", flush=True)
            if best is not None:
                runs.setdefault(variant, []).append(best)
                print(f"  {variant}: median step {statistics.median(best['step_s']):.3f} s, loaded {best['loaded_mb']:,.0f} "
                      f"MB, training peak {best['train_peak_mb']:,.0f} MB, grads+AdamW "
                      f"{best['grad_mb'] + best['optimizer_mb']:,.1f} MB, trainable {best['trainable']:,}, others "
                      f"{best['neighbours_busy']:.0%}", flush=True)
    results = {v: pooled(rs) for v, rs in runs.items()}
    print("\n" + render(results, a.rank))
    if not a.no_write and not a.quick:
        store = load_store()
        store["runs"][f"mmap={a.mmap_threshold}"] = {
            "command": common.command_line(), "when": common.stamp(), "machine": common.machine_line(info),
            "args": vars(a), "results": {v: {**results[v], "rounds": runs[v]} for v in results}}
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(store, indent=1))
        write_results(store)
    return 0


def load_store() -> dict[str, Any]:
    """``{"runs": {"mmap=<threshold>": record}}`` from bench/data/lora_memory.json (a single-run file
    of an earlier version of this script is kept as the run of its own setting; 0 = glibc's default)."""
    if not DATA.exists():
        return {"runs": {}}
    raw = json.loads(DATA.read_text())
    if "runs" in raw:
        return raw
    return {"runs": {f"mmap={raw['args'].get('mmap_threshold', 0)}": raw}}


def write_results(store: dict[str, Any]) -> None:
    """The ``lora_memory`` section of results.md from every stored run (one table per allocator setting)."""
    parts = ["## LoRA vs full fine-tuning (bench/lora_memory.py)", "",
             "Larger bench pair (bench/end_to_end.py settings), each variant in a fresh process, variants alternated "
             "over rounds, medians over all timed steps. Memory: the exact bytes of the gradients and AdamW moments "
             "of the trainable parameters; the resident set when training starts (models loaded, first evaluation "
             "done, glibc's free memory handed back with `malloc_trim`); the peak during training above it; and the "
             "resident-set growth from before loading to the end (bench/end_to_end.py's figure). With glibc's default "
             "allocator, memory freed after loading and between steps stays in the heap and is reused, so the "
             "resident set hides most of the training state; with `MALLOC_MMAP_THRESHOLD_` set, freed blocks above "
             "it go back to the OS and the resident set follows live memory.", ""]
    for key in sorted(store["runs"], key=lambda k: -int(k.split("=")[1])):
        run = store["runs"][key]
        threshold = int(key.split("=")[1])
        args = run["args"]
        setting = (f"glibc `MALLOC_MMAP_THRESHOLD_={threshold}`" if threshold else "glibc's default allocator")
        busy = [r["neighbours_busy"] for r in run["results"].values()]
        parts += [f"### {setting}", "",
                  f"`{run['command']}` — {run['when']}; {args['warmup']} warm-up + {args['steps']} timed steps per "
                  f"process, {args['rounds']} rounds, {args['threads']} thread(s)."
                  + (f" {run['note']}" if run.get("note") else ""), ""]
        if max(busy) > 0.3:
            parts += [f"Other processes used {min(busy):.0%}–{max(busy):.0%} of the CPUs during these runs: the time "
                      "columns are unreliable (only a large ratio would mean something); the memory columns are not "
                      "affected by sharing (exact bytes, or this process's own resident set).", ""]
        parts += [render(run["results"], args["rank"]), ""]
    machines = sorted({run["machine"] for run in store["runs"].values()})
    common.write_section("lora_memory", "\n".join(parts), machine="; ".join(machines))


if __name__ == "__main__":
    raise SystemExit(main())
