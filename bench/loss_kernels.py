"""Loss kernels: every route-1 divergence, dense vs memory-efficient (opd.math.fused) vs TRL's
``generalized_jsd_loss``, forward + backward, lm_head matmuls included.

    python bench/loss_kernels.py                      # the full grid (hours on 2 cores)
    python bench/loss_kernels.py --cells 4096x32000x256 --divergences all      # the acceptance cell
    python bench/loss_kernels.py --quick              # a smoke version (a minute)
    python bench/loss_kernels.py --check-only         # values and gradients agree (one process)

Inputs (identical in every variant, fp32, seed 0): student hidden states ``h [N, H]`` and head
``W [V, H]`` (both trained: the backward reaches ``h`` and ``W``), teacher hidden states
``h_T [N, H_T]`` and head ``W_T [V, H_T]`` (no gradient), and a token mask with 25 % of the
positions invalid (prompt/padding). Every variant projects both heads inside the timed call.

* **dense** — :func:`opd.math.fused.dense_linear_divergence`: ``[N, V]`` logits, plain autograd.
* **chunked** — :func:`opd.math.fused.fused_linear_divergence` at its default chunk size
  (grad-in-forward, ``O(chunk·V)`` memory).
* **trl** — ``logits = h Wᵀ`` (and the teacher's under ``no_grad``), then TRL's
  ``GKDTrainer.generalized_jsd_loss(s[None], t[None], labels=labels[None], beta=β)`` and
  ``backward`` (labels passed, so both reduce as sum / #valid tokens). TRL
  implements the β-family only: ``fkl`` = β 0, ``rkl`` = β 1, ``jsd`` = β 0.5.
* **trl_chunked** — for reference, TRL's own memory-efficient kernel
  (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, what its DistillationTrainer runs:
  ``4096 × 32768`` logit tiles, projections recomputed in backward), masked mean over the same
  tokens.

Each (cell, divergence, variant) runs in a fresh subprocess (bench/common.py: peak =
``VmHWM − VmRSS`` above the inputs; time = median of ``--reps`` after ``--warmup``); the three
variants of a divergence run back to back so their ratios share the machine's state. A dense or
TRL run whose estimated peak exceeds ``--mem-fraction`` of the available memory is skipped and
reported as such. Results accumulate in ``bench/data/loss_kernels.json`` (one record per cell
and run) and the section ``loss_kernels`` of ``bench/results.md`` is rebuilt from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl")
TRL_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}
GRID = [(n, v, h) for v in (32000, 128000) for h in (256, 1024) for n in (1024, 4096)]
ACCEPT_CELL = (4096, 32000, 256)
DATA = common.ROOT / "bench" / "data" / "loss_kernels.json"
#: Bytes per [N, V] element a dense / TRL run may peak at (fp32 × ~14 live [N, V] tensors, a
#: pessimistic estimate); replaced by the largest measured value once one is known.
DENSE_BYTES_PER_ELEMENT = 4 * 14


def make_inputs(n: int, v: int, h: int, ht: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).requires_grad_(True)
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(v, ht, generator=g) * (2.0 / ht**0.5)
    mask = torch.rand(n, generator=g) > 0.25
    return hs, w, th, tw, mask


def loss_fn(variant: str, divergence: str, hs, w, th, tw, mask, beta: float):
    """A closure computing the variant's scalar loss (differentiable w.r.t. ``hs`` and ``w``)."""
    import torch

    from opd.math.fused import DivergenceOptions, SupportTokens, dense_linear_divergence, fused_linear_divergence
    from opd.math.support import SupportSpec

    spec = SupportSpec(kind="full")
    weights = mask.float() / mask.sum().clamp(min=1)
    if variant in ("dense", "chunked"):
        fn = dense_linear_divergence if variant == "dense" else fused_linear_divergence

        def run():
            loss, _, _ = fn(hs, w, weights, DivergenceOptions(divergence, spec, beta=beta),
                            SupportTokens(teacher_hidden_NH=th, teacher_weight_VH=tw))
            return loss

        return run
    trl_beta = TRL_BETA[divergence]
    if variant == "trl_chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        count = mask.sum().clamp(min=1)

        def run_trl_chunked():
            per_token, _entropy = ChunkedDivergenceFunction.apply(hs, w, None, th, tw, None, trl_beta, 1.0, 1.0, None,
                                                                  1.0, None)
            return per_token.masked_fill(~mask, 0).sum() / count

        return run_trl_chunked
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    labels = torch.where(mask, torch.zeros((), dtype=torch.long), torch.full((), -100, dtype=torch.long))

    def run_trl():
        s_logits = hs @ w.T
        with torch.no_grad():
            t_logits = th @ tw.T
        return GKDTrainer.generalized_jsd_loss(s_logits[None], t_logits[None], labels=labels[None], beta=trl_beta)

    return run_trl


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One variant in this fresh process: time, peak memory, loss and gradient norms."""
    import torch

    torch.set_num_threads(a.threads)
    hs, w, th, tw, mask = make_inputs(a.n, a.v, a.h, a.ht)
    run = loss_fn(a.variant, a.divergence, hs, w, th, tw, mask, a.beta)

    def step() -> float:
        hs.grad = None
        w.grad = None
        loss = run()
        loss.backward()
        return float(loss.detach())

    with common.PeakRSS() as peak:
        t = common.time_calls(step, reps=a.reps, warmup=a.warmup)
    return {**t, "peak_mb": peak.mb, "loss": step(), "grad_h_norm": float(hs.grad.norm()),
            "grad_w_norm": float(w.grad.norm())}


def check(divergences: list[str], n: int, v: int, h: int, beta: float, threads: int) -> list[list[Any]]:
    """Values and gradients of chunked and TRL against dense, on the same inputs, in one process."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for div in divergences:
        results = {}
        for variant in ("dense", "chunked", "trl", "trl_chunked"):
            if variant.startswith("trl") and div not in TRL_BETA:
                continue
            hs, w, th, tw, mask = make_inputs(n, v, h, h)
            loss = loss_fn(variant, div, hs, w, th, tw, mask, beta)()
            loss.backward()
            results[variant] = (float(loss.detach()), hs.grad.clone(), w.grad.clone())
        ref = results["dense"]
        for variant in ("chunked", "trl", "trl_chunked"):
            if variant not in results:
                continue
            val, gh, gw = results[variant]
            rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))  # noqa: E731
            ok = (abs(val - ref[0]) <= 1e-5 * max(1.0, abs(ref[0])) and rel(gh, ref[1]) < 1e-4 and rel(gw, ref[2]) < 1e-4)
            rows.append([div, variant, f"{ref[0]:.6f}", f"{val:.6f}", f"{abs(val - ref[0]):.1e}",
                         f"{rel(gh, ref[1]):.1e}", f"{rel(gw, ref[2]):.1e}", "yes" if ok else "**no**"])
    return rows


