"""The two teacher-server protocols behind :class:`~opd.teachers.served.ServedTeacher`.

Each backend turns ``(prompts, completions, topk, token_ids)`` — token ids per sequence — into a
:class:`~opd.serve.payload.ScoreAnswer` with one row per completion token, at the teacher
temperature ``τ``:

* :class:`OPDBackend` — ``opd serve-teacher``: ``POST /v1/score`` (opd.serve.payload); the server
  applies ``τ`` and can score caller-chosen ids. Before the first request it checks the protocol
  version and that the server's tokenizer agrees with the student's
  (:func:`opd.tokenization.check_tokenizers_agree` on the files from ``GET /v1/tokenizer``).
* :class:`VLLMBackend` — vLLM's OpenAI-compatible server: ``POST /v1/completions`` with the
  sequence as the prompt (token ids) and ``prompt_logprobs=k``; the log-prob of completion token
  ``t`` is the prompt log-prob at its position, the top-k its ``k`` best entries. vLLM computes
  prompt log-probs from the raw logits and ignores the request's temperature (0.32: "prompt tokens
  skip sampling processors"), so for ``τ ≠ 1`` the backend first *probes* the server (the same
  sequence at temperature 1 and at ``τ``): if the answers are equal it asks for all ``V`` log-probs
  and tempers them itself, exactly (``log_softmax(l / τ)`` of the untempered log-probs ``l``); if
  ``V`` exceeds what the server returns (``--max-logprobs``) it refuses with an error — a served
  teacher is never silently mis-scaled.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from opd.serve.client import BadAnswer, ServiceClient, ServiceRejected
from opd.serve.payload import PROTOCOL, ScoreAnswer, ScoreRequest

__all__ = ["ClientBackend", "OPDBackend", "VLLMBackend"]


class ClientBackend:
    """What every protocol client shares: the server's URL and closing its connection."""

    client: ServiceClient

    @property
    def url(self) -> str:
        return self.client.url

    def close(self) -> None:
        self.client.close()


class OPDBackend(ClientBackend):
    """Client of ``opd serve-teacher`` (module docstring). ``dtype``: float dtype of the answer's
    log-probs (``float16`` halves the payload; sampled-token log-probs then carry ~1e-3 relative error)."""

    protocol = "opd"
    scores_chosen_ids = True

    def __init__(self, client: ServiceClient, tokenizer: PreTrainedTokenizerBase, *, temperature: float = 1.0,
                 dtype: str = "float32", check_tokenizer: bool = True, vocab_size: int | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.client = client
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.dtype = dtype
        self.check_tokenizer = check_tokenizer
        self.vocab_size = vocab_size
        self._checked = False

    def check(self) -> dict[str, Any]:
        """The server's ``/v1/info``, after checking its protocol and (``check_tokenizer``) tokenizer."""
        def valid_info(body: Any) -> dict[str, Any]:
            if not isinstance(body, dict) or "protocol" not in body or "vocab_size" not in body:
                raise BadAnswer("/v1/info lacks protocol / vocab_size (is this an opd serve-teacher server?)")
            return body

        try:
            info = self.client.get("/v1/info", valid_info)
        except ServiceRejected as err:
            if err.status != 404:
                raise
            raise ServiceRejected(f"{err}; `opd serve-teacher` answers GET /v1/info, so this is not one: if it is a "
                                  "vLLM (OpenAI-compatible) server, set teacher.protocol=vllm", err.status,
                                  err.detail) from None
        if info["protocol"] != PROTOCOL:
            raise ValueError(f"teacher server {self.url} speaks {info['protocol']!r}, this opd speaks {PROTOCOL!r}; "
                             "run the same opd version on both sides")
        if self.vocab_size is not None and int(info["vocab_size"]) != self.vocab_size:
            raise ValueError(f"teacher server {self.url} has a vocabulary of {info['vocab_size']} ids, the student "
                             f"{self.vocab_size}; token-level distillation needs one vocabulary")
        if self.check_tokenizer:
            from opd.models import load_tokenizer
            from opd.tokenization import check_tokenizers_agree

            files = self.client.get("/v1/tokenizer", lambda b: dict(b["files"]))
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in files.items():
                    if "/" in name or name.startswith("."):
                        raise ValueError(f"teacher server {self.url} sent an unexpected tokenizer file name {name!r}")
                    (Path(tmp) / name).write_text(text, encoding="utf-8")
                check_tokenizers_agree(self.tokenizer, load_tokenizer(tmp))
        self._checked = True
        return info

    def serves_logprobs(self, k: int) -> bool:
        """``opd serve-teacher`` returns any number of log-probs per token (up to ``V``)."""
        return True

    def score(self, prompts: list[list[int]], completions: list[list[int]], topk: int,
              token_ids: np.ndarray | None = None) -> ScoreAnswer:
        if not self._checked:
            self.check()
        request = ScoreRequest(prompts=prompts, completions=completions, topk=topk, token_ids=token_ids,
                               temperature=self.temperature, dtype=self.dtype)
        return self.client.post("/v1/score", request.to_json(),
                                lambda body: ScoreAnswer.from_json(body, request, vocab_size=self.vocab_size))


def _tempered(logprobs_NV: np.ndarray, temperature: float) -> np.ndarray:
    """``log_softmax(l / τ)`` of full untempered log-probs ``l`` (= ``log_softmax(z / τ)``), in float64."""
    x = logprobs_NV.astype(np.float64) / temperature
    top = x.max(axis=1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))


