"""End-to-end `opd distill`: every preset runs, resume is exact, user models and prompt files work
through the CLI, data parallelism equals the single-process step, bad inputs fail clearly.

All runs use the shipped 2-digit smoke pair (`builtin:arith/smoke_*`) or models built here."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd.cli import main as opd_main
from opd.config.presets import PRESETS
from opd.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=20", "eval.every=0", "logging.progress=false", "logging.report=false",
    "train.threads=1",
]


def run_cli(args: list[str]) -> int:
    return opd_main(["distill", *args])


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_runs_a_few_steps(method, tmp_path):
    run = tmp_path / method
    overrides = [f"method={method}", *SMOKE, "train.steps=2", f"logging.run_dir={run}"]
    if method == "opsd":  # the smoke student never saw hints; only the mechanics are tested here
        overrides.append("rollout.prompts_per_step=8")
    assert run_cli(overrides) == 0
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert math.isfinite(record["loss"])
        # teacher_kl over the student's own samples, offpolicy_logratio over teacher samples / answers
        shown = [k for k in ("teacher_kl", "offpolicy_logratio") if k in record]
        assert shown and all(math.isfinite(record[k]) for k in shown)
    evals = read_metrics(run, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert (run / "final" / "config.json").is_file()  # save_pretrained: any HF tool loads it
    assert (run / "config.yaml").is_file()


def _train_records(run: Path) -> list[dict]:
    drop = {"time", "seconds", "tokens_per_s"}  # wall-clock fields differ between runs
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run, "train")]


def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path):
    common = [*SMOKE, "method=thinking-machines", "route2.is_correction=ppo_clip", "train.steps=6",
              "train.schedule=cosine", "train.warmup_steps=2", "rollout.samples_per_prompt=2",
              "route2.baseline=group_mean"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli([*common, f"logging.run_dir={full}"]) == 0
    assert run_cli([*common, f"logging.run_dir={part}", "train.stop_after=3"]) == 0
    assert [r["step"] for r in read_metrics(part, "train")] == [1, 2, 3]
    assert not (part / "final").exists()
    assert opd_main(["distill", "--resume", str(part)]) == 0
    assert _train_records(part) == _train_records(full)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli([*SMOKE, "train.steps=1", f"logging.run_dir={run}"]) == 0
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    assert opd_main(["distill", "--resume", str(run)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _make_user_pair(root: Path, vocab_mismatch: bool = False) -> tuple[Path, Path]:
    from opd.models import build_model, tiny_llama_config
    from opd.tokenization import char_tokenizer

    alphabet = "abcdefgh=|"
    tok = char_tokenizer(alphabet)
    teacher_tok = char_tokenizer(alphabet + ("xyz" if vocab_mismatch else ""))
    student = build_model(tiny_llama_config(len(tok), layers=1, hidden=16, tokenizer=tok), seed=0)
    teacher = build_model(tiny_llama_config(len(teacher_tok), layers=1, hidden=32, tokenizer=teacher_tok), seed=1)
    s_dir, t_dir = root / "student", root / "teacher"
    student.save_pretrained(s_dir)
    tok.save_pretrained(s_dir)
    teacher.save_pretrained(t_dir)
    teacher_tok.save_pretrained(t_dir)
    return s_dir, t_dir


def test_user_models_and_jsonl_prompts_through_the_cli(tmp_path):
    s_dir, t_dir = _make_user_pair(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    letters = "abcdefgh"
    with prompts.open("w") as f:
        for i in range(60):
            p = letters[i % 8] + letters[(i * 3) % 8] + "="
            f.write(json.dumps({"question": p, "solution": p[0] * 2, "hint": p[1] + "|"}) + "\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "opd.cli", "distill", f"student.model={s_dir}", f"teacher.model={t_dir}",
           "data.task=jsonl", f"data.path={prompts}", "data.prompt_field=question", "data.answer_field=solution",
           "data.context_field=hint", "teacher.use_context=true", "rollout.max_new_tokens=4",
           "rollout.prompts_per_step=8", "train.steps=3", "eval.size=6", "eval.every=0", "logging.progress=false",
           "logging.report=false", f"logging.run_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student after" in proc.stdout
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]


def test_tokenizer_mismatch_stops_before_training(tmp_path, capsys):
    s_dir, t_dir = _make_user_pair(tmp_path, vocab_mismatch=True)
    code = run_cli([*SMOKE, f"student.model={s_dir}", f"teacher.model={t_dir}", "data.task=arith",
                    f"logging.run_dir={tmp_path / 'run'}", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "vocab" in err.lower()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("route2.gama=0.9", "did you mean route2.gamma"),
    ("train.lr=fast", "train.lr"),
    ("route1.beta=1.5", "route1.beta"),
    ("method=nope", "nope"),
])
def test_bad_configs_fail_with_the_promised_message(override, message, capsys):
    assert run_cli([*SMOKE, override]) == 2
    assert message in capsys.readouterr().err


def test_incompatible_combination_is_rejected(capsys):
    assert run_cli([*SMOKE, "routing.kind=cr_opd", "route2.coef=1", "teacher.access=sampled"]) == 2
    assert "cr_opd" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo-on-CPU launch below is for machines without GPUs")
def test_data_parallel_step_equals_single_process_step(tmp_path):
    """accelerate launch, 2 gloo processes, one step on the same global batch: equal gradients."""
    script = ROOT / "tests" / "helpers" / "ddp_step.py"
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    env_cmd = [sys.executable, str(script), str(single)]
    subprocess.run(env_cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    launch = shutil.which("accelerate")
    assert launch is not None, "the accelerate command is missing: pip install accelerate"
    # `--cpu --num_processes 2` starts one process in accelerate 1.x; on a machine without GPUs
    # `--multi_gpu` starts torch.distributed with the gloo backend on CPU (DistributedType.MULTI_CPU)
    proc = subprocess.run([launch, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(multi)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["wrapper"] == "DistributedDataParallel"  # accelerate's prepare did the averaging, not opd
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert max(g.abs().max() for g in a["grads"].values()) > 1e-3  # a real gradient, not zeros


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo-on-CPU launch below is for machines without GPUs")
def test_the_readme_multi_process_command_runs_one_data_parallel_run(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m opd.cli distill` on a machine without GPUs:
    two gloo processes share one run (one folder, one log), not two independent runs."""
    run = tmp_path / "run"
    launch = shutil.which("accelerate")
    assert launch is not None, "the accelerate command is missing: pip install accelerate"
    proc = subprocess.run([launch, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "opd.cli", "distill", *SMOKE,
                           "train.steps=2", f"logging.run_dir={run}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]  # written once, by the main process
    assert proc.stdout.count("student after") == 1


def test_only_the_first_process_prints_the_summary(tmp_path, capsys, monkeypatch):
    """Under `accelerate launch` every process returns from the run; rank 0 alone prints the table."""
    for rank, expect in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert run_cli([*SMOKE, "train.steps=1", f"logging.run_dir={tmp_path / rank}"]) == 0
        assert ("student after" in capsys.readouterr().out) is expect
