"""One prepared GPU run (≤ 10 minutes on one H200): opd vs TRL, rollout engines, loss kernels, on a
randomly initialised Qwen2-style pair.

    python bench/gpu.py                 # on a machine with a CUDA GPU: the measurements, ~6-9 min
    python bench/gpu.py --dry-run       # anywhere (CPU): tiny sizes, every code path, well under a minute
    python bench/gpu.py --parts opd,trl --no-write

**On a GPU machine**: install the CUDA build of torch first, then ``pip install -e ".[bench,lora]"``
(and ``pip install vllm`` for the vLLM row), and run ``python bench/gpu.py`` from the repository
root. Nothing is downloaded: the models are built from config with random weights and the
tokenizer in-process. It prints the tables, writes them to ``bench/data/gpu.md`` (``--out``), the
raw numbers to ``bench/data/gpu.json`` and the section ``gpu`` of ``bench/results.md``
(``--no-write`` leaves both files alone; ``--dry-run`` never touches them). A time budget
(``--budget``, 570 s) skips the parts that no longer fit and says so in the table.

**Pair** (bf16 weights, Qwen2 architecture, tied embeddings, V = 151936 — Qwen2.5's embedding size):
student 24 layers × 896 (14 heads, 2 KV heads, MLP 4864; ≈ 0.49 B parameters, Qwen2.5-0.5B's
shape), teacher 28 × 1536 (12 heads, 2 KV heads, MLP 8960; ≈ 1.54 B, Qwen2.5-1.5B's shape). The
tokenizer is a one-token-per-character WordLevel tokenizer of exactly 151936 ids (the arithmetic
characters plus filler code points). Prompts are 3-digit additions; at random initialisation EOS is
practically never sampled, so every completion has the full length.

**Parts** (each in a fresh process, so that its peak memory is its own):

* ``opd`` / ``trl`` — one OPD optimizer step of opd (``opd.train.distill``) and of TRL's
  ``DistillationTrainer`` on the same models, prompts (``--prompts``, 32), completion length
  (``--tokens``, 256), sampling (temperature 1), loss (full-vocabulary reverse KL: opd ``route1=rkl``,
  TRL ``beta=1``), AdamW (lr 3e-4, β 0.9/0.999, clip 1.0), bf16 weights and bf16 autocast in both
  (opd ``train.precision=bf16``, TRL ``bf16=True``), one completion per prompt, one micro-batch per
  step; ``--warmup`` + ``--steps`` steps; tokens/s = completion tokens per step / step time
  (median); peak = ``torch.cuda.max_memory_allocated`` over the timed steps.
* ``rollout-hf`` / ``rollout-vllm`` — the student's rollouts through opd's engines
  (``rollout.engine=hf``: opd's KV-cached decode loop; ``vllm``: opd/rollout/vllm_engine.py when it
  exists, else "not available"), same prompts and length: engine start-up seconds and the median
  tokens/s of ``--rollout-reps`` generations after one warm-up.
* ``loss`` — route-1 loss forward + backward from hidden states (both LM heads inside the call),
  N = ``--loss-tokens`` (4096) tokens, V = 151936, student H = 896, teacher H = 1536, fp32, 25 % of the
  tokens masked: dense (``[N, V]`` logits) vs opd's memory-efficient ``fused_linear_divergence`` vs
  TRL's chunked kernel, for RKL and JSD; median time and peak memory above the inputs
  (bench/loss_kernels.py's inputs and closures, moved to the device).

``--dry-run`` builds a tiny pair (student 2 × 64, teacher 2 × 128, V = 1024, head dim 32), runs
every part on the CPU with a few tokens and steps, and reports CPU resident-set growth in place of
GPU memory. Its figures mean nothing; it checks that the script works (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from gpu_models import SIZES, build_pair, char_tokenizer_of_size, qwen2_config  # noqa: E402, F401

OUT = common.ROOT / "bench" / "data" / "gpu.md"
DATA = common.ROOT / "bench" / "data" / "gpu.json"
PARTS = ("build", "opd", "trl", "rollout-hf", "rollout-vllm", "loss")
#: Seconds each part may take (start-up included); the whole run is also capped by --budget.
PART_TIMEOUT = {"build": 150, "opd": 150, "trl": 150, "rollout-hf": 90, "rollout-vllm": 200, "loss": 120}
LR = 3e-4

# ----------------------------------------------------------------------------------------- jobs
def _examples(n: int) -> list[Any]:
    from opd.tasks.arith import ArithTask

    return ArithTask(digits=3, eval_size=8, seed=0).train_examples(0, n, 0)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_reset(device: str) -> Any:
    """A callable returning the peak memory (MB) since this call: GPU allocations or CPU RSS growth."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        def above() -> float:
            return (torch.cuda.max_memory_allocated() - base) / 2**20

        return above, lambda: torch.cuda.max_memory_allocated() / 2**20
    rss = common.PeakRSS().__enter__()

    def peak() -> float:
        rss.__exit__()
        return rss.mb

    return peak, peak


