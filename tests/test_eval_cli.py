"""``opd eval``: a whole prompt file is a held-out set, scored exactly as the training run scores its
evaluations (same accuracy on the same model and prompts), with the run's settings as defaults;
EOS is cut before a completion is compared; bad input ends in one line naming file, line and field.

Models: the shipped 2-digit smoke pair (through JSONL files of its own task) and a hand-built
bigram model whose greedy answer is known in advance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd.cli import build_parser
from opd.cli import main as opd_main
from opd.metrics_log import read_metrics

SMOKE_PAIR = ["student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _arith_rows(n: int, *, seed: int, train: bool) -> list[dict]:
    """2-digit problems of the smoke pair's task, under user field names."""
    from opd.tasks.arith import ArithTask

    task = ArithTask(digits=2, eval_size=n if not train else 16, seed=seed)
    examples = task.train_examples(0, n, 0) if train else task.eval_examples(n)
    return [{"question": e.prompt, "solution": e.answer} for e in examples]


def _eval(args: list[str], tmp_path: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    assert opd_main(["eval", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run on the smoke pair with a user prompt file and a 400-row held-out file, non-default
    field names and rollout.max_new_tokens=5 (so defaults can only come from the run's config)."""
    root = tmp_path_factory.mktemp("evalrun")
    train = _write_jsonl(root / "train.jsonl", _arith_rows(200, seed=3, train=True))
    heldout = _write_jsonl(root / "heldout.jsonl", _arith_rows(400, seed=3, train=False))
    run_dir = root / "run"
    threads = torch.get_num_threads()
    try:
        assert opd_main(["distill", *SMOKE_PAIR, "data.task=jsonl", f"data.path={train}", f"data.eval_path={heldout}",
                         "data.prompt_field=question", "data.answer_field=solution", "rollout.max_new_tokens=5",
                         "rollout.prompts_per_step=8", "train.steps=2", "eval.every=0", "train.threads=1",
                         "logging.progress=false", "logging.report=false", f"logging.run_dir={run_dir}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir, heldout


def test_opd_eval_gives_the_training_evals_accuracy(run, tmp_path, capsys):
    run_dir, heldout = run
    after = read_metrics(run_dir, "eval")[-1]
    teacher = read_metrics(run_dir, "eval_teacher")[-1]
    assert after["eval/n"] == 400 and 0.1 < after["eval/accuracy"] < 0.95  # a number that can disagree
    data, out = _eval([str(run_dir / "final"), "builtin:arith/smoke_teacher", "--prompts", str(heldout)],
                      tmp_path, capsys)
    student, smoke_teacher = data["results"]
    assert student["eval/accuracy"] == after["eval/accuracy"]
    assert student["eval/mean_length"] == after["eval/mean_length"]
    assert student["eval/truncation_rate"] == after["eval/truncation_rate"]
    assert smoke_teacher["eval/accuracy"] == teacher["teacher/accuracy"] > 0.9
    assert student["eval/n"] == smoke_teacher["eval/n"] == 400  # every row of the 400-line file
    assert "all 400 rows" in out and f"defaults from {run_dir / 'config.yaml'}" in out
    # the run folder itself, without --prompts: the run's own held-out set, the same numbers
    data, _ = _eval([str(run_dir)], tmp_path, capsys)
    assert data["results"][0]["eval/accuracy"] == after["eval/accuracy"]
    assert data["results"][0]["path"] == str(run_dir / "final")


def test_the_runs_settings_are_the_defaults_and_options_win(run, tmp_path, capsys):
    run_dir, heldout = run
    data, out = _eval([str(run_dir / "final"), "--prompts", str(heldout)], tmp_path, capsys)
    s = data["settings"]
    assert (s["prompt_field"], s["answer_field"], s["max_new_tokens"], s["size"]) == ("question", "solution", 5, None)
    assert "max_new_tokens 5" in out
    data, out = _eval([str(run_dir / "final"), "--prompts", str(heldout), "--max-new-tokens", "1", "--size", "400"],
                      tmp_path, capsys)
    r = data["results"][0]
    assert data["settings"]["max_new_tokens"] == 1 and "the first 400 rows" in out
    assert r["eval/truncation_rate"] == 1.0 and r["eval/accuracy"] == 0.0  # no room for answer + EOS
    # a second run trained differently: its model is scored with the same settings, and the output says so
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    config = (other / "config.yaml").read_text()
    assert "max_new_tokens: 5" in config
    (other / "config.yaml").write_text(config.replace("max_new_tokens: 5", "max_new_tokens: 7", 1))
    data, out = _eval([str(run_dir / "final"), str(other / "final"), "--prompts", str(heldout), "--size", "20"],
                      tmp_path, capsys)
    assert data["settings"]["max_new_tokens"] == 5
    assert f"note: {other} was trained with max_new_tokens=7; every model here is scored with" in out
    # a model outside the run, with --run: the run's settings apply to it too
    data, _ = _eval(["builtin:arith/smoke_teacher", "--run", str(run_dir), "--size", "50"], tmp_path, capsys)
    assert data["settings"]["max_new_tokens"] == 5 and data["results"][0]["eval/n"] == 50


def test_help_shows_every_default():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "eval" in a.choices)
    text = sub.choices["eval"].format_help()
    for option, default in [("--prompts", "the run's held-out set"), ("--prompt-field", "else prompt"),
                            ("--answer-field", "else answer"), ("--verifier", "else auto"),
                            ("--max-new-tokens", "rollout.max_new_tokens; without a run: from the data"),
                            ("--size", "every row of"),
                            ("--batch-size", "else 500"), ("--samples", "default: 0")]:
        assert option in text and default in " ".join(text.split()), option
    assert "(default: None)" not in text


def _bigram_model(root: Path, answer: str = "x") -> Path:
    """A Llama whose greedy continuation of ``=`` is ``answer`` then EOS ``</s>``, whatever the prompt:
    one-hot embeddings, blocks whose outputs are zeroed (the residual stream is the current token),
    and an output matrix that maps each token to its successor."""
    from opd.models import build_model, tiny_llama_config
    from opd.tokenization import char_tokenizer

    tok = char_tokenizer("abcx=", eos="</s>")
    vocab = len(tok)
    config = tiny_llama_config(vocab, layers=1, hidden=16, tokenizer=tok)
    config.tie_word_embeddings = False
    model = build_model(config, seed=0)
    nxt = {i: tok.convert_tokens_to_ids("a") for i in range(vocab)}
    nxt[tok.convert_tokens_to_ids("=")] = tok.convert_tokens_to_ids(answer)
    nxt[tok.convert_tokens_to_ids(answer)] = tok.eos_token_id
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.get_input_embeddings().weight.copy_(torch.eye(vocab, 16))
        head = torch.zeros(vocab, 16)
        for i, j in nxt.items():
            head[j, i] = 1.0
        model.get_output_embeddings().weight.copy_(head)
    out = root / "bigram"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_completions_are_cut_at_eos_before_they_are_compared(tmp_path, capsys):
    model = _bigram_model(tmp_path)
    letters = "abc"
    prompts = [letters[i % 3] + letters[(i // 3) % 3] + "=" for i in range(400)]
    right = _write_jsonl(tmp_path / "right.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": p, "answer": "a"} for p in prompts])
    data, out = _eval([str(model), "--prompts", str(right), "--samples", "2"], tmp_path, capsys)
    r = data["results"][0]
    assert (r["eval/accuracy"], r["eval/n"], r["eval/mean_length"]) == (1.0, 400, 2.0)  # "x</s>": x, then EOS
    assert r["samples"][0]["completion"] == "x</s>" and r["samples"][0]["score"] == 1.0
    assert "EOS '</s>'" in out and "✓ 'aa=' → 'x</s>'" in out
    data, _ = _eval([str(model), "--prompts", str(wrong)], tmp_path, capsys)
    assert data["results"][0]["eval/accuracy"] == 0.0
    # contains: no answer bounds the length, so without a run it must be given (tests/test_eval_length.py)
    data, _ = _eval([str(model), "--prompts", str(right), "--verifier", "contains", "--max-new-tokens", "8"],
                    tmp_path, capsys)
    assert data["results"][0]["eval/accuracy"] == 1.0


def _error(args: list[str], capsys) -> str:
    assert opd_main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("(set OPD_TRACEBACK=1"), err
    return err[0]


def test_bad_input_ends_in_one_line_naming_file_line_and_field(run, tmp_path, capsys):
    run_dir, heldout = run
    final = str(run_dir / "final")
    assert "--prompts nope.jsonl: no such file" in _error([final, "--prompts", "nope.jsonl"], capsys)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "12+34=", "solution": "64"}, {"q": "1"}])
    line = _error([final, "--prompts", str(bad)], capsys)
    assert f"{bad}:2: missing field 'question'" in line and "--prompt-field" in line
    line = _error(["builtin:arith/smoke_student", "--prompts", str(bad)], capsys)  # no run: field 'prompt'
    assert f"{bad}:1: missing field 'prompt'" in line
    no_answers = _write_jsonl(tmp_path / "noans.jsonl", [{"question": "12+34="}])
    line = _error([final, "--prompts", str(no_answers)], capsys)
    assert f"{no_answers}:1: missing field 'solution'" in line and "--answer-field" in line
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"question": "12+34=", "solution": "64"}\n{"question": \n', encoding="utf-8")
    assert f"{torn}:2: invalid JSON" in _error([final, "--prompts", str(torn)], capsys)
    assert "--size 401, but" in _error([final, "--prompts", str(heldout), "--size", "401"], capsys)
    assert "holds no 'finl'" in _error([str(run_dir / "finl")], capsys)
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (empty_run / "metrics.jsonl").write_text("")
    assert "holds no final/ model and no checkpoint" in _error([str(empty_run)], capsys)
