"""The opd teacher server (`opd serve-teacher`) and its protocol.

* the wire format round-trips and rejects malformed arrays;
* what the server computes equals a naive per-sequence forward (sampled, top-k, caller-chosen ids,
  temperature), whatever the batch's padding;
* concurrent requests are merged into fewer forward passes and each caller gets its own rows;
* over HTTP, a ServedTeacher's feedback equals the in-process ModelTeacher's on the same rollouts
  (every access level, temperature 1 and 0.7, with the teacher-only context), fp32 and fp16 wire;
  the student-top-k scoring equals the in-process log-probs at those ids;
* several served teachers work with routing by prompt field (teacher.routes with URLs);
* the tokenizer check refuses a server whose tokenizer differs; a malformed request is answered
  HTTP 400 and is not retried;
* the `opd serve-teacher` command starts a real server process.

Servers run in a thread of the test process (uvicorn) on a free local port, except the command test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from opd.models import build_model, load_model, load_tokenizer, tiny_llama_config
from opd.rollout import Sampling, generate_rollouts
from opd.serve.batcher import Batcher
from opd.serve.client import ServiceClient, ServiceRejected
from opd.serve.payload import BadAnswer, ScoreAnswer, ScoreRequest, decode_array, encode_array
from opd.serve.scoring import score_request, split_batches
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.tasks.base import Example
from opd.teachers import ModelTeacher, RoutedTeacher
from opd.teachers.served import ServedTeacher
from opd.teachers.served_backends import OPDBackend
from opd.tokenization import TokenizerMismatchError, char_tokenizer

# ------------------------------------------------------------------------------------------------
# helpers shared with the other server test files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """An ASGI app served by uvicorn in a daemon thread on a free local port."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def teacher_app(model, tokenizer, name="test", **kwargs):
    from opd.serve.app import build_app

    return build_app(model, tokenizer, name=name, **kwargs)


def served(url, tokenizer, *, vocab, temperature=1.0, dtype="float32", use_context=False, retries=0, timeout=30.0,
           check_tokenizer=True):
    client = ServiceClient(url, role="teacher server", timeout=timeout, retries=retries, backoff=0.05)
    backend = OPDBackend(client, tokenizer, temperature=temperature, dtype=dtype, check_tokenizer=check_tokenizer,
                         vocab_size=vocab)
    return ServedTeacher(backend, tokenizer, vocab_size=vocab, use_context=use_context, context_template="{context}")


# ------------------------------------------------------------------------------------------------
# fixtures: the shipped arith teacher and student, rollouts of the student with teacher context


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(arith_checkpoint("teacher"))


@pytest.fixture(scope="module")
def teacher_model():
    return load_model(arith_checkpoint("teacher"))


@pytest.fixture(scope="module")
def rollouts(tok):
    student = load_model(arith_checkpoint("student"))
    examples = ArithTask(digits=3, eval_size=20, seed=0).eval_examples()[:12]
    examples = [*examples[:11], Example("7+5=", answer="21", teacher_context="21|")]  # a shorter prompt: padding
    torch.manual_seed(0)
    return generate_rollouts(student, tok, examples, Sampling(max_new_tokens=8, samples_per_prompt=2, temperature=1.5))


@pytest.fixture(scope="module")
def server(teacher_model, tok):
    s = ThreadServer(teacher_app(teacher_model, tok, name="arith-teacher"))
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------------
def test_payload_roundtrip_and_rejections():
    ids = np.array([[1, 2], [3, 2**31 - 1]])
    assert np.array_equal(decode_array(encode_array(ids, "int32"), "x"), ids)
    lp = np.array([-0.5, -1e-4, -30.0, -np.inf], dtype=np.float32)
    assert np.array_equal(decode_array(encode_array(lp, "float32"), "x"), lp)
    half = decode_array(encode_array(lp, "float16"), "x")
    assert np.allclose(half[:3], lp[:3], rtol=1e-3) and half[3] == -np.inf
    good = encode_array(lp, "float32")
    with pytest.raises(BadAnswer, match="holds 16 bytes, but shape"):
        decode_array({**good, "shape": [5]}, "x")
    with pytest.raises(BadAnswer, match="has shape \\[4\\], expected \\[3\\]"):
        decode_array(good, "x", shape=(3,))
    with pytest.raises(BadAnswer, match="dtype 'float32', expected"):
        decode_array(good, "x", dtypes=("int32",))
    with pytest.raises(BadAnswer, match="not an array object"):
        decode_array([1, 2], "x")


