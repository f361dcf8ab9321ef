"""Where an opd step goes, and how close its tokens/s come to this CPU's FLOP bound.

    python bench/breakdown.py                 # demo and large pairs (bench/end_to_end.py), profile of large
    python bench/breakdown.py --pairs large --steps 5
    python bench/breakdown.py --quick

The real training loop runs (``opd.train.distill`` with the end-to-end settings); the functions it
calls are wrapped with timers, so nothing is re-implemented here:

* **rollout** — ``collect_rollouts`` (student generation, opd's KV-cached decode loop);
* **teacher** — ``teacher.score`` (one teacher forward per rollout batch);
* **student fwd+bwd** — ``accumulate_gradients`` (student forward, loss, in-loss diagnostics,
  backward); the in-loss diagnostics are then measured separately as the difference between this
  phase with ``monitor.diagnostics`` on and off (same seeds, so the same rollouts);
* **optimizer** — ``AdamW.step``; **monitor** — ``Monitor.step_metrics`` + ``check_nonfinite``;
  **logging** — ``MetricsLog.write`` + ``Monitor.observe``; **other** — the rest of the step interval
  (gradient clipping, scheduler, metric assembly, Python).

FLOP bound: the fp32 GEMM rate measured in this script (``torch.mm`` 2048², 2 threads) over
``8·N_S + 2·N_T`` FLOPs per trained token (2·N_S to generate it, 2·N_T to score it with the
teacher, 6·N_S to train on it; N = parameters of the Linear layers, the LM head included, the
embedding lookup not). Prompt tokens and attention are extra work not counted, so the share is a
conservative measure of the useful rate. Per phase, the achieved rate of its own FLOPs is reported
against the same GEMM rate. A ``torch.profiler`` table of one step of the larger pair shows which
operators take the time.
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
from end_to_end import PAIRS, build_large_pair, build_real_pair, model_paths, opd_overrides  # noqa: E402

PHASES = ("rollout", "teacher", "student fwd+bwd", "optimizer", "monitor", "logging")
DATA = common.ROOT / "bench" / "data" / "breakdown.json"


def linear_params(model: Any) -> int:
    """Parameters of the Linear layers (the LM head included; tied embeddings count once, as the head)."""
    import torch

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


class Timers:
    """Accumulated seconds per phase for the current step, and the list of finished steps."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.counts: dict[str, float] = {}

    def wrap(self, phase: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0

        return timed


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import opd.assemble as C
    import opd.metrics_log
    import opd.step as S
    import opd.train as T
    from opd.config.load import load_config
    from opd.monitor import Monitor

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="opd-breakdown-"))
    student_path, teacher_path = model_paths(a.pair, Path(a.models))
    extra = [] if a.diagnostics else ["monitor.diagnostics=false"]
    cfg = load_config(None, opd_overrides(a.pair, student_path, teacher_path, a.warmup + a.steps, str(tmp / "run"),
                                          a.threads, extra))
    timers = Timers()
    models: dict[str, Any] = {}
    build_student, build_teacher = C.build_student, C.build_teacher

    def capture_student(*args: Any, **kwargs: Any) -> Any:
        out = build_student(*args, **kwargs)
        models["student"] = out[0]
        return out

    def capture_teacher(*args: Any, **kwargs: Any) -> Any:
        teacher = build_teacher(*args, **kwargs)
        models["teacher"] = teacher.model
        teacher.score = timers.wrap("teacher", teacher.score)
        return teacher

    C.build_student, C.build_teacher = capture_student, capture_teacher
    S.collect_rollouts = timers.wrap("rollout", S.collect_rollouts)
    S.accumulate_gradients = timers.wrap("student fwd+bwd", S.accumulate_gradients)
    torch.optim.AdamW.step = timers.wrap("optimizer", torch.optim.AdamW.step)
    Monitor.step_metrics = timers.wrap("monitor", Monitor.step_metrics)
    Monitor.check_nonfinite = timers.wrap("monitor", Monitor.check_nonfinite)
    Monitor.observe = timers.wrap("logging", Monitor.observe)
    opd.metrics_log.MetricsLog.write = timers.wrap("logging", opd.metrics_log.MetricsLog.write)

    marks: list[float] = []
    tokens: list[float] = []
    profile_table: list[list[Any]] = []
    original = T.train_step

    def step(*args: Any, **kwargs: Any) -> dict[str, float]:
        if not marks:
            marks.append(time.perf_counter())
        else:  # the previous step ended here: its logging is done
            marks.append(time.perf_counter())
            timers.steps.append(dict(timers.current))
        timers.current = defaultdict(float)
        profile = a.profile and len(tokens) == a.warmup
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                out = original(*args, **kwargs)
            profile_table.extend(_profile_rows(prof))
        else:
            out = original(*args, **kwargs)
        tokens.append(out["tokens"])
        return out

    T.train_step = step
    apply_previous([x for x in a.previous.split(",") if x])
    T.distill(cfg)
    # the last step's interval ends with the loop's last logging call: close it at the final eval
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    n = min(len(step_s), len(timers.steps))
    keep = slice(a.warmup, n)
    # the profiled step is slower (profiler overhead): leave it out of the timings
    rows = [(s, t, p) for i, (s, t, p) in enumerate(zip(step_s[keep], tokens[keep], timers.steps[keep]))
            if not (a.profile and i == 0)]
    return {"step_s": [r[0] for r in rows], "tokens": [r[1] for r in rows], "phases": [r[2] for r in rows],
            "n_s": linear_params(models["student"]), "n_t": linear_params(models["teacher"]),
            "profile": profile_table}


