"""Peak memory and time of the chunked (fused) vs the dense linear-divergence loss, forward+backward.

    python bench/fused_divergence.py            # N=4096, V=32000 (and 128000 if memory allows), H=256
    python bench/fused_divergence.py --quick    # small smoke version (seconds)

Each variant runs in a fresh subprocess (glibc keeps freed memory, so variants run in one process
would contaminate each other's peak). Peak = ``VmHWM − VmRSS`` read from ``/proc/self/status``, the
baseline taken after the inputs are built and before the first call; it covers warm-up and timed
calls. Time = median over ``--reps`` forward+backward calls after ``--warmup`` calls, fp32,
``torch.set_num_threads(--threads)``. The student is ``h Wᵀ`` (``H``), the teacher ``h_t W_tᵀ``
(``--teacher-hidden``), projected inside the timed call in both variants; 25 % of tokens have weight 0.
Acceptance target (issue): chunked peak ≤ 1/8 of dense at ≤ 1.2× dense time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (bench/common.py: /proc readers shared by the benchmarks)


def worker(a: argparse.Namespace) -> dict:
    """Run one variant in this (fresh) process and return its measurements."""
    import torch

    sys.path.insert(0, ROOT)
    from opd.math.fused import DivergenceOptions, SupportTokens, dense_linear_divergence, fused_linear_divergence
    from opd.math.support import SupportSpec

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    N, V, H, Ht = a.N, a.V, a.H, a.teacher_hidden
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).requires_grad_(True)
    th = torch.randn(N, Ht, generator=g)
    tW = torch.randn(V, Ht, generator=g) * (2.0 / Ht**0.5)
    mask = torch.rand(N, generator=g) > 0.25
    weights = mask.float() / mask.sum()
    spec = SupportSpec(kind=a.support, k=a.k, norm=a.norm)
    fn = dense_linear_divergence if a.variant == "dense" else fused_linear_divergence

    def step() -> float:
        h.grad = None
        W.grad = None
        loss, _, _ = fn(h, W, weights, DivergenceOptions(a.divergence, spec, chunk_size=a.chunk_size or None),
                        SupportTokens(teacher_hidden_NH=th, teacher_weight_VH=tW))
        loss.backward()
        return float(loss.detach())

    base_kb = common.status_kb("VmRSS")
    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak_mb = (common.status_kb("VmHWM") - base_kb) / 1024
    return {"peak_mb": peak_mb, "median_s": statistics.median(times), "min_s": min(times), "loss": loss,
            "grad_h_norm": float(h.grad.norm()), "grad_W_norm": float(W.grad.norm())}


def run_variant(a: argparse.Namespace, *, V: int, divergence: str, variant: str, chunk_size: int) -> dict:
    """Run one variant in a fresh interpreter (``chunk_size`` 0 = the library's automatic choice)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--V", str(V),
           "--N", str(a.N), "--H", str(a.H), "--teacher-hidden", str(a.teacher_hidden),
           "--divergence", divergence, "--support", a.support, "--k", str(a.k), "--norm", a.norm,
           "--chunk-size", str(chunk_size), "--reps", str(a.reps), "--warmup", str(a.warmup),
           "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke version: N=1024, V=16000, 1 warm-up, 3 reps")
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--V", type=int, nargs="+", default=[32000, 128000])
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--divergences", default="jsd,fkl", help="comma-separated, e.g. fkl,rkl,jsd,tvd,akl")
    p.add_argument("--support", default="full")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--norm", default="renorm")
    p.add_argument("--chunk-sizes", default="auto",
                   help="comma-separated chunk sizes; 'auto' = the library default (auto_chunk_size(V))")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mem-fraction", type=float, default=0.6,
                   help="skip a dense run whose estimated peak exceeds this fraction of MemAvailable")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--divergence", default="jsd", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.V = a.V[0]
        print(json.dumps(worker(a)))
        return 0

    sys.path.insert(0, ROOT)
    from opd.math.fused import auto_chunk_size

    if a.quick:
        a.N, a.V, a.reps, a.warmup = 1024, [16000], 3, 1
    chunk_sizes = [0 if c.strip() == "auto" else int(c) for c in a.chunk_sizes.split(",")]
    divergences = [d.strip() for d in a.divergences.split(",") if d.strip()]
    print(f"# fused vs dense linear divergence: N={a.N}, H={a.H}, teacher H={a.teacher_hidden}, fp32, "
          f"support={a.support}" + (f" (k={a.k}, {a.norm})" if a.support != "full" else "")
          + f", threads={a.threads}, median of {a.reps} after {a.warmup} warm-up\n")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (timings are unreliable when it exceeds ~1)\n")
    print("| V | divergence | variant | chunk | peak MB | median s | dense/chunked peak | chunked/dense time "
          "| loss rel. diff | target |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|:---:|")
    dense_mb_per_v = None  # dense peak per vocabulary entry, to estimate larger V
    verdicts = []
    for V in a.V:
        for div in divergences:
            est = None if dense_mb_per_v is None else dense_mb_per_v * V
            if est is not None and est > a.mem_fraction * common.mem_available_mb():
                print(f"| {V} | {div} | dense | – | skipped: est. {est:,.0f} MB > {a.mem_fraction:.0%} of "
                      f"MemAvailable {common.mem_available_mb():,.0f} MB | | | | | |")
                dense = None
            else:
                dense = run_variant(a, V=V, divergence=div, variant="dense", chunk_size=0)
                dense_mb_per_v = max(dense_mb_per_v or 0.0, dense["peak_mb"] / V)
                print(f"| {V} | {div} | dense | – | {dense['peak_mb']:,.0f} | {dense['median_s']:.3f} | 1 | 1 | 0 | |",
                      flush=True)
            for cs in chunk_sizes:
                r = run_variant(a, V=V, divergence=div, variant="chunked", chunk_size=cs)
                label = f"{auto_chunk_size(V)} (auto)" if cs == 0 else str(cs)
                if dense is None:
                    print(f"| {V} | {div} | chunked | {label} | {r['peak_mb']:,.0f} | {r['median_s']:.3f} "
                          "| – | – | – | – |", flush=True)
                    continue
                mem_ratio = dense["peak_mb"] / max(r["peak_mb"], 1e-9)
                time_ratio = r["median_s"] / dense["median_s"]
                rel = abs(r["loss"] - dense["loss"]) / max(abs(dense["loss"]), 1e-12)
                met = mem_ratio >= 8 and time_ratio <= 1.2
                verdicts.append((cs == 0, met))
                print(f"| {V} | {div} | chunked | {label} | {r['peak_mb']:,.0f} | {r['median_s']:.3f} | "
                      f"{mem_ratio:.1f}x | {time_ratio:.2f}x | {rel:.1e} | {'met' if met else 'missed'} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if a.quick:
        print("(--quick is a smoke test: with N this small there are only a few chunks, so the ratios say "
              "nothing about the target, which is stated for N=4096)")
    default = [m for is_default, m in verdicts if is_default]
    if default:
        print(f"target (chunked peak <= dense/8 at <= 1.2x dense time) with the default chunk size: "
              f"met in {sum(default)} of {len(default)} measured pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
