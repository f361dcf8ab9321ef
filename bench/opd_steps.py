"""Shared worker of bench/lora_memory.py and bench/precision.py: run the real training loop
(``opd.train.distill``) in this process for ``warmup + steps`` steps and time every step.

Nothing is re-implemented: ``opd.train.train_step`` is wrapped with a timer (step time = interval
between consecutive step ends, as in bench/end_to_end.py), the student is captured where
``opd.assemble.build_components`` builds it (trainable / total parameters), and peak memory is the resident-set
growth from just before the models are loaded to the end of training (:class:`common.PeakRSS`).

``audit=True`` additionally records, for the first step after warm-up, every matrix product the
step dispatches (``aten.mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` and the CPU SDPA kernels) with
its FLOPs and input dtype, labelled by the phase that ran it: **rollout** (``collect_rollouts``),
**teacher** (``teacher.score``), **student forward** (``student_forward``), **loss** (the rest of
``accumulate_gradients``: the route-1 loss from hidden states, diagnostics) and **backward**
(``Tensor.backward``). That tells exactly where ``train.precision=bf16`` (accelerate's autocast)
reaches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import common

_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")
_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention")


def _product_flops(name: str, args: tuple) -> tuple[float, Any] | None:
    """(FLOPs, dtype of the first operand) of a matrix-product op; None for anything else."""
    import math

    if name in ("mm", "bmm"):
        a, b = args[0], args[1]
    elif name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    elif name in _SDPA:
        q, k = args[0], args[1]  # [B, H, L, D], [B, H, S, D]: QKᵀ and PV
        return 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1], q.dtype
    else:
        return None
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1], a.dtype


class _Phases:
    def __init__(self) -> None:
        self.stack: list[str] = ["other"]

    def wrap(self, phase: str, fn: Any) -> Any:
        def labelled(*args: Any, **kwargs: Any) -> Any:
            self.stack.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()

        labelled.__wrapped__ = fn  # type: ignore[attr-defined]
        return labelled


def _audit_mode(phases: _Phases, flops: dict[str, dict[str, float]]) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = func.overloadpacket.__name__
            if name in _PRODUCTS or name in _SDPA:
                got = _product_flops(name, args)
                if got is not None:
                    flops[phases.stack[-1]][str(got[1]).replace("torch.", "")] += got[0]
            return func(*args, **(kwargs or {}))

    return Audit()


def _malloc_trim() -> None:
    """Hand the memory glibc keeps from freed allocations back to the OS (Linux), so that later
    allocations show up in the resident set instead of reusing pages loading left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_steps(overrides: list[str], *, warmup: int, steps: int, audit: bool = False) -> dict[str, Any]:
    """Train ``warmup + steps`` steps with ``overrides``; see the module docstring for what is measured.

    Memory (MB): ``peak_mb`` — resident-set growth from before loading to the end (bench/end_to_end.py's
    figure); ``loaded_mb`` — resident after loading, when training starts (glibc's free memory handed
    back first); ``train_peak_mb`` — the peak during training above that; ``grad_mb`` /
    ``optimizer_mb`` — exact bytes of the gradients of the trainable parameters and of the
    optimizer's state after training.

    Returns ``step_s`` / ``tokens`` (timed steps only), ``peak_mb``, ``hwm_mb``, ``trainable`` and
    ``total`` student parameters, ``losses``, with ``audit`` ``flops[phase][dtype]``, and on a CUDA
    device ``gpu_peak_mb``: ``torch.cuda.max_memory_allocated`` over the timed steps (the peak
    statistics are reset after warm-up; step ends are marked after ``torch.cuda.synchronize()``).
    """
    import torch

    import opd.assemble as C
    import opd.step as S
    import opd.train as T
    from opd.config.load import load_config

    cfg = load_config(None, overrides)
    captured: dict[str, Any] = {}
    phases = _Phases()
    flops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    build_student, build_teacher = C.build_student, C.build_teacher

    def capture_student(*args: Any, **kwargs: Any) -> Any:
        out = build_student(*args, **kwargs)
        captured["student"] = out[0]
        return out

    def capture_teacher(*args: Any, **kwargs: Any) -> Any:
        teacher = build_teacher(*args, **kwargs)
        teacher.score = phases.wrap("teacher", teacher.score)
        return teacher

    C.build_student, C.build_teacher = capture_student, capture_teacher
    if audit:
        S.collect_rollouts = phases.wrap("rollout", S.collect_rollouts)
        S.accumulate_gradients = phases.wrap("loss", S.accumulate_gradients)
        S.student_forward = phases.wrap("student forward", S.student_forward)
        torch.Tensor.backward = phases.wrap("backward", torch.Tensor.backward)
    marks: list[float] = []
    tokens: list[float] = []
    losses: list[float] = []
    original = T.train_step
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"

    def mark() -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        if not marks:  # models loaded, training starts: what is resident now, and the peak from here on
            captured["parts"] = args[0]
            _malloc_trim()
            captured["loaded_kb"] = common.status_kb("VmRSS")
            common.reset_peak_rss()
            mark()
        if cuda and len(tokens) == warmup + (1 if audit else 0):
            torch.cuda.reset_peak_memory_stats()
        if audit and len(tokens) == warmup:
            with _audit_mode(phases, flops):
                out = original(*args, **kwargs)
        else:
            out = original(*args, **kwargs)
        mark()
        if cuda and len(tokens) >= warmup + (1 if audit else 0):  # a timed step: the peak since the reset
            captured["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        tokens.append(out["tokens"])
        losses.append(out["loss"])
        return out

    T.train_step = timed
    try:
        with common.PeakRSS() as peak:
            T.distill(cfg)
            peak.hwm_kb = common.status_kb("VmHWM")
    finally:  # leave the process as it was (a caller may run more than one job in it)
        T.train_step, C.build_student, C.build_teacher = original, build_student, build_teacher
        if audit:
            S.collect_rollouts = S.collect_rollouts.__wrapped__
            S.accumulate_gradients = S.accumulate_gradients.__wrapped__
            S.student_forward = S.student_forward.__wrapped__
            torch.Tensor.backward = torch.Tensor.backward.__wrapped__
    student, parts = captured["student"], captured["parts"]
    trainable = [p for p in student.parameters() if p.requires_grad]
    state_bytes = sum(t.numel() * t.element_size() for st in parts.optimizer.state.values() for t in st.values()
                      if torch.is_tensor(t))
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    keep = slice(warmup + (1 if audit else 0), None)  # the audited step is slow: not timed
    return {"step_s": step_s[keep], "tokens": tokens[keep], "losses": losses, "peak_mb": peak.mb,
            "loaded_mb": (captured["loaded_kb"] - peak.base_kb) / 1024,
            "train_peak_mb": (peak.hwm_kb - captured["loaded_kb"]) / 1024,
            "grad_mb": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
            "optimizer_mb": state_bytes / 2**20,
            "hwm_mb": common.status_kb("VmHWM") / 1024,
            "trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in student.parameters()),
            "flops": {k: dict(v) for k, v in flops.items()}, "gpu_peak_mb": captured.get("gpu_peak_mb")}


def models_folder(path: str | None) -> Path:
    """The folder holding the larger bench pair (built there by bench/end_to_end.py's builder)."""
    from end_to_end import build_large_pair

    folder = Path(path) if path else Path(__import__("tempfile").mkdtemp(prefix="opd-bench-models-"))
    build_large_pair(folder)
    return folder
