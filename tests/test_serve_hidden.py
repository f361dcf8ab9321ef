"""``teacher.payload=hidden``: the server sends the teacher's final hidden states, the trainer holds its head.

* the bf16 wire dtype rounds like torch (round to nearest even) and decodes exactly;
* ``head_logprobs`` (chunked sampled / top-k / chosen-id log-probs from hidden states) equals a naive
  ``log_softmax`` at odd shapes, chunk sizes, temperature and bias; it carries no gradient;
* the server's hidden states, times the head, are the model's own logits (a naive per-sequence forward);
* over HTTP, the feedback equals the in-process ModelTeacher's on the same rollouts — every access level,
  temperature 1 and 0.7, the teacher-only context — on the demo pair (dense: logits from the head) and with
  the hidden-state accessor (the fused path's input), for each wire dtype (tolerances below, measured);
* route-1 loss and gradients w.r.t. every student parameter equal the in-process teacher's, for the full,
  union, teacher-top-k and student-top-k supports, dense and fused (chunked) paths, per wire dtype;
* routed teachers (two servers, two different heads) merge into one hidden accessor without ``[B, T, V]``
  and equal the per-row in-process teachers; the score cache stores and replays the hidden accessor;
* faults: malformed answer, wrong hidden size, NaN, a server restarted with other weights, a head from
  other weights, a server that does not serve hidden states — each one line naming the server;
* the config: payload=hidden needs protocol=opd; bfloat16 is only for hidden states;
* ``hidden_payload_difference`` (``opd doctor``'s self-test) is ~0 for the same teacher and large for another.

Servers run in a thread of the test process (uvicorn), as in tests/test_serve.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from opd.config import ConfigError, load_config
from opd.errors import ServiceError
from opd.math.head_logprobs import head_logprobs
from opd.models import build_model, load_model, load_tokenizer, tiny_llama_config
from opd.objective import Objective
from opd.rollout import Sampling, generate_rollouts, lm_head_of
from opd.serve.client import ServiceClient
from opd.serve.payload import decode_array, encode_array
from opd.step import student_forward
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.tasks.base import Example
from opd.teachers import ModelTeacher, RoutedTeacher
from opd.teachers.cache import CachedTeacher, FeedbackStore
from opd.teachers.hidden_head import HiddenBackend, hidden_payload_difference
from opd.teachers.served import ServedTeacher
from tests.test_serve import ThreadServer, teacher_app

#: |served − in-process| per wire dtype on the demo pair: log-probs (absolute), loss (relative), gradients
#: (relative to each tensor's largest entry), over τ ∈ {1, 0.7 with context, 0.8}, dense and fused paths,
#: supports full / union / teacher_topk / student_topk. fp32: the same forward pass, only the server's batch
#: layout differs — measured log-probs 7.6e-6, loss 1.6e-7, gradients 1.6e-6. fp16 / bf16 round each hidden
#: value once (relative 2^-11 / 2^-8): measured log-probs 9.7e-4 / 8.8e-3, loss 1.6e-5 / 4.7e-5, gradients
#: 7.6e-5 / 9.6e-4. The bounds are ~2.5-3× those.
TOL = {
    "float32": {"logp": 2e-5, "loss": 1e-6, "grad": 5e-6},
    "float16": {"logp": 3e-3, "loss": 5e-5, "grad": 2.5e-4},
    "bfloat16": {"logp": 2.5e-2, "loss": 1.5e-4, "grad": 3e-3},
}
DTYPES = tuple(TOL)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(arith_checkpoint("teacher"))


@pytest.fixture(scope="module")
def teacher_model():
    return load_model(arith_checkpoint("teacher"))


@pytest.fixture(scope="module")
def student():
    return load_model(arith_checkpoint("student"))


@pytest.fixture(scope="module")
def rollouts(tok, student):
    examples = ArithTask(digits=3, eval_size=20, seed=0).eval_examples()[:7]
    examples = [*examples, Example("7+5=", answer="12", teacher_context="12|")]  # a shorter prompt: padding
    torch.manual_seed(0)
    return generate_rollouts(student, tok, examples, Sampling(max_new_tokens=8, samples_per_prompt=2, temperature=1.5))


@pytest.fixture(scope="module")
def server(teacher_model, tok):
    s = ThreadServer(teacher_app(teacher_model, tok, name="arith-teacher"))
    yield s
    s.stop()


def hidden_teacher(url, tok, *, vocab, dtype="float32", temperature=1.0, use_context=False, retries=0,
                   full_above=8192, head=None):
    client = ServiceClient(url, role="teacher server", timeout=30.0, retries=retries, backoff=0.05, max_backoff=0.1)
    backend = HiddenBackend(client, tok, temperature=temperature, dtype=dtype, vocab_size=vocab, head=head,
                            full_as_hidden_above_vocab=full_above)
    backend.check()
    return ServedTeacher(backend, tok, vocab_size=vocab, use_context=use_context, context_template="{context}")


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------ wire + math


def test_bfloat16_wire_rounds_to_nearest_even_like_torch():
    x = torch.randn(257, dtype=torch.float32) * torch.logspace(-8, 8, 257)
    x[:4] = torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])  # exact ties: to even
    obj = encode_array(x.numpy(), "bfloat16")
    assert len(obj["data"]) == 4 * ((2 * 257 + 2) // 3)  # 2 bytes per value before base64
    got = torch.from_numpy(decode_array(obj, "x", dtypes=("bfloat16",)))
    torch.testing.assert_close(got, x.to(torch.bfloat16).float(), rtol=0, atol=0)
    nan = decode_array(encode_array(np.array([np.nan], np.float32), "bfloat16"), "x")
    assert np.isnan(nan).all()


@pytest.mark.parametrize("n,v,h,chunk,tau,bias", [(1, 3, 2, None, 1.0, False), (13, 37, 5, 4, 0.7, True),
                                                  (40, 9001, 3, 7, 1.3, True), (0, 11, 4, 2, 1.0, False)])
def test_head_logprobs_equals_naive_log_softmax(n, v, h, chunk, tau, bias):
    g = torch.Generator().manual_seed(n + v)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    chosen = torch.randint(0, v, (n, 3), generator=g)
    k = min(5, v)
    got = head_logprobs(hidden, w, b, ids, topk=k, chosen_ids_NM=chosen, temperature=tau, chunk_size=chunk)
    for t in (got.sampled_N, got.topk_logprobs_NK, got.chosen_NM):
        assert not t.requires_grad  # teacher values: never a graph back into the head or the hidden states
    ref_z = hidden.detach().double() @ w.detach().double().T
    if b is not None:
        ref_z = ref_z + b.double()
    rows = []
    for i in range(n):  # a loop over rows: log softmax of each tempered logit vector
        z = ref_z[i] / tau
        rows.append(z - torch.logsumexp(z, 0))
    ref = torch.stack(rows) if rows else torch.zeros(0, v, dtype=torch.float64)
    torch.testing.assert_close(got.sampled_N.double(), ref.gather(1, ids[:, None])[:, 0], rtol=0, atol=2e-5)
    torch.testing.assert_close(got.chosen_NM.double(), ref.gather(1, chosen), rtol=0, atol=2e-5)
    top = ref.topk(k, dim=-1)
    torch.testing.assert_close(got.topk_logprobs_NK.double(), top.values, rtol=0, atol=2e-5)
    assert torch.equal(ref.gather(1, got.topk_ids_NK), ref.gather(1, top.indices)) or n == 0 or v > 1000


def test_head_logprobs_rejects_bad_input():
    h, w = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"hidden_NH has shape \(3, 2\) and weight_VH \(5, 4\)"):
        head_logprobs(torch.zeros(3, 2), w, None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids_N must lie in \[0, V = 5\)"):
        head_logprobs(h, w, None, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head_logprobs(h, w, None, torch.zeros(3, dtype=torch.long), temperature=0.0)


def test_server_hidden_states_times_head_are_the_models_logits(teacher_model, tok, rollouts):
    from opd.serve.hidden import score_hidden, weights_digest
    from opd.serve.payload import ScoreRequest
    from opd.teachers.served import rollout_sequences

    prompts, completions = rollout_sequences(rollouts, tok)
    request = ScoreRequest(prompts=prompts, completions=completions, payload="hidden")
    digest = weights_digest(teacher_model.state_dict().items())
    ans = score_hidden(teacher_model, request, weights_sha256=digest, max_batch_tokens=40)  # several micro-batches
    assert ans.hidden_NH.shape == (request.n_tokens, 128) and ans.weights_sha256 == digest
    w, b = lm_head_of(teacher_model)
    row = 0
    for p, c in zip(prompts, completions):  # one sequence at a time, no padding: the naive reference
        if not c:
            continue
        with torch.no_grad():
            logits = teacher_model(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:]
        got = torch.from_numpy(ans.hidden_NH[row:row + len(c)]) @ w.T
        torch.testing.assert_close(got, logits, rtol=0, atol=2e-5)
        row += len(c)
    assert row == request.n_tokens


def test_batcher_merges_concurrent_hidden_requests_and_splits_answers(teacher_model, tok, rollouts):
    """Hidden requests that arrive together share one forward; each caller gets its own rows, equal to its
    request scored alone. A log-prob request (another key) is scored separately."""
    import asyncio

    from opd.serve.batcher import Batcher
    from opd.serve.hidden import score_hidden
    from opd.serve.payload import ScoreAnswer, ScoreRequest
    from opd.serve.scoring import score_request
    from opd.teachers.served import rollout_sequences

    prompts, completions = rollout_sequences(rollouts, tok)
    reqs = [ScoreRequest(prompts=prompts[i:i + 4], completions=completions[i:i + 4], payload="hidden")
            for i in range(0, 12, 4)]
    logp = ScoreRequest(prompts=prompts[:2], completions=completions[:2])
    calls = []

    def score(req: ScoreRequest):
        calls.append((req.payload, len(req.prompts)))
        if req.payload == "hidden":
            return score_hidden(teacher_model, req, weights_sha256="w")
        return score_request(teacher_model, req)

    async def main():
        batcher = Batcher(score, max_tokens=10_000, max_wait=0.05)
        out = await asyncio.gather(*(batcher.submit(r) for r in [*reqs, logp]))
        await batcher.close()
        return out

    answers = asyncio.run(main())
    assert sorted(calls) == [("hidden", 12), ("logprobs", 2)]
    for req, ans in zip(reqs, answers):
        alone = score_hidden(teacher_model, req, weights_sha256="w")
        assert ans.hidden_NH.shape == alone.hidden_NH.shape == (req.n_tokens, 128)
        np.testing.assert_allclose(ans.hidden_NH, alone.hidden_NH, rtol=0, atol=2e-5)
    assert isinstance(answers[-1], ScoreAnswer) and answers[-1].sampled_logprobs_N.shape == (logp.n_tokens,)


def test_hidden_request_rules():
    from opd.serve.payload import ScoreRequest

    body = ScoreRequest(prompts=[[1, 5]], completions=[[6, 2]], dtype="bfloat16", payload="hidden").to_json()
    assert ScoreRequest.from_json(body, vocab_size=17).payload == "hidden"
    with pytest.raises(ValueError, match="payload=hidden returns hidden states only: send topk=0"):
        ScoreRequest.from_json({**body, "topk": 3}, vocab_size=17)
    with pytest.raises(ValueError, match="dtype must be one of float16, float32 for payload=logprobs"):
        ScoreRequest.from_json({**body, "payload": "logprobs"}, vocab_size=17)
    with pytest.raises(ValueError, match="payload must be one of logprobs, hidden"):
        ScoreRequest.from_json({**body, "payload": "logits"}, vocab_size=17)


# ------------------------------------------------------------------------------------------------ feedback


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,use_context", [(1.0, False), (0.7, True)])
def test_feedback_equals_in_process_teacher(server, tok, teacher_model, rollouts, dtype, temperature, use_context):
    tol = TOL[dtype]["logp"]
    mask = rollouts.completion_mask_BT
    for full_above in (8192, 0):  # dense logits (V = 17 ≤ 8192) and the hidden accessor
        local = ModelTeacher(teacher_model, tok, temperature=temperature, use_context=use_context,
                             context_template="{context}", full_as_hidden_above_vocab=full_above)
        remote = hidden_teacher(server.url, tok, vocab=17, dtype=dtype, temperature=temperature,
                                use_context=use_context, full_above=full_above)
        for access in ("sampled", "topk", "full"):
            a, b = remote.score(rollouts, access=access, topk=5), local.score(rollouts, access=access, topk=5)
            torch.testing.assert_close(a.sampled_logprobs_BT[mask], b.sampled_logprobs_BT[mask], rtol=0, atol=tol)
            assert (a.sampled_logprobs_BT[~mask] == 0).all()
            if access != "sampled":
                torch.testing.assert_close(a.topk_logprobs_BTK[mask], b.topk_logprobs_BTK[mask], rtol=0, atol=tol)
            if access == "full" and full_above == 0:
                assert a.logits_BTV is None and a.hidden_BTH.shape == (*mask.shape, 128)
                za = a.hidden_BTH[mask] @ a.head_weight_VH.T
                zb = b.hidden_BTH[mask].float() @ b.head_weight_VH.float().T
            elif access == "full":
                za, zb = a.logits_BTV[mask], b.logits_BTV[mask]
            if access == "full":
                torch.testing.assert_close(torch.log_softmax(za, -1), torch.log_softmax(zb, -1), rtol=0,
                                           atol=tol)
        remote.close()


def _objective(kind, *, chunked, divergence="rkl"):
    cfg = load_config(None, [f"support.kind={kind}", "support.k=4", "support.norm=renorm",
                             f"route1.divergence={divergence}", "route2.coef=0",
                             f"route1.chunk_size={8 if chunked else 0}"])
    return Objective.from_config(cfg, eos_id=2, diagnostics=False)


def _loss_and_grads(student, objective, rollouts, feedback, chunked):
    student.zero_grad(set_to_none=True)
    out = objective(student_forward(student, rollouts, chunked=chunked), feedback, rollouts)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_equal_in_process_every_support(server, tok, teacher_model, student, rollouts, dtype):
    """Route 1 on each support, dense path (logits from the head) and fused path (the hidden accessor
    projected chunk by chunk inside :func:`opd.math.fused.fused_linear_divergence`), at τ = 0.8."""
    tol = TOL[dtype]
    for chunked in (False, True):
        full_above = 0 if chunked else 8192
        local = ModelTeacher(teacher_model, tok, temperature=0.8, full_as_hidden_above_vocab=full_above)
        remote = hidden_teacher(server.url, tok, vocab=17, dtype=dtype, temperature=0.8, full_above=full_above)
        fb_local, fb_remote = local.score(rollouts, access="full", topk=4), remote.score(rollouts, access="full", topk=4)
        if chunked:
            assert fb_remote.hidden_BTH is not None and fb_remote.logits_BTV is None
        for kind in ("full", "union", "teacher_topk", "student_topk"):
            obj = _objective(kind, chunked=chunked)
            loss_a, grads_a = _loss_and_grads(student, obj, rollouts, fb_remote, chunked)
            loss_b, grads_b = _loss_and_grads(student, obj, rollouts, fb_local, chunked)
            assert torch.isfinite(loss_b) and float(loss_b) > 0
            assert rel(loss_a, loss_b) <= tol["loss"], (kind, chunked, rel(loss_a, loss_b))
            assert grads_a.keys() == grads_b.keys() and grads_b
            worst = max(rel(grads_a[n], grads_b[n]) for n in grads_b)
            assert worst <= tol["grad"], (kind, chunked, worst)
        remote.close()


def test_larger_vocabulary_uses_the_hidden_accessor_and_the_fused_path(tok):
    """V = 9000 > 8192: access=full gives hidden states + the tempered head (no [B, T, V] anywhere in the
    feedback) and the chunked route-1 loss and gradients equal the in-process teacher's."""
    cfg = tiny_llama_config(9000, layers=1, hidden=32, heads=2, tokenizer=tok)
    teacher, student = build_model(cfg, seed=1), build_model(cfg, seed=2)
    s = ThreadServer(teacher_app(teacher, tok, name="big"))
    try:
        torch.manual_seed(0)
        ro = generate_rollouts(student, tok, ArithTask(digits=2, eval_size=6, seed=0).eval_examples()[:4],
                               Sampling(max_new_tokens=5, temperature=1.0))
        remote = hidden_teacher(s.url, tok, vocab=9000, temperature=0.9)
        local = ModelTeacher(teacher, tok, temperature=0.9)
        fa, fb = remote.score(ro, access="full", topk=4), local.score(ro, access="full", topk=4)
        assert fa.logits_BTV is None and fa.hidden_BTH.shape[-1] == 32 and fa.head_weight_VH.shape == (9000, 32)
        torch.testing.assert_close(fa.head_weight_VH, fb.head_weight_VH, rtol=0, atol=0)  # W/τ, the same division
        obj = Objective.from_config(load_config(None, ["route2.coef=0"]), eos_id=2, diagnostics=False)
        assert obj.use_chunked(9000)
        loss_a, ga = _loss_and_grads(student, obj, ro, fa, True)
        loss_b, gb = _loss_and_grads(student, obj, ro, fb, True)
        assert rel(loss_a, loss_b) <= 2e-6
        assert max(rel(ga[n], gb[n]) for n in gb) <= 2e-5
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ routed + cache