#: The optimisations of this issue that ``--previous`` can undo in a measuring process, so that
#: before and after are measured in the same run (bench/results.md, "Before / after").
CHANGES = {
    "sampler": "rollout: KV-cached decode loop with inverse-CDF sampling, behaviour log-probs read per step "
               "(before: `transformers` `generate` with `torch.multinomial`, `output_scores` stacked into "
               "`[B, T, V]`; opd/rollout/generate.py)",
    "sampled": "student fwd+bwd: log π_S(y_t) read off the route-1 chunks instead of a separate LM-head pass "
               "(opd/objective/)",
    "closed_form": "student fwd+bwd: closed-form RKL / FKL logit gradient per chunk instead of autograd through "
                   "the divergence and the log-softmax (opd/math/fused.py)",
    "diag": "in-loss diagnostics: entropies and KLs share exp(S), exp(T), S − T (opd/math/diagnostics/)",
    "teacher_div": "teacher: no `[N, V]` division for temperature 1 (opd/teachers.py; the measured version also "
                   "skipped the copy of the head, since restored so that feedback never aliases live weights)",
}
BASELINE_REV = "1f46230"  # the commit whose opd/math/diagnostics.py predates the shared-intermediate path


def previous_generate_rollouts(model: Any, tokenizer: Any, examples: Any, *, samples_per_prompt: int = 1,
                               max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                               prefix_tokens: int | None = None, group_offset: int = 0, on_policy: bool = True,
                               **_: Any) -> Any:
    """The sampler before this issue, reproduced for the comparison: ``transformers`` ``generate``
    (``torch.multinomial``) with ``output_scores=True``, then ``log_softmax`` over the stacked
    ``[B, T, V]`` processed scores."""
    import torch
    from transformers import GenerationConfig

    from opd.rollout import generate as G

    stop_ids = G.stop_token_ids(tokenizer)
    ids, mask = G.encode_prompts(tokenizer, [e.prompt for e in examples], G.model_device(model))
    n_new = max_new_tokens if prefix_tokens is None else min(prefix_tokens, max_new_tokens)
    config = GenerationConfig(do_sample=True, num_beams=1, max_new_tokens=n_new, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
                              use_cache=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0,
                              eta_cutoff=0.0, min_new_tokens=0)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.repeat_interleave(samples_per_prompt, 0),
                             attention_mask=mask.repeat_interleave(samples_per_prompt, 0), generation_config=config)
    finally:
        model.train(was_training)
    tokens = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(list(out.scores), dim=1).float()
    logprobs = torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return G._finish(examples, tokenizer, ids, mask, tokens, logprobs, stop_ids, samples_per_prompt=samples_per_prompt,
                     partial=prefix_tokens is not None, group_offset=group_offset, on_policy=on_policy)


