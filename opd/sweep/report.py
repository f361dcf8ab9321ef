"""The aggregate report of an ``opd sweep``: per cell mean ± 95 % CI of the final metrics over seeds,
paired differences between cells, per-seed values, and curves with CI bands.

Written next to the sweep's runs as ``sweep.html`` (self-contained, figures inlined) and ``sweep.md``
(figures in ``sweep_files/``), with the page machinery of the run report (:mod:`opd.report.html`,
:mod:`opd.report.markdown`, :mod:`opd.report.plots`).
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path

from opd.report.html import CSS, escape, html_table
from opd.report.markdown import markdown_table
from opd.report.plots import COLORS, Plot, smooth
from opd.sweep.aggregate import CURVE_KEYS, CellResult, compare, table_metrics
from opd.sweep.spec import SweepSpec

__all__ = ["curve_plots", "sweep_tables", "write_sweep_report"]

FILES_DIR = "sweep_files"
_TITLES = {"eval/accuracy": "held-out greedy accuracy", "eval/teacher_rkl": "held-out RKL(S‖T), greedy completions",
           "teacher_kl": "teacher_kl on training rollouts", "loss": "training loss"}


def curve_plots(cells: Sequence[CellResult], keys: Sequence[str] = CURVE_KEYS, dpi: int = 90) -> list[Plot]:
    """One figure per curve key: the mean over seeds per cell, shaded over its 95 % CI (train curves
    are smoothed with a trailing mean first). Keys no cell logged are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = []
    for key in keys:
        fig = Figure(figsize=(6.4, 3.4), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        drew = False
        for i, cell in enumerate(cells):
            curve = cell.curve(key)
            if not curve:
                continue
            xs = [s for s, _ in curve]
            mean = [c.mean for _, c in curve]
            half = [0.0 if math.isnan(c.ci) else c.ci for _, c in curve]
            if not key.startswith("eval/") and len(xs) >= 8:
                width = max(2, len(xs) // 25)
                mean, half = smooth(mean, width), smooth(half, width)
            color = COLORS[i % len(COLORS)]
            marker = "o" if len(xs) < 12 else None
            ax.plot(xs, mean, color=color, lw=1.6, marker=marker, ms=3, label=f"{cell.cell.name} (n={len(cell.seeds)})")
            ax.fill_between(xs, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=color, alpha=0.18, lw=0)
            drew = True
        if not drew:
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="best")
        fig.suptitle(_TITLES.get(key, key), fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        slug = key.replace("/", "_")
        plots.append(Plot(slug=slug, title=_TITLES.get(key, key),
                          caption=f"{key}: mean over seeds, band = 95 % CI (Student t)", png=buf.getvalue()))
    return plots


def sweep_tables(spec: SweepSpec, cells: Sequence[CellResult]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{"summary" | "difference" | "seeds": (headers, rows)}`` (``difference`` only with comparisons)."""
    metrics = table_metrics(spec, list(cells))
    tables = {"summary": (["cell", "seeds", *metrics],
                          [[c.cell.name, str(len(c.seeds)), *[c.summary(m).format() for m in metrics]] for c in cells])}
    comparisons = compare(spec, list(cells))
    if comparisons:
        rows = [[d.cell, d.other, *[d.diffs[m].format() if m in d.diffs else "–" for m in metrics]] for d in comparisons]
        tables["difference"] = (["cell", "minus (paired by seed)", *[f"Δ {m}" for m in metrics]], rows)
    if metrics:
        first = metrics[0]
        tables["seeds"] = (["cell", *[f"seed {s}" for s in spec.seeds]],
                           [[c.cell.name, *[f"{c.values(first)[s]:.3f}" if s in c.values(first) else "–"
                                            for s in spec.seeds]] for c in cells])
    return tables


def _cells_table(spec: SweepSpec) -> tuple[list[str], list[list[str]]]:
    return ["cell", "overrides"], [[c.name, " ".join(c.override_args()) or "(base only)"] for c in spec.cells]


def write_sweep_report(out: str | Path, spec: SweepSpec, cells: Sequence[CellResult], *,
                       command: str | None = None) -> list[Path]:
    """Write ``sweep.html`` and ``sweep.md`` (+ ``sweep_files/*.png``) into ``out``; return their paths."""
    out = Path(out)
    (out / FILES_DIR).mkdir(parents=True, exist_ok=True)
    tables = sweep_tables(spec, cells)
    plots = curve_plots(cells)
    for p in plots:
        (out / FILES_DIR / f"{p.slug}.png").write_bytes(p.png)
    n_runs = sum(len(c.seeds) for c in cells)
    planned = len(spec.cells) * len(spec.seeds)
    intro = (f"{n_runs} of {planned} runs finished · {len(spec.cells)} cells × seeds {spec.seeds} · "
             f"mean ± half-width of the 95 % confidence interval over seeds (Student t, n − 1 degrees of freedom)")
    base = " ".join(spec.base) or "(none)"
    title = f"opd sweep — {spec.name}"
    seeds_note = f"per-seed values of {table_metrics(spec, list(cells))[0]}" if "seeds" in tables else ""

    html = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{escape(title)}</h1>"
            f"<p class='sub'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} · {escape(intro)}</p>"]
    if command:
        html.append(f"<p><code>{escape(command)}</code></p>")
    html.append(f"<p class='sub'>base overrides: <code>{escape(base)}</code>"
                + (f" · config: <code>{escape(spec.config)}</code>" if spec.config else "") + "</p>")
    html.append("<h2>Final metrics</h2>" + html_table(*tables["summary"]))
    if "difference" in tables:
        html.append("<h2>Differences</h2><p class='sub'>cell − other cell, paired by seed, "
                    "mean ± 95 % CI</p>" + html_table(*tables["difference"]))
    if "seeds" in tables:
        html.append(f"<h2>Per seed</h2><p class='sub'>{escape(seeds_note)}</p>" + html_table(*tables["seeds"]))
    html.append("<h2>Curves</h2>")
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        html.append(f"<figure><img alt='{escape(p.title)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption><b>{escape(p.title)}</b>: {escape(p.caption)}</figcaption></figure>")
    html.append("<h2>Cells</h2>" + html_table(*_cells_table(spec)) + "</main></body></html>\n")

    md = [f"# {title}", "", intro, ""]
    if command:
        md += ["```bash", command, "```", ""]
    md += [f"Base overrides: `{base}`" + (f"; config `{spec.config}`" if spec.config else ""), "",
           "## Final metrics", "", *markdown_table(*tables["summary"])]
    if "difference" in tables:
        md += ["## Differences", "", "cell − other cell, paired by seed, mean ± 95 % CI", "",
               *markdown_table(*tables["difference"])]
    if "seeds" in tables:
        md += ["## Per seed", "", seeds_note, "", *markdown_table(*tables["seeds"])]
    md += ["## Curves", ""]
    for p in plots:
        md += [f"![{p.title}]({FILES_DIR}/{p.slug}.png)", "", f"*{p.title}*: {p.caption}", ""]
    md += ["## Cells", "", *markdown_table(*_cells_table(spec))]
    html_path, md_path = out / "sweep.html", out / "sweep.md"
    html_path.write_text("".join(html), encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return [html_path, md_path]
