"""Teacher-signal compression and caching (opd/teachers/cache.py): bytes per token, time per batch,
and the error half-precision storage adds.

    python bench/teacher_cache.py               # demo and large pairs (bench/end_to_end.py)
    python bench/teacher_cache.py --quick

1. **Storage** — bytes per completion token of each way to hold the teacher's signal, measured
   on the stored tensors of real teacher feedback (rollouts of the pair's student): full fp32
   logits (what a ``[B, T, V]`` teacher output costs), the live ``Feedback`` as opd passes it
   (top-k as int64 + fp32, plus logits or hidden states), and the compact store at k ∈ {8, 32, 64}
   in fp32 / bf16 / fp16 (int32 ids), and full feedback stored as hidden states.
2. **Time** — Lightning-OPD-style reuse (arXiv 2604.13010): ``--batches`` fixed rollout batches
   scored for ``--epochs`` epochs; the live teacher every time vs a :class:`CachedTeacher`
   (epoch 1 scores and stores, later epochs hit), in memory and on disk (a fresh reader process
   would see the same files). Median seconds per batch over the epochs' batches.
3. **Error** — the route-1 loss (reverse KL, teacher top-32 support with a tail bucket, and full
   vocabulary through the stored hidden states) computed from cached vs live feedback with the same
   student logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from end_to_end import PAIRS, build_large_pair, model_paths  # noqa: E402

DATA = common.ROOT / "bench" / "data" / "teacher_cache.json"


def make_batches(pair: str, models: Path, n_batches: int) -> tuple[Any, list[Any], Any]:
    """The pair's teacher (a ModelTeacher), ``n_batches`` rollout batches of its student, the student."""
    import torch

    from opd.models import load_model, load_tokenizer
    from opd.rollout import Sampling, generate_rollouts
    from opd.tasks.arith import ArithTask
    from opd.teachers import ModelTeacher

    spec = PAIRS[pair]
    s_path, t_path = model_paths(pair, models)
    tok = load_tokenizer(s_path)
    student, teacher = load_model(s_path), load_model(t_path)
    task = ArithTask(digits=3, eval_size=8, seed=0)
    torch.manual_seed(0)
    batches = [generate_rollouts(student, tok, task.train_examples(i, spec["prompts"], 0),
                                 Sampling(max_new_tokens=spec["max_new_tokens"])) for i in range(n_batches)]
    return ModelTeacher(teacher, tok), batches, student


def storage_rows(teacher: Any, batches: list[Any], vocab: int) -> list[list[Any]]:
    """Bytes per token of each representation, measured on the stored tensors."""
    import dataclasses

    from opd.teachers.cache import compress_feedback

    full = [teacher.score(b, access="full", topk=64) for b in batches]
    tokens = sum(int(b.completion_mask_BT.sum()) for b in batches)
    hidden = full[0].hidden_BTH is not None

    def live_bytes(fb: Any, mask: Any) -> int:
        n = int(mask.sum())  # per valid token, as the tensors' per-position size
        per_pos = sum(t[0, 0].numel() * t.element_size() for t in (fb.sampled_logprobs_BT[..., None],
                                                                   fb.topk_ids_BTK, fb.topk_logprobs_BTK)
                      if t is not None)
        per_pos += (fb.logits_BTV[0, 0].numel() * 4) if fb.logits_BTV is not None else 0
        per_pos += (fb.hidden_BTH[0, 0].numel() * fb.hidden_BTH.element_size()) if fb.hidden_BTH is not None else 0
        return per_pos * n

    rows = []
    ref = 4 * vocab  # full fp32 logits per token

    def vs(size: float) -> str:
        return f"1/{ref / size:,.0f}" if ref / size >= 1.5 else f"{size / ref:.2f}×"

    rows.append(["full logits, fp32 ([B, T, V] teacher output)", f"{ref:,}", "1", "exact"])
    live = sum(live_bytes(fb, b.completion_mask_BT) for fb, b in zip(full, batches)) / tokens
    what = "hidden states + top-64" if hidden else "logits + top-64"
    rows.append([f"live Feedback, access=full ({what}; int64 ids, fp32)", f"{live:,.0f}", vs(live),
                 "exact"])
    for k in sorted({min(k, vocab) for k in (8, 32, 64)}):
        for dtype in ("float32", "bfloat16", "float16"):
            size = sum(compress_feedback(dataclasses.replace(fb, access="topk", logits_BTV=None, hidden_BTH=None,
                                                             head_weight_VH=None, head_bias_V=None),
                                         b.completion_mask_BT, store_dtype=dtype, topk=k).nbytes
                       for fb, b in zip(full, batches)) / tokens
            rows.append([f"compact top-{k}: int32 ids + {dtype} log-probs (+ fp32 sampled)", f"{size:,.0f}",
                         vs(size), "exact" if dtype == "float32" else f"rounded to {dtype}"])
    for dtype in ("float32", "float16"):
        size = sum(compress_feedback(fb, b.completion_mask_BT, store_dtype=dtype, topk=32).nbytes
                   for fb, b in zip(full, batches)) / tokens
        kind = "hidden states" if hidden else "logits"
        rows.append([f"compact full ({kind}, {dtype}) + top-32", f"{size:,.0f}", vs(size),
                     "exact" if dtype == "float32" else f"rounded to {dtype}"])
    return rows


