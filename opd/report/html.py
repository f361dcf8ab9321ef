"""The self-contained HTML report: inline CSS, PNG figures as base64 ``data:`` URIs, no script, no
external resource (it opens offline, in a mail attachment, or in headless Chromium)."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from typing import Any

from opd.report.checklist import Item
from opd.report.compare import SUMMARY_COLUMNS, config_differences, summary_rows
from opd.report.load import FINISHED, RunData, fault_note, run_status
from opd.report.plots import Plot
from opd.report.samples import mark, sample_groups

__all__ = ["CSS", "escape", "html_table", "log_ratio_color", "render_html"]

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 26px 40px}
h1{font-size:1.5em;margin:.4em 0 .1em}h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.sub{color:#666;font-size:.85em}
table{border-collapse:collapse;font-size:.83em;background:#fff;margin:.3em 0}
th,td{border:1px solid #e1e1e1;padding:3px 7px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.missing td.value{color:#b3261e}.flag{font-weight:600;color:#b3261e;white-space:nowrap}
.ok{color:#1b7f3b;white-space:nowrap}
figure{display:inline-block;margin:6px 10px 10px 0;background:#fff;border:1px solid #e1e1e1;padding:4px}
figure img{display:block;max-width:100%}figcaption{font-size:.75em;color:#555;max-width:560px}
.event{background:#fff4e5;border-left:4px solid #e8710a;padding:6px 10px;margin:8px 0;font-size:.85em}
.event.stop{background:#fdecea;border-color:#b3261e}.event code{font-size:.95em}
.quiet{background:#e8f5e9;border-left:4px solid #1b7f3b;padding:6px 10px;font-size:.85em}
.sample{background:#fff;border:1px solid #e1e1e1;padding:5px 9px;margin:5px 0;font-size:.85em}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;padding:1px 3px;margin:0 1px;border-radius:3px;
display:inline-block}.legend span{padding:1px 6px;border-radius:3px;margin-right:4px;font-size:.8em}
.mark{display:inline-block;min-width:1.4em;font-weight:700}.mark.right{color:#1b7f3b}.mark.wrong{color:#b3261e}
.mark.none{color:#888}
.status{background:#fdecea;border-left:4px solid #b3261e;padding:8px 12px;margin:10px 0;font-size:.95em}
.warn{background:#fff4e5;border-left:4px solid #e8710a;padding:4px 10px;margin:4px 0;font-size:.85em}
"""


def log_ratio_color(ell: float, scale: float = 3.0) -> str:
    """Background of a token with log-ratio ``ℓ_t = log π_S − log π_T``: red when the student is more
    confident than the teacher (ℓ > 0, the teacher disagrees), blue when less; opacity ∝ ``|ℓ|/scale``."""
    a = min(abs(ell) / scale, 1.0) * 0.85 if ell == ell else 0.0
    rgb = "214,39,40" if ell > 0 else "31,119,180"
    return f"rgba({rgb},{a:.2f})"


def escape(x: Any) -> str:
    """``str(x)`` with HTML's special characters escaped."""
    return html.escape(str(x))


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``<table>`` of escaped ``headers`` and ``rows`` (cells as text)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _events(run: RunData) -> str:
    if not run.events:
        return ('<div class="quiet">No failure detector fired: length, repetition, entropy, reward sign, teacher '
                "support, gradient spikes, NaN/Inf (thresholds: monitor.* in the config).</div>")
    out = []
    for ev in run.events:
        evidence = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                             for k, v in (ev.get("evidence") or {}).items())
        over = " ".join(ev.get("overrides") or [])
        out.append(
            f'<div class="event{" stop" if ev.get("action") == "stop" else ""}"><b>step {escape(ev.get("step"))} · '
            f'{escape(ev.get("title"))}</b> ({escape(ev.get("detector"))}, action {escape(ev.get("action"))})<br>'
            f'{escape(ev.get("message"))}<br><i>evidence:</i> {escape(evidence)}<br><i>recipe:</i> {escape(ev.get("recipe"))}'
            + (f"<br><i>overrides:</i> <code>{escape(over)}</code>" if over else "")
            + (f"<br><i>outcome:</i> {escape(ev.get('outcome'))}" if ev.get("outcome") else "") + "</div>")
    return "".join(out)


def _tokens(s: dict[str, Any]) -> str:
    ratios = s.get("log_ratio")
    if not ratios:
        return "".join(f'<span class="tok">{escape(t)}</span>' for t in s.get("tokens", []))
    return "".join(f'<span class="tok" style="background:{log_ratio_color(float(v))}" title="ℓ = {float(v):+.3f}">'
                   f"{escape(t)}</span>" for t, v in zip(s.get("tokens", []), ratios, strict=False))


def _samples(run: RunData, limit: int = 8) -> str:
    if not run.samples:
        return '<p class="sub">No samples saved (monitor.samples=0, or no evaluation ran).</p>'
    out = ['<p class="legend sub">Mark: <b style="color:#1b7f3b">✓</b> correct / <b style="color:#b3261e">✗</b> '
           "wrong by the task's verifier (· not verified). Token background: "
           '<span style="background:rgba(214,39,40,.6)">ℓ &gt; 0</span> student more confident than the teacher '
           '(the teacher disagrees) · <span style="background:rgba(31,119,180,.6)">ℓ &lt; 0</span> teacher more '
           "confident · hover a token for ℓ_t = log π_S − log π_T (nats).</p>"]
    for group in sample_groups(run, limit):
        out.append(f"<h3 class='sub'>{escape(group.title)}</h3><p class='sub'>{escape(group.note)}</p>")
        for s in group.samples:
            symbol, word = mark(s.get("score"))
            cls = {"correct": "right", "wrong": "wrong", "not verified": "none"}.get(word, "")
            ratios = s.get("log_ratio") or []
            tail = (f" · Σℓ = {sum(float(v) for v in ratios):+.2f}" if ratios else "") + \
                (f' · answer {escape(s["answer"])}' if s.get("answer") is not None else "") + \
                (" · truncated" if s.get("truncated") else "")
            out.append(f'<div class="sample"><span class="mark {cls}" title="{escape(word)}">{escape(symbol)}</span> '
                       f'<code>{escape(s.get("prompt"))}</code> → {_tokens(s)} <span class="sub">{tail.lstrip(" ·")}'
                       "</span></div>")
    return "".join(out)


