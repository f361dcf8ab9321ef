"""The Markdown report: the same content as the HTML page, with the figures as PNG files beside it
(``report_files/<figure>.png``) and per-token log-ratios written as numbers."""

from __future__ import annotations

from collections.abc import Sequence

from opd.report.checklist import Item
from opd.report.compare import SUMMARY_COLUMNS, config_differences, summary_rows
from opd.report.load import FINISHED, RunData, fault_note, run_status
from opd.report.samples import mark, sample_groups

__all__ = ["markdown_table", "render_markdown"]


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (``|`` in cells escaped), ending with a blank line."""
    return ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows), ""]


def _events(run: RunData) -> list[str]:
    if not run.events:
        return ["No failure detector fired (length, repetition, entropy, reward sign, teacher support, gradient "
                "spikes, NaN/Inf).", ""]
    out = []
    for ev in run.events:
        evidence = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                             for k, v in (ev.get("evidence") or {}).items())
        out += [f"- **step {ev.get('step')} · {ev.get('title')}** ({ev.get('detector')}, action {ev.get('action')}): "
                f"{ev.get('message')}", f"  - evidence: {evidence}", f"  - recipe: {ev.get('recipe')}"]
        if ev.get("overrides"):
            out.append(f"  - overrides: `{' '.join(ev['overrides'])}`")
        if ev.get("outcome"):
            out.append(f"  - outcome: {ev['outcome']}")
    return [*out, ""]


def _samples(run: RunData, limit: int) -> list[str]:
    if not run.samples:
        return ["No samples saved (monitor.samples=0, or no evaluation ran).", ""]
    out = ["✓ correct / ✗ wrong by the task's verifier (· not verified). The number after a token is its "
           "ℓ_t = log π_S − log π_T in nats (> 0: the student is more confident than the teacher).", ""]
    for group in sample_groups(run, limit):
        out += [f"**{group.title}** — {group.note}", ""]
        for s in group.samples:
            ratios = s.get("log_ratio")
            toks = " ".join(f"`{t}`({float(v):+.2f})" for t, v in zip(s.get("tokens", []), ratios, strict=False)) \
                if ratios else " ".join(f"`{t}`" for t in s.get("tokens", []))
            tail = (f" — answer `{s['answer']}`" if s.get("answer") is not None else "") + \
                (" — truncated" if s.get("truncated") else "")
            out.append(f"- {mark(s.get('score'))[0]} `{s.get('prompt')}` → {toks}{tail}")
        out.append("")
    return out


def _status(run: RunData, single: bool) -> list[str]:
    status, why = run_status(run)
    faults = fault_note(run)
    resumed = [f"> **{faults}.**", ""] if faults else []
    if status in FINISHED:
        return resumed
    who = "This run" if single else f"Run `{run.name}`"
    return resumed + [f"> **{who} did not finish: {status}.** {why}. Its curves and \"accuracy after\" stop at its "
                      "last logged step.", ""]


def _warnings(run: RunData) -> list[str]:
    if run.warnings is None:
        return ["Not recorded (no warnings.json in the run folder).", ""]
    if not run.warnings:
        return ["None: every option set has an effect in this configuration.", ""]
    return [*(f"- {w}" for w in run.warnings), ""]


def render_markdown(runs: Sequence[RunData], figures: Sequence[tuple[str, str, str]],
                    items: Sequence[list[Item]]) -> str:
    """The report as Markdown; ``figures`` are ``(title, caption, relative PNG path)``."""
    single = len(runs) == 1
    lines = [f"# opd report — {runs[0].name}" if single else f"# opd comparison — {len(runs)} runs", "",
             "Run folder(s): " + ", ".join(f"`{r.path}`" for r in runs), ""]
    for run in runs:
        lines += _status(run, single)
    lines += ["## Summary", "", *markdown_table(SUMMARY_COLUMNS, summary_rows(runs))]
    notes = [f"*{run.name}: {note}*" for run in runs for note in run.notes]
    lines += [*notes, ""] if notes else []
    lines += ["## Configuration warnings", "", "Printed when the run started.", ""]
    for run in runs:
        lines += ([] if single else [f"### {run.name}", ""]) + _warnings(run)
    if not single:
        diffs = config_differences(runs)
        lines += ["## Configuration differences", "",
                  *(markdown_table(["option", *[r.name for r in runs]], [[k, *v] for k, v in diffs]) if diffs
                    else ["The runs share every option.", ""])]
    lines += ["## Detector events", ""]
    for run in runs:
        lines += ([] if single else [f"### {run.name}", ""]) + _events(run)
    lines += ["## Curves", ""]
    for title, caption, path in figures:
        lines += [f"![{title}]({path})", "", f"*{title}*: {caption}", ""]
    lines += ["## Reporting checklist", "", "The survey's reporting checklist (arXiv 2606.22793), filled from the "
              "resolved config, the logs and run_info.json (what actually ran); **MISSING** marks what the run "
              "cannot answer.", ""]
    if single:
        lines += markdown_table(["section", "item", "this run"],
                        [[it.section, it.name, ("**MISSING** " if it.missing else "") + it.value] for it in items[0]])
    else:
        lines += markdown_table(["section", "item", *[r.name for r in runs]],
                        [[first.section, first.name, *[("**MISSING** " if its[i].missing else "") + its[i].value
                                                       for its in items]] for i, first in enumerate(items[0])])
    lines += ["## Sample completions", ""]
    for run in runs:
        lines += ([] if single else [f"### {run.name}", ""]) + _samples(run, 8 if single else 3)
    return "\n".join(lines)