def timing(teacher: Any, batches: list[Any], epochs: int, access: str, topk: int, folder: Path,
           store_dtype: str) -> dict[str, Any]:
    """Seconds per batch: live every epoch; cached (memory, disk): first epoch vs later epochs."""
    from opd.teachers.cache import CachedTeacher, DiskFeedbackStore, FeedbackStore

    def run(scorer: Any) -> list[list[float]]:
        per_epoch = []
        for _ in range(epochs):
            times = []
            for b in batches:
                t0 = time.perf_counter()
                scorer.score(b, access=access, topk=topk)
                times.append(time.perf_counter() - t0)
            per_epoch.append(times)
        return per_epoch

    live = run(teacher)
    mem = CachedTeacher(teacher, FeedbackStore(store_dtype))
    mem_t = run(mem)
    disk = CachedTeacher(teacher, DiskFeedbackStore(folder / f"{access}-{store_dtype}", store_dtype))
    disk_t = run(disk)
    reader = CachedTeacher(None, DiskFeedbackStore(folder / f"{access}-{store_dtype}", store_dtype))
    reader_t = run(reader)[:1]
    flat = lambda ep: [t for e in ep for t in e]  # noqa: E731
    return {"live": statistics.median(flat(live)), "memory_first": statistics.median(mem_t[0]),
            "memory_hit": statistics.median(flat(mem_t[1:])), "disk_first": statistics.median(disk_t[0]),
            "disk_hit": statistics.median(flat(disk_t[1:])), "disk_reader": statistics.median(flat(reader_t)),
            "hit_rate": mem.stats["hit_rate"], "store_mb": mem.store.nbytes / 2**20,
            "disk_mb": disk.store.nbytes / 2**20}


def loss_error(teacher: Any, student: Any, batches: list[Any]) -> list[list[Any]]:
    """Route-1 loss from cached (fp16 / bf16 / fp32) vs live feedback, same student logits."""
    import torch

    from opd.math.divergences import reverse_kl
    from opd.math.fused import DivergenceOptions, SupportTokens, fused_linear_divergence
    from opd.math.support import SupportSpec, build_support
    from opd.rollout import completion_forward, lm_head_of
    from opd.teachers.cache import CachedTeacher, FeedbackStore

    rows = []
    b = batches[0]
    mask = b.completion_mask_BT.bool()
    with torch.no_grad():
        hidden = completion_forward(student, b.prompt_ids_BP, b.prompt_mask_BP, b.completion_ids_BT,
                                    b.completion_mask_BT, output="hidden")
        weight, bias = lm_head_of(student)
        logits = torch.nn.functional.linear(hidden, weight, bias)[mask].float()
    ids = b.completion_ids_BT[mask]
    w = torch.full((int(mask.sum()),), 1.0 / float(mask.sum()))
    live = teacher.score(b, access="full", topk=32)

    def topk_loss(fb: Any) -> float:
        spec = SupportSpec(kind="teacher_topk", k=32, norm="tail")
        sup = build_support(logits, spec, sampled_ids=ids, teacher_topk_ids=fb.topk_ids_BTK[mask],
                            teacher_topk_logprobs=fb.topk_logprobs_BTK[mask])
        return float((reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid) * w).sum())

    def full_loss(fb: Any) -> float:
        if fb.hidden_BTH is None:
            s_logp = torch.log_softmax(logits, -1)
            return float((reverse_kl(s_logp, torch.log_softmax(fb.logits_BTV[mask].float(), -1)) * w).sum())
        teacher = SupportTokens(teacher_hidden_NH=fb.hidden_BTH[mask].float(), teacher_weight_VH=fb.head_weight_VH,
                                teacher_bias_V=fb.head_bias_V)
        loss, _, _ = fused_linear_divergence(hidden[mask].float(), weight.float(), w,
                                             DivergenceOptions("rkl", SupportSpec(kind="full")), teacher)
        return float(loss.detach())

    ref_topk, ref_full = topk_loss(live), full_loss(live)
    for dtype in ("float32", "bfloat16", "float16"):
        cached = CachedTeacher(teacher, FeedbackStore(dtype))
        cached.score(b, access="full", topk=32)
        fb = cached.score(b, access="full", topk=32)
        err = (fb.topk_logprobs_BTK - live.topk_logprobs_BTK).abs().max()
        rows.append([dtype, f"{float(err):.1e}", f"{abs(topk_loss(fb) - ref_topk) / abs(ref_topk):.1e}",
                     f"{abs(full_loss(fb) - ref_full) / abs(ref_full):.1e}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--store-dtype", default="float16")
    common.add_machine_args(p)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.pairs, a.batches, a.epochs = "demo", 2, 2
    import torch

    torch.set_num_threads(a.threads)
    info = common.machine_info()
    print(f"# teacher cache — {common.machine_line(info)}\n", flush=True)
    models = Path(tempfile.mkdtemp(prefix="opd-cache-models-"))
    build_large_pair(models)
    out: dict[str, Any] = {}
    for pair in a.pairs.split(","):
        teacher, batches, student = make_batches(pair, models, a.batches)
        vocab = teacher.model.get_output_embeddings().weight.shape[0]
        res: dict[str, Any] = {"vocab": vocab, "tokens_per_batch": statistics.mean(
            float(b.completion_mask_BT.sum()) for b in batches)}
        res["storage"] = storage_rows(teacher, batches, vocab)
        res["timing"] = {}
        for access, topk in (("topk", 32), ("full", 32)):
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
            with common.Neighbours() as nb:
                t = timing(teacher, batches, a.epochs, access, topk, Path(tempfile.mkdtemp(prefix="opd-cache-")),
                           a.store_dtype)
            res["timing"][access] = {**t, "neighbours_busy": nb.busy}
        res["error"] = loss_error(teacher, student, batches)
        out[pair] = res
        print(render_pair(pair, res, a), flush=True)
    if not a.no_write and not a.quick:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps({"command": common.command_line(), "when": common.stamp(),
                                    "machine": common.machine_line(info), "results": out}, indent=1))
        common.write_section("teacher_cache", render(out, a))
    return 0


