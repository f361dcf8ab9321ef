"""The hidden-state payload of the ``opd`` scoring protocol (``payload=hidden``; issue 21).

Instead of ``V`` log-probs per token the server answers the teacher's **final hidden states** (after
its last norm) at every completion position, ``H`` values per token, and the caller applies the
teacher's output head ``z = h Wᵀ + b`` itself, chunk by chunk (:mod:`opd.math.head_logprobs`,
:mod:`opd.math.fused`). For completion token ``t`` of sequence ``s`` (state ``s_t``)::

    hidden_t = h_T(s_t)                      (the decoder's output, what lm_head reads)
    log π_T(· | s_t) = log_softmax((h_t Wᵀ + b) / τ)   (computed by the caller, fp32)

— the same forward pass as the log-prob payload (:func:`opd.forward.completion_forward` with
``output="hidden"``). Bytes per token: ``H·4`` (fp32) or ``H·2`` (fp16 / bf16) against ``V·4`` for
full fp32 log-probs; at ``V = 49,152, H = 576`` that is 85× / 170× fewer.

A hidden state is only meaningful with the head it was computed for, so the server publishes two
digests (:func:`head_digest`, :func:`weights_digest`) at ``GET /v1/info``, the head itself at
``GET /v1/head`` (fp32 arrays), and the weights digest in every answer: a client refuses a head whose
digest does not match and an answer from a server whose weights changed (e.g. restarted with another
model) since it fetched the head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from opd.serve.client import BadAnswer
from opd.serve.payload import ScoreRequest, decode_array, encode_array
from opd.serve.scoring import forward_groups

__all__ = ["HiddenAnswer", "decode_head", "encode_head", "head_digest", "score_hidden", "weights_digest"]


def _update(h: "hashlib._Hash", name: str, t: Tensor | None) -> None:
    h.update(name.encode() + b"\0")
    if t is None:
        h.update(b"none\0")
        return
    a = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    h.update(np.asarray(a.shape, dtype="<i8").tobytes())
    h.update(a.tobytes())


def head_digest(weight_VH: Tensor, bias_V: Tensor | None = None) -> str:
    """SHA-256 (hex) of the head ``(W, b)`` as little-endian float32 with its shape: the same value on
    both ends whatever dtype the model holds them in (the digest of ``W.float()``)."""
    h = hashlib.sha256(b"opd-head/1\0")
    _update(h, "weight", weight_VH)
    _update(h, "bias", bias_V)
    return h.hexdigest()


def weights_digest(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 (hex) of every named tensor (sorted by name, as float32): e.g. ``model.state_dict().items()``.
    A server restarted with other weights announces another value."""
    h = hashlib.sha256(b"opd-weights/1\0")
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        _update(h, name, t)
    return h.hexdigest()


def encode_head(weight_VH: Tensor, bias_V: Tensor | None) -> dict[str, Any]:
    """The body of ``GET /v1/head``: ``weight`` ``[V, H]`` and ``bias`` ``[V]`` (or null) as fp32 arrays
    and their ``head_sha256``."""
    return {"weight": encode_array(weight_VH.detach().float().cpu().numpy(), "float32"),
            "bias": None if bias_V is None else encode_array(bias_V.detach().float().cpu().numpy(), "float32"),
            "head_sha256": head_digest(weight_VH, bias_V)}


def decode_head(body: Any, *, vocab_size: int | None, hidden_size: int | None,
                digest: str) -> tuple[Tensor, Tensor | None]:
    """``(weight_VH, bias_V)`` from a ``GET /v1/head`` body, checked: shapes ``[V, H]`` / ``[V]``, finite
    values, and :func:`head_digest` equal to ``digest`` (the one ``/v1/info`` announced).

    Raises:
        BadAnswer: a malformed body, a wrong shape, a non-finite value or a digest mismatch.
    """
    if not isinstance(body, dict) or "weight" not in body:
        raise BadAnswer("/v1/head lacks 'weight' (is this an opd serve-teacher server with payload=hidden?)")
    weight = decode_array(body["weight"], "head weight", dtypes=("float32",), shape=(vocab_size, hidden_size))
    bias = None
    if body.get("bias") is not None:
        bias = decode_array(body["bias"], "head bias", dtypes=("float32",), shape=(weight.shape[0],))
    for name, a in (("head weight", weight), ("head bias", bias)):
        if a is not None and not np.isfinite(a).all():
            raise BadAnswer(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite value(s)")
    w, b = torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias)
    got = head_digest(w, b)
    if got != digest:
        raise BadAnswer(f"the head's sha256 is {got[:12]}…, the server announced {digest[:12]}…")
    return w, b


