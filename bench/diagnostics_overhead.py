"""Step-time overhead of the live diagnostics (``monitor.diagnostics``) in the demo configuration.

    python bench/diagnostics_overhead.py [--reps 7] [--warmup 2] [--threads 2] [key=value ...]

One process builds the demo run's components once (``opd distill`` defaults: the shipped arith
student and teacher, 128 prompts per step, full-vocabulary reverse KL; extra ``key=value``
overrides are applied) and times whole optimizer steps (:func:`opd.train.train_step`: rollout,
teacher scoring, forward/backward, update, metrics) in two variants:

* ``on``   — ``monitor.diagnostics=true``: per-token diagnostics inside the objective's forward,
  their summaries, position buckets, sequence metrics, NaN/Inf guard (the default);
* ``off``  — ``monitor.diagnostics=false``: only the sequence metrics and the NaN/Inf guard (which
  is part of every step and cannot be switched off).

Variants alternate within each repetition (order rotated every repetition) and use the same step
index, hence the same prompts and sampling seed, after ``--warmup`` untimed repetitions. Reported:
the median step time of each variant over ``--reps`` repetitions and the ratios ``on/off`` (the
acceptance number: < 1.10). Then the part that differs is timed alone on one fixed
batch (the loss forward/backward with and without per-token diagnostics, plus the monitor's
reductions), and its extra time is reported as a share of the median whole step — a check that is
less exposed to a shared machine's noise. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from opd.assemble import build_components, build_objective
from opd.collect import collect_rollouts
from opd.config import load_config, with_overrides
from opd.step import StepBatch, accumulate_gradients, token_counts, train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.prompts_per_step=64")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    torch.set_num_threads(args.threads)
    base = load_config(None, list(args.overrides))
    cfgs = {"on": with_overrides(base, ["monitor.diagnostics=true"]),
            "off": with_overrides(base, ["monitor.diagnostics=false"])}
    tmp = Path(tempfile.mkdtemp(prefix="opd-diag-bench-"))
    parts = build_components(base, tmp, Accelerator(cpu=True))
    objectives = {name: build_objective(cfg, parts.tokenizer) for name, cfg in cfgs.items()}
    monitors = {name: type(parts.monitor)(cfg, echo=None, eos_ids=parts.tokenizer.eos_token_id)
                for name, cfg in cfgs.items()}

    def use(name: str) -> None:
        parts.cfg, parts.objective, parts.monitor = cfgs[name], objectives[name], monitors[name]
        parts.chunked = parts.objective.use_chunked(parts.vocab)

    names = ["on", "off"]
    times: dict[str, list[float]] = {n: [] for n in names}
    print(f"demo configuration: {base.rollout.prompts_per_step} prompts/step, route1={base.route1.divergence} on "
          f"support={base.support.kind}, teacher access={parts.access}, vocab={parts.vocab}, threads={args.threads}")
    for rep in range(args.warmup + args.reps):
        for name in (names if rep % 2 else names[::-1]):
            use(name)
            tic = time.perf_counter()
            train_step(parts, rep)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - tic)
        if rep >= args.warmup:
            print(f"rep {rep - args.warmup + 1}: " + "  ".join(f"{n} {times[n][-1] * 1e3:7.1f} ms" for n in names))
    med = {n: statistics.median(v) for n, v in times.items()}
    print("median step time: " + ", ".join(f"{n} {med[n] * 1e3:.1f} ms" for n in names))
    ratio = med["on"] / med["off"]
    print(f"ratio on/off = {ratio:.3f}   (diagnostics overhead {100 * (ratio - 1):+.1f} %)")

    # The part that differs, isolated on one fixed batch (less exposed to a shared machine's noise):
    # the loss forward/backward with and without the per-token diagnostics, plus the monitor's
    # reductions; its extra time relative to the median whole step.
    with torch.no_grad():
        rollouts = collect_rollouts(base, parts.task.train_examples(0, base.rollout.prompts_per_step, base.seed),
                                    parts.engine, parts.tokenizer)
        feedback = parts.teacher.score(rollouts, access=parts.access, topk=base.teacher.topk)
    part: dict[str, list[float]] = {"on": [], "off": []}
    for rep in range(args.warmup + 3 * args.reps):
        for name in (("on", "off") if rep % 2 else ("off", "on")):
            obj = objectives[name]
            batch = StepBatch(rollouts=rollouts, feedback=feedback, reference=None, outcome_rewards_B=None,
                              counts=token_counts(obj, rollouts))
            tic = time.perf_counter()
            parts.optimizer.zero_grad(set_to_none=True)
            _, stats = accumulate_gradients(parts.student, obj, batch, micro_batch_size=None, group_size=1,
                                            chunked=obj.use_chunked(parts.vocab))
            monitors[name].step_metrics(stats, rollouts)
            if rep >= args.warmup:
                part[name].append(time.perf_counter() - tic)
    extra = statistics.median(part["on"]) - statistics.median(part["off"])
    print(f"isolated: loss forward/backward + monitor reductions: on {statistics.median(part['on']) * 1e3:.2f} ms, "
          f"off {statistics.median(part['off']) * 1e3:.2f} ms (median of {3 * args.reps}); extra "
          f"{extra * 1e3:.2f} ms = {100 * extra / med['off']:+.1f} % of the median step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
