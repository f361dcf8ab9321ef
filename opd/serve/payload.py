"""The ``opd`` scoring protocol's wire format: JSON with arrays as base64 little-endian buffers.

A request (``POST /v1/score``) holds a batch of sequences, each a teacher prompt and a completion,
given as token ids; the answer holds, for every completion token (padding is never sent), the
teacher's log-probabilities at temperature ``τ``. docs/serving.md documents the format field by
field; this module is its one implementation (the server and the client both use it).

Arrays travel as ``{"data": base64, "dtype": "int32" | "float16" | "bfloat16" | "float32", "shape": [...]}``:
ids as int32, log-probs as float16 or float32 (the caller chooses); ``bfloat16`` (the upper 16 bits of
the float32, rounded to nearest even) carries hidden states (``payload=hidden``, :mod:`opd.serve.hidden`). A top-32 answer at float16 costs
``32·(4 + 2) + 2 = 194`` bytes per token before base64 (×4/3 on the wire), against ``4·V`` for a
full fp32 distribution (128 kB at V = 32000).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opd.serve.client import BadAnswer

__all__ = [
    "PAYLOADS",
    "PROTOCOL",
    "ScoreAnswer",
    "ScoreRequest",
    "decode_array",
    "encode_array",
]

#: The protocol version a server announces at ``GET /v1/info`` and a client checks.
PROTOCOL = "opd-score/1"
#: What ``POST /v1/score`` can return: log-probs (:class:`ScoreAnswer`) or final hidden states
#: (:class:`opd.serve.hidden.HiddenAnswer`; the caller holds the teacher's head).
PAYLOADS = ("logprobs", "hidden")
_DTYPES = {"int32": np.int32, "float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (``uint16``), round to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) → float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_array(values: Any, dtype: str) -> dict[str, Any]:
    """``values`` (array-like) as a JSON object ``{data, dtype, shape}`` (little-endian)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        values = _to_bfloat16_bits(np.asarray(values, dtype=np.float32))
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")))
    return {"data": base64.b64encode(arr.tobytes()).decode("ascii"), "dtype": dtype, "shape": list(arr.shape)}


def decode_array(obj: Any, name: str, *, dtypes: Sequence[str] = ("int32", "float16", "bfloat16", "float32"),
                 shape: Sequence[int | None] | None = None) -> np.ndarray:
    """The array an :func:`encode_array` object holds (a writable copy; floats widened to float32).

    ``shape`` entries that are not None must match. Raises :class:`BadAnswer` naming ``name`` for a
    malformed object, an unexpected dtype, a byte count that does not match the shape, or a shape
    mismatch.
    """
    if not isinstance(obj, dict) or not {"data", "dtype", "shape"} <= obj.keys():
        raise BadAnswer(f"{name} is not an array object {{data, dtype, shape}}")
    dtype = obj["dtype"]
    if dtype not in dtypes:
        raise BadAnswer(f"{name} has dtype {dtype!r}, expected one of {list(dtypes)}")
    dims = obj["shape"]
    if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise BadAnswer(f"{name} has an invalid shape {dims!r}")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (ValueError, TypeError) as err:
        raise BadAnswer(f"{name} is not valid base64 ({err})") from None
    item = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != count * item.itemsize:
        raise BadAnswer(f"{name} holds {len(raw)} bytes, but shape {dims} of {dtype} needs {count * item.itemsize}")
    arr = np.frombuffer(raw, dtype=item).reshape(dims)
    if shape is not None:
        if len(shape) != len(dims) or any(s is not None and s != d for s, d in zip(shape, dims)):
            want = ["*" if s is None else s for s in shape]
            raise BadAnswer(f"{name} has shape {dims}, expected {want}")
    if dtype == "bfloat16":
        return _from_bfloat16_bits(arr.astype(np.uint16))  # a native-endian, writable copy
    out = arr.astype(np.float32 if dtype != "int32" else np.int64)  # a native-endian, writable copy
    return out


