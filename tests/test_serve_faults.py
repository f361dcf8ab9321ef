"""Servers that fail: down, slow, restarted, or answering malformed JSON / wrong shapes / NaN.

Client level (fast, a scripted stand-in server): every fault ends, after the bounded retries, in one
:class:`~opd.errors.ServiceError` whose one-line message names the server and what it returned; a
server that comes back within the retries is waited for; a request the server rejects (HTTP 4xx)
is not retried. The same holds through each component that talks to a server: the ``opd`` and
``vllm`` teacher protocols and the vLLM rollout-server engine (configuration problems — raw
log-probs, no weight reload, a temperature the server cannot apply — are refused with a ValueError
saying how to start the server).

End to end (``opd distill`` with a real ``opd serve-teacher`` app behind a fault-injecting proxy):
each fault stops the run with exit status 2, the one-line error and the ``--resume`` command; the
last completed step is checkpointed, and ``--resume`` with the server back finishes the run — with
exactly the metrics of an uninterrupted run. A server restarted within the retry window does not
stop the run at all. These end-to-end tests need the loop to catch :class:`~opd.errors.RunFault`
(opd/train.py).
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opd.errors import ServiceError
from opd.models import load_model, load_tokenizer
from opd.rollout import generate_rollouts
from opd.rollout.engine import Sampling
from opd.rollout.vllm_engine import VLLMServerEngine
from opd.serve.client import ServiceClient
from opd.serve.payload import ScoreRequest, decode_array, encode_array
from opd.serve.scoring import score_request
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.teachers import ModelTeacher
from opd.teachers.served import ServedTeacher
from opd.teachers.served_backends import OPDBackend, VLLMBackend
from tests.test_serve import ThreadServer, free_port, teacher_app

# ------------------------------------------------------------------------------------------------
# a scripted stand-in server: each request gets the next action of a script


class Scripted:
    """An HTTP server whose ``handler(method, path, body_json, n) -> (status, body_bytes, delay_s)`` or
    ``"drop"`` (close the connection without answering) decides every answer; ``n`` counts requests."""

    def __init__(self, handler):
        self.handler = handler
        self.count = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _serve(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                outer.count += 1
                action = outer.handler(method, self.path, body, outer.count)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload, delay = action
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(obj, status=200, delay=0.0):
    return status, json.dumps(obj).encode(), delay


def client(url, retries=2, timeout=2.0):
    return ServiceClient(url, role="teacher server", timeout=timeout, retries=retries, backoff=0.05, max_backoff=0.1)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 600, text
    return text


# ------------------------------------------------------------------------------------------------
def test_down_server():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    began = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client(url, retries=2).get("/v1/info")
    msg = one_line(err.value)
    assert msg.startswith(f"teacher server {url}/v1/info could not be reached (ConnectError")
    assert "after 3 attempts" in msg
    assert time.monotonic() - began < 5


def test_slow_server():
    s = Scripted(lambda m, p, b, n: ok({"x": 1}, delay=1.0))
    try:
        with pytest.raises(ServiceError, match=r"did not answer within 0.2 s \(after 2 attempts") as err:
            client(s.url, retries=1, timeout=0.2).get("/v1/info")
        one_line(err.value)
    finally:
        s.close()


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_then_reported(status):
    s = Scripted(lambda m, p, b, n: (status, b"Internal\nServer Error", 0))
    try:
        with pytest.raises(ServiceError, match=f"answered HTTP {status}: Internal Server Error \\(after 3 attempts"):
            client(s.url).get("/v1/info")
        assert s.count == 3
    finally:
        s.close()


def test_restarted_server_is_waited_for():
    """Dropped connections and 503s (a server restarting) within the retry budget are invisible."""
    script = {1: "drop", 2: (503, b"starting", 0)}
    s = Scripted(lambda m, p, b, n: script.get(n) or ok({"fine": True}))
    try:
        assert client(s.url, retries=3).get("/v1/info") == {"fine": True}
        assert s.count == 3
    finally:
        s.close()


def test_client_error_is_not_retried():
    s = Scripted(lambda m, p, b, n: (404, b'{"detail":"Not Found"}', 0))
    try:
        with pytest.raises(ServiceError, match=r"answered HTTP 404: .*Not Found.* \(after 1 attempt over"):
            client(s.url, retries=3).get("/nothing")
        assert s.count == 1
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------
# the opd protocol: a stand-in that scores with the real scoring code, then corrupts the answer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(arith_checkpoint("smoke_teacher"))


@pytest.fixture(scope="module")
def smoke_teacher():
    return load_model(arith_checkpoint("smoke_teacher"))


@pytest.fixture(scope="module")
def rollouts(tok):
    student = load_model(arith_checkpoint("smoke_student"))
    torch.manual_seed(0)
    return generate_rollouts(student, tok, ArithTask(digits=2, eval_size=10, seed=0).eval_examples()[:5],
                             Sampling(max_new_tokens=5, temperature=1.3))


def _corrupt(answer: dict, kind: str) -> bytes:
    if kind == "garbage":
        return b"<html>502 Bad Gateway</html>"
    lp = decode_array(answer["sampled_logprobs"], "x")
    if kind == "shape":
        answer["sampled_logprobs"] = encode_array(lp[:-1], "float32")
    elif kind == "nan":
        lp[1] = math.nan
        answer["sampled_logprobs"] = encode_array(lp, "float32")
    elif kind == "missing":
        del answer["sampled_logprobs"]
    return json.dumps(answer).encode()


def opd_standin(model, tok, fault, fault_from=1):
    from opd.serve.app import tokenizer_files

    files = tokenizer_files(tok)

    def handle(method, path, body, n):
        if path == "/v1/info":
            return ok({"protocol": "opd-score/1", "vocab_size": 17})
        if path == "/v1/tokenizer":
            return ok({"files": files})
        req = ScoreRequest.from_json(body, vocab_size=17)
        answer = score_request(model, req).to_json(req.dtype)
        handle.scores += 1
        if handle.scores < fault_from or fault is None:
            return ok(answer)
        return 200, _corrupt(answer, fault), 0

    handle.scores = 0
    return Scripted(handle)


@pytest.mark.parametrize("fault, expected", [
    ("garbage", r"answered malformed JSON \(Expecting value at char 0; body starts '<html>502 Bad Gateway</html>'\)"),
    ("shape", r"answered something unusable: sampled_logprobs has shape \[\d+\], expected \[\d+\]"),
    ("nan", r"answered something unusable: sampled_logprobs holds 1 NaN value\(s\)"),
    ("missing", r"answered something unusable: missing field 'sampled_logprobs'"),
])
def test_opd_protocol_faults(tok, smoke_teacher, rollouts, fault, expected):
    s = opd_standin(smoke_teacher, tok, fault)
    try:
        teacher = ServedTeacher(OPDBackend(client(s.url), tok, vocab_size=17), tok, vocab_size=17)
        with pytest.raises(ServiceError, match=f"teacher server {s.url}/v1/score {expected} \\(after 3 attempts"):
            teacher.score(rollouts, access="topk", topk=4)
    finally:
        s.close()


def test_opd_protocol_recovers_when_the_server_does(tok, smoke_teacher, rollouts):
    """Two corrupt answers, then good ones: the retries absorb them and the feedback is exact."""
    s = opd_standin(smoke_teacher, tok, "nan", fault_from=1)
    original = s.handler

    def flaky(method, path, body, n):
        status, payload, delay = original(method, path, body, n)
        if path == "/v1/score" and original.scores > 2:
            req = ScoreRequest.from_json(body, vocab_size=17)
            return ok(score_request(smoke_teacher, req).to_json(req.dtype))
        return status, payload, delay

    s.handler = flaky
    try:
        teacher = ServedTeacher(OPDBackend(client(s.url, retries=3), tok, vocab_size=17), tok, vocab_size=17)
        got = teacher.score(rollouts, access="sampled")
        want = ModelTeacher(smoke_teacher, tok).score(rollouts, access="sampled")
        torch.testing.assert_close(got.sampled_logprobs_BT, want.sampled_logprobs_BT, rtol=0, atol=1e-5)
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------
# the vllm protocol and the vLLM rollout server: stand-ins that speak vLLM's API with an HF model


def _prompt_logprobs(model, seq, k, temperature=1.0):
    """vLLM's prompt_logprobs layout: None, then per position a dict of the top-k and the actual token."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float() / temperature, -1)
    out = [None]
    for pos in range(1, len(seq)):
        row = lp[pos - 1]
        ids = row.topk(k).indices.tolist() if k else []
        out.append({str(i): {"logprob": float(row[i]), "rank": 1, "decoded_token": None} for i in {*ids, seq[pos]}})
    return out


