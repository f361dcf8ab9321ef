"""Bad inputs and faults a user meets, each reproduced as the user meets it (the command line, the
file, the fault injected where it happens), checked for: one line that says what was wrong and how
to fix it, the exit status, and what is (or is not) left on disk (docs/guarantees.md).

Runs use the shipped 2-digit smoke pair."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import opd.sweep  # noqa: F401 — loads opd.sweep.execute
import opd.train as train_module
from opd.checkpoint import list_checkpoints, read_checkpoint
from opd.cli import main as opd_main

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=20", "eval.every=0", "logging.progress=false", "logging.report=false",
    "train.threads=1",
]


def opd(*args: str) -> int:
    return opd_main(list(args))


_BAR = re.compile(r"\|[^|]*\| *\d+/\d+ \[")  # a progress bar (transformers' loading / writing bars when
# transformers was imported before `opd` set HF_HUB_DISABLE_PROGRESS_BARS, as in a test session)


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not progress bars, warnings or the traceback hint (the error itself)."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not _BAR.search(line)
            and not line.startswith(("opd: warning", "opd preflight", "(set OPD_TRACEBACK"))]


def one_error(capsys, expected: str) -> str:
    """The run's stderr holds exactly one error and it contains ``expected``; no traceback. An error is
    one line, or a configuration error's header and its one problem (``invalid configuration (1
    problem):`` then ``  - ...``, the form every config problem takes)."""
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert lines and lines[0].startswith("opd "), lines
    if lines[0].endswith("invalid configuration (1 problem):"):
        assert len(lines) == 2 and lines[1].startswith("  - "), lines
    else:
        assert len(lines) == 1, lines
    assert expected in lines[-1], lines[-1]
    return lines[-1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ 6: no option is ignored
def test_a_python_verifier_on_the_built_in_task_is_refused(tmp_path, capsys):
    run = tmp_path / "x"
    assert opd("distill", "data.verifier=python:nosuchmod:fn", "train.steps=2", f"logging.run_dir={run}") == 2
    line = one_error(capsys, "data.verifier=python:nosuchmod:fn is not used by data.task=arith")
    assert "data.task=jsonl" in line and "remove data.verifier" in line
    assert not run.exists()  # refused before anything was loaded or written


def test_data_options_a_built_in_task_does_not_read_are_warned_on_screen_and_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    assert opd("distill", *SMOKE, "train.steps=1", "data.path=mine.jsonl", "data.prompt_field=question",
               f"logging.run_dir={run}") == 0
    out = capsys.readouterr()
    recorded = json.loads((run / "warnings.json").read_text())
    for key in ("data.path", "data.prompt_field"):
        shown = [w for w in recorded if w.startswith(key)]
        assert len(shown) == 1 and "has no effect" in shown[0] and "data.task=jsonl or hf" in shown[0]
        assert f"opd: warning: {shown[0]}" in out.out + out.err


# ------------------------------------------------------------------------------ 7: a full disk
def _enforce_fail(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4544 vs 4438")


@pytest.mark.parametrize("free, reason", [(0, "no space left on the device (RuntimeError: [enforce fail"),
                                          (10 << 30, "the writer failed (RuntimeError: [enforce fail")])
def test_torch_save_failing_at_a_periodic_checkpoint_ends_like_every_fault(tmp_path, monkeypatch, capsys, free,
                                                                            reason):
    """torch.save raises RuntimeError (not OSError) on a full disk: one line, summary, report, resume
    command; the previous checkpoint intact; no lock left. With room on the device the line says the
    writer failed instead of claiming the disk is full."""
    run = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4
            _enforce_fail()
        return real_save(obj, path, *a, **k)

    real_usage = shutil.disk_usage
    monkeypatch.setattr("opd.checkpoint.torch.save", save)
    monkeypatch.setattr("opd.io.shutil.disk_usage", lambda p: real_usage(p)._replace(free=free))
    assert opd("distill", *SMOKE, "logging.report=true", "train.steps=6", "train.checkpoint_every=2",
               f"logging.run_dir={run}") == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("opd distill: error:")]
    assert len(errors) == 1
    assert f"could not write the checkpoint of step 4 to {run / 'checkpoints' / 'step-000004'}: {reason}" in errors[0]
    assert "the run failed after step 4 of 6" in err
    assert f"continue with: opd distill --resume {run}" in captured.out
    assert f"report: {run / 'report.html'}" in captured.out and (run / "report.html").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resume"] == f"opd distill --resume {run}"
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp
    assert read_checkpoint(run / "checkpoints" / "step-000002").state.step == 2  # intact
    assert not (run / ".lock").exists()


class _FullFile:
    """A text file on a full disk as Python meets it: opening works, a write is buffered, and flushing
    it fails — on ``flush()`` and again on ``close()``."""

    def __init__(self, path, *args, **kwargs):
        self._f = open(path, *args, **kwargs)  # noqa: SIM115

    def fileno(self):
        return self._f.fileno()

    def seek(self, *a):
        return self._f.seek(*a)

    def truncate(self, *a):
        return self._f.truncate(*a)

    def write(self, text):
        return len(text)  # buffered

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._f.close()
        self.flush()


def test_a_disk_full_at_start_names_the_file_and_leaves_no_lock(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr("opd.run_lock.open", _FullFile, raising=False)  # the lock file is the first write
    assert opd("distill", *SMOKE, "train.steps=1", f"logging.run_dir={run}") == 2
    one_error(capsys, f"could not write the run folder's lock (logging.run_dir) to {run / '.lock'}: no space left on "
                      "the device")
    assert not run.exists()  # the folder this run created is gone again, lock and all


def test_a_disk_full_when_the_config_is_written_names_it_and_leaves_no_lock(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("opd.io.os.fsync", fsync)  # config.yaml is the first whole file a run writes
    assert opd("distill", *SMOKE, "train.steps=1", f"logging.run_dir={run}") == 2
    one_error(capsys, f"could not write the configuration to {run / 'config.yaml'}: no space left on the device")
    assert not (run / ".lock").exists() and not (run / "config.yaml").exists()
    assert not list(run.glob("*.tmp"))


def test_atomic_dir_reads_only_the_named_failures_as_failed_writes(tmp_path, monkeypatch):
    from opd.io import WriteError, atomic_dir

    real_usage = shutil.disk_usage
    monkeypatch.setattr("opd.io.shutil.disk_usage", lambda p: real_usage(p)._replace(free=0))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("previous")
    with pytest.raises(WriteError, match=r"could not write the model to .*m: no space left on the device \(RuntimeE"):
        with atomic_dir(tmp_path / "m", what="the model", failures=(RuntimeError,)) as tmp:
            (tmp / "new.txt").write_text("half")
            _enforce_fail()
    with pytest.raises(ValueError, match="a bug"):  # anything else is not a failed write
        with atomic_dir(tmp_path / "m", what="the model", failures=(RuntimeError,)):
            raise ValueError("a bug")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["old.txt"]


def test_the_lock_file_goes_with_the_run_and_the_folder_can_be_taken_again(tmp_path):
    from opd.run_lock import RunFolderError, acquire_run_folder

    run = tmp_path / "run"
    lock = acquire_run_folder(run, resume=False, overwrite=False)
    with pytest.raises(RunFolderError, match="in use by a live opd run"):
        acquire_run_folder(run, resume=False, overwrite=False)
    lock.release()
    assert list(run.iterdir()) == []
    with acquire_run_folder(run, resume=False, overwrite=False):
        assert [p.name for p in run.iterdir()] == [".lock"]
    assert list(run.iterdir()) == []


# ------------------------------------------------------------------------------ MEH cases: config
def test_an_option_named_as_other_trainers_do_points_at_the_opd_option(tmp_path, capsys):
    assert opd("distill", "logging.save_every=50", f"logging.run_dir={tmp_path / 'x'}") == 2
    one_error(capsys, "logging.save_every: unknown key; did you mean train.checkpoint_every (save a resumable "
                      "checkpoint every n steps)?")


def test_an_option_written_as_two_arguments_says_to_write_key_equals_value(tmp_path, capsys):
    assert opd("distill", "train.steps", "3") == 2
    one_error(capsys, "train.steps is an option: write train.steps=3 (one argument, no spaces around '=')")
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  lr: 1.0e-3\n")
    assert opd("distill", str(config), "train.steps", "3") == 2  # after a config file: two overrides
    one_error(capsys, "overrides 'train.steps' '3' are one option written as two arguments: write train.steps=3")
    assert opd("distill", "train.steps=3", "logging.progress") == 2
    one_error(capsys, "override 'logging.progress' is not of the form section.key=value: write logging.progress=VALUE")


def test_a_duplicate_key_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  steps: 3\n  lr: 1.0e-3\n  steps: 50\n")
    assert opd("distill", str(config)) == 2
    one_error(capsys, f"file '{config}' is not valid YAML at line 4, column 3: duplicate key 'steps' (first written "
                      "at line 2)")
    config.write_text("train: {steps: 3}\ntrain: {lr: 0.1}\n")
    assert opd("distill", str(config)) == 2
    one_error(capsys, "duplicate key 'train' (first written at line 1)")


def test_a_duplicate_key_in_a_sweep_spec_is_refused(tmp_path):
    from opd.sweep.spec import SpecError, load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  train.lr: [0.1]\nseeds: 2\nseeds: 3\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line 4, column 1: duplicate key 'seeds' \(first written "
                                         r"at line 3\)"):
        load_spec(spec)


def test_a_verifier_for_a_built_in_task_in_opd_eval_is_refused(capsys):
    assert opd("eval", "builtin:arith/teacher", "--task", "arith", "--verifier", "contains", "--size", "4") == 2
    one_error(capsys, "--verifier contains is not used by the built-in task arith: it scores completions with its "
                      "own verifier; drop --verifier, or pass --prompts FILE to score your own prompts with it")


def test_a_run_folder_that_cannot_be_created_names_the_option(tmp_path, capsys):
    if not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    assert opd("distill", "train.steps=1", "logging.run_dir=/proc/x") == 2
    one_error(capsys, "logging.run_dir=/proc/x: cannot create this folder (/proc does not accept new folders); "
                      "choose another logging.run_dir")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert opd("distill", "train.steps=1", f"logging.run_dir={blocker / 'run'}") == 2
    one_error(capsys, f"logging.run_dir={blocker / 'run'}: cannot create this folder (Not a directory")


# ------------------------------------------------------------------------------ MEH cases: data
def test_a_prompt_that_is_null_is_called_null_not_missing(tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "12+34=", "answer": "46"}] * 20
                       + [{"prompt": None, "answer": "1"}])
    run = tmp_path / "run"
    assert opd("distill", *SMOKE, "data.task=jsonl", f"data.path={data}", "train.steps=1",
               f"logging.run_dir={run}") == 2
    line = one_error(capsys, f"{data}:21: field 'prompt' is null; give it a value, or remove the record")
    assert "missing" not in line
    assert not run.exists()


def test_a_data_path_that_is_a_folder_is_called_a_folder(tmp_path, capsys):
    folder = tmp_path / "prompts"
    folder.mkdir()
    run = tmp_path / "run"
    assert opd("distill", *SMOKE, "data.task=jsonl", f"data.path={folder}", "train.steps=1",
               f"logging.run_dir={run}") == 2
    line = one_error(capsys, f"prompt file '{folder}' is a folder, not a JSONL file")
    assert "data.task=hf" in line and "does not exist" not in line


# ------------------------------------------------------------------------------ MEH cases: served teacher
class _ThreadServer:
    """An ASGI app served by uvicorn in a daemon thread on a free local port."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_the_vllm_protocol_against_an_opd_teacher_server_suggests_protocol_opd(tmp_path, capsys):
    """`opd serve-teacher`'s own app (opd.serve.app) answers 404 on /v1/models; the run stops with one
    line that names the fix."""
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer
    from opd.serve.app import build_app

    path = resolve_model_path("builtin:arith/smoke_teacher")
    server = _ThreadServer(build_app(load_model(path), load_tokenizer(path), name="smoke-teacher"))
    try:
        run = tmp_path / "run"
        args = [*SMOKE, "train.steps=1", f"teacher.server={server.url}", "teacher.server_retries=0",
                f"logging.run_dir={run}"]
        assert opd("distill", *args, "teacher.protocol=vllm") == 2
        line = one_error(capsys, f"teacher server {server.url}/v1/models answered HTTP 404")
        assert line.endswith("if it is `opd serve-teacher`, set teacher.protocol=opd")
        assert opd("distill", *args, "teacher.protocol=opd") == 0  # the fix it names works
    finally:
        server.stop()