@dataclass(frozen=True)
class ScoreRequest:
    """A batch of sequences to score (the body of ``POST /v1/score``).

    Attributes:
        prompts: per sequence, the teacher prompt's token ids (at least one).
        completions: per sequence, the completion's token ids (may be empty); the answer holds one
            row per completion token, sequences concatenated in order (``N = Σ len``).
        topk: return the teacher's ``topk`` most likely ids and their log-probs per token (0 = none).
        token_ids: per completion token, ``M`` caller-chosen ids whose log-probs to return (e.g. the
            student's top-k), as an ``[N, M]`` array; None = none.
        temperature: ``τ``; every log-prob is ``log_softmax(z / τ)``.
        dtype: float dtype of the log-probs in the answer (``float16`` or ``float32``), or of the hidden
            states (``payload="hidden"``: also ``bfloat16``).
        payload: ``"logprobs"`` (the default) or ``"hidden"``: the answer is the teacher's final hidden
            states at every completion position (:class:`opd.serve.hidden.HiddenAnswer`), and the
            caller applies the teacher's head itself; ``topk``, ``token_ids`` and ``temperature`` are
            then not used (the caller's head applies the temperature).
    """

    prompts: list[list[int]]
    completions: list[list[int]]
    topk: int = 0
    token_ids: np.ndarray | None = None
    temperature: float = 1.0
    dtype: str = "float32"
    payload: str = "logprobs"

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    def to_json(self) -> dict[str, Any]:
        flat_p = [i for p in self.prompts for i in p]
        flat_c = [i for c in self.completions for i in c]
        body: dict[str, Any] = {
            "prompt_ids": encode_array(flat_p, "int32"), "prompt_lengths": [len(p) for p in self.prompts],
            "completion_ids": encode_array(flat_c, "int32"),
            "completion_lengths": [len(c) for c in self.completions],
            "topk": int(self.topk), "temperature": float(self.temperature), "dtype": self.dtype,
        }
        if self.token_ids is not None:
            body["token_ids"] = encode_array(self.token_ids, "int32")
        if self.payload != "logprobs":
            body["payload"] = self.payload
        return body

    @classmethod
    def from_json(cls, body: Any, *, vocab_size: int) -> "ScoreRequest":
        """Parse and check a request (a :class:`ValueError` names the first problem)."""
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        for key in ("prompt_ids", "prompt_lengths", "completion_ids", "completion_lengths"):
            if key not in body:
                raise ValueError(f"the request lacks {key!r}")
        p_len, c_len = body["prompt_lengths"], body["completion_lengths"]
        if (not isinstance(p_len, list) or not isinstance(c_len, list) or len(p_len) != len(c_len)
                or not all(isinstance(n, int) and n >= 0 for n in p_len + c_len)):
            raise ValueError("prompt_lengths and completion_lengths must be lists of counts of equal length")
        if any(n < 1 for n in p_len):
            raise ValueError("every prompt needs at least one token (its last token predicts the first completion token)")
        flat_p = decode_array(body["prompt_ids"], "prompt_ids", dtypes=("int32",), shape=(sum(p_len),))
        flat_c = decode_array(body["completion_ids"], "completion_ids", dtypes=("int32",), shape=(sum(c_len),))
        for name, ids in (("prompt_ids", flat_p), ("completion_ids", flat_c)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"{name} holds ids outside [0, {vocab_size}) (the teacher's vocabulary)")
        topk = body.get("topk", 0)
        if not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk must be a count >= 0, got {topk!r}")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        payload = body.get("payload", "logprobs")
        if payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {', '.join(PAYLOADS)}, got {payload!r}")
        dtype = body.get("dtype", "float32")
        allowed = ("float16", "bfloat16", "float32") if payload == "hidden" else ("float16", "float32")
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {', '.join(allowed)} for payload={payload}, got {dtype!r}")
        if payload == "hidden" and (topk or body.get("token_ids") is not None):
            raise ValueError("payload=hidden returns hidden states only: send topk=0 and no token_ids (the caller "
                             "computes every log-prob from the hidden states and the teacher's head)")
        token_ids = None
        if body.get("token_ids") is not None:
            token_ids = decode_array(body["token_ids"], "token_ids", dtypes=("int32",), shape=(sum(c_len), None))
            if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
                raise ValueError(f"token_ids holds ids outside [0, {vocab_size})")
        prompts, completions, i, j = [], [], 0, 0
        for lp, lc in zip(p_len, c_len):
            prompts.append(flat_p[i:i + lp].tolist())
            completions.append(flat_c[j:j + lc].tolist())
            i, j = i + lp, j + lc
        return cls(prompts=prompts, completions=completions, topk=topk, token_ids=token_ids,
                   temperature=float(temperature), dtype=dtype, payload=payload)