def _status(run: RunData, single: bool) -> str:
    status, why = run_status(run)
    faults = fault_note(run)
    resumed = f'<div class="status"><b>{escape(faults)}.</b></div>' if faults else ""
    if status in FINISHED:
        return resumed
    who = "This run" if single else f"Run {escape(run.name)}"
    return resumed + (f'<div class="status"><b>{who} did not finish: {escape(status)}.</b> {escape(why)}. Its curves and '
                      '"accuracy after" stop at its last logged step.</div>')


def _warnings(run: RunData) -> str:
    if run.warnings is None:
        return "<p class='sub'>Not recorded (no warnings.json in the run folder).</p>"
    if not run.warnings:
        return "<p class='sub'>None: every option set has an effect in this configuration.</p>"
    return "".join(f'<div class="warn">{escape(w)}</div>' for w in run.warnings)


def _checklist_single(items: list[Item]) -> str:
    rows, section = [], None
    for it in items:
        sec = f"<td><b>{escape(it.section)}</b></td>" if it.section != section else "<td></td>"
        section = it.section
        flag = '<span class="flag">✗ missing</span>' if it.missing else '<span class="ok">✓</span>'
        rows.append(f'<tr class="{"missing" if it.missing else ""}">{sec}<td>{escape(it.name)}</td><td>{flag}</td>'
                    f'<td class="value">{escape(it.value)}</td></tr>')
    n_missing = sum(it.missing for it in items)
    return (f'<p class="sub">{len(items)} items, {n_missing} flagged missing (the run cannot answer them).</p>'
            "<table><tr><th>section</th><th>item</th><th></th><th>this run</th></tr>" + "".join(rows) + "</table>")


def _checklist_multi(runs: Sequence[RunData], items: Sequence[list[Item]]) -> str:
    head = "<tr><th>section</th><th>item</th>" + "".join(f"<th>{escape(r.name)}</th>" for r in runs) + "</tr>"
    rows = []
    for i, first in enumerate(items[0]):
        cells = "".join(
            '<td class="value">' + ('<span class="flag">✗ missing</span> ' if its[i].missing else "")
            + f"{escape(its[i].value)}</td>" for its in items)
        rows.append(f"<tr><td>{escape(first.section)}</td><td>{escape(first.name)}</td>{cells}</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def render_html(runs: Sequence[RunData], plots: Sequence[Plot], items: Sequence[list[Item]]) -> str:
    """The report page for one run, or the comparison page for several."""
    single = len(runs) == 1
    title = f"opd report — {runs[0].name}" if single else f"opd comparison — {len(runs)} runs"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
             f"<body><main><h1>{escape(title)}</h1><p class='sub'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} · "
             + " · ".join(escape(r.path) for r in runs) + "</p>"]
    parts += [_status(run, single) for run in runs]
    parts.append("<h2>Summary</h2>" + html_table(SUMMARY_COLUMNS, summary_rows(runs)))
    for run in runs:
        parts += [f"<p class='sub'>{escape(run.name)}: {escape(note)}</p>" for note in run.notes]
    parts.append("<h2>Configuration warnings</h2><p class='sub'>printed when the run started (options with no "
                 "effect in this configuration, and similar)</p>")
    for run in runs:
        parts.append(("" if single else f"<h3 class='sub'>{escape(run.name)}</h3>") + _warnings(run))
    if not single:
        diffs = config_differences(runs)
        parts.append("<h2>Configuration differences</h2>" + (
            html_table(["option", *[r.name for r in runs]], [[k, *v] for k, v in diffs]) if diffs
            else "<p class='sub'>The runs share every option.</p>"))
    parts.append("<h2>Detector events</h2>")
    for run in runs:
        parts.append(("" if single else f"<h3 class='sub'>{escape(run.name)}</h3>") + _events(run))
        if run.applied_config is not None:
            parts.append("<p class='sub'>A recipe changed the configuration mid-run: config.applied.yaml holds the "
                         "final one; the checklist shows the starting config.yaml.</p>")
    parts.append("<h2>Curves</h2>")
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        parts.append(f"<figure id='fig-{escape(p.slug)}'><img alt='{escape(p.title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption><b>{escape(p.title)}</b>: {escape(p.caption)}</figcaption></figure>")
    parts.append("<h2>Reporting checklist</h2><p class='sub'>The survey's reporting checklist (arXiv 2606.22793), "
                 "filled from the resolved config, the logs and run_info.json (what actually ran).</p>")
    parts.append(_checklist_single(items[0]) if single else _checklist_multi(runs, items))
    parts.append("<h2>Sample completions</h2>")
    for run in runs:
        parts.append(("" if single else f"<h3 class='sub'>{escape(run.name)}</h3>") + _samples(run, 8 if single else 3))
    parts.append("</main></body></html>\n")
    return "".join(parts)
