"""The Markdown report: the same content as the HTML page, with the figures as PNG files beside it
(``report_files/<figure>.png``) and per-token log-ratios written as numbers."""

from __future__ import annotations

from collections.abc import Sequence

from opd.report.checklist import Item
from opd.report.compare import SUMMARY_COLUMNS, config_differences, summary_rows
from opd.report.load import RunData

__all__ = ["render_markdown"]


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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
        return ["No samples saved.", ""]
    last = max(int(s["step"]) for s in run.samples)
    out = [f"Training batch at step {last}; each token is followed by ℓ_t = log π_S − log π_T in nats "
           "(> 0: the student is more confident than the teacher).", ""]
    for s in [x for x in run.samples if int(x["step"]) == last][:limit]:
        toks = " ".join(f"`{t}`({float(v):+.2f})" for t, v in zip(s.get("tokens", []), s.get("log_ratio", []),
                                                                 strict=False))
        out.append(f"- `{s.get('prompt')}` → {toks}" + (f" — answer `{s['answer']}`" if s.get("answer") else ""))
    return [*out, ""]


def render_markdown(runs: Sequence[RunData], figures: Sequence[tuple[str, str, str]],
                    items: Sequence[list[Item]]) -> str:
    """The report as Markdown; ``figures`` are ``(title, caption, relative PNG path)``."""
    single = len(runs) == 1
    lines = [f"# opd report — {runs[0].name}" if single else f"# opd comparison — {len(runs)} runs", "",
             "Run folder(s): " + ", ".join(f"`{r.path}`" for r in runs), "", "## Summary", "",
             *_table(SUMMARY_COLUMNS, summary_rows(runs))]
    if not single:
        diffs = config_differences(runs)
        lines += ["## Configuration differences", "",
                  *(_table(["option", *[r.name for r in runs]], [[k, *v] for k, v in diffs]) if diffs
                    else ["The runs share every option.", ""])]
    lines += ["## Detector events", ""]
    for run in runs:
        lines += ([] if single else [f"### {run.name}", ""]) + _events(run)
    lines += ["## Curves", ""]
    for title, caption, path in figures:
        lines += [f"![{title}]({path})", "", f"*{title}*: {caption}", ""]
    lines += ["## Reporting checklist", "", "methods.md §3.10, filled from the resolved config, the logs and "
              "run_info.json; **MISSING** marks what the run cannot answer.", ""]
    if single:
        lines += _table(["section", "item", "this run"],
                        [[it.section, it.name, ("**MISSING** " if it.missing else "") + it.value] for it in items[0]])
    else:
        lines += _table(["section", "item", *[r.name for r in runs]],
                        [[first.section, first.name, *[("**MISSING** " if its[i].missing else "") + its[i].value
                                                       for its in items]] for i, first in enumerate(items[0])])
    lines += ["## Sample completions", ""]
    for run in runs:
        lines += ([] if single else [f"### {run.name}", ""]) + _samples(run, 8 if single else 3)
    return "\n".join(lines)
