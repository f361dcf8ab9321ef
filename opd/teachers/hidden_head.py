"""Full-vocabulary feedback from a served teacher at hidden-state cost (``teacher.payload=hidden``).

The server (``opd serve-teacher``, :mod:`opd.serve.hidden`) returns the teacher's final hidden states
``h_t`` (after its last norm, ``H`` values per token in fp32 / fp16 / bf16) at every completion
position; the trainer holds the teacher's output head ``(W, b)`` — fetched once from the server at
start (``GET /v1/head``) or given from the teacher's files — and checks it by its SHA-256 against the
digest the server announces, so a server with another head is refused; every answer carries the
digest of all the server's weights, and an answer from a server whose weights changed since the head
was fetched (restarted with another model) is refused. Then, at temperature ``τ``::

    log π_T(· | s_t) = log_softmax((h_t Wᵀ + b) / τ)

* sampled-token, top-k and caller-chosen-id log-probs are computed chunk by chunk
  (:func:`opd.math.head_logprobs.head_logprobs`: a ``[chunk, V]`` block at a time);
* ``access="full"`` returns the hidden-state accessor ``hidden_BTH`` with ``head_weight_VH = W/τ`` and
  ``head_bias_V = b/τ`` (:class:`~opd.types.Feedback`), which route 1's fused path
  (:func:`opd.math.fused.fused_linear_divergence`) projects chunk by chunk — never ``[B·T, V]``. For a
  vocabulary of at most ``full_as_hidden_above_vocab`` ids it returns ``logits_BTV = (h Wᵀ + b)/τ``
  instead, exactly as the in-process :class:`~opd.teachers.ModelTeacher` does (the dense path of small
  vocabularies).

The feedback equals the in-process teacher's on the same rollouts up to the rounding of the hidden
states on the wire (fp32: the same forward pass; docs/serving.md gives the measured fp16 / bf16
differences). :func:`hidden_payload_difference` measures it for ``opd doctor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opd.math.head_logprobs import head_logprobs
from opd.serve.client import ServiceClient
from opd.serve.hidden import HiddenAnswer, decode_head, head_digest
from opd.serve.payload import ScoreRequest
from opd.teachers.served_backends import ClientBackend, OPDBackend
from opd.types import Access, Feedback, Rollouts

__all__ = ["HIDDEN_DTYPES", "HiddenBackend", "HiddenPayloadCheck", "hidden_payload_difference"]

#: Wire dtypes of the hidden states.
HIDDEN_DTYPES = ("float32", "float16", "bfloat16")


def _scatter(rows_N: Tensor, mask_BT: Tensor) -> Tensor:
    out = torch.zeros((*mask_BT.shape, *rows_N.shape[1:]), dtype=rows_N.dtype, device=rows_N.device)
    out[mask_BT.to(rows_N.device)] = rows_N
    return out


class HiddenBackend(ClientBackend):
    """Client of ``opd serve-teacher`` for ``payload=hidden`` (module docstring).

    Args:
        client: the server's :class:`~opd.serve.client.ServiceClient`.
        tokenizer: the student's tokenizer (checked against the server's, as for the log-prob payload).
        temperature: ``τ``, applied here through the head.
        dtype: wire dtype of the hidden states (:data:`HIDDEN_DTYPES`).
        vocab_size: the student's ``V``; the server's head must have as many rows.
        head: ``(weight_VH, bias_V)`` read from the teacher's own files; None = fetch it from the server.
            Either way its digest must equal the server's ``head_sha256``.
        full_as_hidden_above_vocab: above this ``V``, ``access="full"`` returns the hidden-state accessor;
            at or below it, tempered logits (as :class:`~opd.teachers.ModelTeacher`).
        chunk_size: rows per ``[chunk, V]`` block for the sampled / top-k log-probs (None = automatic).
    """

    protocol = "opd"
    payload = "hidden"
    scores_chosen_ids = True

    def __init__(self, client: ServiceClient, tokenizer: PreTrainedTokenizerBase, *, temperature: float = 1.0,
                 dtype: str = "float32", check_tokenizer: bool = True, vocab_size: int | None = None,
                 head: tuple[Tensor, Tensor | None] | None = None, full_as_hidden_above_vocab: int = 8192,
                 chunk_size: int | None = None):
        if dtype not in HIDDEN_DTYPES:
            raise ValueError(f"teacher.server_dtype={dtype!r} is not a hidden-state dtype; choose one of "
                             f"{', '.join(HIDDEN_DTYPES)}")
        self.inner = OPDBackend(client, tokenizer, temperature=temperature, dtype="float32",
                                check_tokenizer=check_tokenizer, vocab_size=vocab_size)
        self.client = client
        self.temperature = float(temperature)
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.full_as_hidden_above_vocab = int(full_as_hidden_above_vocab)
        self.chunk_size = chunk_size
        self._local_head = head
        self.head: tuple[Tensor, Tensor | None] | None = None
        self.hidden_size: int | None = None
        self.weights_sha256: str | None = None
        self._tempered: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def check(self) -> dict[str, Any]:
        """Reach the server (protocol, vocabulary, tokenizer: :meth:`OPDBackend.check`), check that it serves
        ``payload=hidden``, and take the head: the given one or ``GET /v1/head``, refused unless its digest
        is the server's ``head_sha256``. Returns the server's ``/v1/info``.

        Raises:
            ValueError: the server does not serve hidden states, or the given head is not the server's.
            opd.errors.ServiceError: the server is down or keeps answering garbage.
        """
        info = self.inner.check()
        if "hidden" not in info.get("payloads", ()) or "head_sha256" not in info:
            raise ValueError(f"teacher server {self.url} does not serve payload=hidden (an older opd, or a model whose "
                             "output layer is not a plain linear head); set teacher.payload=logprobs or update opd "
                             "on the server")
        self.hidden_size = int(info["hidden_size"])
        digest = str(info["head_sha256"])
        if self._local_head is not None:
            weight, bias = self._local_head
            if tuple(weight.shape) != (int(self.vocab_size or weight.shape[0]), self.hidden_size):
                raise ValueError(f"the teacher head given has shape {tuple(weight.shape)}, the server's hidden states "
                                 f"have {self.hidden_size} values per token (V = {self.vocab_size})")
            if head_digest(weight, bias) != digest:
                raise ValueError(f"the teacher head read from the teacher's files is not the one teacher server "
                                 f"{self.url} uses (sha256 {head_digest(weight, bias)[:12]}… vs {digest[:12]}…): the "
                                 "server runs other weights; serve the same teacher, or let opd fetch the head")
            head = (weight.detach().float().cpu(), None if bias is None else bias.detach().float().cpu())
        else:
            head = self.client.get("/v1/head", lambda body: decode_head(
                body, vocab_size=self.vocab_size, hidden_size=self.hidden_size, digest=digest))
        self.head = head
        self.weights_sha256 = str(info["weights_sha256"])
        self._tempered = {}
        return info

    def tempered_head(self, device: torch.device | str) -> tuple[Tensor, Tensor | None]:
        """``(W/τ, b/τ)`` on ``device`` (computed once per device: the teacher is frozen)."""
        if self.head is None:
            self.check()
        device = torch.device(device)
        if device not in self._tempered:
            weight, bias = self.head  # type: ignore[misc]
            tau = self.temperature
            self._tempered[device] = ((weight / tau).to(device),
                                      None if bias is None else (bias / tau).to(device))
        return self._tempered[device]

    def hidden(self, prompts: list[list[int]], completions: list[list[int]]) -> Tensor:
        """The server's hidden states ``[N, H]`` (fp32) at every completion token, sequences in order."""
        if self.head is None:
            self.check()
        request = ScoreRequest(prompts=prompts, completions=completions, topk=0, temperature=1.0,
                               dtype=self.dtype, payload="hidden")
        if request.n_tokens == 0:
            return torch.zeros(0, int(self.hidden_size or 0))

        def validate(body: Any) -> HiddenAnswer:
            return HiddenAnswer.from_json(body, request, hidden_size=self.hidden_size,
                                          weights_sha256=self.weights_sha256)

        answer = self.client.post("/v1/score", request.to_json(), validate)
        return torch.from_numpy(np.ascontiguousarray(answer.hidden_NH))

    def feedback(self, prompts: list[list[int]], completions: list[list[int]], rollouts: Rollouts, *,
                 access: Access, topk: int) -> Feedback:
        """The teacher's :class:`~opd.types.Feedback` on ``rollouts`` (module docstring), on their device."""
        device = rollouts.completion_ids_BT.device
        mask = rollouts.completion_mask_BT.bool().to(device)
        hidden_N = self.hidden(prompts, completions).to(device)
        weight, bias = self.tempered_head(device)
        ids_N = rollouts.completion_ids_BT[mask]
        k = min(topk, weight.shape[0]) if access != "sampled" else 0
        # the head is already divided by τ: temperature 1 here
        lp = head_logprobs(hidden_N, weight, bias, ids_N, topk=k, chunk_size=self.chunk_size)
        fields: dict[str, Tensor | None] = {"sampled_logprobs_BT": _scatter(lp.sampled_N, mask)}
        if access != "sampled":
            fields["topk_ids_BTK"] = _scatter(lp.topk_ids_NK, mask)
            fields["topk_logprobs_BTK"] = _scatter(lp.topk_logprobs_NK, mask)
        if access == "full":
            if weight.shape[0] <= self.full_as_hidden_above_vocab:
                fields["logits_BTV"] = _scatter(F.linear(hidden_N, weight, bias), mask)
            else:
                fields["hidden_BTH"] = _scatter(hidden_N, mask)
                fields["head_weight_VH"], fields["head_bias_V"] = weight, bias
        return Feedback(access=access, **fields)

    def token_logprobs(self, prompts: list[list[int]], completions: list[list[int]], rollouts: Rollouts,
                       token_ids_BTK: Tensor) -> Tensor:
        """``log π_T(v | s_t)`` at temperature τ for caller-chosen ids ``token_ids_BTK`` (0 on padding)."""
        device = rollouts.completion_ids_BT.device
        mask = rollouts.completion_mask_BT.bool().to(device)
        hidden_N = self.hidden(prompts, completions).to(device)
        weight, bias = self.tempered_head(device)
        lp = head_logprobs(hidden_N, weight, bias, rollouts.completion_ids_BT[mask],
                           chosen_ids_NM=token_ids_BTK.to(device)[mask], chunk_size=self.chunk_size)
        return _scatter(lp.chosen_NM, mask)


