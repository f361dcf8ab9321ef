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
from opd.report.compare import SUMMARY_COLUMNS, summary_rows
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
        __import__("opd.model_paths", fromlist=["resolve_model_path"]).resolve_model_path(
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
    assert all(len(s["tokens"]) == len(s["log_ratio"]) for s in samples)
    # the loop stores held-out greedy samples at every evaluation (0, 4, 8) and the last training
    # batch once there is one (4, 8), each marked by the verifier
    by_source = {src: {s["step"] for s in samples if s["source"] == src} for src in ("heldout", "train")}
    assert by_source == {"heldout": {0, 4, 8}, "train": {4, 8}}
    assert all(s["score"] is not None for s in samples)
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


# ------------------------------------------------------------------------------------ what the reader is told
def _copy(run: Path, dest: Path, *, config: dict | None = None, train: list[dict] | None = None) -> Path:
    """A copy of ``run`` with config options changed (``{"rollout.on_policy_fraction": 0}``) and / or
    the train records replaced."""
    import yaml

    shutil.copytree(run, dest)
    if config:
        data = yaml.safe_load((dest / "config.yaml").read_text())
        for dotted, value in config.items():
            section, key = dotted.split(".")
            data[section][key] = value
        (dest / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if train is not None:
        kept = [line for line in (dest / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] != "train"]
        (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept + [json.dumps(r) for r in train]))
    return dest


def _render(run: Path) -> tuple[str, str]:
    """The HTML and Markdown pages of ``run`` without figures (the figures are tested above)."""
    from opd.report.html import render_html
    from opd.report.markdown import render_markdown

    data = load_run(run)
    return render_html([data], [], [checklist(data)]), render_markdown([data], [], [checklist(data)])


def _rewrite_samples_through_the_loop_call(run: Path) -> list[dict]:
    """samples.jsonl as the loop writes it at an evaluation (the call the loop makes:
    ``evaluate(..., samples=monitor.samples)`` then ``monitor.write_samples(step, tokenizer,
    task=task, heldout=result.samples)``), here on the smoke pair after one training step."""
    from accelerate import Accelerator

    from opd.assemble import build_components
    from opd.config import load_config
    from opd.evaluate import evaluate
    from opd.step import train_step

    (run / "samples.jsonl").unlink()
    cfg = load_config(None, [*SMOKE, "monitor.samples=6"])
    threads = torch.get_num_threads()
    parts = build_components(cfg, run, Accelerator(cpu=True))
    try:
        train_step(parts, 0)
        result = evaluate(parts.student, parts.tokenizer, parts.task, parts.task.eval_examples(16), max_new_tokens=6,
                          teacher=parts.teacher, samples=cfg.monitor.samples)
        parts.monitor.write_samples(8, parts.tokenizer, task=parts.task, heldout=result.samples)
    finally:
        parts.close()
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_samples_are_marked_by_the_verifier_and_say_where_they_come_from(runs, tmp_path):
    run = _copy(runs[0], tmp_path / "run")
    rows = _rewrite_samples_through_the_loop_call(run)
    held = [r for r in rows if r["source"] == "heldout"]
    train = [r for r in rows if r["source"] == "train"]
    assert len(held) == len(train) == 6
    html, md = _render(run)
    samples_html = __import__("html").unescape(html[html.index("<h2>Sample completions</h2>"):])
    samples_md = md[md.index("## Sample completions"):]
    assert "held-out prompts, greedy decoding — step 8" in samples_html
    assert "training batch, step 8 — student samples at temperature 1.0" in samples_html
    assert "sampled, not greedy, so their accuracy is not the held-out accuracy" in samples_md
    for group in (held, train):
        right = sum(r["score"] == 1.0 for r in group)
        assert f"{right} of 6 shown are correct by the task's verifier" in samples_html
    n_right = sum(r["score"] == 1.0 for r in rows)
    assert samples_html.count('title="correct">✓</span>') == n_right
    assert samples_html.count('title="wrong">✗</span>') == len(rows) - n_right
    assert sum(line.startswith("- ✓ ") for line in samples_md.splitlines()) == n_right
    assert sum(line.startswith("- ✗ ") for line in samples_md.splitlines()) == len(rows) - n_right


def test_a_run_that_did_not_finish_says_so(runs, tmp_path):
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert "did not finish" not in (runs[0] / "report.html").read_text()
    cases = {
        "interrupted": ({"status": "interrupted", "steps_done": 5, "signal": "SIGINT",
                         "resume": "opd distill --resume X"}, "interrupted after step 5 of 8 (signal: SIGINT)"),
        "failed": ({"status": "failed", "steps_done": 3, "error": "could not write the checkpoint: no space left"},
                   "failed after step 3 of 8: could not write the checkpoint: no space left"),
        "no updates": ({"status": "no updates"}, "every one of the 8 steps was skipped"),
        "stopped": ({"status": "stopped", "steps_done": 4}, "stopped after step 4 of 8 (train.stop_after)"),
    }
    for status, (fields, sentence) in cases.items():
        run = _copy(runs[0], tmp_path / status.replace(" ", "_"))
        (run / "summary.json").write_text(json.dumps({**summary, **fields}))
        html, md = _render(run)
        assert f"This run did not finish: {status}." in html and sentence in html, status
        assert f"> **This run did not finish: {status}.**" in md and sentence in md, status
        assert f"| {status} |" in md
    run = _copy(runs[0], tmp_path / "killed")
    (run / "summary.json").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 9, "lo')  # killed mid-write
    html, md = _render(run)
    assert "This run did not finish: unfinished." in html and "no summary.json" in html
    assert "dropped a torn last line" in md


def test_configuration_warnings_are_shown(runs, tmp_path):
    html = (runs[0] / "report.html").read_text()
    assert "<h2>Configuration warnings</h2>" in html
    run = _copy(runs[0], tmp_path / "warned")
    (run / "warnings.json").write_text(json.dumps(["route2.gamma has no effect: route 2 is off (route2.coef=0)"]))
    html, md = _render(run)
    assert '<div class="warn">route2.gamma has no effect: route 2 is off (route2.coef=0)</div>' in html
    assert "- route2.gamma has no effect" in md
    (run / "warnings.json").write_text("[]")
    assert "None: every option set has an effect" in _render(run)[0]
    (run / "warnings.json").unlink()
    assert "Not recorded (no warnings.json" in _render(run)[1]


def test_hardware_says_what_ran_and_what_the_config_asked(runs, tmp_path):
    run = _copy(runs[0], tmp_path / "asked", config={"train.device": "cuda", "train.precision": "fp16"})
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "device": "cpu", "precision": "no"}))
    item = next(i for i in checklist(load_run(run)) if i.name == "hardware")
    assert "ran on cpu (config asked train.device=cuda)" in item.value
    assert "no mixed precision (config asked train.precision=fp16)" in item.value
    (run / "run_info.json").write_text(json.dumps({k: v for k, v in info.items() if k != "precision"}))
    item = next(i for i in checklist(load_run(run)) if i.name == "hardware")
    assert "precision not recorded (config asked train.precision=fp16)" in item.value


