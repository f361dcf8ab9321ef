"""A sweep's cells at an earlier step, and the value diagnostics of GAE-OPD runs (docs/evidence.md §(e)).

    python scripts/sweep_at_step.py runs/evidence/gae-fork --step 100 [--baseline-axis value=exact_mc]
    python scripts/sweep_at_step.py runs/evidence/gae-fork --step 400 --plot eval/mean_length out.png --only lam=0.95

For every cell folder of the sweep output and every finished seed, reads ``metrics.jsonl``: the ``eval``
record at ``--step`` (greedy accuracy, mean length, teacher RKL on the held-out set — with a constant
learning rate and per-step seeding this is the final evaluation of a run of ``--step`` steps), and the
means over the run's train records up to ``--step`` of the value diagnostics (``value/rmse_vs_mc``,
``value/bias_vs_mc``, ``value/mc_stderr``, ``critic/target_rmse``; ``…@first``: the probe at the first step), and ``eval/answer_rkl`` = ``eval/teacher_rkl × eval/mean_length``,
the summed per-token KL(S‖T) of a greedy answer (the eval's RKL is a token mean). Prints one Markdown table, mean ±
the half-width of the 95 % CI over seeds (:mod:`opd.sweep.stats`), and, with ``--baseline-axis``,
differences paired by seed against the cell with that axis value and the same other axes. ``--plot KEY
PNG`` also draws the mean over seeds of the eval metric ``KEY`` against the step for the cells whose
name contains every ``--only`` string.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opd.sweep.stats import paired_difference, summarize

EVAL_KEYS = ("eval/accuracy", "eval/mean_length", "eval/teacher_rkl", "eval/answer_rkl")
TRAIN_KEYS = ("value/rmse_vs_mc", "value/bias_vs_mc", "value/mc_stderr", "critic/target_rmse")


def run_metrics(run: Path, step: int) -> dict[str, float] | None:
    """The metrics above for one run folder (None when it has no eval record at ``step``)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    out: dict[str, float] = {}
    sums: dict[str, list[float]] = {k: [] for k in TRAIN_KEYS}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and rec.get("step") == step:
            out.update({k: float(rec[k]) for k in EVAL_KEYS if k in rec})
            if "eval/teacher_rkl" in rec and "eval/mean_length" in rec:  # token mean × tokens per answer
                out["eval/answer_rkl"] = float(rec["eval/teacher_rkl"]) * float(rec["eval/mean_length"])
        if rec.get("kind") == "train" and rec.get("step", 0) <= step:
            for k in TRAIN_KEYS:
                if k in rec:
                    sums[k].append(float(rec[k]))
    if not out:
        return None
    out.update({k: sum(v) / len(v) for k, v in sums.items() if v})
    out.update({f"{k}@first": v[0] for k, v in sums.items() if v and k.startswith("value/") and k != "value/mc_stderr"})
    return out


def eval_curve(run: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and key in rec:
            out[int(rec["step"])] = float(rec[key])
    return out


def plot(out_dir: Path, cells: list[str], key: str, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for name in cells:
        curves = [eval_curve(r, key) for r in sorted((out_dir / name).glob("seed-*")) if r.is_dir()]
        curves = [c for c in curves if c]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps], marker="o", ms=2.5, lw=1.4,
                label=f"{name} (n={len(curves)})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(png))


def cell_axes(name: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in name.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the sweep's output folder")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--baseline-axis", help="axis=value: paired differences against that cell")
    p.add_argument("--plot", nargs=2, metavar=("KEY", "PNG"), help="draw eval metric KEY against the step")
    p.add_argument("--only", action="append", default=[], help="--plot: cells whose name contains this")
    a = p.parse_args(argv)
    cells: dict[str, dict[int, dict[str, float]]] = {}
    for cell in sorted(d for d in a.out.iterdir() if d.is_dir()):
        seeds = {}
        for run in sorted(cell.glob("seed-*")):
            if run.is_dir() and (m := run_metrics(run, a.step)) is not None:
                seeds[int(run.name.split("-")[1])] = m
        if seeds:
            cells[cell.name] = seeds
    first = [f"{k}@first" for k in TRAIN_KEYS if k.startswith("value/") and k != "value/mc_stderr"]
    keys = [k for k in (*EVAL_KEYS, *TRAIN_KEYS, *first) if any(k in m for s in cells.values() for m in s.values())]
    print(f"step {a.step} of {a.out} — mean ± 95 % CI over seeds\n")
    print("| cell | seeds | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, seeds in cells.items():
        row = [summarize(m.get(k) for m in seeds.values()).format() if any(k in m for m in seeds.values()) else "—"
               for k in keys]
        print(f"| {name} | {len(seeds)} | " + " | ".join(row) + " |")
    if a.baseline_axis:
        axis, value = a.baseline_axis.split("=", 1)
        print(f"\npaired by seed, cell − the cell with {axis}={value}\n")
        diff_keys = list(EVAL_KEYS)
        print("| cell | minus | " + " | ".join(f"Δ {k}" for k in diff_keys) + " |")
        print("|---|---|" + "---|" * len(diff_keys))
        for name, seeds in cells.items():
            axes = cell_axes(name)
            if axes.get(axis) == value:
                continue
            other = ",".join(f"{k}={value if k == axis else v}" for k, v in axes.items())
            if other not in cells:
                continue
            row = [paired_difference({s: m.get(k) for s, m in seeds.items()},
                                     {s: m.get(k) for s, m in cells[other].items()}).format() for k in diff_keys]
            print(f"| {name} | {other} | " + " | ".join(row) + " |")
    if a.plot:
        plot(a.out, [c for c in cells if all(o in c for o in a.only)], a.plot[0], Path(a.plot[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