def vllm_standin(model, fault=None, *, applies_temperature=False, max_logprobs=20, raw_logprobs=False,
                 dev_mode=True):
    def handle(method, path, body, n):
        if path == "/v1/models":
            return ok({"data": [{"id": "m"}]})
        if path == "/tokenize":
            return ok({"tokens": load_tokenizer(arith_checkpoint("smoke_teacher"))(body["prompt"]).input_ids})
        if path == "/collective_rpc":
            return ok({"results": [None]}) if dev_mode else (404, b'{"detail":"Not Found"}', 0)
        if path == "/reset_prefix_cache":
            return 200, b"", 0
        k = body.get("prompt_logprobs")
        if k is not None:  # a teacher request
            if k > max_logprobs:
                return 400, json.dumps({"error": {"message": f"Requested prompt logprobs of {k}, which is greater "
                                                  f"than max allowed: {max_logprobs}"}}).encode(), 0
            tau = body.get("temperature", 1.0) if applies_temperature else 1.0
            choices = [{"index": i, "prompt_logprobs": _prompt_logprobs(model, seq, k, tau)}
                       for i, seq in enumerate(body["prompt"])]
            if fault == "short":
                choices[0]["prompt_logprobs"] = choices[0]["prompt_logprobs"][:-1]
            if fault == "nan":
                first = choices[0]["prompt_logprobs"][1]
                first[next(iter(first))]["logprob"] = math.nan
            return ok({"choices": choices})
        # a rollout request: greedy continuation of one prompt (what the engine tests need)
        seq = list(body["prompt"][0])
        ids, lps = [], []
        for _ in range(body["max_tokens"]):
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([seq + ids])).logits[0, -1].float(), -1)
            tok_id = int(lp.argmax())
            ids.append(tok_id)
            lps.append(0.0 if body.get("top_k") == 1 and not raw_logprobs else float(lp[tok_id]))
            if tok_id in body.get("stop_token_ids", []):
                break
        probe = body.get("top_k") == 1  # the engine's logprobs-mode probe is answered correctly
        if fault == "nan" and not probe:
            lps[0] = math.nan
        if fault == "lengths" and not probe:
            lps = lps[:-1]
        return ok({"choices": [{"index": 0, "token_ids": ids, "logprobs": {"token_logprobs": lps}}]})

    return Scripted(handle)


