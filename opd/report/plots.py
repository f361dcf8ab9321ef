"""The report's figures: matplotlib (Agg canvas, no pyplot state), rendered to PNG bytes.

One figure per question a reader of an OPD run asks (the survey's diagnostics and reporting
checklist, arXiv 2606.22793): is the loss going down, is the student approaching the teacher
(teacher_kl on the student's own samples, exact RKL/FKL), is it getting
better (evaluation accuracy), is it blowing up (length, truncation, repetition, EOS), is it
collapsing (entropy), is the teacher's signal actionable (top-k overlap and coverage), where in the
completion the disagreement sits (early / middle / late thirds), and are rewards and gradients
well behaved. Several runs overlay one line per run. Detector events are drawn as dotted
vertical lines. A figure whose series no run logged is left out (the checklist says so); a step
without a value (NaN, e.g. teacher_kl of a batch with no student sample) is a gap, never a zero.
``offpolicy_logratio`` — ``log π_S − log π_T`` on teacher samples or dataset answers — is drawn
beside teacher_kl under its own name: it is not a KL and is usually negative.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from opd.report.compare import legacy_teacher_kl
from opd.report.load import RunData, series

__all__ = ["COLORS", "FIGURES", "Plot", "make_plots", "smooth"]

# (slug, title, caption, panels); a panel is (y label, [(metric key, label)], log scale); a key
# "a|b" plots the first of a, b that was logged (b: the loop's own all-rows value)
Panel = tuple[str, list[tuple[str, str]], bool]
FIGURES: list[tuple[str, str, str, list[Panel]]] = [
    ("loss", "Loss", "the minimised objective and its terms (per optimizer step)",
     [("loss", [("loss", "total"), ("loss/route1", "route 1"), ("loss/route2", "route 2"), ("loss/ref_kl", "ref KL"),
                ("loss/entropy_bonus", "entropy bonus"), ("loss/sft", "SFT"), ("loss/value", "value head")], False)]),
    ("teacher_kl", "Teacher KL", "teacher_kl = mean ℓ_t = log π_S(y_t) − log π_T(y_t) on the student's own "
     "samples (a sampled estimate of RKL); RKL / FKL exact (full access) or on the teacher's top-k; off-policy "
     "rows (teacher samples, dataset answers) give log π_S − log π_T, which is not a KL and is drawn apart",
     [("nats / token", [("teacher_kl", "teacher_kl (student samples)"), ("diag/rkl", "RKL(S‖T)"),
                        ("diag/fkl", "FKL(T‖S)"),
                        ("offpolicy_logratio", "log π_S − log π_T on off-policy rows (not a KL)")], False)]),
    ("eval", "Evaluation", "greedy held-out accuracy and the student's RKL to the teacher on its own completions",
     [("accuracy", [("eval/accuracy", "student")], False), ("RKL(S‖T)", [("eval/teacher_rkl", "student")], False)]),
    ("length", "Length, truncation, repetition", "student rollouts: mean length; fraction truncated at the length "
     "limit; n-gram repetition rate; fraction ending with EOS (Demystifying OPD 2604.08527)",
     [("tokens", [("diag/length_mean|mean_length", "mean length")], False),
      ("rate", [("diag/truncation_rate|truncation_rate", "truncation"), ("diag/repetition_rate", "repetition"),
                ("diag/eos_rate", "EOS")], False)]),
    ("entropy", "Entropy", "per-token entropy at the student's states (EOPD 2603.07079; top-k teacher entropy "
     "is a lower bound)",
     [("nats", [("diag/student_entropy", "student H_S"), ("diag/teacher_entropy", "teacher H_T")], False)]),
    ("overlap", "Top-k overlap and coverage", "|TopK_S ∩ TopK_T|/k, student mass on the shared set (Rethinking "
     "OPD 2604.13016), sampled token in the teacher's top-k, and the off-support fraction",
     [("fraction", [("diag/overlap_ratio", "overlap ratio"), ("diag/overlap_mass", "overlap mass"),
                    ("diag/sampled_in_teacher_topk", "y_t ∈ TopK_T"),
                    ("diag/teacher_offsupport_frac", "off-support")], False)]),
    ("position", "Per-position diagnostics", "early / middle / late thirds of each completion (position bias, "
     "2606.22600); ℓ_t = log π_S − log π_T over the batch's rows",
     [("ℓ_t", [("diag/teacher_kl_early", "early"), ("diag/teacher_kl_middle", "middle"),
                      ("diag/teacher_kl_late", "late")], False),
      ("RKL(S‖T)", [("diag/rkl_early", "early"), ("diag/rkl_middle", "middle"), ("diag/rkl_late", "late")], False),
      ("student entropy", [("diag/student_entropy_early", "early"), ("diag/student_entropy_middle", "middle"),
                           ("diag/student_entropy_late", "late")], False)]),
    ("signal", "Rewards and gradients", "sign balance of r_t = −ℓ_t (Fu et al. 2603.25562) and the pre-clip "
     "gradient norm (PowerOPD 2606.17199)",
     [("fraction r_t < 0", [("diag/reward_neg_frac", "negative rewards")], False),
      ("‖g‖ (log)", [("grad_norm", "gradient norm")], True)]),
]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass(frozen=True)
class Plot:
    slug: str
    title: str
    caption: str
    png: bytes


def smooth(ys: list[float], width: int) -> list[float]:
    """Trailing moving average (the raw series is drawn faintly underneath)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= width:
            acc -= ys[i - width]
        out.append(acc / min(i + 1, width))
    return out