def test_split_batches_respects_the_token_budget():
    assert split_batches([3, 3, 3, 10, 2], max_tokens=8) == [[0, 1], [2], [3], [4]]
    assert split_batches([1] * 5, max_tokens=100) == [[0, 1, 2, 3, 4]]


def _naive(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float() / temperature, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_score_request_equals_a_naive_forward(temperature):
    tok = char_tokenizer("abcdefgh")
    model = build_model(tiny_llama_config(len(tok), layers=2, hidden=32, heads=2, tokenizer=tok), seed=1)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, len(tok), n)) for n in (1, 5, 3, 7)]
    completions = [list(rng.integers(2, len(tok), n)) for n in (4, 0, 6, 2)]  # one empty completion
    n = sum(map(len, completions))
    chosen = rng.integers(0, len(tok), (n, 3))
    req = ScoreRequest(prompts=prompts, completions=completions, topk=4, token_ids=chosen, temperature=temperature)
    ans = score_request(model, req, max_batch_tokens=10)  # several micro-batches
    rows = torch.cat([_naive(model, p, c, temperature) for p, c in zip(prompts, completions) if c])
    flat_c = torch.tensor([t for c in completions for t in c])
    torch.testing.assert_close(torch.from_numpy(ans.sampled_logprobs_N), rows.gather(1, flat_c[:, None])[:, 0],
                               rtol=0, atol=1e-5)
    top = rows.topk(4, dim=-1)
    assert np.array_equal(ans.topk_ids_NK, top.indices.numpy())
    torch.testing.assert_close(torch.from_numpy(ans.topk_logprobs_NK), top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ans.token_logprobs_NM), rows.gather(1, torch.from_numpy(chosen)),
                               rtol=0, atol=1e-5)


def test_batcher_merges_concurrent_requests_and_splits_answers():
    calls = []

    def score(req: ScoreRequest) -> ScoreAnswer:
        calls.append(len(req.prompts))
        flat = np.array([float(-t) for c in req.completions for t in c], dtype=np.float32)
        return ScoreAnswer(sampled_logprobs_N=flat)

    reqs = [ScoreRequest(prompts=[[1]], completions=[[i, i + 1]]) for i in range(5)]
    other = ScoreRequest(prompts=[[1]], completions=[[9]], temperature=0.5)  # a different key: not merged

    async def main():
        batcher = Batcher(score, max_tokens=100, max_wait=0.05)
        out = await asyncio.gather(*(batcher.submit(r) for r in [*reqs, other]))
        await batcher.close()
        return out, batcher

    answers, batcher = asyncio.run(main())
    for i, a in enumerate(answers[:5]):
        assert a.sampled_logprobs_N.tolist() == [-i, -(i + 1)]
    assert answers[5].sampled_logprobs_N.tolist() == [-9]
    assert sorted(calls) == [1, 5] and batcher.batches == 2 and batcher.requests_scored == 6


def _compare(served_fb, local_fb, mask, atol):
    diff = {"sampled": (served_fb.sampled_logprobs_BT - local_fb.sampled_logprobs_BT).abs().max().item()}
    assert (served_fb.sampled_logprobs_BT[~mask] == 0).all()
    if local_fb.topk_ids_BTK is not None:
        assert torch.equal(served_fb.topk_ids_BTK[mask], local_fb.topk_ids_BTK[mask])
        diff["topk"] = (served_fb.topk_logprobs_BTK - local_fb.topk_logprobs_BTK).abs().max().item()
    if local_fb.logits_BTV is not None:
        want = torch.log_softmax(local_fb.logits_BTV, -1)[mask]
        diff["full"] = (served_fb.logits_BTV[mask] - want).abs().max().item()
    assert max(diff.values()) <= atol, diff
    return diff


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_context", [False, True])
def test_served_teacher_equals_in_process_teacher(server, tok, teacher_model, rollouts, temperature, use_context):
    local = ModelTeacher(teacher_model, tok, temperature=temperature, use_context=use_context,
                         context_template="{context}")
    remote = served(server.url, tok, vocab=17, temperature=temperature, use_context=use_context)
    mask = rollouts.completion_mask_BT
    for access in ("sampled", "topk", "full"):
        # measured: |Δ| = 0 (the same forward pass on the same batch); the bound allows a server that
        # merged other requests into the batch (another padding, another summation order)
        _compare(remote.score(rollouts, access=access, topk=5), local.score(rollouts, access=access, topk=5), mask,
                 atol=1e-5)
    half = served(server.url, tok, vocab=17, temperature=temperature, use_context=use_context, dtype="float16")
    fb, ref = half.score(rollouts, access="topk", topk=5), local.score(rollouts, access="topk", topk=5)
    rel = ((fb.topk_logprobs_BTK - ref.topk_logprobs_BTK).abs() / ref.topk_logprobs_BTK.abs().clamp(min=1e-3))[mask]
    assert rel.max() <= 1e-3  # fp16 wire: relative error ≤ 2^-11 per value (measured ≤ 4.8e-4)