def render_pair(pair: str, res: dict[str, Any], a: argparse.Namespace) -> str:
    parts = [f"### {pair} pair (V = {res['vocab']:,}; {res['tokens_per_batch']:.0f} completion tokens per batch)", "",
             "Bytes per completion token:", "",
             common.md_table(["representation", "bytes / token", "vs full fp32 logits", "values"], res["storage"],
                             "lrrl"), ""]
    rows = []
    for access, t in res["timing"].items():
        rows.append([f"{access} (k=32)", f"{t['live'] * 1e3:.1f}", f"{t['memory_first'] * 1e3:.1f}",
                     f"{t['memory_hit'] * 1e3:.2f}", f"{t['live'] / t['memory_hit']:.0f}×",
                     f"{t['disk_first'] * 1e3:.1f}", f"{t['disk_hit'] * 1e3:.2f}", f"{t['disk_reader'] * 1e3:.2f}",
                     f"{t['store_mb']:.2f}", f"{t['neighbours_busy']:.0%}"])
    parts += [f"Seconds per batch over {a.batches} fixed batches × {a.epochs} epochs (store dtype {a.store_dtype}; "
              "ms, medians):", "",
              common.md_table(["access", "live teacher", "memory: 1st epoch", "memory: hit", "hit speed-up",
                               "disk: 1st epoch", "disk: hit", "disk: new reader", "store MB", "CPU used by others"],
                              rows, "lrrrrrrrrr"), "",
              "Route-1 loss from cached vs live feedback (same student logits; batch 1):", "",
              common.md_table(["store dtype", "max |Δ top-k log-prob|", "rel. Δ loss: RKL on teacher top-32 + tail",
                               "rel. Δ loss: RKL, full vocabulary"], res["error"], "lrrr"), ""]
    return "\n".join(parts)


def render(out: dict[str, Any], a: argparse.Namespace) -> str:
    parts = ["## Teacher-signal compression and caching (bench/teacher_cache.py)", "",
             f"`{common.command_line()}` — {common.stamp()}. opd/teachers/cache.py stores, per valid completion "
             "token, the sampled token's log-prob (fp32), the teacher's top-k as int32 ids + log-probs in the store "
             "dtype and, for full access, the logits (small V) or the teacher's final hidden states (large V; the "
             "head is stored once). Keys are the exact teacher-prompt + completion ids.", ""]
    parts += [render_pair(pair, res, a) for pair, res in out.items()]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
