"""`opd sweep`: Student-t intervals against hand-computed values, spec expansion and baselines,
aggregation of run folders, and an end-to-end 2 × 2 × 2-seed sweep on the smoke pair that is
killed after its first finished run and resumed (finished runs are skipped, no process is left)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.sweep import aggregate, compare, load_spec, plan_runs, run_finished, spec_from_mapping, write_aggregate
from opd.sweep.spec import SpecError, parse_seeds
from opd.sweep.stats import paired_difference, summarize, t_abs_probability, t_quantile

ROOT = Path(__file__).resolve().parent.parent

# two-sided 95 % critical values of Student's t, from printed tables
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_printed_tables(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_matches_scipy_and_inverts_the_probability():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 6, 7, 15, 40, 101):
        for conf in (0.5, 0.9, 0.95, 0.99):
            t = t_quantile(conf, df)
            assert t == pytest.approx(stats.t.ppf(0.5 + conf / 2, df), rel=1e-9)
            assert t_abs_probability(t, df) == pytest.approx(conf, abs=1e-10)


def test_summarize_is_the_textbook_interval():
    xs = [0.91, 0.93, 0.88, 0.95, 0.90]
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    s = summarize([*xs, None, float("nan")])  # missing values are left out
    assert (s.n, s.mean, s.sd) == (n, pytest.approx(mean), pytest.approx(sd))
    assert s.ci == pytest.approx(2.7764451 * sd / math.sqrt(n), rel=1e-6)
    assert s.format() == f"{mean:.3f} ± {s.ci:.3f}"
    one = summarize([0.5])
    assert one.n == 1 and math.isnan(one.ci) and one.format() == "0.500"
    assert summarize([]).format() == "–"


def test_paired_difference_pairs_by_seed():
    a = {0: 0.9, 1: 0.8, 2: 0.7, 3: None}
    b = {0: 0.5, 1: 0.6, 2: 0.4, 4: 0.1}
    d = paired_difference(a, b)
    diffs = [0.4, 0.2, 0.3]
    assert d.n == 3 and d.mean == pytest.approx(sum(diffs) / 3)
    assert d.ci == pytest.approx(t_quantile(0.95, 2) * summarize(diffs).sd / math.sqrt(3))


def test_grid_cells_names_overrides_and_baseline():
    spec = spec_from_mapping({
        "grid": {"method": [None, "sft-teacher"], "data.length": [4, 8]},
        "cells": [{"name": "gae", "set": {"method": "gae-opd", "route2.lam": 0.9}}],
        "seeds": 3, "baseline": {"method": "sft-teacher"}, "base": ["train.steps=10"],
        "pairs": [["gae", "method=null,length=4"]],
    })
    names = [c.name for c in spec.cells]
    assert names == ["method=null,length=4", "method=null,length=8", "method=sft-teacher,length=4",
                     "method=sft-teacher,length=8", "gae"]
    assert spec.cells[0].override_args() == ["data.length=4"]  # method=null means "no preset"
    assert spec.cells[2].override_args() == ["method=sft-teacher", "data.length=4"]
    assert spec.cells[4].override_args() == ["method=gae-opd", "route2.lam=0.9"]
    assert spec.seeds == [0, 1, 2] and spec.base == ["train.steps=10"]
    assert spec.baseline_of(spec.cells[1]).name == "method=sft-teacher,length=8"
    assert spec.baseline_of(spec.cells[3]) is None  # the baseline itself
    assert spec.baseline_of(spec.cells[4]) is None  # not on the grid
    assert spec.comparisons() == [("method=null,length=4", "method=sft-teacher,length=4"),
                                  ("method=null,length=8", "method=sft-teacher,length=8"),
                                  ("gae", "method=null,length=4")]
    named = spec_from_mapping({"cells": [{"name": "a", "set": ["x.y=1"]}, {"name": "b"}], "baseline": "b"})
    assert named.baseline_of(named.cells[0]).name == "b"


@pytest.mark.parametrize("data,fragment", [
    ({}, "no cells"),
    ({"grid": {"a.b": [1]}, "grd": 1}, "unknown sweep key"),
    ({"cells": [{"name": "x"}, {"name": "x"}]}, "duplicate cell name"),
    ({"grid": {"a.b": [1, 2]}, "baseline": {"a.b": 3}}, "no cell has that value"),
    ({"grid": {"a.b": [1]}, "baseline": "nope"}, "is not a cell"),
    ({"grid": {"a.b": [1]}, "seeds": 0}, "at least 1"),
    ({"grid": {"a.b": [1]}, "sample_eval": -1}, "sample_eval"),
    ({"cells": [{"name": "x", "set": ["novalue"]}]}, "key=value"),
    ({"cells": [{"name": "x"}, {"name": "y"}], "pairs": [["x", "z"]]}, "pairs"),
])
def test_bad_specs_say_what_is_wrong(data, fragment):
    with pytest.raises(SpecError, match=fragment):
        spec_from_mapping(data)


def test_seed_lists():
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds("4") == [0, 1, 2, 3] and parse_seeds("2,5") == [2, 5]
    assert parse_seeds([7, 1]) == [7, 1]
    with pytest.raises(SpecError):
        parse_seeds([1, 1])


def _fake_run(run_dir: Path, before: float, after: float, curve: list[tuple[int, float]], sample: float | None):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "steps": 10, "steps_done": 10, "stopped_early": False, "seconds": 12.0,
        "before": {"before/accuracy": before}, "after": {"after/accuracy": after, "after/teacher_rkl": 0.5},
        "teacher": {"teacher/accuracy": 1.0}}))
    lines = [{"kind": "eval", "step": s, "eval/accuracy": v} for s, v in curve]
    lines += [{"kind": "train", "step": s, "teacher_kl": "nan" if s == 2 else 0.1 * s} for s in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if sample is not None:
        (run_dir / "sample_eval.json").write_text(json.dumps({"samples": 2, "sample/accuracy": sample,
                                                              "sample/share/a": sample}))


def test_aggregate_reads_run_folders(tmp_path):
    spec = spec_from_mapping({"grid": {"method": [None, "sft-teacher"]}, "seeds": 2,
                              "baseline": {"method": "sft-teacher"}, "sample_eval": 2})
    runs = plan_runs(spec, tmp_path, threads=1)
    values = {("method=null", 0): 0.9, ("method=null", 1): 0.7, ("method=sft-teacher", 0): 0.6,
              ("method=sft-teacher", 1): 0.65}
    for r in runs:
        v = values[(r.cell.name, r.seed)]
        _fake_run(r.run_dir, 0.5, v, [(0, 0.5), (5, v - 0.1), (10, v)], sample=v / 2)
    # a third seed of one cell that did not finish: left out
    assert all(run_finished(r) for r in runs)
    cells = aggregate(spec, runs)
    opd, sft = cells
    assert opd.summary("after/accuracy").mean == pytest.approx(0.8)
    assert opd.summary("after/accuracy").ci == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)
    assert opd.summary("gain/accuracy").mean == pytest.approx(0.3)
    assert opd.summary("sample/share/a").mean == pytest.approx(0.4)
    (comparison,) = compare(spec, cells)
    assert (comparison.cell, comparison.other) == ("method=null", "method=sft-teacher")
    diff = comparison.diffs["after/accuracy"]
    assert diff.mean == pytest.approx(((0.9 - 0.6) + (0.7 - 0.65)) / 2)
    curve = dict(opd.curve("eval/accuracy"))
    assert sorted(curve) == [0, 5, 10] and curve[5].mean == pytest.approx(0.7)
    assert 2 not in dict(opd.curve("teacher_kl"))  # a NaN step is a gap, not a zero
    _, files = write_aggregate(spec, runs, tmp_path, command="opd sweep test")
    data = json.loads((tmp_path / "sweep_results.json").read_text())
    acc = data["cells"][0]["final"]["after/accuracy"]
    assert acc["values"] == {"0": 0.9, "1": 0.7} and acc["n"] == 2
    md = (tmp_path / "sweep.md").read_text()
    assert "| method=null | 2 | 0.800 ± 1.271 |" in md
    assert (tmp_path / "sweep_files" / "eval_accuracy.png").stat().st_size > 1000
    assert "data:image/png;base64" in (tmp_path / "sweep.html").read_text()


def test_a_changed_spec_is_refused(tmp_path):
    from opd.sweep.execute import execute

    spec = spec_from_mapping({"grid": {"train.lr": [1e-4]}, "seeds": 1})
    run = plan_runs(spec, tmp_path, threads=1)[0]
    run.record_path.parent.mkdir(parents=True)
    run.record_path.write_text(json.dumps({"distill": ["distill", "something-else"]}))
    with pytest.raises(SpecError, match="spec changed"):
        execute([run], jobs=1, threads=1)


# --------------------------------------------------------------------------------------------
# end to end: 2 methods x 2 learning rates x 2 seeds on the smoke pair, killed and resumed
SMOKE_SPEC = """
name: smoke-grid
base: [student.model=builtin:arith/smoke_student, teacher.model=builtin:arith/smoke_teacher, data.digits=2,
       rollout.prompts_per_step=8, eval.size=16, eval.every=1, eval.teacher=false, train.steps=2,
       monitor.diagnostics=false]