@pytest.mark.parametrize("fault, expected", [
    ("short", r"prompt_logprobs has \d+ positions for a prompt of \d+ tokens"),
    ("nan", r"prompt_logprobs at position 1 holds NaN or positive log-probs"),
])
def test_vllm_protocol_faults(tok, smoke_teacher, rollouts, fault, expected):
    s = vllm_standin(smoke_teacher, fault)
    try:
        teacher = ServedTeacher(VLLMBackend(client(s.url), tok, vocab_size=17), tok, vocab_size=17)
        with pytest.raises(ServiceError, match=f"{s.url}/v1/completions answered something unusable: {expected}"):
            teacher.score(rollouts, access="topk", topk=4)
    finally:
        s.close()


@pytest.mark.parametrize("applies", [False, True])
def test_vllm_protocol_temperature_is_detected_and_applied_once(tok, smoke_teacher, rollouts, applies):
    """A server that ignores the temperature for prompt log-probs is corrected exactly (from all V
    log-probs); one that applies it is trusted; either way the feedback equals the tempered teacher."""
    s = vllm_standin(smoke_teacher, applies_temperature=applies)
    try:
        backend = VLLMBackend(client(s.url), tok, vocab_size=17, temperature=0.6)
        got = ServedTeacher(backend, tok, vocab_size=17).score(rollouts, access="topk", topk=4)
        assert backend.temper_here is (not applies)
        want = ModelTeacher(smoke_teacher, tok, temperature=0.6).score(rollouts, access="topk", topk=4)
        # an unpadded forward per sequence vs the padded batch: |Δ| ≤ 2e-5 at log-probs near −5
        torch.testing.assert_close(got.sampled_logprobs_BT, want.sampled_logprobs_BT, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.topk_logprobs_BTK, want.topk_logprobs_BTK, rtol=1e-5, atol=1e-5)
    finally:
        s.close()