def _baseline_module(path: str, name: str) -> Any:
    """``opd/<path>`` as it was at :data:`BASELINE_REV`, imported under ``name``."""
    import importlib.util
    import subprocess

    source = subprocess.run(["git", "show", f"{BASELINE_REV}:{path}"], capture_output=True, text=True, check=True,
                            cwd=common.ROOT).stdout
    file = Path(tempfile.mkdtemp(prefix="opd-baseline-")) / Path(path).name
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_previous(changes: list[str]) -> None:
    """Undo the named :data:`CHANGES` in this process (monkeypatching; the library is untouched)."""
    for change in changes:
        if change == "sampler":
            import opd.collect
            import opd.rollout.engine

            opd.collect.generate_rollouts = previous_generate_rollouts  # off-policy teacher samples
            opd.rollout.engine.generate_rollouts = previous_generate_rollouts  # the student's rollouts (hf engine)
        elif change == "sampled":
            from opd.objective import Objective

            Objective._sampled_from_route1 = lambda self: False  # type: ignore[method-assign]
        elif change == "closed_form":
            import opd.math.fused as fused

            init = fused._Args.__init__

            def generic_only(self: Any, *args: Any, **kwargs: Any) -> None:
                init(self, *args, **kwargs)
                self.closed_form = None

            fused._Args.__init__ = generic_only  # type: ignore[method-assign]
        elif change == "diag":
            import opd.objective.core
            import opd.objective.route1

            old = _baseline_module("opd/math/diagnostics.py", "opd.math._baseline_diagnostics")
            opd.objective.route1.diagnostics_extra_fn = old.diagnostics_extra_fn
            opd.objective.core.token_diagnostics = old.token_diagnostics
        elif change == "teacher_div":
            from opd.teachers import ModelTeacher

            ModelTeacher._tempered = lambda self, x: x / self.temperature  # type: ignore[method-assign]
        else:
            raise ValueError(f"unknown change {change!r}; choose from {sorted(CHANGES)}")