def _records(run: RunData, key: str) -> list[dict]:
    return run.evals if key.startswith("eval/") else run.train


def _draw_panel(ax, runs: Sequence[RunData], panel: Panel) -> bool:
    ylabel, keys, log = panel
    drew = False
    multi = len(runs) > 1
    shown_labels: list[str] = []
    for r_i, run in enumerate(runs):
        shown = 0
        for k_i, (key, label) in enumerate(keys):
            for key in key.split("|"):
                xs, ys = series(_records(run, key), key)
                if xs:
                    break
            finite = [(x, y) for x, y in zip(xs, ys, strict=True) if y == y and abs(y) != float("inf")]
            if not finite or (log and all(y <= 0 for _, y in finite)):
                continue
            if multi and shown:  # several runs: one line per run (the panel's first logged key)
                continue
            xs, ys = [x for x, _ in finite], [y for _, y in finite]
            color = COLORS[(r_i if multi else k_i) % len(COLORS)]
            if key == "teacher_kl" and legacy_teacher_kl(run):  # older logs: teacher_kl over every row
                label = "log π_S − log π_T, all rows incl. off-policy (logged as teacher_kl)"
            name = f"{run.name}" if multi else label
            if key.startswith("eval/") or len(xs) < 8:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.5, color=color, label=name)
            else:
                ax.plot(xs, ys, lw=0.8, alpha=0.3, color=color)
                ax.plot(xs, smooth(ys, max(2, len(ys) // 25)), lw=1.6, color=color, label=name)
            shown += 1
            drew = True
            if label not in shown_labels:
                shown_labels.append(label)
        if not multi:
            for ev in run.events:
                ax.axvline(float(ev.get("step", 0)), color="#555", ls=":", lw=1)
    if run_teacher := [run.teacher_eval for run in runs if run.teacher_eval is not None and len(runs) == 1]:
        if keys[0][0] == "eval/accuracy" and "teacher/accuracy" in run_teacher[0]:
            ax.axhline(float(run_teacher[0]["teacher/accuracy"]), color="#888", ls="--", lw=1, label="teacher")
    if log and drew:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if multi and shown_labels:  # one line per run: say which series the lines are
        ax.set_title(", ".join(shown_labels), fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=7, loc="best", frameon=False)
    return drew


def make_plots(runs: Sequence[RunData], dpi: int = 90) -> list[Plot]:
    """The report's figures for ``runs`` (one line per run when there are several)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = []
    for slug, title, caption, panels in FIGURES:
        fig = Figure(figsize=(4.2 * len(panels), 3.0), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        drew = [_draw_panel(ax, runs, panel) for ax, panel in zip(axes, panels, strict=True)]
        if not any(drew):
            continue
        for ax, ok in zip(axes, drew, strict=True):
            if not ok:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#888")
        fig.suptitle(title, fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append(Plot(slug=slug, title=title, caption=caption, png=buf.getvalue()))
    return out