def test_vllm_protocol_refuses_a_temperature_it_cannot_apply(tok, smoke_teacher, rollouts):
    s = vllm_standin(smoke_teacher, max_logprobs=5)  # ignores τ and will not send all 17 log-probs
    try:
        teacher = ServedTeacher(VLLMBackend(client(s.url), tok, vocab_size=17, temperature=0.6), tok, vocab_size=17)
        with pytest.raises(ValueError, match=r"teacher.temperature=0.6 with the vLLM teacher server .* returns "
                                             r"untempered prompt log-probs .* --max-logprobs 17"):
            teacher.score(rollouts, access="sampled")
    finally:
        s.close()


def _engine(url, tok, retries=2):
    return VLLMServerEngine(ServiceClient(url, role="rollout server", timeout=2.0, retries=retries, backoff=0.05,
                                          max_backoff=0.1), tok, concurrency=2)


@pytest.mark.parametrize("fault, expected", [
    ("nan", r"token_logprobs holds NaN or positive log-probs"),
    ("lengths", r"\d+ token ids and \d+ log-probs for max_tokens=5"),
])
def test_rollout_server_faults(tok, smoke_teacher, fault, expected):
    s = vllm_standin(smoke_teacher, fault)
    try:
        engine = _engine(s.url, tok)
        examples = ArithTask(digits=2, eval_size=10, seed=0).eval_examples()[:2]
        with pytest.raises(ServiceError, match=f"rollout server {s.url}/v1/completions answered something "
                                               f"unusable: {expected}"):
            engine.generate(examples, Sampling(max_new_tokens=5, greedy=True))
    finally:
        s.close()


def test_rollout_server_configuration_is_checked(tok, smoke_teacher):
    examples = ArithTask(digits=2, eval_size=10, seed=0).eval_examples()[:2]
    raw = vllm_standin(smoke_teacher, raw_logprobs=True)
    no_dev = vllm_standin(smoke_teacher, dev_mode=False)
    try:
        with pytest.raises(ValueError, match="returns raw log-probs .* --logprobs-mode processed_logprobs"):
            _engine(raw.url, tok).generate(examples, Sampling(max_new_tokens=5))
        with pytest.raises(ValueError, match="does not accept weight reloads .* VLLM_SERVER_DEV_MODE=1"):
            _engine(no_dev.url, tok).sync_weights(load_model(arith_checkpoint("smoke_student")))
    finally:
        raw.close()
        no_dev.close()


# ------------------------------------------------------------------------------------------------
# end to end: opd distill against a real opd teacher server behind a fault-injecting proxy


class FaultProxy:
    """An ASGI app forwarding to ``upstream``; from the ``fault_from``-th ``/v1/score`` request on (while
    ``active``) it answers with ``fault`` instead: http500, garbage, shape, nan, slow (sleep past the
    client's timeout) or down (the proxy stops listening)."""

    def __init__(self, upstream: str, fault: str, fault_from: int):
        import httpx

        self.upstream, self.fault, self.fault_from = upstream, fault, fault_from
        self.active = True
        self.scores = 0
        self.server: ThreadServer | None = None
        self._http = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def __call__(self, scope, receive, send):
        import asyncio

        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status, payload = 200, b""
        if scope["path"] == "/v1/score":
            self.scores += 1
        faulty = self.active and scope["path"] == "/v1/score" and self.scores >= self.fault_from
        if faulty and self.fault == "down":
            self.server.server.should_exit = True
            status, payload = 503, b"shutting down"
        elif faulty and self.fault == "slow":
            await asyncio.sleep(1.5)
            status, payload = 200, b"{}"
        else:
            r = await self._http.request(scope["method"], scope["path"], content=body,
                                         headers={"content-type": "application/json"})
            status, payload = r.status_code, r.content
            if faulty:
                status, payload = (500, b"boom") if self.fault == "http500" else (200, _corrupt(json.loads(payload),
                                                                                                 self.fault))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    def start(self, port: int | None = None) -> str:
        self.server = ThreadServer(self, port=port)
        return self.server.url


