"""``opd report``: a run's self-contained HTML page and Markdown file — how the run ended, the
configuration warnings it started with, curves, detector events, the filled reporting checklist
(the survey's, arXiv 2606.22793) and sample completions (held-out greedy and training-batch, each
marked ✓/✗ by the verifier, with per-token teacher/student log-ratios); several runs give one
comparison (table + overlaid curves). Every file is written atomically (temporary file, then rename).

    from opd.report import write_report
    html_path, md_path = write_report([Path("runs/demo")])

Modules: :mod:`~opd.report.load` (reading a run folder, its status), :mod:`~opd.report.plots`
(matplotlib figures), :mod:`~opd.report.checklist`, :mod:`~opd.report.compare`,
:mod:`~opd.report.samples` (which samples are shown, and their marks), :mod:`~opd.report.html`,
:mod:`~opd.report.markdown`, :mod:`~opd.report.run_info` (``run_info.json``, written at start).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from opd.report.checklist import CHECKLIST, Item, checklist
from opd.report.html import render_html
from opd.report.load import RunData, load_run, run_status
from opd.report.markdown import render_markdown
from opd.report.plots import make_plots
from opd.report.samples import sample_groups

__all__ = ["CHECKLIST", "Item", "RunData", "checklist", "load_run", "run_status", "sample_groups", "write_report"]

FILES_DIR = "report_files"


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary sibling and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_report(runs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write ``report.html`` and ``report.md`` (+ ``report_files/*.png``) for one or more runs.

    Args:
        runs: run folders written by ``opd distill``; two or more give a comparison.
        out: output folder; default the run folder (one run) or ``<parent of the first run>/
            compare-<YYYYmmdd-HHMMSS>`` (several).

    Returns:
        ``[html_path, markdown_path]``.

    Raises:
        FileNotFoundError: a folder is not a run folder (no ``metrics.jsonl``).
        ValueError: no run was given.
    """
    if not runs:
        raise ValueError("write_report needs at least one run folder")
    data: list[RunData] = [load_run(r) for r in runs]
    if out is None:
        out = data[0].path if len(data) == 1 else data[0].path.parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    (out / FILES_DIR).mkdir(parents=True, exist_ok=True)
    plots = make_plots(data)
    items = [checklist(r) for r in data]
    figures = []
    for p in plots:
        _write_atomic(out / FILES_DIR / f"{p.slug}.png", p.png)
        figures.append((p.title, p.caption, f"{FILES_DIR}/{p.slug}.png"))
    html_path, md_path = out / "report.html", out / "report.md"
    _write_atomic(html_path, render_html(data, plots, items).encode("utf-8"))
    _write_atomic(md_path, render_markdown(data, figures, items).encode("utf-8"))
    return [html_path, md_path]
