"""Held-out accuracy against optimizer steps for the runs of compare_methods.sh (docs/real_models.md §5).

    python examples/real_models/plot_compare.py runs/real-compare docs/real_models_compare.png

Reads each run's ``metrics.jsonl`` (the greedy held-out evaluations every 10 steps); the warm start's
OPD phase is drawn after its 10 SFT steps, so every curve's x axis is the total budget spent. Mean over
the seeds, with each seed as a thin line; the teacher and the untouched student as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {"opd": ("OPD (default: full-vocabulary reverse KL)", "C0"), "sft": ("SFT on teacher samples", "C1"),
          "warm-opd": ("warm start (10 SFT steps) + OPD", "C2")}


def evals(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["eval/accuracy"]) for r in rows if r.get("kind") == "eval"]


def teacher_accuracy(run: Path) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next((r["teacher/accuracy"] for r in rows if r.get("kind") == "eval_teacher"), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--warm", type=int, default=10, help="SFT steps of the warm start")
    a = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    teacher = start = None
    for kind, (label, colour) in CURVES.items():
        curves = []
        for run in sorted(a.out_dir.glob(f"{kind}-seed*")):
            if not (run / "metrics.jsonl").is_file() or run.suffix == ".log":
                continue
            points = evals(run)
            if kind == "warm-opd":
                warm = a.out_dir / run.name.replace("warm-opd", "warm")
                points = evals(warm) + [(s + a.warm, acc) for s, acc in points if s > 0]
            teacher = teacher if teacher is not None else teacher_accuracy(run)
            if kind == "opd" and points and points[0][0] == 0:
                start = points[0][1]
            curves.append(points)
            ax.plot(*zip(*points), color=colour, alpha=0.25, linewidth=0.8)
        if curves:
            steps = sorted({s for c in curves for s, _ in c if all(s in dict(c2) for c2 in curves)})
            mean = [sum(dict(c)[s] for c in curves) / len(curves) for s in steps]
            ax.plot(steps, mean, color=colour, marker="o", linewidth=2, label=f"{label} (mean of {len(curves)})")
    if teacher is not None:
        ax.axhline(teacher, color="k", linestyle="--", linewidth=1, label=f"teacher {teacher:.3f}")
    if start is not None:
        ax.axhline(start, color="grey", linestyle=":", linewidth=1, label=f"pruned student untouched {start:.3f}")
    ax.set_xlabel("optimizer steps (16 prompts each)")
    ax.set_ylabel("held-out accuracy (greedy, 42 questions)")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M-Instruct → its 26-of-30-block prune")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    a.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