def job_opd(a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    from opd_steps import run_steps

    models = Path(a.models)
    run_dir = Path(tempfile.mkdtemp(prefix="opd-gpu-")) / "run"
    steps = spec["warmup"] + spec["steps"]
    overrides = [
        f"student.model={models / 'student'}", f"teacher.model={models / 'teacher'}", "student.dtype=bfloat16",
        "teacher.dtype=bfloat16", "train.precision=bf16", f"train.device={a.device}",
        f"rollout.prompts_per_step={spec['prompts']}", f"rollout.max_new_tokens={spec['tokens']}",
        "rollout.temperature=1.0", "route1.divergence=rkl", "support.kind=full", "route2.coef=0",
        f"train.steps={steps}", f"train.lr={LR}", "train.betas=[0.9,0.999]", "train.weight_decay=0",
        "train.grad_clip=1.0", "train.schedule=constant", "train.warmup_steps=0", "train.log_every=1",
        "eval.size=8", "eval.every=0", "eval.teacher=false", "eval.max_new_tokens=4", f"logging.run_dir={run_dir}",
        "logging.progress=false", "logging.report=false", "seed=0",
        *([f"train.threads={a.threads}"] if a.device == "cpu" else []),
    ]
    r = run_steps(overrides, warmup=spec["warmup"], steps=spec["steps"])
    peak = r["gpu_peak_mb"] if a.device == "cuda" else r["peak_mb"]
    return {"step_s": r["step_s"], "tokens": r["tokens"], "peak_mb": peak}


def job_trl(a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    from opd.models import load_model, load_tokenizer

    models = Path(a.models)
    steps = spec["warmup"] + spec["steps"]
    prompts = [e.prompt for s in range(steps) for e in _examples(spec["prompts"])]
    marks: list[float] = []
    tokens: list[float] = []
    peaks: dict[str, float] = {}
    device = a.device

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ARG002
            _sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ARG002
            _sync(device)
            marks.append(time.perf_counter())
            if len(marks) - 1 == spec["warmup"]:
                peaks["read"] = _peak_reset(device)[1]

    tok = load_tokenizer(models / "student")
    student = load_model(models / "student", dtype="bfloat16", device=device)
    teacher = load_model(models / "teacher", dtype="bfloat16", device=device)
    trainer = common.trl_distillation_trainer(
        student, teacher, tok, prompts, prompts_per_step=spec["prompts"], steps=steps, lr=LR,
        max_tokens=spec["tokens"], bf16=True, use_cpu=device == "cpu", output_dir=tempfile.mkdtemp(prefix="trl-gpu-"),
        callback=StepTimer(), tokens=tokens)
    if device == "cpu":
        torch.set_num_threads(a.threads)
    trainer.train()
    step_s = [b - a_ for a_, b in zip(marks, marks[1:])]
    return {"step_s": step_s[spec["warmup"]:], "tokens": tokens[spec["warmup"]:len(step_s)],
            "peak_mb": peaks["read"]() if "read" in peaks else None}


def vllm_unavailable() -> str | None:
    """Why the vLLM engine cannot run here, or None when it can be tried."""
    from opd.config.fields import field_specs

    choices = field_specs()["rollout.engine"].choices or ()
    if "vllm" not in choices or importlib.util.find_spec("opd.rollout.vllm_engine") is None:
        return f"not available: opd has no vllm engine yet (rollout.engine choices: {', '.join(choices)})"
    if importlib.util.find_spec("vllm") is None:
        return "not available: the vllm package is not installed"
    return None


def job_rollout(a: argparse.Namespace, spec: dict[str, Any], engine_name: str) -> dict[str, Any]:
    import torch

    from opd.factories import build_student
    from opd.config.load import load_config
    from opd.rollout.engine import build_engine, sampling_from_config

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    models = Path(a.models)
    cfg = load_config(None, [f"student.model={models / 'student'}", f"teacher.model={models / 'teacher'}",
                             "student.dtype=bfloat16", f"rollout.engine={engine_name}", f"train.device={a.device}",
                             f"rollout.prompts_per_step={spec['prompts']}", f"rollout.max_new_tokens={spec['tokens']}",
                             "rollout.temperature=1.0", *a.engine_overrides])
    student, tokenizer = build_student(cfg, a.device)
    read_peak = _peak_reset(a.device)[1]
    if a.device == "cuda":  # an engine may allocate outside torch's allocator: read the device's own figure
        def read_peak() -> float:
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
    t0 = time.perf_counter()
    engine = build_engine(cfg, student, tokenizer)
    startup = time.perf_counter() - t0
    examples, sampling = _examples(spec["prompts"]), sampling_from_config(cfg.rollout)
    times, tokens = [], []
    try:
        for rep in range(spec["rollout_reps"] + 1):  # the first is warm-up
            torch.manual_seed(rep)
            _sync(a.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                rollouts = engine.generate(examples, sampling)
            _sync(a.device)
            if rep:
                times.append(time.perf_counter() - t0)
                tokens.append(float(rollouts.completion_mask_BT.sum()))
    finally:
        engine.close()
    return {"startup_s": startup, "gen_s": times, "tokens": tokens, "peak_mb": read_peak()}


def _time_loss(a: argparse.Namespace, spec: dict[str, Any], divergence: str, beta: float, variant: str
               ) -> dict[str, Any]:
    """Median time and peak memory (above the inputs) of one loss variant's forward + backward."""
    import torch
    from loss_kernels import loss_fn

    n, v = spec["loss_tokens"], spec["vocab"]
    h, ht = spec["student"]["hidden"], spec["teacher"]["hidden"]
    g = torch.Generator(device=a.device).manual_seed(0)
    hs = torch.randn(n, h, generator=g, device=a.device).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, device=a.device) * (2.0 / h**0.5)).requires_grad_(True)
    th = torch.randn(n, ht, generator=g, device=a.device)
    tw = torch.randn(v, ht, generator=g, device=a.device) * (2.0 / ht**0.5)
    mask = torch.rand(n, generator=g, device=a.device) > 0.25
    run = loss_fn(variant, divergence, hs, w, th, tw, mask, beta)

    def step() -> float:
        hs.grad = w.grad = None
        loss = run()
        loss.backward()
        return float(loss.detach())

    step()  # warm-up (kernel selection, Triton compilation)
    read_peak = _peak_reset(a.device)[0]
    times = []
    for _ in range(spec["loss_reps"]):
        _sync(a.device)
        t0 = time.perf_counter()
        loss = step()
        _sync(a.device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_mb": read_peak(), "loss": loss}


def job_loss(a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {}
    for divergence, beta in (("rkl", 1.0), ("jsd", 0.5)):
        for variant in ("dense", "chunked", "trl_chunked"):
            try:
                out[f"{divergence}/{variant}"] = _time_loss(a, spec, divergence, beta, variant)
            except Exception as err:  # noqa: BLE001 — e.g. out of memory: reported in the table
                out[f"{divergence}/{variant}"] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            if a.device == "cuda":
                torch.cuda.empty_cache()
    return {"kernels": out}


def worker(a: argparse.Namespace) -> dict[str, Any]:
    spec = SIZES["dry" if a.dry_run else "gpu"]
    if a.job == "build":
        return build_pair(Path(a.models), "dry" if a.dry_run else "gpu", a.device)
    if a.job == "opd":
        return job_opd(a, spec)
    if a.job == "trl":
        return job_trl(a, spec)
    if a.job in ("rollout-hf", "rollout-vllm"):
        return job_rollout(a, spec, a.job.split("-", 1)[1])
    return job_loss(a, spec)


# ----------------------------------------------------------------------------------------- report
def _gpu_line(device: str) -> str:
    import torch

    if device != "cuda":
        return "CPU (dry run: no GPU)"
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"{torch.cuda.device_count()} GPU(s) visible, one used")


def render(results: dict[str, Any], a: argparse.Namespace) -> str:
    spec = SIZES["dry" if a.dry_run else "gpu"]
    mem = "peak GPU MB" if a.device == "cuda" else "peak RSS MB (CPU)"
    build = results.get("build", {})
    def count(n: float) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

    out = [f"Pair: student Qwen2 {spec['student']['layers']}×{spec['student']['hidden']} "
           f"({count(build.get('student_params', 0))} parameters), teacher Qwen2 {spec['teacher']['layers']}×"
           f"{spec['teacher']['hidden']} ({count(build.get('teacher_params', 0))}), V = {spec['vocab']}, bf16; "
           f"{spec['prompts']} prompts × {spec['tokens']} completion tokens per step; {spec['warmup']} warm-up + "
           f"{spec['steps']} timed steps.", ""]

    def status(name: str) -> str | None:
        r = results.get(name)
        if r is None:
            return "not run"
        return r.get("error") or r.get("skipped")

    rows = []
    tps = {}
    for name in ("opd", "trl"):
        r = results.get(name, {})
        if status(name):
            rows.append([name, "–", "–", "–", "–", status(name)])
            continue
        step = statistics.median(r["step_s"])
        tps[name] = statistics.median([t / s for t, s in zip(r["tokens"], r["step_s"])])
        rows.append([name, f"{step:.3f}", f"{statistics.mean(r['tokens']):,.0f}", f"{tps[name]:,.0f}",
                     common.fmt_mb(r["peak_mb"]), ""])
    if len(tps) == 2:
        rows[0][5] = f"{tps['opd'] / tps['trl']:.2f}× TRL's tokens/s"
    out += ["**One OPD step: opd vs TRL `DistillationTrainer`** (bf16):", "",
            common.md_table(["framework", "s / step (median)", "tokens / step", "tokens / s (median)", mem, "note"],
                            rows, "lrrrrl"), ""]
    rows = []
    for name in ("rollout-hf", "rollout-vllm"):
        engine = name.split("-", 1)[1]
        r = results.get(name, {})
        if status(name):
            rows.append([engine, "–", "–", "–", "–", status(name)])
            continue
        rate = statistics.median([t / s for t, s in zip(r["tokens"], r["gen_s"])])
        rows.append([engine, f"{r['startup_s']:.1f}", f"{statistics.median(r['gen_s']):.3f}", f"{rate:,.0f}",
                     common.fmt_mb(r["peak_mb"]), ""])
    out += ["**Rollout engines** (student, same prompts and length):", "",
            common.md_table(["engine", "start-up s", "s / batch (median)", "tokens / s",
                             "GPU MB in use after generating (device-wide)" if a.device == "cuda" else mem, "note"],
                            rows, "lrrrrl"), ""]
    r = results.get("loss", {})
    n = spec["loss_tokens"]
    if status("loss"):
        out += [f"**Route-1 loss** (N = {n}, V = {spec['vocab']}): {status('loss')}", ""]
    else:
        rows = []
        for key, k in r["kernels"].items():
            div, variant = key.split("/")
            dense = r["kernels"].get(f"{div}/dense", {})
            if "error" in k:
                rows.append([div, variant, "–", "–", "–", "–", k["error"]])
                continue
            ratio = (f"{dense['peak_mb'] / k['peak_mb']:.1f}× / {k['median_s'] / dense['median_s']:.2f}"
                     if "peak_mb" in dense and variant != "dense" and min(dense["peak_mb"], k["peak_mb"]) >= 1 else "–")
            rel = (f"{abs(k['loss'] - dense['loss']) / max(abs(dense['loss']), 1e-12):.1e}"
                   if "loss" in dense and variant != "dense" else "–")
            rows.append([div, variant, f"{k['median_s'] * 1e3:,.1f}", common.fmt_mb(k["peak_mb"]), ratio, rel, ""])
        out += [f"**Route-1 loss, forward + backward** (N = {n} tokens, V = {spec['vocab']}, H = "
                f"{spec['student']['hidden']}, H_T = {spec['teacher']['hidden']}, fp32; peak above the inputs):", "",
                common.md_table(["divergence", "variant", "ms (median)", mem, "dense/variant peak / variant/dense time",
                                 "loss rel. diff vs dense", "note"], rows, "llrrrrl"), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- main
def _in_process(parser: argparse.ArgumentParser, args: list[str]) -> dict[str, Any]:
    """A worker's result computed in this process (``{"error": ...}`` when it raises, like run_worker)."""
    try:
        return json.loads(json.dumps(worker(parser.parse_args(args))))
    except Exception as err:  # noqa: BLE001 — reported in the table, as a failed subprocess would be
        return {"error": f"{type(err).__name__}: {err}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: every code path, no GPU needed")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)} (build is always run)")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run; parts that no longer fit "
                                                               "are skipped")
    p.add_argument("--engine-overrides", nargs="*", default=[],
                   help="extra rollout.* overrides for the engine rows, e.g. rollout.<vllm option>=VALUE")
    p.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads (CPU runs only)")
    p.add_argument("--out", help=f"Markdown file for the tables (default {OUT.relative_to(common.ROOT)}; "
                                 "dry run: none)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/data/gpu.* or bench/results.md")
    p.add_argument("--in-process", action="store_true",
                   help="run the parts in this process instead of fresh ones (tests; peak memory is then shared)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        common.worker_print(worker(a))
        return 0
    began = time.time()
    import torch

    a.device = "cpu" if a.dry_run else "cuda"
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    wanted = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        print(f"bench/gpu.py: unknown parts {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    print(f"# GPU bench{' (dry run)' if a.dry_run else ''} — {_gpu_line(a.device)}; {common.machine_line()}\n",
          flush=True)
    models = Path(tempfile.mkdtemp(prefix="opd-gpu-models-"))
    results: dict[str, Any] = {}
    base_args = ["--models", str(models), "--device", a.device, "--threads", str(a.threads),
                 *(["--dry-run"] if a.dry_run else []), "--engine-overrides", *a.engine_overrides]
    env_vllm = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"} if a.dry_run else {}
    for part in ["build", *[x for x in PARTS if x in wanted and x != "build"]]:
        if part == "rollout-vllm" and (why := vllm_unavailable()):
            results[part] = {"skipped": why}
            print(f"  {part}: {why}", flush=True)
            continue
        left = a.budget - (time.time() - began)
        if left < min(PART_TIMEOUT[part], 30):
            results[part] = {"skipped": f"skipped: the {a.budget:.0f} s budget was spent"}
            print(f"  {part}: {results[part]['skipped']}", flush=True)
            continue
        os.environ.update(env_vllm)
        t0 = time.time()
        if a.in_process:
            r = _in_process(p, ["--worker", "--job", part, *base_args])
        else:
            r = common.run_worker(__file__, ["--job", part, *base_args], timeout=min(PART_TIMEOUT[part], left))
        results[part] = r
        print(f"  {part}: {'error: ' + r['error'] if 'error' in r else 'done'} ({time.time() - t0:.0f} s)", flush=True)
        if part == "build" and "error" in r:
            break
    body = render(results, a)
    header = (f"## GPU: opd vs TRL, rollout engines, loss kernels (bench/gpu.py)\n\n`{common.command_line()}` — "
              f"{common.stamp()}, {time.time() - began:.0f} s in all; {_gpu_line(a.device)}.\n\n")
    print("\n" + header + body, flush=True)
    out = Path(a.out) if a.out else (None if a.dry_run or a.no_write else OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + body + "\n")
    if not a.dry_run and not a.no_write:
        DATA.write_text(json.dumps({"command": common.command_line(), "when": common.stamp(),
                                    "gpu": _gpu_line(a.device), "results": results}, indent=1))
        common.write_section("gpu", header + body)
    failed = [k for k, r in results.items() if "error" in r]
    return 1 if failed and a.dry_run else 0


if __name__ == "__main__":
    raise SystemExit(main())