@dataclass(frozen=True)
class HiddenPayloadCheck:
    """Max absolute differences between a hidden-payload teacher and a reference on the same rollouts:
    sampled-token log-probs, the top-``k`` log-prob values (sorted, so equal values in another order do not
    count), and the per-token reverse KL ``KL(π_ref ‖ π_served)`` over the full vocabulary (≥ 0)."""

    max_abs_sampled: float
    max_abs_topk: float
    max_full_kl: float
    tokens: int

    @property
    def max_abs(self) -> float:
        """The larger of the two log-prob differences."""
        return max(self.max_abs_sampled, self.max_abs_topk)


@torch.no_grad()
def hidden_payload_difference(served: Any, reference: Any, rollouts: Rollouts, *, topk: int = 8) -> HiddenPayloadCheck:
    """Score ``rollouts`` with ``served`` (a teacher with ``payload=hidden``) and ``reference`` (e.g. the
    in-process teacher, or the same server with the log-prob payload) and return the differences
    (:class:`HiddenPayloadCheck`) — ``opd doctor``'s teacher self-test for this payload.

    The full-vocabulary comparison goes through the two feedbacks' full distributions chunk by chunk
    (``logits_BTV`` or the hidden-state accessor), so it never holds ``[B·T, V]`` for a large vocabulary.
    """
    a = served.score(rollouts, access="full", topk=topk)
    b = reference.score(rollouts, access="full", topk=topk)
    mask = rollouts.completion_mask_BT.bool().to(a.sampled_logprobs_BT.device)
    n = int(mask.sum())
    if n == 0:
        return HiddenPayloadCheck(0.0, 0.0, 0.0, 0)
    d_sampled = (a.sampled_logprobs_BT[mask] - b.sampled_logprobs_BT.to(mask.device)[mask]).abs().max()
    ka = a.topk_logprobs_BTK[mask].sort(dim=-1, descending=True).values
    kb = b.topk_logprobs_BTK.to(mask.device)[mask].sort(dim=-1, descending=True).values
    d_topk = (ka - kb).abs().max()
    kl = 0.0
    chunk = 256
    za, zb = _full_logits_rows(a, mask), _full_logits_rows(b, mask)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        lpa, lpb = torch.log_softmax(za(rows), -1), torch.log_softmax(zb(rows), -1)
        kl = max(kl, float((lpb.exp() * (lpb - lpa)).sum(-1).max()))
    return HiddenPayloadCheck(float(d_sampled), float(d_topk), kl, n)


def _full_logits_rows(fb: Feedback, mask_BT: Tensor):
    """A function ``rows -> [rows, V]`` fp32 tempered logits of the valid tokens of ``fb`` (chunked)."""
    if fb.logits_BTV is not None:
        logits = fb.logits_BTV.to(mask_BT.device)[mask_BT]
        return lambda rows: logits[rows].float()
    if fb.hidden_BTH is None or fb.head_weight_VH is None:
        raise ValueError("the feedback holds no full distribution (logits_BTV or hidden_BTH + head_weight_VH)")
    hidden = fb.hidden_BTH.to(mask_BT.device)[mask_BT]
    w, b = fb.head_weight_VH.float(), None if fb.head_bias_V is None else fb.head_bias_V.float()
    return lambda rows: F.linear(hidden[rows].float(), w.to(hidden.device), None if b is None else b.to(hidden.device))
