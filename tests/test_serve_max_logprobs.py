"""A vLLM teacher server started as docs/serving.md shows (default ``--max-logprobs 20``) with a
model of a 30-token vocabulary (issue 16.9).

A stand-in speaking vLLM's API (HTTP 400 above ``max_logprobs``, as vLLM answers) scores with a
tiny HF model. A run that needs only the sampled token (``method=thinking-machines``) starts and
finishes: its held-out RKL falls back to the sampled log-ratio instead of asking for all 30
log-probs per token, and no scoring request asks for more than 20. A run whose training needs 30
(``teacher.access=full``, or top-32) stops before step 1 with one line naming ``--max-logprobs 30``;
nothing is written, so no ``--resume`` is offered and no report is attempted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.cli import main as opd_main
from opd.errors import FeedbackUnavailable
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling, generate_rollouts
from opd.tasks.base import Example
from opd.teachers import ModelTeacher
from opd.teachers.served import ServedTeacher
from opd.teachers.served_backends import VLLMBackend
from tests.test_serve_faults import Scripted, _prompt_logprobs, client, ok

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # + pad, bos, eos, unk: V = 30
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from opd.models import build_model, tiny_llama_config
    from opd.tokenization import char_tokenizer

    root = tmp_path_factory.mktemp("v30")
    tok = char_tokenizer(LETTERS)
    assert len(tok) == 30
    model = build_model(tiny_llama_config(30, layers=1, hidden=16, tokenizer=tok), seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": LETTERS[i % 26] + LETTERS[(3 * i) % 26], "answer": LETTERS[(5 * i) % 26]} for i in range(60)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def vllm_server(model, tok, log: list[int]):
    """vLLM's /v1/completions with prompt_logprobs, refusing more than MAX_LOGPROBS like vLLM does;
    ``log`` records every prompt_logprobs asked for (the refused ones as negative numbers)."""
    def handle(method, path, body, n):
        if path == "/v1/models":
            return ok({"data": [{"id": "m"}]})
        if path == "/tokenize":
            return ok({"tokens": tok(body["prompt"]).input_ids})
        k = int(body["prompt_logprobs"])
        if k > MAX_LOGPROBS:
            log.append(-k)
            return 400, json.dumps({"error": {"message": f"Requested prompt logprobs of {k}, which is greater than "
                                              f"max allowed: {MAX_LOGPROBS}"}}).encode(), 0
        log.append(k)
        return ok({"choices": [{"index": i, "prompt_logprobs": _prompt_logprobs(model, seq, k)}
                               for i, seq in enumerate(body["prompt"])]})

    return Scripted(handle)


@pytest.fixture(scope="module")
def served(model_dir):
    tok, model = load_tokenizer(model_dir / "model"), load_model(model_dir / "model")
    log: list[int] = []
    server = vllm_server(model, tok, log)
    yield server, log, tok, model
    server.close()


def _args(model_dir: Path, url: str, run_dir: Path, *extra: str) -> list[str]:
    m = str(model_dir / "model")
    return ["distill", f"student.model={m}", f"teacher.model={m}", f"teacher.server={url}", "teacher.protocol=vllm",
            "data.task=jsonl", f"data.path={model_dir / 'prompts.jsonl'}", "eval.size=8", "eval.batch_size=8",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=3", "eval.max_new_tokens=3", "train.steps=2",
            "train.threads=1", "logging.progress=false", "logging.report=true", f"logging.run_dir={run_dir}", *extra]


def test_a_sampled_token_run_starts_and_asks_only_what_the_server_gives(model_dir, served, tmp_path, capsys):
    server, log, _, _ = served
    log.clear()
    run = tmp_path / "run"
    code = opd_main(_args(model_dir, server.url, run, "method=thinking-machines"))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    refused = [k for k in log if k < 0]
    assert refused == [-30]  # one probe (one tiny sequence) for the evaluation's exact RKL, then never again
    assert all(k <= MAX_LOGPROBS for k in log if k >= 0) and len(log) > 3
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rkl = [r["eval/teacher_rkl"] for r in evals if r["kind"] == "eval"]
    assert len(rkl) == 2 and all(abs(v) < 1e-4 for v in rkl)  # teacher == student: the log-ratio is 0
    assert "FileNotFoundError" not in out.out + out.err and (run / "report.html").is_file()


@pytest.mark.parametrize("extra, what", [
    (("teacher.access=full",), "teacher.access=full needs for training"),
    (("method=thinking-machines", "teacher.access=topk", "teacher.topk=32"),
     "teacher.access=topk with teacher.topk=32 needs for training"),
])
def test_a_run_that_needs_more_stops_before_step_1_naming_the_flag(model_dir, served, tmp_path, capsys, extra, what):
    server, _, _, _ = served
    run = tmp_path / "run"
    code = opd_main(_args(model_dir, server.url, run, *extra))
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2
    assert err[-2] == (f"opd distill: error: the teacher server {server.url} refuses 30 log-probs per token, which "
                       f"{what}: restart it with --max-logprobs 30 (vLLM's default is 20; -1: no limit), or set "
                       + ("teacher.access=sampled" if "full" in what else
                          "teacher.topk (and support.k) at most the server's limit, or teacher.access=sampled"))
    assert "--resume" not in out.out + out.err and "FileNotFoundError" not in out.out + out.err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_served_teacher_feedback_within_the_limit_is_exact(model_dir, served):
    server, log, tok, model = served
    ex = [Example(prompt="ab"), Example(prompt="zq")]
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tok, ex, Sampling(max_new_tokens=3, temperature=1.0))
    teacher = ServedTeacher(VLLMBackend(client(server.url), tok, vocab_size=30), tok, vocab_size=30)
    with pytest.raises(FeedbackUnavailable, match=r"--max-logprobs 30"):
        teacher.score(rollouts, access="full")
    got = teacher.score(rollouts, access="topk", topk=20)
    want = ModelTeacher(model, tok).score(rollouts, access="topk", topk=20)
    torch.testing.assert_close(got.sampled_logprobs_BT, want.sampled_logprobs_BT, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.topk_logprobs_BTK, want.topk_logprobs_BTK, rtol=1e-5, atol=1e-5)
