"""``opd doctor`` end to end: the demo, bad input, a served teacher (good and broken), and the
projection and recommendation rules against hand-computed values."""

from __future__ import annotations

import json

import pytest

from opd.cli import main as opd_main
from opd.config.load import load_config
from opd.config.schema import MonitorConfig
from opd.doctor.predict import predict, projected_records
from opd.doctor.probe import LengthStats
from opd.doctor.recommend import Measured, overrides, recommend
from opd.doctor.run import run_doctor
from opd.models import load_model, load_tokenizer
from opd.tasks.arith import arith_checkpoint
from tests.test_serve import ThreadServer, teacher_app


def test_doctor_on_the_demo_writes_its_three_files_and_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = opd_main(["doctor", "train.threads=1", "--out", "dr", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("OK:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dr"]  # nothing else: no runs/ folder
    names = {p.name for p in (tmp_path / "dr").iterdir()}
    assert {"doctor.html", "doctor.md", "doctor.json"} <= names
    report = json.loads((tmp_path / "dr" / "doctor.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("determinism", "batch invariance", "padding invariance", "temperature", "tokenizer round trip",
                 "special tokens and vocabulary", "embedding rows vs vocabulary", "pad / EOS"):
        assert status[name] == "pass", (name, report["checks"])
    assert status["served vs in-process"] == "skip"
    assert not any(p["fires"] for p in report["predictions"])
    probe = report["probe"]
    assert probe["teacher_accuracy"] > probe["student_accuracy"]
    assert probe["step_seconds"] > 0 and probe["peak_memory_mb"] > 0 and probe["batch_rows"] == 128
    assert "diag/overlap_mass_early" in probe["step_metrics"]
    html = (tmp_path / "dr" / "doctor.html").read_text()
    assert html.count("data:image/png;base64,") == 3


def test_bad_input_ends_in_the_same_one_line_error_as_distill(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert opd_main(["distill", "rollout.max_new_tokens=0"]) == 2
    distill_err = capsys.readouterr().err.splitlines()
    assert opd_main(["doctor", "rollout.max_new_tokens=0"]) == 2
    doctor_err = capsys.readouterr().err.splitlines()
    assert doctor_err[0].replace("opd doctor:", "opd distill:") == distill_err[0]
    assert opd_main(["doctor", "student.model=/nonexistent/model", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opd doctor: error:") and "/nonexistent/model" in err and "Traceback" not in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert opd_main(["doctor", "--out", "run"]) == 2
    assert "never writes into one" in capsys.readouterr().err


@pytest.fixture(scope="module")
def arith_tok():
    return load_tokenizer(arith_checkpoint("teacher"))


def _served_doctor(app) -> object:
    server = ThreadServer(app)
    try:
        cfg = load_config(None, [f"teacher.server={server.url}", "train.threads=1", "rollout.prompts_per_step=32"])
        return run_doctor(cfg, progress=False)
    finally:
        server.stop()


def test_a_served_teacher_is_compared_with_the_same_model_run_here(arith_tok):
    result = _served_doctor(teacher_app(load_model(arith_checkpoint("teacher")), arith_tok, name="arith-teacher"))
    served = {c.name: c for c in result.checks}["served vs in-process"]
    assert served.passed, served.line()
    assert result.exit_code == 0


def test_a_server_that_fails_the_self_test_is_named_with_the_failing_check(arith_tok):
    # the server holds another model than teacher.model (the student's weights): its scores disagree
    result = _served_doctor(teacher_app(load_model(arith_checkpoint("student")), arith_tok, name="arith-teacher"))
    assert result.exit_code == 1
    verdict = result.verdict()
    assert verdict.startswith("FAIL: the teacher server http://127.0.0.1:") and "served vs in-process" in verdict


def test_projection_fires_the_monitor_rules_on_hand_made_measurements():
    m = MonitorConfig()
    start = {"diag/truncation_rate": 0.1, "diag/length_mean": 4.0, "diag/repetition_rate": 0.0,
             "diag/student_entropy": 0.6, "diag/teacher_entropy": 0.2, "diag/reward_neg_frac": 0.5,
             "diag/teacher_offsupport_frac": 0.0, "grad_norm": 2.0}
    quiet = projected_records(start, teacher_cut_share=0.0, teacher_mean_length=4.5, teacher_repetition=0.0, budget=8,
                              worst_row_grad_ratio=1.5, window=m.window)
    assert len(quiet) == 2 * m.window and quiet[-1]["grad_norm"] == pytest.approx(3.0)
    assert not any(p.fires for p in predict(quiet, m))
    # the teacher's answers do not fit the budget: 80 % of them would be cut → truncation collapse
    cut = projected_records(start, teacher_cut_share=0.8, teacher_mean_length=8.0, teacher_repetition=0.6, budget=8,
                            worst_row_grad_ratio=12.0, window=m.window)
    fired = {p.detector for p in predict(cut, m) if p.fires}
    assert fired == {"length", "repetition", "grad_spike"}
    assert cut[-1]["diag/truncation_rate"] == 0.8 and cut[0]["diag/truncation_rate"] == 0.1
    # an action set to off is not predicted
    off = MonitorConfig(length_action="off")
    assert "length" not in {p.detector for p in predict(cut, off)}


def test_length_stats_and_the_max_new_tokens_rule():
    s = LengthStats(lengths=(3, 4, 5, 9, 12), ended=(True, True, True, True, False), budget=8)
    assert s.cut_share == pytest.approx(2 / 5) and s.eos_rate == pytest.approx(3 / 5)
    assert s.quantile(0.95) == 12 and s.mean == pytest.approx(6.6)
    cfg = load_config(None, [])
    m = Measured(teacher_p95_length=12.0, teacher_cut_share=0.4, student_cut_share=0.0, mean_length=4.0,
                 student_entropy=0.1, teacher_entropy=0.5, offsupport_frac=0.3, overlap_mass=0.95, grad_norm=1.0,
                 grad_spike_predicted=False)
    got = overrides(recommend(cfg, m))
    assert "rollout.max_new_tokens=15" in got  # ⌈1.25 · 12⌉
    assert "support.kind=teacher_topk" in got and "route1.fkl_coef=0.5" in got
    assert not any(o.startswith(("train.lr", "teacher.temperature")) for o in got)
    healthy = Measured(teacher_p95_length=5.0, teacher_cut_share=0.0, student_cut_share=0.0, mean_length=4.0,
                       student_entropy=0.6, teacher_entropy=0.2, offsupport_frac=0.0, overlap_mass=1.0, grad_norm=1.0,
                       grad_spike_predicted=False)
    assert overrides(recommend(cfg, healthy)) == []
    hot = load_config(None, ["teacher.temperature=3.0"])
    assert overrides(recommend(hot, healthy)) == ["teacher.temperature=1"]
