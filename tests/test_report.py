"""``opd report``: the HTML page is self-contained and renders, every checklist item is present and
flagged when the run cannot answer it, the compute estimate follows 2·N_T per scored token, the
Markdown's figures exist, several runs compare, and ``opd distill`` writes the report and prints
its path. The Chromium check runs when Chromium is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd.cli import main as opd_main
from opd.report import CHECKLIST, checklist, load_run, write_report
from opd.report.html import log_ratio_color
from opd.report.plots import FIGURES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "train.steps=8", "eval.size=16", "eval.every=4", "train.threads=1",
    "logging.progress=false", "monitor.warmup_steps=3", "monitor.window=2",
]


def _distill(run_dir: Path, *overrides: str, capsys=None) -> str:
    threads = torch.get_num_threads()
    try:
        assert opd_main(["distill", *SMOKE, f"logging.run_dir={run_dir}", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    return "" if capsys is None else capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs: the default objective, and one whose every rollout is truncated (an event)."""
    base = tmp_path_factory.mktemp("runs")
    _distill(base / "a")
    _distill(base / "b", "rollout.max_new_tokens=1", "train.lr=1e-3")
    return base / "a", base / "b"


def test_distill_writes_the_report_and_prints_its_path(tmp_path, capsys):
    out = _distill(tmp_path / "run", "train.steps=3", "eval.every=0", capsys=capsys)
    line = next(line for line in out.splitlines() if line.startswith("report: "))
    path = Path(line.removeprefix("report: "))
    assert path == tmp_path / "run" / "report.html" and path.is_file() and (tmp_path / "run" / "report.md").is_file()
    for name in ("run_info.json", "summary.json", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    _distill(tmp_path / "quiet", "train.steps=2", "eval.every=0", "logging.report=false")
    assert not (tmp_path / "quiet" / "report.html").exists()


def test_html_is_self_contained(runs):
    html = (runs[0] / "report.html").read_text()
    assert "<script" not in html.lower()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", html)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs]
    assert "http://" not in html and "https://" not in html and "@import" not in html
    assert html.count("<img ") >= 6  # loss, teacher_kl, eval, length, entropy, overlap, position, signal
    for slug in ("loss", "teacher_kl", "eval", "length", "entropy", "overlap", "position"):
        assert f"id='fig-{slug}'" in html, slug


def test_every_checklist_item_is_present_and_unanswerable_ones_are_flagged(runs):
    html = (runs[0] / "report.html").read_text()
    md = (runs[0] / "report.md").read_text()
    for section, item in CHECKLIST:
        assert f"<td>{item}</td>" in html.replace("&amp;", "&"), item
        assert f"| {item} |" in md, item
        assert section in html and section in md
    items = {i.name: i for i in checklist(load_run(runs[0]))}
    assert [i for i in CHECKLIST if i[1] not in items] == []
    assert items["calibration"].missing and items["pass@k"].missing  # opd measures neither
    assert not items["teacher forward FLOPs"].missing and not items["SFT cold start"].missing
    assert html.count("✗ missing") == sum(i.missing for i in items.values())
    assert md.count("| **MISSING** ") == sum(i.missing for i in items.values())


def test_items_without_their_source_are_flagged_missing(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs[0], copy)
    (copy / "run_info.json").unlink()
    (copy / "summary.json").unlink()
    items = {i.name: i for i in checklist(load_run(copy))}
    assert items["teacher forward FLOPs"].missing and "parameter count" in items["teacher forward FLOPs"].value
    assert items["hardware"].missing and items["SFT cold start"].missing and items["teacher consistency"].missing
    assert not items["wall time"].missing  # falls back to the log's timestamps
    (copy / "config.yaml").unlink()
    assert all(i.missing for i in checklist(load_run(copy)))


def test_teacher_flops_are_two_n_t_per_scored_token(runs):
    run = load_run(runs[0])
    n_t = run.info["teacher"]["parameters"]
    assert n_t == sum(p.numel() for p in __import__("opd.models", fromlist=["load_model"]).load_model(
        __import__("opd.build", fromlist=["resolve_model_path"]).resolve_model_path(
            "builtin:arith/smoke_teacher")).parameters())
    tokens = sum(r["tokens"] for r in run.train)
    item = next(i for i in checklist(run) if i.name == "teacher forward FLOPs")
    assert f"{2 * n_t * tokens:.3e}" in item.value
    assert f"{tokens:,.0f}" in next(i for i in checklist(run) if i.name == "scored tokens").value


def test_markdown_figures_exist_and_samples_show_log_ratios(runs):
    md = (runs[0] / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(pngs) >= 6
    for p in pngs:
        data = (runs[0] / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", p
    samples = [json.loads(line) for line in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {4, 8} and all(len(s["tokens"]) == len(s["log_ratio"]) for s in samples)
    first = samples[-1]
    assert f"`{first['tokens'][0]}`({first['log_ratio'][0]:+.2f})" in md
    html = (runs[0] / "report.html").read_text()
    assert f'title="ℓ = {first["log_ratio"][0]:+.3f}"' in html


def test_log_ratio_colours():
    assert log_ratio_color(2.0).startswith("rgba(214,39,40,")  # student more confident: red
    assert log_ratio_color(-2.0).startswith("rgba(31,119,180,")  # teacher more confident: blue
    assert log_ratio_color(0.0).endswith(",0.00)") and log_ratio_color(100.0).endswith(",0.85)")


def test_events_appear_in_the_report(runs):
    html = (runs[1] / "report.html").read_text()
    md = (runs[1] / "report.md").read_text()
    assert "length inflation / truncation collapse" in html and "StableOPD" in html
    assert "(length, action warn)" in md and "No failure detector fired" not in md
    assert "No failure detector fired" in (runs[0] / "report.html").read_text()


def test_several_runs_give_one_comparison(runs, tmp_path):
    html_path, md_path = write_report(list(runs), out=tmp_path / "cmp")
    html, md = html_path.read_text(), md_path.read_text()
    for run in runs:
        assert html.count(run.name) >= 3 and run.name in md
    assert "Configuration differences" in html and "rollout.max_new_tokens" in md and "train.lr" in md
    assert html.count("<img ") == len(list((tmp_path / "cmp" / "report_files").glob("*.png"))) >= 6
    assert md.count("| identity |") == 1  # one checklist table, a column per run
    default = write_report(list(runs))[0]
    assert default.parent.parent == runs[0].parent and default.parent.name.startswith("compare-")


def test_report_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        write_report([tmp_path])
    with pytest.raises(ValueError, match="at least one run folder"):
        write_report([])
    assert len(FIGURES) == 8


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(runs[1]),
                           "--out", str(out), "--height", "1600"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no errors" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