class VLLMBackend(ClientBackend):
    """Client of vLLM's OpenAI-compatible server (module docstring).

    Args:
        vocab_size: ``V`` (needed to ask for the full distribution when ``τ ≠ 1``).
        model: the served model's name; default: the first of ``GET /v1/models``.
        check_tokenizer: compare the server's encoding of a probe text (``POST /tokenize``) with the
            student tokenizer's.
    """

    protocol = "vllm"
    scores_chosen_ids = False

    def __init__(self, client: ServiceClient, tokenizer: PreTrainedTokenizerBase, *, vocab_size: int,
                 temperature: float = 1.0, model: str | None = None, check_tokenizer: bool = True):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.client = client
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.temperature = float(temperature)
        self.model = model
        self.check_tokenizer = check_tokenizer
        self.temper_here: bool | None = None if self.temperature != 1.0 else False  # decided by the probe
        self._tokenizer_checked = False
        # the largest prompt_logprobs the server answered / the smallest it refused (serves_logprobs)
        self._served_k, self._refused_k = 0, math.inf

    # -- set-up ---------------------------------------------------------------------------------
    def _model_name(self) -> str:
        if self.model is None:
            def first_model(body: Any) -> str:
                return str(body["data"][0]["id"])

            try:
                self.model = self.client.get("/v1/models", first_model)
            except ServiceRejected as err:
                if err.status != 404:
                    raise
                # `opd serve-teacher` has no /v1/models: the usual cause is the protocol, not the server
                raise ServiceRejected(f"{err}; a vLLM (OpenAI-compatible) server answers GET /v1/models, so this is "
                                      "not one: if it is `opd serve-teacher`, set teacher.protocol=opd",
                                      err.status, err.detail) from None
        return self.model

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        special = set(tok.all_special_ids)
        ids = [i for i in sorted(tok.get_vocab().values()) if i not in special][:32]
        probe = tok.decode(ids)
        mine = list(tok(probe).input_ids)
        theirs = self.client.post("/tokenize", {"model": self._model_name(), "prompt": probe},
                                  lambda body: [int(i) for i in body["tokens"]])
        if mine != theirs:
            raise ValueError(f"the vLLM teacher server {self.url} encodes the probe text {probe!r} as {theirs[:16]}, "
                             f"the student tokenizer as {mine[:16]}; a served teacher must share the student's "
                             "tokenizer (or set teacher.check_tokenizer=false if you are sure)")

    def _probe_temperature(self, sequence: list[int]) -> None:
        """Decide whether the server applies ``τ`` to prompt log-probs (module docstring)."""
        k = min(5, self.vocab_size)
        at_one = self._request([sequence], k, temperature=1.0)[0]
        at_tau = self._request([sequence], k, temperature=self.temperature)[0]
        same = all(a.keys() == b.keys() and all(abs(a[i] - b[i]) <= 1e-6 * max(1.0, abs(a[i])) for i in a)
                   for a, b in zip(at_one, at_tau) if a is not None and b is not None)
        if not same:
            self.temper_here = False  # the server tempers prompt log-probs itself
            return
        try:
            self._request([sequence], self.vocab_size, temperature=1.0)
        except ServiceRejected as err:
            raise ValueError(
                f"teacher.temperature={self.temperature:g} with the vLLM teacher server {self.url}: it returns "
                "untempered prompt log-probs (checked with a probe request), and tempering them needs all "
                f"V={self.vocab_size} log-probs per token, which it refused ({err.detail[:120]}). Start it with "
                f"--max-logprobs {self.vocab_size} (or -1), use teacher.protocol=opd (opd serve-teacher applies the "
                "temperature), or set teacher.temperature=1"
            ) from None
        self.temper_here = True

    # -- requests -------------------------------------------------------------------------------
    def _request(self, sequences: list[list[int]], k: int, *, temperature: float = 1.0, finish=None):
        """Per sequence, per position: ``{token id: log-prob}`` of the prompt log-probs (None at 0),
        passed through ``finish`` inside the client's validation (a malformed answer is retried)."""
        body = {"model": self._model_name(), "prompt": sequences, "max_tokens": 1, "temperature": temperature,
                "prompt_logprobs": int(k), "add_special_tokens": False}

        def parse(answer: Any):
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != len(sequences):
                raise BadAnswer(f"{len(choices)} choices for {len(sequences)} prompts")
            out = []
            for seq, choice in zip(sequences, choices):
                plp = choice.get("prompt_logprobs")
                if not isinstance(plp, list) or len(plp) != len(seq):
                    got = "none" if not isinstance(plp, list) else f"{len(plp)} positions"
                    raise BadAnswer(f"prompt_logprobs has {got} for a prompt of {len(seq)} tokens")
                rows: list[dict[int, float] | None] = []
                for pos, entry in enumerate(plp):
                    if entry is None:
                        rows.append(None)
                        continue
                    row = {int(tok): float(v["logprob"] if isinstance(v, dict) else v) for tok, v in entry.items()}
                    if any(math.isnan(x) or x > 1e-3 for x in row.values()):
                        raise BadAnswer(f"prompt_logprobs at position {pos} holds NaN or positive log-probs")
                    rows.append(row)
                out.append(rows)
            return out if finish is None else finish(out)

        return self.client.post("/v1/completions", body, parse)

    def _probe_sequence(self) -> list[int]:
        """A short sequence of ordinary tokens (the BOS when the tokenizer adds one) for probe requests."""
        tok = self.tokenizer
        special = set(tok.all_special_ids)
        ids = [i for i in sorted(tok.get_vocab().values()) if i not in special][:4]
        seq = list(tok(tok.decode(ids)).input_ids)
        return seq if len(seq) >= 2 else seq + ids[:2]

    def serves_logprobs(self, k: int) -> bool:
        """Whether the server returns ``k`` prompt log-probs per token. vLLM refuses a request above its
        ``--max-logprobs`` (default 20) with HTTP 400, so the first question about a new ``k`` is one
        tiny probe request; the answers are remembered (a server that gives ``k`` gives any less)."""
        if k <= self._served_k:
            return True
        if k >= self._refused_k:
            return False
        try:
            self._request([self._probe_sequence()], k)
        except ServiceRejected:
            self._refused_k = k
            return False
        self._served_k = k
        return True

    def check(self) -> None:
        """Reach the server: its model name, (``check_tokenizer``) the probe-text tokenizer check and
        (``τ ≠ 1``) the temperature probe — all before the first step."""
        self._model_name()
        if self.check_tokenizer and not self._tokenizer_checked:
            self._check_tokenizer()
            self._tokenizer_checked = True
        if self.temper_here is None:
            self._probe_temperature(self._probe_sequence())

    def _ensure_ready(self, sequences: list[list[int]], completions: list[list[int]]) -> bool:
        """Tokenizer check and temperature probe before the first real request; False when there is
        nothing to probe with yet (no completion token)."""
        self.check()
        if self.temper_here is None:
            first = next((s for s, c in zip(sequences, completions) if c), None)
            if first is None:
                return False
            self._probe_temperature(first)
        return True

    def score(self, prompts: list[list[int]], completions: list[list[int]], topk: int,
              token_ids: np.ndarray | None = None) -> ScoreAnswer:
        if token_ids is not None:
            raise ValueError("the vLLM protocol cannot score caller-chosen token ids; use teacher.protocol=opd")
        sequences = [p + c for p, c in zip(prompts, completions)]
        if not self._ensure_ready(sequences, completions) or not any(completions):
            return _empty_answer(topk, self.vocab_size)
        k_out = min(topk, self.vocab_size)
        k_ask = self.vocab_size if self.temper_here else k_out

        def extract(answers: list[list[dict[int, float] | None]]) -> ScoreAnswer:
            sampled, top_ids, top_lp = [], [], []
            for prompt, completion, rows in zip(prompts, completions, answers):
                for t, token in enumerate(completion):
                    row = rows[len(prompt) + t]
                    if row is None or token not in row:
                        raise BadAnswer(f"prompt_logprobs lacks the completion token {token} at position "
                                        f"{len(prompt) + t}")
                    ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
                    lps = np.fromiter(row.values(), dtype=np.float64, count=len(row))
                    if self.temper_here:
                        if len(row) < self.vocab_size:
                            raise BadAnswer(f"asked for all {self.vocab_size} log-probs, got {len(row)}")
                        lps = _tempered(lps[None], self.temperature)[0]
                    sampled.append(float(lps[ids == token][0]))
                    if topk:
                        order = np.argsort(-lps, kind="stable")[:k_out]
                        if len(order) < k_out:
                            raise BadAnswer(f"asked for {k_out} prompt log-probs per token, got {len(order)}")
                        top_ids.append(ids[order])
                        top_lp.append(lps[order])
            if not topk:
                return ScoreAnswer(sampled_logprobs_N=np.asarray(sampled, dtype=np.float32))
            return ScoreAnswer(sampled_logprobs_N=np.asarray(sampled, dtype=np.float32),
                               topk_ids_NK=np.asarray(top_ids, dtype=np.int64).reshape(-1, k_out),
                               topk_logprobs_NK=np.asarray(top_lp, dtype=np.float32).reshape(-1, k_out))

        # a server that applies τ itself gets it; otherwise the untempered log-probs are tempered here
        tau = 1.0 if self.temper_here else self.temperature
        return self._request(sequences, k_ask, temperature=tau, finish=extract)


def _empty_answer(topk: int, vocab: int) -> ScoreAnswer:
    k = min(topk, vocab)
    return ScoreAnswer(sampled_logprobs_N=np.zeros(0, dtype=np.float32),
                       topk_ids_NK=np.zeros((0, k), dtype=np.int64) if topk else None,
                       topk_logprobs_NK=np.zeros((0, k), dtype=np.float32) if topk else None)
