"""The teacher server behind ``opd serve-teacher MODEL``: a FastAPI app over any HF causal LM.

Endpoints (docs/serving.md has the field-by-field format):

* ``GET /health`` — 200 once the model is loaded;
* ``GET /v1/info`` — protocol version, model name, vocabulary size, special token ids, and the
  batching counters;
* ``GET /v1/tokenizer`` — the tokenizer's ``save_pretrained`` files (text), so a client can check
  that it agrees with the student's before training (:func:`opd.tokenization.check_tokenizers_agree`);
* ``POST /v1/score`` — a :class:`~opd.serve.payload.ScoreRequest`; answers a
  :class:`~opd.serve.payload.ScoreAnswer` (sampled-token, top-k and caller-chosen-id log-probs at
  the requested temperature), or with ``payload=hidden`` a :class:`~opd.serve.hidden.HiddenAnswer`
  (final hidden states). A malformed request gets HTTP 400 with one line saying why;
* ``GET /v1/head`` — the output head (fp32 weight and bias, and its digest) for ``payload=hidden``.

Concurrent requests are batched (:class:`~opd.serve.batcher.Batcher`).
"""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.forward import HeadNotLinearError, lm_head_of, lm_head_vocab_size
from opd.serve.batcher import Batcher
from opd.serve.hidden import encode_head, head_digest, score_hidden, weights_digest
from opd.serve.payload import PAYLOADS, PROTOCOL, ScoreRequest
from opd.serve.scoring import score_request

__all__ = ["build_app", "hidden_payload_info", "tokenizer_files"]


def hidden_payload_info(model: nn.Module) -> dict[str, Any] | None:
    """What ``payload=hidden`` needs announced (``hidden_size``, ``head_sha256``, ``weights_sha256``) and
    the ``GET /v1/head`` body (``head``); None when the model's head is not a plain linear layer
    (:func:`opd.forward.lm_head_of` says why), so hidden states would not reproduce its logits."""
    try:
        weight, bias = lm_head_of(model)
    except HeadNotLinearError:
        return None
    return {"hidden_size": int(weight.shape[1]), "head_sha256": head_digest(weight, bias),
            "weights_sha256": weights_digest(model.state_dict().items()), "head": encode_head(weight, bias)}


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as ``{name: text}`` (binary files are skipped:
    fast tokenizers keep everything in ``tokenizer.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for path in sorted(Path(tmp).iterdir()):
            try:
                out[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
        return out


def build_app(model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, name: str, max_batch_tokens: int = 16384,
              batch_wait: float = 0.005):
    """The FastAPI application serving ``model`` (kept in eval mode, never trained).

    Args:
        name: what ``/v1/info`` calls the model (its path or hub id).
        max_batch_tokens: padded positions per forward pass, and completion tokens merged across
            requests into one scoring call.
        batch_wait: seconds to wait for more requests once one has arrived.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    vocab = lm_head_vocab_size(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hidden_info = hidden_payload_info(model)

    def score(request: ScoreRequest):
        if request.payload == "hidden":
            if hidden_info is None:
                raise ValueError("unreachable: hidden requests are refused at parsing when there is no linear head")
            return score_hidden(model, request, weights_sha256=hidden_info["weights_sha256"], pad_id=int(pad_id),
                                max_batch_tokens=max_batch_tokens)
        return score_request(model, request, pad_id=int(pad_id), max_batch_tokens=max_batch_tokens)

    batcher = Batcher(score, max_tokens=max_batch_tokens, max_wait=batch_wait)
    files = tokenizer_files(tokenizer)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await batcher.close()

    app = FastAPI(title="opd teacher server", version=PROTOCOL, lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {"protocol": PROTOCOL, "model": name, "vocab_size": vocab,
                "special_token_ids": {role: getattr(tokenizer, f"{role}_token_id", None)
                                      for role in ("bos", "eos", "pad", "unk")},
                "max_batch_tokens": max_batch_tokens, "batches": batcher.batches,
                "requests_scored": batcher.requests_scored,
                "payloads": list(PAYLOADS) if hidden_info is not None else ["logprobs"],
                **({} if hidden_info is None else {k: v for k, v in hidden_info.items() if k != "head"})}

    @app.get("/v1/head")
    async def head_endpoint():
        if hidden_info is None:
            return JSONResponse(status_code=404, content={"error": "this model's output layer is not a plain linear "
                                                          "head: payload=hidden is not served"})
        return hidden_info["head"]

    @app.get("/v1/tokenizer")
    async def tokenizer_endpoint() -> dict[str, Any]:
        return {"files": files}

    @app.post("/v1/score")
    async def score_endpoint(raw: Request):
        try:
            body = await raw.json()
            request = ScoreRequest.from_json(body, vocab_size=vocab)
            if request.payload == "hidden" and hidden_info is None:
                raise ValueError("this model's output layer is not a plain linear head (soft-capping, a logit scale "
                                 "or another layer): payload=hidden is not served; ask for payload=logprobs")
        except ValueError as err:  # includes JSON decode errors and BadAnswer (a ValueError)
            return JSONResponse(status_code=400, content={"error": str(err)})
        answer = await batcher.submit(request)
        return answer.to_json(request.dtype)

    return app
