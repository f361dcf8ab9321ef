"""What opd guarantees when inputs are bad or things go wrong (docs/guarantees.md), each with the
fault injected: run folders that cannot be mixed, interrupts that save and resume exactly, checks
before anything is written, faults during a run caught with one line, torn files survived.

All runs use the shipped 2-digit smoke pair."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import opd.step as step_module
import opd.train as train_module
from opd.cli import main as opd_main
from opd.config import load_config
from opd.run_lock import acquire_run_folder
from opd.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=20", "eval.every=0", "logging.progress=false", "logging.report=false",
    "train.threads=1",
]
RESUMABLE = [*SMOKE, "method=thinking-machines", "train.steps=6", "train.schedule=cosine", "train.warmup_steps=2",
             "rollout.samples_per_prompt=2", "route2.baseline=group_mean"]


def distill(*args: str) -> int:
    return opd_main(["distill", *args])


def train_records(run: Path) -> list[dict]:
    drop = {"time", "seconds", "tokens_per_s"}  # wall-clock fields differ between runs
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run, "train")]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = final_weights(a), final_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    assert distill(*RESUMABLE, f"logging.run_dir={run}") == 0
    return run


# ------------------------------------------------------------------------------ run folders
def test_a_finished_run_folder_is_refused_then_overwritten_on_request(tmp_path, capsys):
    run = tmp_path / "run"
    assert distill(*SMOKE, "train.steps=1", f"logging.run_dir={run}") == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert distill(*SMOKE, "train.steps=2", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"opd distill --resume {run}" in err and "logging.overwrite=true" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the first run was touched
    assert distill(*SMOKE, "train.steps=2", f"logging.run_dir={run}", "logging.overwrite=true") == 0
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]  # the old records are gone


def test_a_live_run_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    with acquire_run_folder(run, resume=False, overwrite=False):  # another live run holds the lock
        assert distill(*SMOKE, "train.steps=1", f"logging.run_dir={run}") == 2
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    err = capsys.readouterr().err
    assert "in use by a live opd run" in err and f"pid {os.getpid()}" in err
    assert list(run.iterdir()) == []  # the holder's lock file went with it


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    """Two real processes: the first holds the folder while it runs, the second is refused."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from opd.run_lock import "
         "acquire_run_folder as a; lock = a(Path(sys.argv[1]), resume=False, overwrite=False); print('held', "
         "flush=True); time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "opd.cli", "distill", *SMOKE, "train.steps=1",
                               f"logging.run_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert f"in use by a live opd run (pid {holder.pid}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the error line and the OPD_TRACEBACK hint


@pytest.mark.parametrize("override, message", [
    ("student.model=/nonexistent/student", "/nonexistent/student"),
    ("data.task=jsonl", "bad.jsonl"),
    ("train.device=cuda", "train.device=cuda"),
    ("train.precision=fp16", "train.precision=fp16"),
])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, capsys, override, message):
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: train.device=cuda is valid here")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "12+34=", "answer": "46"}\n{"prompt": "oops\n')
    extra = [f"data.path={bad}"] if override == "data.task=jsonl" else []
    run = tmp_path / "run"
    assert distill(*SMOKE, override, *extra, "train.steps=1", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()


def test_prompts_longer_than_the_context_are_refused_before_training(tmp_path, capsys):
    from opd.models import build_model, tiny_llama_config
    from opd.tokenization import char_tokenizer

    tok = char_tokenizer("abcdefgh=|")
    model = build_model(tiny_llama_config(len(tok), layers=1, hidden=32, heads=1, max_positions=16, tokenizer=tok),
                        seed=0)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": a + b + "=", "answer": a} for a in "abcdef" for b in "abcde"]  # 30 short prompts
    rows.append({"prompt": "abcdefgh" * 2 + "=", "answer": "a"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"student.model={folder}", f"teacher.model={folder}", "data.task=jsonl", f"data.path={prompts}",
              "eval.size=4", "logging.progress=false", "logging.report=false", "train.steps=1"]
    run = tmp_path / "run"
    assert distill(*common, "rollout.max_new_tokens=2", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl:31" in err and "18 tokens" in err and "at most 16" in err and not run.exists()
    # the prompts fit, the completion budget does not
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    assert distill(*common, "rollout.max_new_tokens=14", f"logging.run_dir={run}") == 2
    assert "rollout.max_new_tokens" in capsys.readouterr().err and not run.exists()


def test_missing_optional_packages_are_named_with_their_install_line(tmp_path, capsys, monkeypatch):
    import opd.preflight as preflight

    monkeypatch.setattr(preflight, "_has_module", lambda name: name not in ("tensorboard", "datasets"))
    assert distill(*SMOKE, "logging.tensorboard=true", f"logging.run_dir={tmp_path / 'a'}") == 2
    err = capsys.readouterr().err
    assert 'logging.tensorboard=true needs the package \'tensorboard\'' in err and 'pip install "opd[logging]"' in err
    assert distill(*SMOKE, "data.task=hf", "data.path=some/dataset", f"logging.run_dir={tmp_path / 'b'}") == 2
    assert 'pip install "opd[hub]"' in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_options_without_effect_are_warned_at_start_and_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    assert distill(*SMOKE, "train.steps=1", "route2.gamma=0.9", f"logging.run_dir={run}") == 0
    out = capsys.readouterr()
    assert "warning: route2.gamma" in out.out + out.err
    recorded = json.loads((run / "warnings.json").read_text())
    assert any(w.startswith("route2.gamma") and "no effect" in w for w in recorded)


# ------------------------------------------------------------------------------ interrupts
def test_an_interrupt_with_default_settings_saves_and_resumes_exactly(tmp_path, uninterrupted, monkeypatch, capsys):
    """No periodic checkpoint: Ctrl-C during step 3 finishes that step, checkpoints it, and
    `--resume` continues to the same metrics and weights as the uninterrupted run."""
    run = tmp_path / "run"
    original = train_module.train_step

    def step(parts, n):
        if n == 2:  # the signal arrives while step 3 (index 2) is running
            os.kill(os.getpid(), signal.SIGINT)
        return original(parts, n)

    monkeypatch.setattr(train_module, "train_step", step)
    assert distill(*RESUMABLE, f"logging.run_dir={run}") == 128 + signal.SIGINT
    monkeypatch.setattr(train_module, "train_step", original)
    out = capsys.readouterr().out
    assert f"continue with: opd distill --resume {run}" in out and "interrupted after step 3 of 6" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["steps_done"] == 3
    assert (run / "checkpoints" / "step-000003" / "trainer_state.pt").is_file() and not (run / "final").exists()
    assert distill("--resume", str(run)) == 0
    assert train_records(run) == train_records(uninterrupted)
    assert same_weights(run, uninterrupted)
    assert json.loads((run / "summary.json").read_text())["status"] == "done"


def test_sigterm_to_a_real_process_saves_and_resumes_exactly(tmp_path, uninterrupted):
    """A real SIGTERM (what a scheduler sends) to a running `opd distill` process."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "helpers" / "slow_distill.py"), *RESUMABLE, f"logging.run_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        if log.exists() and log.read_text().count('"train"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"continue with: opd distill --resume {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    done = summary["steps_done"]
    assert 2 <= done < 6 and (run / "checkpoints" / f"step-{done:06d}").is_dir()
    assert distill("--resume", str(run)) == 0
    assert train_records(run) == train_records(uninterrupted) and same_weights(run, uninterrupted)


def test_stop_request_second_ctrl_c_aborts_at_once():
    from opd.interrupts import StopRequest

    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN when started in the background
    with StopRequest(echo=None) as stop:
        assert signal.getsignal(signal.SIGINT) is not before
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ------------------------------------------------------------------------------ faults during a run
def test_non_finite_weights_after_an_update_stop_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflow(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second update overflows
            with torch.no_grad():
                self.param_groups[0]["params"][1].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflow)
    assert distill(*SMOKE, "train.steps=5", "train.checkpoint_every=1", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert "weights are not finite after the update of step 2" in err and "lower train.lr" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000001"]  # the good step is kept, the broken weights were never saved


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            _enospc()
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr("opd.checkpoint.torch.save", save)
    assert distill(*SMOKE, "train.steps=6", "train.checkpoint_every=2", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert f"could not write the checkpoint of step 4 to {run / 'checkpoints' / 'step-000004'}" in err
    assert "no space left on the device" in err and "Traceback" not in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000002"]  # no half-written step-000004(.tmp)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resume"] == f"opd distill --resume {run}"


def test_a_full_disk_at_the_final_save_leaves_no_torn_model(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", _enospc)
    assert distill(*SMOKE, "train.steps=2", f"logging.run_dir={run}") == 2
    err = capsys.readouterr().err
    assert f"could not write the final model to {run / 'final'}" in err
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_a_server_fault_checkpoints_the_completed_steps_and_resumes(tmp_path, uninterrupted, monkeypatch, capsys):
    """A RunFault while a step prepares its batch (a teacher server down) keeps every completed
    step; --resume continues exactly."""
    from opd.errors import ServiceError

    run = tmp_path / "run"
    original = step_module.prepare_batch

    def flaky(parts, n):
        if n == 4:
            raise ServiceError("teacher server http://localhost:1 did not answer after 3 tries (connection refused)")
        return original(parts, n)

    monkeypatch.setattr(step_module, "prepare_batch", flaky)
    assert distill(*RESUMABLE, f"logging.run_dir={run}") == 2
    monkeypatch.setattr(step_module, "prepare_batch", original)
    err = capsys.readouterr()
    assert "http://localhost:1 did not answer" in err.err and "the run failed after step 4 of 6" in err.err
    assert f"continue with: opd distill --resume {run}" in err.out
    assert distill("--resume", str(run)) == 0
    assert train_records(run) == train_records(uninterrupted) and same_weights(run, uninterrupted)


# ------------------------------------------------------------------------------ torn files
def test_resume_survives_a_torn_log_line_and_a_damaged_checkpoint(tmp_path, uninterrupted, capsys):
    run = tmp_path / "run"
    assert distill(*RESUMABLE, "train.checkpoint_every=2", "train.stop_after=4", f"logging.run_dir={run}") == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a kill while writing
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert distill("--resume", str(run)) == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert f"{state} is damaged" in said and "step-000002 (step 2)" in said and "torn last line" in said
    assert train_records(run) == train_records(uninterrupted) and same_weights(run, uninterrupted)


def test_damage_inside_the_log_is_named_not_ignored(tmp_path, capsys):
    run = tmp_path / "run"
    assert distill(*SMOKE, "train.steps=3", "train.stop_after=2", f"logging.run_dir={run}") == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert distill("--resume", str(run)) == 2
    assert f"{run / 'metrics.jsonl'}, line 2, is damaged" in capsys.readouterr().err


def test_every_whole_file_is_written_atomically(tmp_path):
    """No temporary files are left and every file a run writes whole parses."""
    run = tmp_path / "run"
    assert distill(*SMOKE, "train.steps=2", "train.checkpoint_every=1", "logging.report=true",
                   f"logging.run_dir={run}") == 0
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    for name in ("summary.json", "run_info.json", "warnings.json"):
        json.loads((run / name).read_text())
    assert load_config(str(run / "config.yaml")).train.steps == 2
