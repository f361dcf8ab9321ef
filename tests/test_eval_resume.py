"""Evaluation across a served-teacher failure and a resume (issue 16.10).

* A served teacher gets a row: nothing here can sample it, so it is scored on the reference answers
  (:func:`opd.evaluate.evaluate_teacher_forced`) — checked against greedy decoding of the same model,
  row by row (for ``arith`` the two are the same number).
* A teacher server that dies *in* the held-out evaluation due at step 2: the resumed run redoes that
  evaluation (with the numbers an uninterrupted run logs there), its final table shows the teacher,
  "student before" and "student after" and the failure, and so does its report.
"""

from __future__ import annotations

import json

import pytest
import torch

from opd.evaluate import evaluate, evaluate_teacher_forced
from opd.models import load_model
from opd.rollout import Sampling, generate_rollouts
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.teachers import ModelTeacher
# fixtures (smoke_teacher is the one teacher_server builds on) and helpers of the served-teacher fault tests
from tests.test_serve_faults import FaultProxy, _distill, smoke_teacher, teacher_server, tok  # noqa: F401


@pytest.mark.parametrize("name", ["smoke_teacher", "smoke_student"])
def test_teacher_forced_accuracy_is_greedy_accuracy(tok, name):  # noqa: F811
    model = load_model(arith_checkpoint(name))
    task = ArithTask(digits=2, eval_size=500, seed=0)
    examples = task.eval_examples(64)
    forced = evaluate_teacher_forced(ModelTeacher(model, tok), tok, examples, max_new_tokens=6, batch_size=24)
    # naive reference: decode greedily and compare each completion with answer + EOS
    rollouts = generate_rollouts(model, tok, examples, Sampling(max_new_tokens=6, greedy=True))
    rows = [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=False)
            for ids, m in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT)]
    same = [text == ex.answer + "$" for text, ex in zip(rows, examples)]
    assert forced.accuracy == sum(same) / len(same)
    assert forced.accuracy == evaluate(model, tok, task, examples, max_new_tokens=6).accuracy
    lengths = [len(ex.answer) + 1 for ex, s in zip(examples, same) if s]
    assert forced.mean_length == pytest.approx(sum(lengths) / len(lengths))
    assert forced.decoding == "teacher-forced" and forced.n == 64
    assert 0.3 < forced.accuracy if name == "smoke_student" else forced.accuracy > 0.95


def test_no_reference_answers_no_teacher_row(tok):  # noqa: F811
    from opd.tasks.base import Example

    model = load_model(arith_checkpoint("smoke_teacher"))
    assert evaluate_teacher_forced(ModelTeacher(model, tok), tok, [Example(prompt="12+34=")], max_new_tokens=4) is None


def _args(url, run_dir, report):
    return ["student.model=builtin:arith/smoke_student", f"teacher.server={url}", "data.digits=2", "train.steps=4",
            "rollout.prompts_per_step=8", "eval.size=16", "eval.batch_size=16", "eval.every=2", "train.threads=1",
            "train.checkpoint_every=1", "teacher.server_retries=1", "teacher.server_timeout=2",
            "logging.progress=false", f"logging.report={str(report).lower()}", "monitor.warmup_steps=0",
            f"logging.run_dir={run_dir}"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_resumed_run_redoes_the_due_evaluation_and_shows_the_failure(teacher_server, tmp_path, capsys):  # noqa: F811
    torch.manual_seed(0)
    # /v1/score requests: 1 student eval (step 0), 2 teacher eval, 3 step 1, 4 step 2, 5 the eval due at step 2
    proxy = FaultProxy(teacher_server.url, "http500", fault_from=5)
    url = proxy.start()
    run = tmp_path / "run"
    code, out = _distill(_args(url, run, report=False), capsys)
    assert code == 2, out
    assert "teacher (forced)" in out and "answered HTTP 500: boom" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 2
    assert not [r for r in _records(run) if r["kind"] == "eval" and r["step"] == 2]  # the due evaluation failed
    proxy.active = False  # the server is back
    code, out = _distill(["--resume", str(run)], capsys)
    assert code == 0, out
    records = _records(run)
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [0, 2, 4]  # step 2's evaluation was redone on resume
    table = out[out.index("model "):]
    for row in ("teacher (forced)", "student before", "student after"):
        assert f"\n{row}" in table, out
    assert "resumed after a failure at step 2: teacher server" in out and "HTTP 500: boom" in out
    teacher = next(r for r in records if r["kind"] == "eval_teacher")
    assert teacher["decoding"] == "teacher-forced" and teacher["teacher/accuracy"] > 0.9
    # the report says so
    from opd.report import write_report

    _, md = write_report([run])
    text = md.read_text()
    assert "This run failed 1 time and was resumed from its last checkpoint (at step 2: teacher server" in text
    assert "teacher-forced" in text
    # the redone evaluation has the numbers an uninterrupted run logs at step 2
    ref = tmp_path / "ref"
    code, out = _distill(_args(teacher_server.url, ref, report=False), capsys)
    assert code == 0, out
    want = {r["step"]: r for r in _records(ref) if r["kind"] == "eval"}
    for key in ("eval/accuracy", "eval/mean_length", "eval/teacher_rkl"):
        assert evals[2][key] == pytest.approx(want[2][key], rel=1e-6, abs=1e-9), key
    proxy.server.stop()


def test_a_fault_in_the_first_evaluation_writes_a_report_not_a_file_error(teacher_server, tmp_path,  # noqa: F811
                                                                         capsys):
    """The server fails the very first request (the held-out evaluation before step 1): the run stops
    with the one-line error, its report is written (metrics.jsonl holds the failure) — never a
    FileNotFoundError about metrics.jsonl — and the resume redoes that evaluation."""
    proxy = FaultProxy(teacher_server.url, "http500", fault_from=1)
    url = proxy.start()
    run = tmp_path / "run"
    code, out = _distill(_args(url, run, report=True), capsys)
    assert code == 2, out
    assert "FileNotFoundError" not in out and "could not write the report" not in out
    assert (run / "report.md").is_file() and "answered HTTP 500: boom" in (run / "report.md").read_text()
    proxy.active = False
    code, out = _distill(["--resume", str(run)], capsys)
    assert code == 0, out
    assert "\nstudent before" in out and "resumed after a failure at step 0" in out
    assert sorted(r["step"] for r in _records(run) if r["kind"] == "eval") == [0, 2, 4]
    proxy.server.stop()