grid:
  method: [null, sft-teacher]
  train.lr: [1e-4, 3e-4]
seeds: 2
baseline: {method: sft-teacher}
"""


def _sweep_cmd(spec: Path, out: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "opd.cli", "sweep", str(spec), "--out", str(out), "--jobs", str(jobs),
            "--threads", "1", "--no-progress"]


def _processes_writing(out: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(out).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL semantics")
def test_sweep_runs_a_grid_resumes_after_a_kill_and_aggregates(tmp_path):
    spec = tmp_path / "smoke.yaml"
    spec.write_text(SMOKE_SPEC)
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen(_sweep_cmd(spec, out, jobs=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, cwd=tmp_path, text=True)
    runs = plan_runs(load_spec(spec), out, threads=1)
    deadline = time.time() + 900
    try:
        while not any(run_finished(r) for r in runs):
            assert first.poll() is None, first.communicate()[0]
            assert time.time() < deadline, "no run finished in 900 s"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)  # also when the wait failed: no sweep may outlive the test
        first.wait()
    done_before = [r for r in runs if run_finished(r)]
    assert 1 <= len(done_before) < len(runs)
    mtimes = {r.run_dir: (r.run_dir / "summary.json").stat().st_mtime_ns for r in done_before}
    time.sleep(1.0)
    assert _processes_writing(out) == []  # the killed sweep's running `opd distill` processes died with it

    second = subprocess.run(_sweep_cmd(spec, out, jobs=2), capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    log = second.stdout + second.stderr
    assert f"({len(done_before)} already finished, skipped)" in log
    assert log.count("] method=") == len(runs) - len(done_before)  # one line per finished run
    assert all(run_finished(r) for r in runs)
    for r in done_before:  # skipped, not redone
        assert (r.run_dir / "summary.json").stat().st_mtime_ns == mtimes[r.run_dir]

    data = json.loads((out / "sweep_results.json").read_text())
    assert [c["name"] for c in data["cells"]] == ["method=null,lr=1e-4", "method=null,lr=3e-4",
                                                  "method=sft-teacher,lr=1e-4", "method=sft-teacher,lr=3e-4"]
    for cell in data["cells"]:
        acc = cell["final"]["after/accuracy"]
        assert acc["n"] == 2 and cell["seeds"] == [0, 1]
        xs = list(acc["values"].values())
        sd = math.sqrt(sum((x - sum(xs) / 2) ** 2 for x in xs))
        assert acc["ci"] == pytest.approx(t_quantile(0.95, 1) * sd / math.sqrt(2), rel=1e-9)
        assert [p["step"] for p in cell["curves"]["eval/accuracy"]] == [0, 1, 2]
    assert [(d["cell"], d["minus"]) for d in data["differences"]] == [
        ("method=null,lr=1e-4", "method=sft-teacher,lr=1e-4"), ("method=null,lr=3e-4", "method=sft-teacher,lr=3e-4")]
    md = (out / "sweep.md").read_text()
    assert "## Differences" in md and "± " in md
    assert (out / "sweep.html").is_file() and (out / "sweep_files" / "eval_accuracy.png").is_file()


@pytest.mark.skipif(os.environ.get("OPD_TEST_RAY") != "1", reason="starting a local Ray instance takes ~30 s on the "
                    "shared 2-core machine; set OPD_TEST_RAY=1 to run it")
def test_sweep_through_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "smoke.yaml"
    spec.write_text(SMOKE_SPEC.replace("train.lr: [1e-4, 3e-4]", "train.lr: [3e-4]").replace("seeds: 2", "seeds: 1"))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([*_sweep_cmd(spec, out, jobs=2), "--ray", "local"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ray at local" in done.stdout + done.stderr
    data = json.loads((out / "sweep_results.json").read_text())
    assert [c["final"]["after/accuracy"]["n"] for c in data["cells"]] == [1, 1]