def test_routed_hidden_teachers_merge_heads_without_full_logits(server, tok, teacher_model, student):
    other_model = copy.deepcopy(student)  # a second teacher with another head
    other = ThreadServer(teacher_app(other_model, tok, name="arith-student"))
    try:
        base = ArithTask(digits=3, eval_size=20, seed=0).eval_examples()[:6]
        examples = [Example(e.prompt, answer=e.answer, fields={"domain": "ab"[i % 2]}) for i, e in enumerate(base)]
        torch.manual_seed(1)
        ro = generate_rollouts(student, tok, examples, Sampling(max_new_tokens=8))
        routed = RoutedTeacher({"a": hidden_teacher(server.url, tok, vocab=17, temperature=0.7, full_above=0),
                                "b": hidden_teacher(other.url, tok, vocab=17, temperature=0.7, full_above=0)},
                               field="domain")
        local = RoutedTeacher({"a": ModelTeacher(teacher_model, tok, temperature=0.7),
                               "b": ModelTeacher(other_model, tok, temperature=0.7)}, field="domain")
        got, want = routed.score(ro, access="full", topk=4), local.score(ro, access="full", topk=4)
        assert got.logits_BTV is None and got.hidden_BTH.shape[-1] == 128 + 64  # two heads side by side (H = 128, 64)
        mask = ro.completion_mask_BT
        z = got.hidden_BTH[mask] @ got.head_weight_VH.T
        torch.testing.assert_close(z, want.logits_BTV[mask], rtol=0, atol=2e-5)
        torch.testing.assert_close(got.sampled_logprobs_BT, want.sampled_logprobs_BT, rtol=0, atol=2e-5)
        assert (got.hidden_BTH[~mask] == 0).all()
    finally:
        other.stop()