def _profile_rows(prof: Any, limit: int = 14) -> list[list[Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [[e.key, e.count, f"{e.self_cpu_time_total / 1e3:.1f}", f"{e.self_cpu_time_total / total:.1%}"]
            for e in events[:limit]]


def summarise(on: dict[str, Any], off: dict[str, Any] | None, gemm: float) -> dict[str, Any]:
    """Median phase times, the in-loss diagnostics cost, FLOP-bound shares."""
    med = {ph: statistics.median(p.get(ph, 0.0) for p in on["phases"]) for ph in PHASES}
    step = statistics.median(on["step_s"])
    tokens = statistics.median(on["tokens"])
    diag = 0.0
    if off is not None:
        diag = max(0.0, med["student fwd+bwd"] - statistics.median(p.get("student fwd+bwd", 0.0)
                                                                    for p in off["phases"]))
    phases = dict(med)
    phases["student fwd+bwd"] -= diag
    phases["diagnostics (in-loss)"] = diag
    phases["other"] = max(0.0, step - sum(med.values()))
    n_s, n_t = on["n_s"], on["n_t"]
    flops_per_token = 8 * n_s + 2 * n_t
    bound = gemm * 1e9 / flops_per_token
    phase_flops = {"rollout": 2 * n_s * tokens, "teacher": 2 * n_t * tokens, "student fwd+bwd": 6 * n_s * tokens}
    return {"step_s": step, "tokens": tokens, "tokens_per_s": tokens / step, "bound_tokens_per_s": bound,
            "share_of_bound": tokens / step / bound, "phases": phases, "n_s": n_s, "n_t": n_t,
            "phase_rate": {ph: f / max(phases[ph], 1e-12) / 1e9 / gemm for ph, f in phase_flops.items()},
            "flops_per_token": flops_per_token}


def rescale(s: dict[str, Any], gemm: float) -> dict[str, Any]:
    """The bound-dependent fields of a pair's summary for the GEMM rate ``gemm`` (GFLOP/s)."""
    bound = gemm * 1e9 / s["flops_per_token"]
    phase_flops = {"rollout": 2 * s["n_s"] * s["tokens"], "teacher": 2 * s["n_t"] * s["tokens"],
                   "student fwd+bwd": 6 * s["n_s"] * s["tokens"]}
    return {"bound_tokens_per_s": bound, "share_of_bound": s["tokens_per_s"] / bound,
            "phase_rate": {ph: f / max(s["phases"][ph], 1e-12) / 1e9 / gemm for ph, f in phase_flops.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    common.add_machine_args(p)
    p.add_argument("--quick", action="store_true", help="demo pair, 1 warm-up + 2 steps")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--diagnostics", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--profile", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--previous", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-ablations", action="store_true",
                   help="skip the before/after measurements of this issue's optimisations")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild the results.md section from bench/data/breakdown.json without measuring")
    a = p.parse_args(argv)
    if a.render_only:
        store = json.loads(DATA.read_text())
        saved = argparse.Namespace(**{**vars(a), **store.get("args", {})})
        text = render(store["results"], store["gemm_gflops"], store["copy_gbps"], saved, store["command"], store["when"])
        print(text)
        common.write_section("breakdown", text, machine=store["machine"])
        return 0
    if a.worker:
        common.worker_print(worker(a))
        return 0
    if a.quick:
        a.pairs, a.steps, a.warmup = "demo", 2, 1
    info = common.machine_info()
    print(f"# breakdown — {common.machine_line(info)}\n", flush=True)
    import torch

    torch.set_num_threads(a.threads)
    models = Path(tempfile.mkdtemp(prefix="opd-breakdown-models-"))
    build_large_pair(models)
    if "real" in a.pairs.split(","):
        build_real_pair(models)
    common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
    gemm = common.matmul_gflops(2048)
    bw = common.stream_gbps(256)
    print(f"measured: fp32 GEMM {gemm:.0f} GFLOP/s, copy bandwidth {bw:.1f} GB/s ({a.threads} threads)\n", flush=True)
    out: dict[str, Any] = {}
    for pair in a.pairs.split(","):
        runs = {}
        for diag in (1, 0):
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
            runs[diag] = common.run_worker(__file__, [
                "--pair", pair, "--models", str(models), "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--threads", str(a.threads), "--diagnostics", str(diag),
                "--profile", str(int(diag == 1 and pair == "large" and not a.quick))])
            if "error" in runs[diag]:
                raise SystemExit(f"{pair}: {runs[diag]['error']}")
        s = summarise(runs[1], runs[0], gemm)
        s["neighbours_busy"] = max(r["neighbours_busy"] for r in runs.values())
        s["profile"] = runs[1]["profile"]
        out[pair] = s
        print(render_pair(pair, s), flush=True)
        gemm = max(gemm, common.matmul_gflops(2048))
    ablations: dict[str, Any] = {}
    if not a.no_ablations and not a.quick and "large" in out:
        # each change: the previous code path and the current one measured back to back, so that the
        # ratio does not mix measurements taken minutes apart on a shared machine
        for change in (*CHANGES, "all"):
            pair_runs = {}
            for label, previous in (("before", ",".join(CHANGES) if change == "all" else change), ("after", "")):
                common.wait_for_quiet(a.quiet_busy, a.quiet_timeout, echo=lambda m: print(m, flush=True))
                r = common.run_worker(__file__, [
                    "--pair", "large", "--models", str(models), "--steps", str(a.steps), "--warmup", str(a.warmup),
                    "--threads", str(a.threads), "--previous", previous])
                if "error" in r:
                    print(f"  {change} {label}: {r['error']}", flush=True)
                    break
                pair_runs[label] = {"phases": {ph: statistics.median(p.get(ph, 0.0) for p in r["phases"])
                                               for ph in PHASES},
                                    "step_s": statistics.median(r["step_s"]), "neighbours_busy": r["neighbours_busy"]}
            if len(pair_runs) == 2:
                ablations[change] = pair_runs
                print(f"  {change}: step {pair_runs['before']['step_s']:.3f} s before, "
                      f"{pair_runs['after']['step_s']:.3f} s after", flush=True)
        out["ablations"] = ablations
    gemm = max(gemm, common.matmul_gflops(2048))  # the bound uses the best calibration of the run
    for pair, s in out.items():
        if pair != "ablations":
            s.update(rescale(s, gemm))
    text = render(out, gemm, bw, a)
    if not a.no_write and not a.quick:
        real = a.pairs == "real"  # the real pair keeps its own section and data file beside demo/large
        data = DATA.with_name("breakdown_real.json") if real else DATA
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps({"command": common.command_line(), "when": common.stamp(), "gemm_gflops": gemm,
                                    "copy_gbps": bw, "machine": common.machine_line(info), "results": out,
                                    "args": {"steps": a.steps, "warmup": a.warmup}}, indent=1))
        common.write_section("breakdown_real" if real else "breakdown", text)
    return 0


def render_pair(pair: str, s: dict[str, Any]) -> str:
    rows = [[ph, f"{sec * 1e3:.1f}", f"{sec / s['step_s']:.1%}",
             f"{s['phase_rate'][ph]:.1%}" if ph in s["phase_rate"] else "–"] for ph, sec in s["phases"].items()]
    rows.append(["**step**", f"{s['step_s'] * 1e3:.1f}", "100%", f"{s['share_of_bound']:.1%}"])
    head = (f"**{pair}**: N_S = {s['n_s'] / 1e6:.2f} M, N_T = {s['n_t'] / 1e6:.2f} M Linear parameters; "
            f"{s['tokens']:.0f} completion tokens / step; {s['tokens_per_s']:,.0f} tokens/s against a FLOP bound of "
            f"{s['bound_tokens_per_s']:,.0f} tokens/s (8·N_S + 2·N_T = {s['flops_per_token'] / 1e6:.1f} MFLOP per "
            f"token) → **{s['share_of_bound']:.1%} of the bound**; other processes used {s['neighbours_busy']:.0%} "
            "of the CPUs meanwhile.")
    return head + "\n\n" + common.md_table(["phase", "ms / step (median)", "share of step",
                                            "achieved FLOP rate ÷ GEMM rate"], rows, "lrrr") + "\n"


def gap_analysis(pair: str, s: dict[str, Any], gemm: float, bw: float) -> str:
    """Where the time above the FLOP bound goes, per phase, and what would close each part.

    A phase's *ideal* time is its counted FLOPs at the GEMM rate; everything else a phase takes
    (and all of the uncounted phases: diagnostics, optimizer, monitor, logging, other) is the gap.
    For the rollout, the weight reads alone bound a decode step from below: every step multiplies
    ``rows`` activations by every student matrix, ``4·N_S`` bytes in fp32 at the copy bandwidth.
    """
    spec = PAIRS.get(pair, {})
    step = s["step_s"]
    ideal = {"rollout": 2 * s["n_s"] * s["tokens"], "teacher": 2 * s["n_t"] * s["tokens"],
             "student fwd+bwd": 6 * s["n_s"] * s["tokens"]}
    ideal = {ph: f / (gemm * 1e9) for ph, f in ideal.items()}
    gap = {ph: max(sec - ideal.get(ph, 0.0), 0.0) for ph, sec in s["phases"].items()}
    total_gap = max(step - sum(ideal.values()), 1e-12)
    rows = [[ph, f"{s['phases'][ph] * 1e3:.0f}", f"{ideal.get(ph, 0.0) * 1e3:.0f}", f"{gap[ph] * 1e3:.0f}",
             f"{gap[ph] / total_gap:.0%}"] for ph in sorted(gap, key=gap.get, reverse=True)]
    lines = [f"**Where the rest goes ({pair})**: the step takes {step * 1e3:.0f} ms, its counted FLOPs at the GEMM "
             f"rate {sum(ideal.values()) * 1e3:.0f} ms; the {total_gap * 1e3:.0f} ms between them:", "",
             common.md_table(["phase", "measured ms", "at the GEMM rate ms", "gap ms", "share of the gap"], rows,
                             "lrrrr"), ""]
    prompts, new = spec.get("prompts"), spec.get("max_new_tokens")
    if prompts and new:
        decode_steps = min(new, max(1, round(s["tokens"] / prompts)))
        reads = decode_steps * 4 * s["n_s"] / (bw * 1e9)
        lines.append(
            f"- **rollout** ({s['phases']['rollout'] * 1e3:.0f} ms at {s['phase_rate']['rollout']:.0%} of the GEMM "
            f"rate): each of the {decode_steps} decode steps multiplies {prompts} rows by every student matrix, "
            f"about {prompts / 2:.0f} FLOP per fp32 weight byte, so the steps are bound by reading the weights — "
            f"{reads * 1e3:.0f} ms for the weight reads alone at the measured {bw:.1f} GB/s, plus per-step Python "
            "and attention overhead. What would close it: more rows per decode step (more prompts per step or "
            "samples per prompt raise the FLOPs per byte read), half-precision weights during generation (half the "
            "bytes), or a serving engine with continuous batching.")
    diag = s["phases"].get("diagnostics (in-loss)", 0.0)
    if diag > 0:
        without = s["share_of_bound"] * step / max(step - diag, 1e-12)
        lines.append(
            f"- **in-loss diagnostics** ({diag * 1e3:.0f} ms): top-k of the student's and the teacher's log-probs "
            "over the vocabulary (overlap, coverage), entropies and exact KLs per token. `monitor.diagnostics=false` "
            f"removes them (the same step would then run at about {without:.0%} of the bound); fusing them into the "
            "loss's closed-form gradient pass, which already holds exp(S) and S − T per chunk, would remove most "
            "of their passes over the `[chunk, V]` buffers.")
    lines.append(
        f"- **student fwd+bwd** ({s['phase_rate']['student fwd+bwd']:.0%} of the GEMM rate) and **teacher** "
        f"({s['phase_rate']['teacher']:.0%}): the matmuls run near the GEMM rate (`aten::mm` in the profile); the "
        "rest is elementwise work over `[chunk, V]` logits (log-softmax, exp, the gradient's few passes) and "
        "attention, bound by memory bandwidth. A fused kernel (one pass over each logit block) or half precision "
        "would close part of it.")
    return "\n".join(lines) + "\n"


def render(out: dict[str, Any], gemm: float, bw: float, a: argparse.Namespace, command: str | None = None,
           when: str | None = None) -> str:
    parts = ["## Breakdown of an opd step (bench/breakdown.py)", "",
             f"`{command or common.command_line()}` — {when or common.stamp()}; medians over {a.steps} steps after "
             f"{a.warmup} warm-up "
             f"(the profiled step excluded); measured in the same run: fp32 GEMM {gemm:.0f} GFLOP/s, copy bandwidth "
             f"{bw:.1f} GB/s. Settings as in bench/end_to_end.py. Each phase's FLOPs: rollout 2·N_S, teacher 2·N_T, "
             "student fwd+bwd 6·N_S per completion token.", ""]
    if "large" in out:
        share = out["large"]["share_of_bound"]
        parts += [f"**Acceptance** (tokens/s of the larger pair ≥ 25 % of the FLOP bound): {share:.1%} → "
                  f"{'met' if share >= 0.25 else '**missed**; the profile and the phase table below show where the rest goes'}.",
                  ""]
    for pair, s in out.items():
        if pair == "ablations":
            continue
        parts.append(render_pair(pair, s))
        if pair == "large":
            parts.append(gap_analysis(pair, s, gemm, bw))
        if s.get("profile"):
            parts += ["torch.profiler, one step of this pair, top operators by self CPU time:", "",
                      common.md_table(["operator", "calls", "self CPU ms", "share"], s["profile"], "lrrr"), ""]
    ab = out.get("ablations")
    if ab and any("before" in v for v in ab.values() if isinstance(v, dict)):
        parts += ["### Before / after this issue's optimisations (larger pair, same run)", "",
                  "Each row measures the larger pair twice, back to back in fresh processes: once with one change "
                  "undone in the measuring process (the previous code path reproduced by bench/breakdown.py, or "
                  f"imported from commit {BASELINE_REV}), once with the current code; the last row undoes all of "
                  "them. Medians of the same number of steps as above. Phase times are those of the phase the "
                  "change touches.", ""]
        rows = []
        phases = {"sampler": "rollout", "sampled": "student fwd+bwd", "closed_form": "student fwd+bwd",
                  "diag": "student fwd+bwd", "teacher_div": "teacher"}
        for change, what in (*CHANGES.items(), ("all", "all of the above")):
            if change not in ab or "before" not in ab[change]:
                continue
            before, after = ab[change]["before"], ab[change]["after"]
            phase = phases.get(change)
            rows.append([what, phase or "–",
                         f"{before['phases'][phase] * 1e3:.0f} → {after['phases'][phase] * 1e3:.0f} ms" if phase else "–",
                         f"{before['step_s'] * 1e3:.0f} → {after['step_s'] * 1e3:.0f} ms",
                         f"{before['step_s'] / after['step_s']:.2f}×",
                         f"{max(before['neighbours_busy'], after['neighbours_busy']):.0%}"])
        parts += [common.md_table(["change", "phase", "phase before → after", "step before → after",
                                   "step speed-up", "CPU used by others"], rows, "llrrrr"), ""]
        afters = [v["after"]["step_s"] for v in ab.values() if isinstance(v, dict) and "after" in v]
        if len(afters) > 1:
            parts += [f"Noise: the {len(afters)} \"after\" measurements run the same code; their step times range from "
                      f"{min(afters) * 1e3:.0f} to {max(afters) * 1e3:.0f} ms ({max(afters) / min(afters) - 1:.0%} apart), "
                      "so a single row's step speed-up smaller than that is not distinguishable from the machine's "
                      "drift; the phase column isolates the part a change touches.", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