def test_the_opd_protocol_against_a_vllm_server_suggests_protocol_vllm(tmp_path, capsys):
    """The other way round: a stand-in for vLLM's OpenAI server (GET /v1/models, 404 elsewhere, as
    FastAPI answers) with the default teacher.protocol=opd."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class VLLMLike(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            found = self.path == "/v1/models"
            body = json.dumps({"data": [{"id": "teacher"}]} if found else {"detail": "Not Found"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), VLLMLike)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert opd("distill", *SMOKE, "train.steps=1", f"teacher.server={url}", "teacher.server_retries=0",
                   f"logging.run_dir={tmp_path / 'run'}") == 2
        line = one_error(capsys, f"teacher server {url}/v1/info answered HTTP 404")
        assert line.endswith("if it is a vLLM (OpenAI-compatible) server, set teacher.protocol=vllm")
    finally:
        httpd.shutdown()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------ MEH cases: interrupts
def test_a_second_ctrl_c_ends_in_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = train_module.train_step

    def step(parts, n):
        if n == 2:  # the user presses Ctrl-C twice during step 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(parts, n)

    monkeypatch.setattr(train_module, "train_step", step)
    assert opd("distill", *SMOKE, "train.steps=4", "train.checkpoint_every=2", f"logging.run_dir={run}") == 130
    monkeypatch.setattr(train_module, "train_step", original)
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    assert "opd: SIGINT received: finishing the current step" in captured.out  # the first Ctrl-C's own line
    assert error_lines(err) == ["opd distill: a second Ctrl-C stopped the run at once, without saving the step in "
                                "progress; what was written before is intact; continue from its last checkpoint "
                                f"(step-000002) with: opd distill --resume {run}"]
    assert not (run / ".lock").exists()
    assert opd("distill", "--resume", str(run)) == 0  # nothing was lost: the command it prints works
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 4


def test_ctrl_c_on_a_sweep_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """The sweep's main thread gets the KeyboardInterrupt while its worker waits on a run (the runs
    themselves get the signal too and save)."""
    execute_module = sys.modules["opd.sweep.execute"]  # the package re-exports a function of that name

    def interrupted_run(run):  # the user's Ctrl-C arrives while the first run is under way
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return False, 0.5, "interrupted"

    monkeypatch.setattr(execute_module, "run_distill", interrupted_run)
    # a terminal's Ctrl-C reaches Python's default handler; a suite started in the background (`cmd &`,
    # nohup) inherits SIGINT ignored, and the signal would never arrive
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  train.lr: [1.0e-4, 3.0e-4]\nseeds: 1\n")
    out = tmp_path / "sweep"
    try:
        code = opd("sweep", str(spec), "--out", str(out), "--no-progress", "--jobs", "1", "train.steps=1")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == [f"opd sweep: interrupted; the finished runs in {out} are kept: run the same command "
                                "again to continue (finished runs are skipped, unfinished ones start again)"]


# ------------------------------------------------------------------------------ MEH cases: sweep arguments
def test_sweep_overrides_may_follow_options(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  train.lr: [1.0e-4, 3.0e-4]\nseeds: 1\n")
    assert opd("sweep", str(spec), "--jobs", "1", "train.steps=7", "--dry-run", "--out", str(tmp_path / "o")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and all("train.steps=7" in line for line in printed)
    with pytest.raises(SystemExit) as exc:  # a real unknown option is still argparse's error
        opd("sweep", str(spec), "--jobs", "1", "--no-such-option", "train.steps=7", "--dry-run")
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_sweep_of_zero_seeds_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  train.lr: [1.0e-4, 3.0e-4]\n")
    assert opd("sweep", str(spec), "--seeds", "0", "--out", str(tmp_path / "o")) == 2
    one_error(capsys, "seeds is a count of seeds and must be at least 1, got 0, which runs nothing; for the seed 0 "
                      "alone write a list")
    assert not (tmp_path / "o").exists()
    assert opd("sweep", str(spec), "--seeds", "0,", "--dry-run", "--out", str(tmp_path / "o")) == 0
    assert capsys.readouterr().out.count("seed=0") == 2  # the list form: seed 0 in both cells


def test_ctrl_c_before_the_run_handles_it_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while models load (before the run installs its own handler) is Python's
    KeyboardInterrupt: one line and status 130, no traceback, no run folder."""
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "check_environment", interrupted)
    run = tmp_path / "run"
    assert opd("distill", *SMOKE, "train.steps=1", f"logging.run_dir={run}") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and error_lines(err) == ["opd distill: interrupted"]
    assert not run.exists()


def test_a_reader_that_leaves_early_is_not_an_error():
    """`opd methods | head -1`: the pipe closes (here at once, `| true`) before opd is done writing; no error line, status 0."""
    import subprocess

    proc = subprocess.run(f"{sys.executable} -m opd.cli methods | true; echo \"${{PIPESTATUS[0]}}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "0", proc
    assert "Broken pipe" not in proc.stderr and "error" not in proc.stderr, proc.stderr