@dataclass(frozen=True)
class HiddenAnswer:
    """The answer to a ``payload=hidden`` request: ``hidden_NH`` (fp32 after decoding, one row per
    completion token, sequences in request order) and the server's :func:`weights_digest`."""

    hidden_NH: np.ndarray
    weights_sha256: str

    @property
    def n_tokens(self) -> int:
        return int(self.hidden_NH.shape[0])

    def take(self, rows: slice) -> "HiddenAnswer":
        """The answer of a sub-range of rows (the batcher hands each caller its own)."""
        return HiddenAnswer(self.hidden_NH[rows], self.weights_sha256)

    def to_json(self, dtype: str) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "hidden": encode_array(self.hidden_NH, dtype),
                "weights_sha256": self.weights_sha256}

    @classmethod
    def from_json(cls, body: Any, request: ScoreRequest, *, hidden_size: int | None,
                  weights_sha256: str | None = None) -> "HiddenAnswer":
        """Parse and check an answer: ``[N, H]`` hidden states in the requested dtype (or fp32), all finite,
        and (when given) the weights digest the client started with.

        Raises:
            BadAnswer: what is wrong (a missing field, a wrong shape or hidden size, NaN / Inf, or a
                server whose weights changed).
        """
        if not isinstance(body, dict):
            raise BadAnswer(f"the answer is a JSON {type(body).__name__}, not an object")
        if "hidden" not in body:
            raise BadAnswer("the answer lacks 'hidden' (does the server support payload=hidden? update opd there)")
        digest = body.get("weights_sha256")
        if weights_sha256 is not None and digest != weights_sha256:
            raise BadAnswer(f"the server's weights changed (sha256 {str(digest)[:12]}…, the run started with "
                            f"{weights_sha256[:12]}…): it was restarted with another model; restart it with the "
                            "teacher this run started with, or start a new run")
        hidden = decode_array(body["hidden"], "hidden", dtypes=(request.dtype, "float32"),
                              shape=(request.n_tokens, None))
        if hidden_size is not None and hidden.shape[1] != hidden_size:
            raise BadAnswer(f"hidden has {hidden.shape[1]} values per token, the teacher's head reads {hidden_size}")
        bad = ~np.isfinite(hidden)
        if bad.any():
            raise BadAnswer(f"hidden holds {int(bad.sum())} NaN/Inf value(s)")
        return cls(hidden_NH=hidden, weights_sha256=str(digest))


@torch.no_grad()
def score_hidden(model: nn.Module, request: ScoreRequest, *, weights_sha256: str, pad_id: int = 0,
                 max_batch_tokens: int = 16384) -> HiddenAnswer:
    """The final hidden states of ``model`` at every completion position of ``request`` (module
    docstring), in micro-batches of at most ``max_batch_tokens`` padded positions."""
    hidden: np.ndarray | None = None
    for rows, _, keep, out in forward_groups(model, request, pad_id=pad_id, max_batch_tokens=max_batch_tokens,
                                             output="hidden"):
        flat = out[keep].float().cpu().numpy()
        if hidden is None:
            hidden = np.zeros((request.n_tokens, flat.shape[1]), dtype=np.float32)
        hidden[rows] = flat
    if hidden is None:  # no completion token at all
        size = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        hidden = np.zeros((0, size), dtype=np.float32)
    return HiddenAnswer(hidden_NH=hidden, weights_sha256=weights_sha256)
