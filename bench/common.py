"""Shared helpers of the benchmark scripts: timing, peak memory in a fresh process, the machine
description, the calibration of the machine's matmul rate and memory bandwidth, and the writer of
``bench/results.md``.

Conventions every script follows (bench/README.md):

* ``torch.set_num_threads(threads)`` (default 2), fp32, a fixed seed;
* time = median over ``reps`` (≥ 5) calls after ``warmup`` calls; wall clock (``perf_counter``) and
  process CPU time are both recorded, with the 1-minute load average before and after, because
  the machine is shared and a busy neighbour inflates wall time;
* peak memory = ``VmHWM − VmRSS`` read from ``/proc/self/status`` in a **fresh subprocess**, with
  the high-water mark reset (``/proc/self/clear_refs`` ← 5) right before the measured region, so
  imports and input construction do not count and glibc's kept-but-freed memory of an earlier
  variant cannot leak into a later one;
* ratios are only taken between figures measured in the same run of a script.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.md"


# ----------------------------------------------------------------------------- /proc readers


def status_kb(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current ``VmRSS`` (Linux ≥ 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.mb``: the resident-set growth above the level at entry
    (``VmHWM − VmRSS_at_entry``), in MiB. Use it in a fresh process (see the module docstring)."""

    def __enter__(self) -> "PeakRSS":
        self.reset = reset_peak_rss()
        self.base_kb = status_kb("VmRSS")
        self.mb = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mb = (status_kb("VmHWM") - self.base_kb) / 1024


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def load1() -> float:
    return os.getloadavg()[0]


def cpu_busy_fraction(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from ``/proc/stat``; this process is idle)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + parts[4]  # idle + iowait
        return sum(parts), idle

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_busy: float = 0.25, timeout: float = 600.0, interval: float = 2.0,
                   echo: Callable[[str], None] | None = None) -> float:
    """Wait until the CPUs are less than ``max_busy`` busy (other users' work), at most ``timeout``
    seconds; returns the last busy fraction seen (so a report can say how quiet it was)."""
    start = time.time()
    busy = cpu_busy_fraction(interval)
    warned = False
    while busy > max_busy and time.time() - start < timeout:
        if echo is not None and not warned:
            echo(f"  (waiting for the machine to be quiet: {busy:.0%} busy)")
            warned = True
        busy = cpu_busy_fraction(interval)
    return busy


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Median / min wall and CPU seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_median_s": statistics.median(cpu),
            "times_s": wall}


# ----------------------------------------------------------------------------- subprocess workers


def _cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / hz, sum(parts) / hz


class Neighbours:
    """``with Neighbours() as nb: <run children>`` then ``nb.busy``: the fraction of the machine's
    CPUs that *other* processes used meanwhile (machine busy time minus this process's and its
    children's CPU time, over wall time × CPUs). A value above ~0.1 means the timing was shared."""

    def __enter__(self) -> "Neighbours":
        self._busy, self._total = _cpu_ticks()
        self._own = _own_cpu()
        self.busy = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        busy, total = _cpu_ticks()
        own = _own_cpu() - self._own
        self.busy = max(0.0, (busy - self._busy - own) / max(total - self._total, 1e-9))