def test_student_topk_ids_are_scored_exactly(server, tok, teacher_model, rollouts):
    student = load_model(arith_checkpoint("student"))
    from opd.rollout import completion_forward

    with torch.no_grad():
        s_logits = completion_forward(student, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                      rollouts.completion_ids_BT, rollouts.completion_mask_BT)
    ids_BTK = s_logits.topk(6, dim=-1).indices
    remote = served(server.url, tok, vocab=17, temperature=0.8)
    got = remote.score_token_ids(rollouts, ids_BTK)
    local = ModelTeacher(teacher_model, tok, temperature=0.8).score(rollouts, access="full")
    want = torch.log_softmax(local.logits_BTV, -1).gather(-1, ids_BTK)
    mask = rollouts.completion_mask_BT
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)


def test_routing_by_prompt_field_with_served_teachers(server, tok, teacher_model):
    from opd.factories import build_teacher
    from opd.config.schema import Config

    student = load_model(arith_checkpoint("student"))
    other = ThreadServer(teacher_app(student, tok, name="arith-student"))  # the student as a second teacher
    try:
        cfg = Config()
        cfg.data.route_field = "domain"
        cfg.teacher.routes = {"a": server.url, "b": other.url}
        cfg.teacher.server = server.url
        teacher = build_teacher(cfg, student, tok, "cpu")
        base = ArithTask(digits=3, eval_size=20, seed=0).eval_examples()[:6]
        examples = [Example(e.prompt, answer=e.answer, fields={"domain": "ab"[i % 2]}) for i, e in enumerate(base)]
        torch.manual_seed(1)
        ro = generate_rollouts(student, tok, examples, Sampling(max_new_tokens=8))
        local = RoutedTeacher({"a": ModelTeacher(teacher_model, tok), "b": ModelTeacher(student, tok)}, field="domain")
        _compare(teacher.score(ro, access="topk", topk=4), local.score(ro, access="topk", topk=4),
                 ro.completion_mask_BT, atol=1e-5)
    finally:
        other.stop()


def test_tokenizer_mismatch_is_refused(tok):
    other_tok = char_tokenizer("0123456789+=|x")  # one more character: ids and vocabulary differ
    model = build_model(tiny_llama_config(len(other_tok), layers=1, hidden=32, heads=1, tokenizer=other_tok), seed=0)
    s = ThreadServer(teacher_app(model, other_tok))
    try:
        with pytest.raises(TokenizerMismatchError, match="vocabulary"):
            OPDBackend(ServiceClient(s.url, role="teacher server", retries=0), tok).check()
    finally:
        s.stop()


def test_malformed_request_is_answered_400_and_not_retried(server):
    client = ServiceClient(server.url, role="teacher server", retries=3, backoff=0.05)
    began = time.monotonic()
    with pytest.raises(ServiceRejected, match=r"HTTP 400: .*prompt_lengths and completion_lengths") as err:
        client.post("/v1/score", {"prompt_ids": encode_array([1], "int32"), "prompt_lengths": [1, 1],
                                  "completion_ids": encode_array([], "int32"), "completion_lengths": [0]})
    assert err.value.status == 400 and "after 1 attempt " in str(err.value)
    assert time.monotonic() - began < 1.0  # no back-off: not retried


def test_serve_teacher_command_starts_a_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve-teacher", "builtin:arith/smoke_teacher",
                             "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        client = ServiceClient(f"http://127.0.0.1:{port}", role="teacher server", timeout=5, retries=60, backoff=0.25,
                               max_backoff=0.5)
        info = client.get("/v1/info")
        assert info["protocol"] == "opd-score/1" and info["model"] == "builtin:arith/smoke_teacher"
        assert info["vocab_size"] == 17 and info["special_token_ids"]["eos"] == 2
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "opd serve-teacher: builtin:arith/smoke_teacher at http://127.0.0.1:" in out