def test_score_cache_stores_and_replays_the_hidden_accessor(server, tok, rollouts):
    remote = hidden_teacher(server.url, tok, vocab=17, temperature=0.7, full_above=0)
    cached = CachedTeacher(remote, FeedbackStore(store_dtype="float32"))
    first = cached.score(rollouts, access="full", topk=4)
    second = cached.score(rollouts, access="full", topk=4)
    assert cached.stats["hits"] == rollouts.batch_size and cached.stats["misses"] == rollouts.batch_size
    mask = rollouts.completion_mask_BT
    live = remote.score(rollouts, access="full", topk=4)
    for fb in (first, second):
        assert fb.hidden_BTH is not None
        torch.testing.assert_close(fb.hidden_BTH[mask], live.hidden_BTH[mask], rtol=0, atol=0)
        torch.testing.assert_close(fb.head_weight_VH, live.head_weight_VH, rtol=0, atol=0)
        torch.testing.assert_close(fb.sampled_logprobs_BT, live.sampled_logprobs_BT, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ faults


def tamper(inner, mutate):
    """An ASGI app that passes everything to ``inner`` but rewrites the JSON answers of ``POST /v1/score``."""

    async def app(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/score":
            return await inner(scope, receive, send)
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                body = json.dumps(mutate(json.loads(b"".join(chunks)))).encode()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        await inner(scope, receive, capture)

    return app


def _hidden_of(body):
    return decode_array(body["hidden"], "hidden")


def _with_hidden(body, values):
    return {**body, "hidden": encode_array(values, "float32")}


@pytest.mark.parametrize("fault,message", [
    (lambda b: {**b, "hidden": {**b["hidden"], "data": "!!not base64"}}, "hidden is not valid base64"),
    (lambda b: _with_hidden(b, _hidden_of(b)[:, :-1]), "hidden has 127 values per token, the teacher's head reads 128"),
    (lambda b: _with_hidden(b, np.where(np.arange(_hidden_of(b).size).reshape(_hidden_of(b).shape) == 5, np.nan,
                                        _hidden_of(b))), "hidden holds 1 NaN/Inf value"),
    (lambda b: {k: v for k, v in b.items() if k != "hidden"}, "the answer lacks 'hidden'"),
])
def test_malformed_answers_end_in_one_line(teacher_model, tok, rollouts, fault, message):
    s = ThreadServer(tamper(teacher_app(teacher_model, tok), fault))
    try:
        remote = hidden_teacher(s.url, tok, vocab=17, retries=1)
        with pytest.raises(ServiceError) as err:
            remote.score(rollouts, access="full")
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"teacher server {s.url}/v1/score answered something unusable")
        assert message in text and "after 2 attempts" in text
    finally:
        s.stop()


def test_server_restarted_with_other_weights_is_refused(teacher_model, student, tok, rollouts):
    s = ThreadServer(teacher_app(teacher_model, tok))
    remote = hidden_teacher(s.url, tok, vocab=17, retries=0)
    remote.score(rollouts, access="sampled")
    s.stop()
    changed = copy.deepcopy(teacher_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of the body (the head is the same)
    s2 = ThreadServer(teacher_app(changed, tok), port=s.port)  # the same address, other weights
    try:
        with pytest.raises(ServiceError, match="the server's weights changed .* restarted with another model") as err:
            remote.score(rollouts, access="full")
        assert "\n" not in str(err.value)
    finally:
        s2.stop()


def test_head_from_other_weights_is_refused(server, tok, student):
    weight, bias = lm_head_of(load_model(arith_checkpoint("teacher")))
    other = weight.detach().clone()
    other[3, 7] += 1e-3  # one value differs
    with pytest.raises(ValueError, match="is not the one teacher server .* the server runs other weights"):
        hidden_teacher(server.url, tok, vocab=17, head=(other, bias))
    with pytest.raises(ValueError, match=r"the teacher head given has shape \(17, 64\), the server's hidden states "
                                         "have 128 values per token"):
        hidden_teacher(server.url, tok, vocab=17, head=lm_head_of(student))
    w, b = lm_head_of(load_model(arith_checkpoint("teacher")))  # the teacher's own files: accepted
    hidden_teacher(server.url, tok, vocab=17, head=(w, b)).close()


def test_head_with_a_wrong_digest_is_refused(teacher_model, tok):
    def corrupt(inner):
        async def app(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/v1/head":
                w, _ = lm_head_of(teacher_model)
                body = json.dumps({"weight": encode_array((w * 1.001).detach().numpy(), "float32"), "bias": None,
                                   "head_sha256": "x"}).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await inner(scope, receive, send)
        return app

    s = ThreadServer(corrupt(teacher_app(teacher_model, tok)))
    try:
        with pytest.raises(ServiceError, match=r"/v1/head answered something unusable: the head's sha256 is"):
            hidden_teacher(s.url, tok, vocab=17, retries=0)
    finally:
        s.stop()


def test_model_without_a_linear_head_does_not_serve_hidden(tok):
    cfg = tiny_llama_config(17, layers=1, hidden=32, heads=2, tokenizer=tok)
    cfg.final_logit_softcapping = 30.0  # hidden @ W would not reproduce its logits
    s = ThreadServer(teacher_app(build_model(cfg, seed=0), tok))
    try:
        with pytest.raises(ValueError, match="does not serve payload=hidden .* set teacher.payload=logprobs"):
            hidden_teacher(s.url, tok, vocab=17)
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ config + doctor


def test_config_payload_rules():
    cfg = load_config(None, ["teacher.server=http://127.0.0.1:1", "teacher.payload=hidden",
                             "teacher.server_dtype=bfloat16"])
    assert cfg.teacher.payload == "hidden"
    with pytest.raises(ConfigError, match="teacher.payload=hidden needs teacher.protocol=opd"):
        load_config(None, ["teacher.server=http://127.0.0.1:1", "teacher.payload=hidden", "teacher.protocol=vllm"])
    with pytest.raises(ConfigError, match="teacher.server_dtype=bfloat16 is for hidden states"):
        load_config(None, ["teacher.server=http://127.0.0.1:1", "teacher.server_dtype=bfloat16"])
    # student_topk with a hidden payload reads the full distribution (no extra request for the student's ids)
    from opd.config.validate import resolve_teacher_access

    st = load_config(None, ["teacher.server=http://127.0.0.1:1", "teacher.payload=hidden",
                            "support.kind=student_topk", "support.k=4"])
    assert resolve_teacher_access(st) == "full"


def test_doctor_self_test_function(server, tok, teacher_model, student, rollouts):
    remote = hidden_teacher(server.url, tok, vocab=17, dtype="float16", full_above=0)
    same = hidden_payload_difference(remote, ModelTeacher(teacher_model, tok), rollouts)
    assert same.tokens == int(rollouts.completion_mask_BT.sum())
    assert same.max_abs <= TOL["float16"]["logp"] and 0 <= same.max_full_kl <= 1e-5
    other = hidden_payload_difference(remote, ModelTeacher(student, tok), rollouts)
    assert other.max_abs > 0.1 and other.max_full_kl > 1e-2