@dataclass(frozen=True)
class ScoreAnswer:
    """The teacher's log-probs for every completion token of a :class:`ScoreRequest` (``N`` rows).

    Attributes:
        sampled_logprobs_N: ``log π_T(y_t | s_t)`` of each completion token.
        topk_ids_NK / topk_logprobs_NK: the teacher's ``K`` most likely ids, by decreasing
            log-prob (None when ``topk = 0``).
        token_logprobs_NM: log-probs of the caller-chosen ``token_ids`` (None when none were asked).
    """

    sampled_logprobs_N: np.ndarray
    topk_ids_NK: np.ndarray | None = None
    topk_logprobs_NK: np.ndarray | None = None
    token_logprobs_NM: np.ndarray | None = None

    def to_json(self, dtype: str) -> dict[str, Any]:
        body: dict[str, Any] = {"n_tokens": int(self.sampled_logprobs_N.shape[0]),
                                "sampled_logprobs": encode_array(self.sampled_logprobs_N, dtype)}
        if self.topk_ids_NK is not None:
            body["topk_ids"] = encode_array(self.topk_ids_NK, "int32")
            body["topk_logprobs"] = encode_array(self.topk_logprobs_NK, dtype)
        if self.token_logprobs_NM is not None:
            body["token_logprobs"] = encode_array(self.token_logprobs_NM, dtype)
        return body

    @classmethod
    def from_json(cls, body: Any, request: ScoreRequest, *, vocab_size: int | None = None) -> "ScoreAnswer":
        """Parse and check an answer against its request; :class:`BadAnswer` names what is wrong
        (a missing array, a wrong shape or dtype, ids outside the vocabulary, NaN / +Inf log-probs)."""
        if not isinstance(body, dict):
            raise BadAnswer(f"the answer is a JSON {type(body).__name__}, not an object")
        n = request.n_tokens
        floats = (request.dtype, "float32")
        sampled = decode_array(body["sampled_logprobs"], "sampled_logprobs", dtypes=floats, shape=(n,))
        _finite_logprobs("sampled_logprobs", sampled)
        topk_ids = topk_lp = token_lp = None
        if request.topk:
            k = None if vocab_size is None else min(request.topk, vocab_size)
            topk_ids = decode_array(body["topk_ids"], "topk_ids", dtypes=("int32",), shape=(n, k))
            topk_lp = decode_array(body["topk_logprobs"], "topk_logprobs", dtypes=floats, shape=(n, topk_ids.shape[1]))
            if vocab_size is not None and topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= vocab_size):
                raise BadAnswer(f"topk_ids holds ids outside [0, {vocab_size})")
            _finite_logprobs("topk_logprobs", topk_lp)
        if request.token_ids is not None:
            m = request.token_ids.shape[1]
            token_lp = decode_array(body["token_logprobs"], "token_logprobs", dtypes=floats, shape=(n, m))
            _finite_logprobs("token_logprobs", token_lp)
        return cls(sampled_logprobs_N=sampled, topk_ids_NK=topk_ids, topk_logprobs_NK=topk_lp,
                   token_logprobs_NM=token_lp)


def _finite_logprobs(name: str, values: np.ndarray) -> None:
    """Log-probs are ≤ 0 and never NaN (``-inf`` = probability 0 is allowed)."""
    if np.isnan(values).any():
        raise BadAnswer(f"{name} holds {int(np.isnan(values).sum())} NaN value(s)")
    if (values > 1e-3).any():
        raise BadAnswer(f"{name} holds positive log-probabilities (max {float(values.max()):.3g})")
