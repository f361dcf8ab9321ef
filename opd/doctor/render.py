"""``opd doctor``'s outputs: the console verdict, ``doctor.json``, ``doctor.md`` and ``doctor.html``.

The HTML page is self-contained like the run report (inline CSS, figures as base64 PNG, no script).
Figures: the length distributions of the student's rollouts and of the teacher's answers against
``rollout.max_new_tokens``; the actionability diagnostics by position (early / middle / late thirds
of each completion, arXiv 2606.22793); the histogram of ``r_t = log π_T(y_t) − log π_S(y_t)``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from opd.doctor.run import DoctorResult
from opd.io import atomic_write_text, write_json

__all__ = ["POSITION_ROWS", "console_lines", "figures", "to_json", "to_markdown", "to_html", "write_outputs"]

#: (diag key, label) of the per-position table and figure.
POSITION_ROWS: tuple[tuple[str, str], ...] = (
    ("teacher_kl", "teacher_kl ℓ_t"), ("rkl", "RKL(S‖T)"), ("overlap_ratio", "top-k overlap ratio"),
    ("overlap_mass", "top-k overlap mass"), ("sampled_in_teacher_topk", "y_t ∈ TopK_T"),
    ("student_entropy", "H_S"), ("teacher_entropy", "H_T"),
)
_THIRDS = ("early", "middle", "late")


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _summary_rows(r: DoctorResult) -> list[tuple[str, str]]:
    p, m = r.probe, r.probe.step_metrics
    t = p.teacher
    rows = [
        ("student / teacher accuracy", f"{_f(p.student_accuracy, '.3f')} / {_f(p.teacher_accuracy, '.3f')} "
                                       f"(verifier on {p.student.n} student rollouts / "
                                       f"{0 if t is None else t.n} teacher answers)"),
        ("student rollouts", f"mean length {p.student.mean:.1f}, cut by max_new_tokens={p.student.budget}: "
                             f"{p.student.cut_share:.1%}, EOS rate {p.student.eos_rate:.1%}"),
        ("teacher answers", "not sampled (no in-process teacher)" if t is None else
         f"mean length {t.mean:.1f} student tokens, p95 {t.quantile(0.95):.0f}; would be cut: {t.cut_share:.1%}"),
        ("reward r_t", f"negative {p.reward_neg_frac:.1%}, p05 {_f(m.get('diag/reward_p05'))}, "
                       f"p50 {_f(m.get('diag/reward_p50'))}, p95 {_f(m.get('diag/reward_p95'))}"),
        ("support", f"y_t ∈ TopK_T {_f(m.get('diag/sampled_in_teacher_topk'), '.3f')}, off-support "
                    f"{_f(m.get('diag/teacher_offsupport_frac'), '.3f')}, overlap mass "
                    f"{_f(m.get('diag/overlap_mass'), '.3f')}"),
        ("entropy", f"H_S {_f(m.get('diag/student_entropy'))}, H_T {_f(m.get('diag/teacher_entropy'))} nats"),
        ("one training step", f"{p.step_seconds:.2f} s for {p.batch_rows} rollouts (rollouts + teacher scoring "
                              f"{p.rollout_seconds:.2f} s, update {p.update_seconds:.2f} s), peak memory "
                              f"{p.peak_memory_mb:.0f} MiB ({p.memory_kind}), ‖g‖ {_f(m.get('grad_norm'))}, "
                              f"the update moves log π_S(y_t) by {_f(p.step_shift)} nats/token"),
    ]
    return rows


def console_lines(r: DoctorResult, files: list[Path] | None = None) -> list[str]:
    """The short verdict printed by ``opd doctor``."""
    lines = [r.verdict(), "", "teacher self-test:"]
    lines += [f"  {c.line()}" for c in r.checks]
    lines += ["", "the pair on your prompts:"] + [f"  {k}: {v}" for k, v in _summary_rows(r)]
    lines += ["", "predicted detectors (50+ step run):"]
    lines += [f"  {'FIRES' if p.fires else 'quiet'} {p.detector}: {p.why}" for p in r.predictions]
    lines += ["", "recommendations:"]
    lines += [f"  {x.setting}={x.value}{'' if x.changes else ' (keep)'}: {x.measured} [{x.source}]"
              for x in r.recommendations]
    if r.overrides:
        lines += ["", "paste into opd distill: " + " ".join(r.overrides)]
    lines.append(f"\ndone in {r.seconds:.1f} s")
    if files:
        lines.append("wrote " + ", ".join(str(f) for f in files))
    return lines


def to_json(r: DoctorResult) -> dict[str, Any]:
    p = r.probe
    return {
        "verdict": r.verdict(), "exit_code": r.exit_code, "seconds": r.seconds, "teacher_server": r.served,
        "checks": [{"name": c.name, "status": c.status, "measured": c.measured, "tolerance": c.tolerance,
                    "detail": c.detail} for c in r.checks],
        "probe": {"student_accuracy": p.student_accuracy, "teacher_accuracy": p.teacher_accuracy,
                  "max_new_tokens": p.student.budget, "student_lengths": list(p.student.lengths),
                  "student_cut_share": p.student.cut_share, "student_eos_rate": p.student.eos_rate,
                  "teacher_lengths": None if p.teacher is None else list(p.teacher.lengths),
                  "teacher_cut_share": None if p.teacher is None else p.teacher.cut_share,
                  "teacher_repetition": p.teacher_repetition, "reward_neg_frac": p.reward_neg_frac,
                  "step_seconds": p.step_seconds, "rollout_seconds": p.rollout_seconds,
                  "update_seconds": p.update_seconds, "step_shift": p.step_shift,
                  "peak_memory_mb": p.peak_memory_mb, "memory_kind": p.memory_kind, "batch_rows": p.batch_rows,
                  "student_params": p.student_params, "teacher_params": p.teacher_params,
                  "step_metrics": p.step_metrics},
        "predictions": [{"detector": x.detector, "fires": x.fires, "why": x.why, "evidence": x.evidence}
                        for x in r.predictions],
        "recommendations": [{"setting": x.setting, "value": x.value, "current": x.current, "measured": x.measured,
                             "source": x.source} for x in r.recommendations],
        "overrides": r.overrides, "notes": r.notes,
    }


def _position_table(r: DoctorResult) -> list[list[str]]:
    m = r.probe.step_metrics
    rows = []
    for key, label in POSITION_ROWS:
        cells = [m.get(f"diag/{key}_{third}") for third in _THIRDS]
        if any(c is not None for c in cells):
            rows.append([label, *(_f(c) for c in cells), _f(m.get(f"diag/{key}"))])
    return rows


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    clean = (lambda x: str(x).replace("|", "\\|").replace("\n", " "))
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


def to_markdown(r: DoctorResult, figure_names: list[tuple[str, str]] = ()) -> str:
    out = ["# opd doctor", "", f"**{r.verdict()}**", "", "## Teacher self-test", ""]
    out += _md_table(["check", "result", "measured", "tolerance", "detail"],
                     [[c.name, c.status, _f(c.measured), _f(c.tolerance), c.detail] for c in r.checks])
    out += ["", "## The pair on your prompts", ""]
    out += _md_table(["what", "measured"], [list(x) for x in _summary_rows(r)])
    out += ["", "### Diagnostics by position", ""]
    out += _md_table(["diagnostic", "early", "middle", "late", "all"], _position_table(r))
    out += ["", "## Predicted failure detectors", ""]
    out += _md_table(["detector", "would fire", "why"], [[p.detector, "yes" if p.fires else "no", p.why]
                                                         for p in r.predictions])
    out += ["", "## Recommendations", ""]
    out += _md_table(["setting", "recommended", "now", "measured", "source"],
                     [[x.setting, x.value, x.current, x.measured, x.source] for x in r.recommendations])
    if r.overrides:
        out += ["", "Paste into `opd distill`:", "", "```", " ".join(r.overrides), "```"]
    out += [""] + [f"![{title}]({name})" for name, title in figure_names]
    out += ["", *[f"- {n}" for n in r.notes], "", f"_measured in {r.seconds:.1f} s_", ""]
    return "\n".join(out)


def figures(r: DoctorResult, dpi: int = 90) -> list[tuple[str, str, bytes]]:
    """``(slug, title, png)`` per figure (a figure without data is left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    out = []
    p = r.probe
    fig = Figure(figsize=(3.8, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max([*p.student.lengths, *(p.teacher.lengths if p.teacher else ()), p.student.budget]) + 1
    bins = [b - 0.5 for b in range(0, top + 2)]  # one bin per length, centred on it
    for lengths, label, color in ((p.student.lengths, "student rollouts", "#1f77b4"),
                                  (p.teacher.lengths if p.teacher else (), "teacher answers", "#d62728")):
        if lengths:  # shares, so that samples of different sizes compare
            ax.hist(lengths, bins=bins, weights=[1 / len(lengths)] * len(lengths), alpha=0.55, label=label,
                    color=color)
    ax.axvline(p.student.budget + 0.5, color="k", ls="--", lw=1, label="max_new_tokens")
    ax.set_xlabel("completion length (student tokens)")
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    out.append(("lengths", "Lengths against rollout.max_new_tokens", png(fig)))
    m = p.step_metrics
    keys = [(k, lab) for k, lab in POSITION_ROWS if k != "reward" and f"diag/{k}_early" in m]
    if keys:
        fig = Figure(figsize=(3.8, 3.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(_THIRDS)
        for j, third in enumerate(_THIRDS):
            ax.bar([i + j * width for i in range(len(keys))], [m.get(f"diag/{k}_{third}", math.nan) for k, _ in keys],
                   width=width, label=third)
        ax.set_xticks([i + width for i in range(len(keys))], [lab for _, lab in keys], rotation=35, ha="right",
                      fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.legend(fontsize=7, title="position", title_fontsize=7)
        out.append(("position", "Actionability diagnostics by position", png(fig)))
    if p.rewards:
        fig = Figure(figsize=(3.8, 3.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.hist(p.rewards, bins=40, color="#2ca02c")
        ax.axvline(0, color="k", lw=1)
        ax.set_xlabel("r_t = log π_T(y_t) − log π_S(y_t)")
        ax.set_ylabel("tokens")
        ax.set_title(f"negative: {p.reward_neg_frac:.1%}", fontsize=9)
        out.append(("rewards", "Per-token reward on the student's rollouts", png(fig)))
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#1d1d1f}
main{max-width:1180px;margin:0 auto;padding:18px 26px 40px}h1{font-size:1.5em}
h2{font-size:1.15em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.83em;background:#fff}th,td{border:1px solid #e1e1e1;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f0f0f0}.pass{color:#1b7f3b;font-weight:600}
.FAIL{color:#b3261e;font-weight:700}.skip{color:#888}.verdict{padding:8px 12px;margin:10px 0;font-size:1em}
.v-OK{background:#e8f5e9;border-left:4px solid #1b7f3b}.v-WARN{background:#fff4e5;border-left:4px solid #e8710a}
.v-FAIL{background:#fdecea;border-left:4px solid #b3261e}figure{display:inline-block;margin:6px 10px 10px 0;
background:#fff;border:1px solid #e1e1e1;padding:4px}figcaption{font-size:.75em;color:#555}
code,pre{background:#f3f3f3;padding:2px 5px}pre{padding:8px;white-space:pre-wrap}"""


def _table(headers: list[str], rows: list[list[str]], classes: list[str | None] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = ""
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            cls = classes[i] if classes and j == 1 and classes[i] else None
            cells.append(f"<td{f' class={cls!r}' if cls else ''}>{html.escape(str(c))}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(r: DoctorResult, figs: list[tuple[str, str, bytes]]) -> str:
    kind = r.verdict().split(":", 1)[0]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>opd doctor</title><style>{_CSS}</style>"
             "</head><body><main><h1>opd doctor</h1>",
             f"<div class='verdict v-{html.escape(kind)}'>{html.escape(r.verdict())}</div>",
             "<h2>Teacher self-test</h2>",
             _table(["check", "result", "measured", "tolerance", "detail"],
                    [[c.name, c.status, _f(c.measured), _f(c.tolerance), c.detail] for c in r.checks],
                    [c.status for c in r.checks]),
             "<h2>The pair on your prompts</h2>", _table(["what", "measured"], [list(x) for x in _summary_rows(r)]),
             "<h3>Diagnostics by position</h3>",
             _table(["diagnostic", "early", "middle", "late", "all"], _position_table(r))]
    for slug, title, data in figs:
        parts.append(f"<figure><img alt='{html.escape(slug)}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'><figcaption>{html.escape(title)}</figcaption></figure>")
    parts += ["<h2>Predicted failure detectors</h2>",
              _table(["detector", "would fire", "why"], [[p.detector, "FIRES" if p.fires else "quiet", p.why]
                                                         for p in r.predictions],
                     ["FAIL" if p.fires else "pass" for p in r.predictions]),
              "<h2>Recommendations</h2>",
              _table(["setting", "recommended", "now", "measured", "source"],
                     [[x.setting, x.value, x.current, x.measured, x.source] for x in r.recommendations])]
    if r.overrides:
        parts.append(f"<p>Paste into <code>opd distill</code>:</p><pre>{html.escape(' '.join(r.overrides))}</pre>")
    parts += [f"<p class='skip'>{html.escape(n)}</p>" for n in r.notes]
    parts.append(f"<p class='skip'>measured in {r.seconds:.1f} s</p></main></body></html>")
    return "".join(parts)


def write_outputs(r: DoctorResult, out: Path) -> list[Path]:
    """Write ``doctor.json``, ``doctor.md`` (figures beside it as PNG) and ``doctor.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(r)
    for slug, _, data in figs:
        (out / f"doctor_{slug}.png").write_bytes(data)
    write_json(out / "doctor.json", to_json(r))
    atomic_write_text(out / "doctor.md", to_markdown(r, [(f"doctor_{s}.png", t) for s, t, _ in figs]), what="doctor.md")
    atomic_write_text(out / "doctor.html", to_html(r, figs), what="doctor.html")
    return [out / "doctor.html", out / "doctor.md", out / "doctor.json"]

