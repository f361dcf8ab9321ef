"""A teacher behind an HTTP server: the same :class:`~opd.types.Feedback` as an in-process model.

:class:`ServedTeacher` sends each rollout's teacher prompt and completion as token ids to a
server, receives log-probs for every completion token (padding is never sent) and lays them out
exactly as :class:`~opd.teachers.ModelTeacher` does::

    sampled_logprobs_BT[b, t] = log softmax(z_T(s_t^T) / τ)[y_t]                 (always)
    topk_ids_BTK, topk_logprobs_BTK = topk(log softmax(z_T / τ), K)              (access topk / full)
    logits_BTV = log softmax(z_T / τ)  (the full tempered log-probs; valid logits)  (access full)

with 0 at padding. The teacher prompt is built from the rollouts' examples exactly as the
in-process teacher builds it (:func:`~opd.teachers.teacher_prompt_texts`, the student's tokenizer:
a served teacher must share it — checked against the server before training where the protocol
allows). ``access="full"`` asks for all ``V`` log-probs per token, so it is refused above
:data:`FULL_VOCAB_LIMIT`; use a top-k support there, or the hidden-state payload: with a
:class:`~opd.teachers.hidden_head.HiddenBackend` (``teacher.payload=hidden``) the server sends final
hidden states and every log-prob is computed here from the teacher's head, chunk by chunk.

Two protocols (:mod:`opd.teachers.served_backends`): ``opd`` (``opd serve-teacher``; also returns
the log-probs of caller-chosen ids, :meth:`ServedTeacher.score_token_ids`) and ``vllm`` (vLLM's
OpenAI-compatible ``/v1/completions`` with ``prompt_logprobs``). Every request goes through
:class:`~opd.serve.client.ServiceClient`: bounded retries, then one
:class:`~opd.errors.ServiceError` naming the server.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opd.errors import FeedbackUnavailable
from opd.rollout import encode_prompts
from opd.serve.payload import ScoreAnswer
from opd.teachers.base import LocalModel, check_request, teacher_prompt_texts
from opd.types import Access, Feedback, Rollouts

__all__ = ["FULL_VOCAB_LIMIT", "ServedTeacher", "rollout_sequences"]

#: Largest vocabulary for which ``access="full"`` is served (``V`` log-probs per token on the wire).
FULL_VOCAB_LIMIT = 8192


def rollout_sequences(rollouts: Rollouts, tokenizer: PreTrainedTokenizerBase, *, use_context: bool = False,
                      context_template: str = "{context}\n") -> tuple[list[list[int]], list[list[int]]]:
    """Per row, the teacher prompt's ids (unpadded) and the completion's ids up to its mask's end.

    Rollouts with examples: :func:`teacher_prompt_texts` encoded with ``tokenizer`` (what an
    in-process teacher with that tokenizer reads); without examples: the student's prompt ids.
    """
    if rollouts.examples:
        texts = teacher_prompt_texts(rollouts.examples, use_context, context_template)
        ids, mask = encode_prompts(tokenizer, texts)
    else:
        if use_context:
            raise ValueError("use_context=True needs rollouts with examples (their teacher_context)")
        ids, mask = rollouts.prompt_ids_BP.cpu(), rollouts.prompt_mask_BP.cpu()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    c_ids, c_mask = rollouts.completion_ids_BT.cpu(), rollouts.completion_mask_BT.cpu().bool()
    completions = [row[m].tolist() for row, m in zip(c_ids, c_mask)]
    return prompts, completions


def _scatter(rows_N: np.ndarray, mask_BT: Tensor, fill: float | int = 0) -> Tensor:
    """Flat per-token rows ``[N, ...]`` back to ``[B, T, ...]`` (mask order), ``fill`` elsewhere."""
    values = torch.from_numpy(np.ascontiguousarray(rows_N))
    out = torch.full((*mask_BT.shape, *values.shape[1:]), fill, dtype=values.dtype)
    out[mask_BT] = values
    return out


class ServedTeacher:
    """A teacher that scores rollouts through a server (see the module docstring).

    Args:
        backend: a protocol client with ``score(prompts, completions, topk, token_ids=None) ->
            ScoreAnswer`` (:mod:`opd.teachers.served_backends`), ``url`` and ``close()``.
        tokenizer: the student's tokenizer (encodes teacher prompt texts).
        vocab_size: ``V`` of the student's output layer (sizes ``logits_BTV`` for ``access="full"``).
        use_context, context_template: as :class:`~opd.teachers.ModelTeacher`.
    """

    def __init__(self, backend, tokenizer: PreTrainedTokenizerBase, *, vocab_size: int, use_context: bool = False,
                 context_template: str = "{context}\n"):
        self.backend = backend
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.use_context = use_context
        self.context_template = context_template

    model = None  # the network is on the server

    @property
    def url(self) -> str:
        return self.backend.url

    def local_models(self) -> list[LocalModel]:
        return []

    def close(self) -> None:
        self.backend.close()

    @property
    def payload(self) -> str:
        """``"logprobs"`` or ``"hidden"`` (the backend's: :class:`opd.teachers.hidden_head.HiddenBackend`)."""
        return getattr(self.backend, "payload", "logprobs")

    def _sequences(self, rollouts: Rollouts) -> tuple[list[list[int]], list[list[int]]]:
        return rollout_sequences(rollouts, self.tokenizer, use_context=self.use_context,
                                 context_template=self.context_template)

    def logprobs_needed(self, access: Access, topk: int) -> int:
        """Log-probs per token a request for ``access`` asks of the server: ``V`` (full), ``min(topk, V)``
        (topk) or 0 (sampled: only the completion token's, which every server returns)."""
        return self.vocab_size if access == "full" else (min(topk, self.vocab_size) if access == "topk" else 0)

    def check_access(self, access: Access, topk: int, *, why: str = "") -> None:
        """Refuse, before any request, feedback the server will not give (vLLM: ``--max-logprobs``).

        Raises:
            FeedbackUnavailable: one line naming the server flag (or the setting) that would allow it.
        """
        k = self.logprobs_needed(access, topk)
        if k == 0 or self.payload == "hidden" or getattr(self.backend, "serves_logprobs", lambda _k: True)(k):
            return
        what = f"teacher.access={access}" + (f" with teacher.topk={topk}" if access == "topk" else "")
        lower = ("teacher.access=sampled" if access == "full" else
                 "teacher.topk (and support.k) at most the server's limit, or teacher.access=sampled")
        raise FeedbackUnavailable(
            f"the teacher server {self.url} refuses {k} log-probs per token, which {what} needs"
            f"{f' for {why}' if why else ''}: restart it with --max-logprobs {k} (vLLM's default is 20; -1: no "
            f"limit), or set {lower}")

    def _answer(self, rollouts: Rollouts, topk: int, token_ids_BTK: Tensor | None = None) -> ScoreAnswer:
        prompts, completions = self._sequences(rollouts)
        chosen = None
        if token_ids_BTK is not None:
            chosen = token_ids_BTK.cpu()[rollouts.completion_mask_BT.cpu().bool()].numpy()
        return self.backend.score(prompts, completions, topk, token_ids=chosen)

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Teacher feedback for ``rollouts`` from the server (module docstring), on the rollouts' device.

        Raises:
            ValueError: ``access="full"`` with a vocabulary above :data:`FULL_VOCAB_LIMIT`.
            opd.errors.FeedbackUnavailable: the server refuses the log-probs per token the access
                needs (checked before the request, :meth:`check_access`).
            opd.errors.ServiceError: the server stayed unreachable or kept answering garbage.
        """
        check_request(access, topk)
        if self.payload == "hidden":  # hidden states on the wire, the head applied here (opd.teachers.hidden_head)
            return self.backend.feedback(*self._sequences(rollouts), rollouts, access=access, topk=topk)
        device = rollouts.completion_ids_BT.device
        mask = rollouts.completion_mask_BT.cpu().bool()
        v = self.vocab_size
        if access == "full" and v > FULL_VOCAB_LIMIT:
            raise ValueError(
                f"access=full from a teacher server would send all V={v} log-probs per token (limit "
                f"{FULL_VOCAB_LIMIT}); use a top-k support (support.kind=teacher_topk with teacher.access=topk), "
                "or teacher.payload=hidden (the server sends hidden states, the trainer applies the head)"
            )
        k = min(topk, v)
        ask = self.logprobs_needed(access, topk)
        self.check_access(access, topk)
        answer = self._answer(rollouts, ask)
        fields: dict[str, Tensor] = {"sampled_logprobs_BT": _scatter(answer.sampled_logprobs_N, mask).float()}
        if access != "sampled":
            ids, lps = answer.topk_ids_NK, answer.topk_logprobs_NK
            if access == "full":
                full = np.full((ids.shape[0], v), -np.inf, dtype=np.float32)
                np.put_along_axis(full, ids, lps, axis=1)
                if np.isinf(full).all(axis=1).any():
                    raise ValueError("the teacher server's full distribution holds a row without any finite log-prob")
                fields["logits_BTV"] = _scatter(full, mask).float()
                ids, lps = ids[:, :k], lps[:, :k]
            fields["topk_ids_BTK"] = _scatter(ids, mask).long()
            fields["topk_logprobs_BTK"] = _scatter(lps, mask).float()
        return Feedback(access=access, **{key: t.to(device) for key, t in fields.items()})

    def score_token_ids(self, rollouts: Rollouts, token_ids_BTK: Tensor) -> Tensor:
        """``log π_T(v | s_t)`` at temperature τ for caller-chosen ids ``token_ids_BTK[b, t, :]`` (e.g. the
        student's top-k at each position, for an exact RKL on the student's support without V-wide
        payloads); 0 at padding. Only the ``opd`` protocol offers it.

        Raises:
            ValueError: the protocol cannot score chosen ids, or ``token_ids_BTK`` does not match the
                rollouts' ``[B, T]``.
        """
        b, t = rollouts.completion_ids_BT.shape
        if token_ids_BTK.dim() != 3 or tuple(token_ids_BTK.shape[:2]) != (b, t):
            raise ValueError(f"token_ids_BTK has shape {tuple(token_ids_BTK.shape)}, expected ({b}, {t}, K)")
        if not getattr(self.backend, "scores_chosen_ids", False):
            raise ValueError(f"teacher.protocol={self.backend.protocol} cannot score caller-chosen token ids; "
                             "use teacher.protocol=opd (opd serve-teacher)")
        if self.payload == "hidden":
            return self.backend.token_logprobs(*self._sequences(rollouts), rollouts, token_ids_BTK)
        answer = self._answer(rollouts, 0, token_ids_BTK)
        mask = rollouts.completion_mask_BT.cpu().bool()
        return _scatter(answer.token_logprobs_NM, mask).float().to(rollouts.completion_ids_BT.device)