def _lines(run: Path, slug: str) -> dict[str, list[float]]:
    """The lines of the first panel of figure ``slug``: label → y values."""
    from matplotlib.figure import Figure

    from opd.report.plots import _draw_panel

    panel = next(f for f in FIGURES if f[0] == slug)[3][0]
    ax = Figure().subplots()
    _draw_panel(ax, [load_run(run)], panel)
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_offpolicy_log_ratio_is_not_shown_as_a_kl(runs, tmp_path):
    base = [r for r in load_run(runs[0]).train]
    sft = [{**{k: v for k, v in r.items() if k != "teacher_kl"}, "teacher_kl": "nan",
            "offpolicy_logratio": -0.25 - 0.01 * r["step"]} for r in base]
    run = _copy(runs[0], tmp_path / "sft", config={"rollout.on_policy_fraction": 0.0}, train=sft)
    row = dict(zip(SUMMARY_COLUMNS, summary_rows([load_run(run)])[0], strict=True))
    assert row["teacher_kl (last 10)"] == "– (no student samples)"
    assert row["off-policy log π_S − log π_T (last 10)"].endswith("(not a KL)")
    lines = _lines(run, "teacher_kl")
    assert "teacher_kl (student samples)" not in lines  # NaN: no line, and never a zero
    off = lines["log π_S − log π_T on off-policy rows (not a KL)"]
    assert len(off) == len(base) and max(off) < -0.25  # its own line, with every logged step
    item = next(i for i in checklist(load_run(run)) if i.name == "teacher_kl")
    assert item.missing and "no student samples" in item.value and "not a KL" in item.value
    # logs written before the split: teacher_kl over every row of a run that trained on teacher samples
    legacy = [{**r, "teacher_kl": -0.3} for r in base]
    old = _copy(runs[0], tmp_path / "legacy", config={"rollout.on_policy_fraction": 0.0}, train=legacy)
    assert "incl. off-policy rows" in dict(zip(SUMMARY_COLUMNS, summary_rows([load_run(old)])[0],
                                               strict=True))["teacher_kl (last 10)"]
    assert "log π_S − log π_T, all rows incl. off-policy (logged as teacher_kl)" in _lines(old, "teacher_kl")
    assert "includes the off-policy rows" in next(i for i in checklist(load_run(old)) if i.name == "teacher_kl").value


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