@pytest.fixture(scope="module")
def teacher_server(smoke_teacher, tok):
    s = ThreadServer(teacher_app(smoke_teacher, tok, name="smoke-teacher"))
    yield s
    s.stop()


def _distill(args, capsys):
    from opd.cli import main

    code = main(["distill", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _args(url, run_dir):
    # 2 requests before training (eval.size ≤ eval.batch_size): the student's held-out evaluation and the
    # served teacher's (teacher-forced on the reference answers); then 1 per step
    return ["student.model=builtin:arith/smoke_student", f"teacher.server={url}", "data.digits=2", "train.steps=3",
            "rollout.prompts_per_step=8", "eval.size=16", "eval.batch_size=16", "train.threads=1",
            "train.checkpoint_every=1", "teacher.server_retries=1", "teacher.server_timeout=0.5",
            "logging.progress=false", "logging.report=false", "monitor.warmup_steps=0", f"logging.run_dir={run_dir}"]


def _history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r.get("kind", r.get("split")), r.get("step")): {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s", "time")}
            for r in rows}


@pytest.mark.parametrize("fault, said", [
    ("down", "could not be reached"),
    ("slow", "did not answer within 0.5 s"),
    ("http500", "answered HTTP 500: boom"),
    ("garbage", "answered malformed JSON"),
    ("shape", "answered something unusable: sampled_logprobs has shape"),
    ("nan", "answered something unusable: sampled_logprobs holds 1 NaN"),
])
def test_distill_stops_resumably_on_a_teacher_server_fault(teacher_server, tmp_path, capsys, fault, said):
    proxy = FaultProxy(teacher_server.url, fault, fault_from=4)  # request 4 = step 2's feedback
    url = proxy.start()
    run = tmp_path / "run"
    code, out = _distill(_args(url, run), capsys)
    assert code == 2, out
    lines = [line for line in out.splitlines() if f"teacher server {url}/v1/score {said}" in line]
    assert lines, out  # the one-line error names the server and what it returned
    assert f"opd distill --resume {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 1
    assert (run / "checkpoints").exists() or any(p.name.startswith("checkpoint") for p in run.iterdir())
    # the server is back: the resumed run finishes
    proxy.active = False
    if fault == "down":
        proxy.server.stop()
        proxy.start(port=proxy.server.port)
    code, out = _distill(["--resume", str(run)], capsys)
    assert code == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps_done"] == 3
    if fault == "down":  # nothing was lost: the same metrics as an uninterrupted run
        ref = tmp_path / "ref"
        code, out = _distill(_args(teacher_server.url, ref), capsys)
        assert code == 0, out
        got, want = _history(run), _history(ref)
        assert ("fault", 1) in got  # the failure stays on record (the report names it)
        got = {key: v for key, v in got.items() if key[0] != "fault"}
        assert got.keys() == want.keys()
        for key in want:
            for name, value in want[key].items():
                if isinstance(value, float):
                    assert got[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, name)
    proxy.server.stop()


def test_distill_waits_for_a_server_restarted_within_the_retries(teacher_server, tmp_path, capsys):
    proxy = FaultProxy(teacher_server.url, "down", fault_from=4)
    url = proxy.start()
    port = proxy.server.port

    def restart():  # back after ~1 s, while the client is still retrying
        time.sleep(1.0)
        proxy.active = False
        proxy.server.stop()
        proxy.start(port=port)

    threading.Thread(target=restart, daemon=True).start()
    args = [a for a in _args(url, tmp_path / "run") if not a.startswith(("teacher.server_retries",
                                                                        "teacher.server_timeout"))]
    code, out = _distill([*args, "teacher.server_retries=6"], capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 3
    proxy.server.stop()