def flops(n: int, v: int, h: int, ht: int) -> float:
    """lm_head matmul FLOPs of one forward+backward: student 2NVH + 4NVH, teacher 2NVH_T."""
    return 6 * n * v * h + 2 * n * v * ht


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="all", help="comma-separated NxVxH cells, or 'all' (the issue's grid)")
    p.add_argument("--divergences", default="all", help=f"comma-separated subset of {','.join(DIVERGENCES)}")
    p.add_argument("--variants", default="dense,chunked,trl,trl_chunked")
    p.add_argument("--teacher-hidden", type=int, default=0, help="H_T (0 = same as the student's H)")
    p.add_argument("--beta", type=float, default=0.5, help="β of jsd")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-fraction", type=float, default=0.6)
    common.add_machine_args(p)
    p.add_argument("--max-neighbours", type=float, default=0.1,
                   help="rerun a divergence's variants when other processes used more than this share of the CPUs")
    p.add_argument("--attempts", type=int, default=3, help="at most this many runs per divergence (the least shared is kept)")
    p.add_argument("--quick", action="store_true", help="N=512, V=8000, H=128, 3 divergences, 3 reps (smoke)")
    p.add_argument("--check-only", action="store_true",
                   help="only the value/gradient agreement check (rewrites that table of results.md)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch bench/results.md")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild the results.md section from bench/data/loss_kernels.json without measuring")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    for k in ("n", "v", "h", "ht"):
        p.add_argument(f"--{k}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        common.worker_print(worker(a))
        return 0

    if a.render_only:
        store = json.loads(DATA.read_text())
        common.write_section("loss_kernels", render(store), machine=_machine(store))
        return 0
    divs = list(DIVERGENCES) if a.divergences == "all" else [d.strip() for d in a.divergences.split(",")]
    cells = GRID if a.cells == "all" else [tuple(int(x) for x in c.split("x")) for c in a.cells.split(",")]
    variants = [x.strip() for x in a.variants.split(",")]
    if a.quick:
        cells, divs, a.reps, a.warmup = [(512, 8000, 128)], ["rkl", "jsd", "tvd"], 3, 1
    info = common.machine_info()
    print(f"# loss kernels — {common.machine_line(info)}\n")

    check_n, check_v, check_h = (512, 8000, 128) if a.quick else (1024, 32000, 256)
    check_rows = check(divs, check_n, check_v, check_h, a.beta, a.threads)
    check_md = common.md_table(["divergence", "variant", "dense loss", "variant loss", "|Δ loss|",
                                "max |Δ ∂h| / max |∂h|", "max |Δ ∂W| / max |∂W|", "agrees"], check_rows, "llrrrrrl")
    print(f"values and gradients vs dense (N={check_n}, V={check_v}, H={check_h}):\n{check_md}\n", flush=True)
    if a.check_only:
        if not a.quick and not a.no_write and DATA.exists():  # refresh the agreement table only
            store = json.loads(DATA.read_text())
            store["check"] = {"command": common.command_line(), "when": common.stamp(), "n": check_n, "v": check_v,
                              "h": check_h, "rows": check_rows}
            DATA.write_text(json.dumps(store, indent=1))
            common.write_section("loss_kernels", render(store), machine=_machine(store))
        return 0

    import torch

    torch.set_num_threads(a.threads)
    store = json.loads(DATA.read_text()) if DATA.exists() else {"runs": {}, "check": {}}
    measured: list[float] = []  # bytes per [N, V] element of the dense / TRL runs so far
    gemm = 0.0
    for n, v, h in cells:
        ht = a.teacher_hidden or h
        rows, records = [], []
        print(f"## N={n}, V={v}, H={h}, H_T={ht}", flush=True)
        for div in divs:
            best: dict[str, dict[str, Any]] | None = None
            # the machine's GEMM rate: the best of the calibrations so far (a busy neighbour only lowers it)
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
            gemm = max(gemm, common.matmul_gflops(2048))
            for attempt in range(a.attempts):
                results = run_group(a, div, variants, n, v, h, ht, measured)
                shared = max((r.get("neighbours_busy", 0.0) for r in results.values()), default=0.0)
                if best is None or shared < max(r.get("neighbours_busy", 0.0) for r in best.values()):
                    best = results
                if shared <= a.max_neighbours:
                    break
                print(f"  ({div}: other processes used {shared:.0%} of the CPUs; attempt {attempt + 2})", flush=True)
            for variant, r in best.items():
                rows.append(_row(div, variant, r, best, flops(n, v, h, ht), gemm))
                records.append({"divergence": div, "variant": variant, **{k: x for k, x in r.items() if k != "times_s"}})
                print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
        key = f"{n}x{v}x{h}" + (f"_t{ht}" if ht != h else "")
        print(f"  fp32 GEMM rate (best calibration so far): {gemm:.0f} GFLOP/s", flush=True)
        store["runs"][key] = {"command": common.command_line(), "when": common.stamp(), "gemm_gflops": gemm,
                              "machine": common.machine_line(info), "reps": a.reps, "warmup": a.warmup,
                              "records": records}
        if not a.no_write and not a.quick:
            DATA.parent.mkdir(parents=True, exist_ok=True)
            DATA.write_text(json.dumps(store, indent=1))
    if not a.quick and not a.no_write:
        store["check"] = {"command": common.command_line(), "when": common.stamp(), "n": check_n, "v": check_v,
                          "h": check_h, "rows": check_rows}
        DATA.write_text(json.dumps(store, indent=1))
        common.write_section("loss_kernels", render(store), machine=_machine(store))
    return 0


def _machine(store: dict[str, Any]) -> str | None:
    """The machine line of the runs in ``store`` (their opd commits listed when they differ)."""
    lines = sorted({run["machine"] for run in store["runs"].values()})
    return "; ".join(lines) if lines else None


def run_group(a: argparse.Namespace, div: str, variants: list[str], n: int, v: int, h: int, ht: int,
              measured: list[float]) -> dict[str, dict[str, Any]]:
    """The variants of one divergence, back to back, each in a fresh process."""
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        if variant.startswith("trl") and div not in TRL_BETA:
            continue
        est_mb = (max(measured) if measured else DENSE_BYTES_PER_ELEMENT) * n * v / 2**20
        if variant in ("dense", "trl") and est_mb > a.mem_fraction * common.mem_available_mb():
            results[variant] = {"skipped": f"skipped: est. {est_mb:,.0f} MB > {a.mem_fraction:.0%} of available "
                                           f"{common.mem_available_mb():,.0f} MB"}
            continue
        common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
        args = ["--variant", variant, "--divergence", div, "--n", str(n), "--v", str(v), "--h", str(h),
                "--ht", str(ht), "--beta", str(a.beta), "--reps", str(a.reps), "--warmup", str(a.warmup),
                "--threads", str(a.threads)]
        r = common.run_worker(__file__, args)
        results[variant] = r
        if "peak_mb" in r and variant in ("dense", "trl"):
            measured.append(r["peak_mb"] * 2**20 / (n * v))
    return results


def _row(div: str, variant: str, r: dict[str, Any], results: dict[str, dict[str, Any]], fl: float,
         gemm: float) -> list[Any]:
    if "skipped" in r or "error" in r:
        return [div, variant, "–", "–", "–", "–", "–", "–", "–", r.get("skipped") or r.get("error")]
    dense = results.get("dense", {})
    trl = results.get("trl", {})
    mem_vs_dense = f"{dense['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}×" if "peak_mb" in dense else "–"
    time_vs_dense = f"{r['median_s'] / dense['median_s']:.2f}" if "median_s" in dense else "–"
    vs_trl = "–"
    if not variant.startswith("trl") and "peak_mb" in trl:
        vs_trl = f"{trl['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}× / {r['median_s'] / trl['median_s']:.2f}"
    rel = "–"
    if "loss" in dense and variant != "dense":
        rel = f"{abs(r['loss'] - dense['loss']) / max(abs(dense['loss']), 1e-12):.1e}"
    mfu = f"{fl / r['median_s'] / 1e9 / gemm:.0%}"
    return [div, variant, common.fmt_mb(r["peak_mb"]), common.fmt_s(r["median_s"]), mem_vs_dense, time_vs_dense,
            vs_trl, rel, mfu, f"{r.get('neighbours_busy', float('nan')):.0%}"]


HEADERS = ["divergence", "variant", "peak MB", "median s", "dense/variant peak", "variant/dense time",
           "TRL/variant peak / variant/TRL time", "loss rel. diff vs dense", "lm_head FLOP/s ÷ GEMM rate",
           "CPU used by others"]


def render(store: dict[str, Any]) -> str:
    """The ``loss_kernels`` section of results.md from the accumulated records."""
    out = ["## Loss kernels (bench/loss_kernels.py)", "",
           "Forward + backward of the route-1 loss from hidden states (lm_head matmuls of student and teacher "
           "included), fp32, 25 % of the tokens masked, H_T = H. Peak = resident-set growth above the inputs "
           "in a fresh process; time = median of the stated repetitions after warm-up; every ratio compares "
           "variants run back to back in the same run. \"lm_head FLOP/s ÷ GEMM rate\" is the achieved lm_head matmul "
           "rate (6·N·V·H + 2·N·V·H_T FLOPs per call) over the best fp32 GEMM rate (`torch.mm` 2048²) calibrated "
           "during the run; \"CPU used by "
           "others\" is the share of the machine that other users' processes took during that measurement (the "
           "machine is shared: a divergence's variants are rerun, up to 3 times, when it exceeds 10 %, and the least "
           "shared attempt is kept).", ""]
    chk = store.get("check")
    if chk:
        out += [f"**Agreement** (`{chk['command']}`, {chk['when']}; N={chk['n']}, V={chk['v']}, H={chk['h']}, one "
                "process, same inputs): chunked and TRL against dense.", "",
                common.md_table(["divergence", "variant", "dense loss", "variant loss", "|Δ loss|",
                                 "max |Δ ∂h| / max |∂h|", "max |Δ ∂W| / max |∂W|", "agrees"], chk["rows"], "llrrrrrl"),
                ""]
    accept = None
    for key in sorted(store["runs"], key=lambda k: tuple(int(x) for x in k.split("_")[0].split("x"))[::-1]):
        run = store["runs"][key]
        n, v, h = (int(x) for x in key.split("_")[0].split("x"))
        out += [f"### N = B·T = {n}, V = {v}, H = {h}", "",
                f"`{run['command']}` — {run['when']}, median of {run['reps']} after {run['warmup']} warm-up, "
                f"GEMM {run['gemm_gflops']:.0f} GFLOP/s", ""]
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for rec in run["records"]:
            results.setdefault(rec["divergence"], {})[rec["variant"]] = rec
        rows = [_row(div, var, rec, res, flops(n, v, h, h), run["gemm_gflops"])
                for div, res in results.items() for var, rec in res.items()]
        out += [common.md_table(HEADERS, rows, "llrrrrrrrr"), ""]
        if (n, v, h) == ACCEPT_CELL:
            accept = results
    if accept:
        out += ["### Acceptance (N = 4096, V = 32000, H = 256)", ""]
        lines = []
        for div, res in accept.items():
            c, d, t = res.get("chunked", {}), res.get("dense", {}), res.get("trl", {})
            if "peak_mb" not in c or "peak_mb" not in d:
                continue
            mem, tim = d["peak_mb"] / c["peak_mb"], c["median_s"] / d["median_s"]
            verdict = "met" if mem >= 8 and tim <= 1.2 else "**missed**"
            line = f"- {div}: chunked peak = 1/{mem:.1f} of dense at {tim:.2f}× its time → {verdict}"
            if "peak_mb" in t:
                tm, tt = t["peak_mb"] / c["peak_mb"], c["median_s"] / t["median_s"]
                line += (f"; vs TRL generalized_jsd_loss: 1/{tm:.1f} of its peak at {tt:.2f}× its time → "
                         f"{'met' if tm >= 4 and tt <= 1.0 else '**missed**'}")
            tc = res.get("trl_chunked", {})
            if "peak_mb" in tc:
                line += (f" (TRL's own chunked kernel, for reference: chunked uses 1/{tc['peak_mb'] / c['peak_mb']:.1f} "
                         f"of its peak at {c['median_s'] / tc['median_s']:.2f}× its time)")
            lines.append(line)
        out += lines + [""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
