"""bf16 autocast vs fp32 on these CPUs (AMX): does ``train.precision=bf16`` speed an OPD step up, and
where in the step does the autocast reach?

    python bench/precision.py                       # demo and large pairs, 2 alternating rounds
    python bench/precision.py --pairs large --rounds 1
    python bench/precision.py --quick               # smoke: demo pair, 1 warm-up + 2 steps, prints only

Three measurements, all with the settings of bench/end_to_end.py (fp32 weights, 2 threads):

1. **GEMM rates** — ``torch.mm`` on 2048² matrices in fp32 and in bf16, same process, before the
   runs: whether the CPU's bf16 matrix units (AMX) are used by PyTorch here.
2. **Step time** — the real loop (``opd.train.distill``, bench/opd_steps.py) with
   ``train.precision=no`` and ``bf16`` (``accelerate``'s autocast, which opd applies around the
   student's forward and loss: opd/step.py passes ``accelerator.autocast`` to
   ``accumulate_gradients``), each in a fresh process, alternating ``--rounds`` times; medians of
   all timed steps. The first step after warm-up of every process is audited instead of timed:
   every matrix product it dispatches is recorded with its FLOPs and input dtype, by phase
   (rollout, teacher, student forward, loss, backward) — the table says which share of each
   phase's matmul FLOPs ran in bf16.
3. **Per-phase potential** — in one process, one real step records the arguments of its three
   phases — rollout (``collect_rollouts``), teacher scoring (``teacher.score``), the student's
   forward + loss + backward (``accumulate_gradients``) — and each is called again with them, fp32 vs
   inside ``torch.autocast("cpu", dtype=torch.bfloat16)``, interleaved, median of ``--reps``. It
   shows what bf16 would gain in the phases opd's autocast does not cover today.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

DATA = common.ROOT / "bench" / "data" / "precision.json"
PHASES = ("rollout", "teacher", "student forward", "loss", "backward", "other")


def gemm_rate(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = common.time_calls(lambda: torch.mm(a, b), reps=reps, warmup=2)
    return 2 * n**3 / t["median_s"] / 1e9


def _overrides(pair: str, models: Path, steps: int, threads: int, precision: str, run_dir: str) -> list[str]:
    from end_to_end import model_paths, opd_overrides

    student, teacher = model_paths(pair, models)
    return opd_overrides(pair, student, teacher, steps, run_dir, threads, [f"train.precision={precision}",
                                                                          "train.device=cpu"])


def step_worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from opd_steps import run_steps

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="opd-precision-"))
    ov = _overrides(a.pair, Path(a.models), a.warmup + 1 + a.steps, a.threads, a.precision, str(tmp / "run"))
    return run_steps(ov, warmup=a.warmup, steps=a.steps, audit=True)


def phase_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Rollout, teacher and student fwd+bwd, fp32 vs bf16 autocast, interleaved.

    One real step (``train_step``, precision ``no``) runs first with its three phase functions
    wrapped to record their arguments; each phase is then called again with exactly those arguments,
    plainly and inside ``torch.autocast("cpu", dtype=torch.bfloat16)``. The share of each replay's
    matmul FLOPs that ran in bf16 is recorded too (bench/opd_steps.py's audit), so a phase that
    switches an outer autocast off shows up as 0 %.
    """
    import torch
    from accelerate import Accelerator
    from opd_steps import _audit_mode, _Phases

    import opd.step as S
    from opd.assemble import build_components
    from opd.config.load import load_config

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="opd-precision-"))
    cfg = load_config(None, _overrides(a.pair, Path(a.models), 2, a.threads, "no", str(tmp / "run")))
    parts = build_components(cfg, tmp / "run", Accelerator(cpu=True))
    calls: dict[str, tuple[Any, tuple, dict]] = {}

    def recorder(name: str, fn: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls[name] = (fn, args, kwargs)
            return fn(*args, **kwargs)

        return record

    collect, accumulate = S.collect_rollouts, S.accumulate_gradients
    S.collect_rollouts = recorder("rollout", collect)
    S.accumulate_gradients = recorder("student fwd+bwd", accumulate)
    parts.teacher.score = recorder("teacher", parts.teacher.score)
    S.train_step(parts, 0)
    S.collect_rollouts, S.accumulate_gradients = collect, accumulate

    def replay(name: str) -> None:
        fn, args, kwargs = calls[name]
        torch.manual_seed(0)
        if name == "student fwd+bwd":
            parts.student.train()
            fn(*args, **kwargs)
            parts.optimizer.zero_grad(set_to_none=True)
        else:
            parts.student.eval()
            with torch.no_grad():
                fn(*args, **kwargs)

    out: dict[str, Any] = {}
    for name in ("rollout", "teacher", "student fwd+bwd"):
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for rep in range(a.reps + 1):  # the first pair is warm-up
            for mode in ("fp32", "bf16"):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
                t0 = time.perf_counter()
                with ctx:
                    replay(name)
                if rep:
                    times[mode].append(time.perf_counter() - t0)
        flops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        with _audit_mode(_Phases(), flops), torch.autocast("cpu", dtype=torch.bfloat16):
            replay(name)
        by_dtype = flops["other"]
        total = sum(by_dtype.values()) or 1.0
        out[name] = {**times, "bf16_share": by_dtype.get("bfloat16", 0.0) / total}
    parts.close()
    return {"phases": out}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    step_s = [s for r in runs for s in r["step_s"]]
    tps = [t / s for r in runs for t, s in zip(r["tokens"], r["step_s"])]
    return {"step_s": statistics.median(step_s), "tokens_per_s": statistics.median(tps), "n_steps": len(step_s),
            "first_loss": runs[0]["losses"][0], "flops": runs[0]["flops"],
            "rounds": [{"step_s": r["step_s"], "neighbours_busy": r.get("neighbours_busy")} for r in runs],
            "neighbours_busy": max(r.get("neighbours_busy", 0.0) for r in runs)}


def _audit_rows(flops: dict[str, dict[str, float]]) -> list[list[Any]]:
    total = sum(sum(v.values()) for v in flops.values()) or 1.0
    rows = []
    for phase in PHASES:
        by_dtype = flops.get(phase)
        if not by_dtype:
            continue
        f = sum(by_dtype.values())
        rows.append([phase, f"{f / 1e9:,.2f}", f"{f / total:.0%}", f"{by_dtype.get('bfloat16', 0.0) / f:.0%}",
                     ", ".join(sorted(by_dtype))])
    return rows


def render(results: dict[str, dict[str, Any]], phases: dict[str, Any], gemm: dict[str, float]) -> str:
    out = [f"GEMM rate (`torch.mm` 2048², one process, before the runs): fp32 {gemm['float32']:.0f} GFLOP/s, bf16 "
           f"{gemm['bfloat16']:.0f} GFLOP/s → **{gemm['bfloat16'] / gemm['float32']:.1f}×** (AMX).", ""]
    rows = []
    for pair, by in results.items():
        fp, bf = by.get("no"), by.get("bf16")
        for prec, r in by.items():
            speed = f"{fp['step_s'] / r['step_s']:.2f}×" if fp and prec == "bf16" else "–"
            rows.append([pair, "fp32" if prec == "no" else "bf16 autocast", f"{r['step_s']:.3f}",
                         f"{r['tokens_per_s']:,.0f}", speed, f"{r['first_loss']:.6g}", r["n_steps"],
                         f"{r['neighbours_busy']:.0%}"])
        if fp and bf:
            rows[-1][5] += f" (rel. diff {abs(bf['first_loss'] - fp['first_loss']) / abs(fp['first_loss']):.1e})"
    out += ["**Step time** (`train.precision=no` vs `bf16`):", "",
            common.md_table(["pair", "precision", "s / step (median)", "tokens / s", "speed-up vs fp32",
                             "loss of step 1", "steps timed", "CPU used by others"], rows, "llrrrrrr"), ""]
    for pair, by in results.items():
        if "bf16" in by:
            out += [f"**Where the autocast reaches** ({pair} pair, `train.precision=bf16`, one audited step): matmul "
                    "FLOPs per phase and the share that ran in bf16.", "",
                    common.md_table(["phase", "GFLOP", "share of the step", "in bf16", "dtypes"],
                                    _audit_rows(by["bf16"]["flops"]), "lrrrl"), ""]
    for pair, ph in phases.items():
        rows = []
        for name, t in ph["phases"].items():
            f, b = statistics.median(t["fp32"]), statistics.median(t["bf16"])
            rows.append([name, f"{f * 1e3:,.1f}", f"{b * 1e3:,.1f}", f"{f / b:.2f}×", f"{t['bf16_share']:.0%}",
                         len(t["fp32"])])
        out += [f"**Per-phase potential** ({pair} pair; each phase called directly, fp32 vs bf16 autocast, interleaved; "
                f"other processes used {ph.get('neighbours_busy', 0):.0%} of the CPUs):", "",
                common.md_table(["phase", "fp32 ms (median)", "bf16 autocast ms (median)", "speed-up",
                                 "matmul FLOPs in bf16 under the autocast", "reps"], rows, "lrrrrr"), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--steps", type=int, default=8, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="repetitions per phase in the per-phase measurement")
    common.add_machine_args(p)
    p.add_argument("--max-neighbours", type=float, default=0.1)
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="demo pair, 1 warm-up + 2 steps, one round; prints only")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", choices=("steps", "phases"), help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        common.worker_print(step_worker(a) if a.job == "steps" else phase_worker(a))
        return 0
    if a.quick:
        a.pairs, a.steps, a.warmup, a.rounds, a.reps, a.attempts = "demo", 2, 1, 1, 2, 1
    import torch

    torch.set_num_threads(a.threads)
    info = common.machine_info()
    print(f"# bf16 vs fp32 — {common.machine_line(info)}\n", flush=True)
    common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
    gemm = {d: gemm_rate(d) for d in ("float32", "bfloat16")}
    print(f"GEMM 2048²: fp32 {gemm['float32']:.0f} GFLOP/s, bf16 {gemm['bfloat16']:.0f} GFLOP/s", flush=True)
    from opd_steps import models_folder

    models = models_folder(None)
    common_args = ["--models", str(models), "--threads", str(a.threads)]

    def run(args: list[str], label: str) -> dict[str, Any] | None:
        best = None
        for _attempt in range(a.attempts):
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
            r = common.run_worker(__file__, [*args, *common_args])
            if "error" in r:
                print(f"  {label}: {r['error']}", flush=True)
                return best
            if best is None or r["neighbours_busy"] < best["neighbours_busy"]:
                best = r
            if r["neighbours_busy"] <= a.max_neighbours:
                break
            print(f"  ({label}: other processes used {r['neighbours_busy']:.0%} of the CPUs; rerun)", flush=True)
        return best

    results: dict[str, dict[str, Any]] = {}
    phases: dict[str, Any] = {}
    for pair in a.pairs.split(","):
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(a.rounds):
            for precision in ("no", "bf16"):
                r = run(["--job", "steps", "--pair", pair, "--precision", precision, "--steps", str(a.steps),
                         "--warmup", str(a.warmup)], f"{pair} {precision}")
                if r is not None:
                    runs.setdefault(precision, []).append(r)
                    print(f"  {pair} {precision}: median step {statistics.median(r['step_s']):.3f} s, others "
                          f"{r['neighbours_busy']:.0%}", flush=True)
        results[pair] = {prec: pooled(rs) for prec, rs in runs.items()}
        ph = run(["--job", "phases", "--pair", pair, "--reps", str(a.reps)], f"{pair} phases")
        if ph is not None:
            phases[pair] = ph
            print(f"  {pair} phases: " + ", ".join(
                f"{k} {statistics.median(v['fp32']) / statistics.median(v['bf16']):.2f}× ({v['bf16_share']:.0%} bf16)"
                for k, v in ph["phases"].items()), flush=True)
    body = render(results, phases, gemm)
    print("\n" + body)
    if not a.no_write and not a.quick:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps({"command": common.command_line(), "when": common.stamp(), "gemm": gemm,
                                    "machine": common.machine_line(info), "args": vars(a), "results": results,
                                    "phases": phases}, indent=1))
        head = (f"## bf16 autocast vs fp32 on CPU (bench/precision.py)\n\n`{common.command_line()}` — {common.stamp()}; "
                f"{a.warmup} warm-up + 1 audited + {a.steps} timed steps per process, {a.rounds} alternating rounds, "
                "medians over all timed steps; bench/end_to_end.py settings (fp32 weights).\n\n")
        common.write_section("precision", head + body, machine=common.machine_line(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
