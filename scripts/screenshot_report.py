"""Open a run's HTML report in headless Chromium, check that it renders without errors, and save a
PNG screenshot.

    python scripts/screenshot_report.py RUN_DIR [--out report.png] [--width 1280] [--height 3200]

Writes ``RUN_DIR/report.html`` first if it does not exist (``opd report``). Two Chromium passes,
each with a fresh, empty profile and no network features:

1. ``--dump-dom`` with the console logged to stderr (``--enable-logging=stderr --v=0``): the page
   must render (the DOM holds the report's sections and every figure) and the log must hold no
   console message, uncaught error or failed resource load (``CONSOLE``, ``Uncaught``,
   ``net::ERR_``) — the report has no script and no external resource, so any is a defect;
2. ``--screenshot`` at ``--window-size``.

Exit status 0 when both pass; 1 on a rendering problem; 2 when Chromium is not installed (Debian:
``apt-get install -y chromium``). Runs as root need ``--no-sandbox``, which is always passed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]
PAGE_ERRORS = re.compile(r"CONSOLE|Uncaught|net::ERR_")
SECTIONS = ("Summary", "Detector events", "Curves", "Reporting checklist", "Sample completions")


def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else the first of :data:`BROWSERS` on PATH."""
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="opd-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def check_page(browser: str, html: Path, timeout: float = 120.0) -> list[str]:
    """Problems found while rendering ``html`` (empty: it rendered cleanly)."""
    url = html.resolve().as_uri()
    proc = _run(browser, ["--enable-logging=stderr", "--v=0", "--dump-dom", url], timeout)
    problems = [line.strip() for line in proc.stderr.splitlines() if PAGE_ERRORS.search(line)]
    dom = proc.stdout
    if proc.returncode != 0:
        problems.append(f"chromium exited with status {proc.returncode}")
    for section in SECTIONS:
        if f">{section}</h2>" not in dom:
            problems.append(f"the rendered page lacks the section {section!r}")
    source = html.read_text(encoding="utf-8")
    n_img, n_rendered = source.count("<img "), dom.count("<img ")
    if n_img != n_rendered:
        problems.append(f"{n_img} figures in the file but {n_rendered} in the rendered page")
    return problems


def screenshot(browser: str, html: Path, out: Path, width: int, height: int, timeout: float = 120.0) -> None:
    """Save a PNG of the page's first ``width × height`` pixels to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    proc = _run(browser, [f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
                          html.resolve().as_uri()], timeout)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (status {proc.returncode}): {proc.stderr[-800:]}")
    if out.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise RuntimeError(f"{out} is not a PNG file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder written by `opd distill`")
    parser.add_argument("--out", help="screenshot path (default RUN_DIR/report_screenshot.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3200)
    parser.add_argument("--chromium", help="browser executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    html = run_dir / "report.html"
    if not html.is_file():
        from opd.report import write_report

        html = write_report([run_dir])[0]
    browser = find_browser(args.chromium)
    if browser is None:
        print("screenshot_report: no Chromium found (looked for " + ", ".join(BROWSERS) + "); install it, e.g. "
              "`apt-get install -y chromium`, or pass --chromium PATH", file=sys.stderr)
        return 2
    problems = check_page(browser, html)
    for p in problems:
        print(f"page problem: {p}", file=sys.stderr)
    out = Path(args.out) if args.out else run_dir / "report_screenshot.png"
    screenshot(browser, html, out, args.width, args.height)
    print(f"rendered {html} in {browser}: {'no errors' if not problems else f'{len(problems)} problem(s)'}")
    print(f"screenshot: {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