def _own_cpu() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(script: Path | str, args: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script --worker ARGS`` in a fresh interpreter; return the JSON of its last
    stdout line (a ``{"error": ...}`` dict when it fails, including running out of memory), with
    ``neighbours_busy``: the share of the CPUs other processes used meanwhile (:class:`Neighbours`)."""
    cmd = [sys.executable, str(script), "--worker", *args]
    try:
        with Neighbours() as nb:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                       "TRL_EXPERIMENTAL_SILENCE": "1"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"error": f"{reason}: {' | '.join(tail)}", "neighbours_busy": nb.busy}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "neighbours_busy": nb.busy}


def worker_print(result: dict[str, Any]) -> None:
    """The worker side of :func:`run_worker`: its result as the last stdout line."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the machine


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 — an optional package
        return "not installed"


def git_commit() -> str:
    """``<short sha>`` of HEAD, with ``+dirty`` when the working tree has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, ISA extensions relevant to matmuls, and package versions."""
    cpu = _lscpu()
    flags = set(cpu.get("Flags", "").split())
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    import torch

    return {
        "cpu": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core", "?"),
        "isa": " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags),
        "ram_gib": round(total_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "accelerate": _version("accelerate"),
        "opd": git_commit(),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    i = info or machine_info()
    return (f"{i['cpu']}, {i['cpus']} CPUs ({i['threads_per_core']} thread/core; {i['isa']}), {i['ram_gib']} GiB RAM; "
            f"python {i['python']}, torch {i['torch']}, transformers {i['transformers']}, trl {i['trl']}, "
            f"accelerate {i['accelerate']}, opd {i['opd']}")


def matmul_gflops(n: int = 2048, reps: int = 5, threads: int | None = None) -> float:
    """Measured fp32 GEMM rate: median over ``reps`` of ``torch.mm`` on ``n×n`` matrices (2n³ FLOPs)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = time_calls(lambda: torch.mm(a, b, out=out), reps=reps, warmup=2)
    return 2 * n**3 / t["median_s"] / 1e9


def stream_gbps(mb: int = 512, reps: int = 5) -> float:
    """Measured copy bandwidth (read + write bytes / s) of ``dst.copy_(src)`` on ``mb`` MiB."""
    import torch

    n = mb * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    t = time_calls(lambda: dst.copy_(src), reps=reps, warmup=1)
    return 2 * n * 4 / t["median_s"] / 1e9


# ----------------------------------------------------------------------------- reporting


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (``l``/``r``), default right except the first."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


HEADER = """\
# Benchmark results

Every figure below was printed by a script in `bench/` (bench/README.md explains how to run them and
how time and memory are measured); each section names the command that produced it, when, and on
which machine. Sections are rewritten independently by their scripts. Ratios compare numbers
measured in the same run; times are medians of repeated runs. The machine is shared with other
users: the column "CPU used by others" says how much of it they took during a measurement.
"""


def add_machine_args(parser: Any) -> None:
    """The options every measuring script shares: thread count and the wait for a quiet machine."""
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (default 2)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="wait at most this many seconds for a quiet machine before each measurement")
    parser.add_argument("--quiet-busy", type=float, default=0.3,
                        help="wait (≤ --quiet-timeout) until other processes use less than this fraction of the CPUs")


def write_section(name: str, body: str, path: Path = RESULTS, machine: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``bench/results.md``, delimited by
    ``<!-- BEGIN name -->`` / ``<!-- END name -->``, leaving the other sections untouched; the file
    starts with :data:`HEADER`; the section ends with ``machine`` (default: this machine now)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n\n_Machine: {machine or machine_line()}._\n{end}"
    text = path.read_text() if path.exists() else ""
    if "<!-- BEGIN header -->" not in text:
        text = f"<!-- BEGIN header -->\n{HEADER.rstrip()}\n<!-- END header -->\n\n" + text
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text.lstrip())


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def fmt_mb(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def trl_distillation_trainer(student: Any, teacher: Any, tokenizer: Any, prompts: list[str], *, prompts_per_step: int,
                             steps: int, lr: float, max_tokens: int, bf16: bool, use_cpu: bool, output_dir: str,
                             callback: Any, tokens: list[float]) -> Any:
    """TRL's ``DistillationTrainer`` set up as the benches compare it with opd: reverse KL (``beta=1``) on
    the full vocabulary (``top_k=0``), temperature 1, constant LR, AdamW (0.9, 0.999) without weight decay,
    gradient clip 1, no checkpoints or logging services. The completion tokens of every step are
    appended to ``tokens`` (TRL reports none per step)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=output_dir, per_device_train_batch_size=prompts_per_step, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, max_completion_length=max_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=1.0, bf16=bf16, fp16=False, gradient_checkpointing=False,
        use_cpu=use_cpu, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, shuffle_dataset=False,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                                  callbacks=[callback])
    generate = trainer._generate_and_score_completions

    def counted(inputs: Any) -> dict[str, Any]:
        out = generate(inputs)
        tokens.append(float(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = counted
    return trainer


# ---------------------------------------------------------------------------------------------
# servers started by a bench
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a server process with ``env`` added to this one's, its output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def wait_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900.0) -> float:
    """Seconds until ``url``'s ``/health`` answers; RuntimeError with the log's tail if the process
    exits or ``timeout`` passes first."""
    from opd.serve.client import ServiceClient

    client = ServiceClient(url, role="server", timeout=5, retries=0)
    began = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            client.get("/health")
            return time.perf_counter() - began
        except Exception:
            if time.perf_counter() - began > timeout:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def stop_servers(procs: Sequence[subprocess.Popen], timeout: float = 30.0) -> None:
    """Terminate every server process, then wait for each (killed after ``timeout`` seconds)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
