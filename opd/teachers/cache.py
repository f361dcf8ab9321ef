"""Teacher-signal compression and caching: score a sequence once, reuse the signal after.

Two pieces:

* **Compact storage** (:class:`CompactFeedback`): only the valid completion tokens of a batch are
  kept, packed row after row (``N`` tokens). Per token: the sampled token's log-prob in fp32
  (4 B — route 2's reward, kept exact), the teacher's top-k as ``int32`` ids and log-probs in the
  *store dtype* (fp32, fp16 or bf16: ``K·(4 + 2)`` B in 16 bit), and for ``access="full"`` either
  the tempered logits ``[N, V]`` (small vocabularies) or the teacher's final hidden states
  ``[N, H]`` with the (tempered) head kept once per store — ``H ≪ V`` values per token that
  rebuild the whole distribution (``logits = h Wᵀ + b``). Full fp32 logits cost ``4·V`` B per token
  (128 KB at V = 32,000); top-64 in int32 + fp16 costs 64·(4 + 2) + 4 = 388 B.
* **Caching** (:class:`CachedTeacher`): any :class:`~opd.teachers.Teacher` wrapped with a
  :class:`FeedbackStore` (in memory) or :class:`DiskFeedbackStore` (a folder of safetensors
  shards that outlives the run). A sequence is keyed by the exact token ids the teacher reads —
  its (teacher) prompt and the valid completion tokens — plus the teacher-only context and
  routing fields of its example; a hit returns the stored signal, a miss is scored by the inner
  teacher (all misses of a call in one batch) and stored. This is Lightning OPD's offline
  teacher (arXiv 2604.13010: precompute the teacher's log-probs once over fixed rollouts and reuse
  them): see :func:`warm_cache`. Within a run it pays off wherever sequences repeat — dataset
  answers as off-policy rows, converged greedy evaluation rollouts, small tasks whose on-policy
  samples repeat, several runs over the same rollouts.

A cache is only correct for a **frozen** teacher: the config refuses it for ``teacher.model=self``
with ``self_mode=live``. A disk store records a *signature* of the teacher (model, temperature,
context) and refuses to open with a different one.

Exactness: with ``store_dtype="float32"`` a hit returns the same bits the inner teacher returned
when the sequence was scored (the fp32 values are stored as they are). With fp16 / bf16 the top-k
log-probs, logits and hidden states are rounded once to the store dtype (relative error ≤ 2⁻¹¹ /
2⁻⁸); ids and sampled log-probs stay exact. Rescoring a sequence inside a different batch can
change the last bits of a live teacher's output (batched matmul blocking); a cache removes that
variation rather than adding one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from opd.types import ACCESS_LEVELS, Access, Feedback, Rollouts

__all__ = [
    "STORE_DTYPES",
    "CachedTeacher",
    "CompactFeedback",
    "DiskFeedbackStore",
    "FeedbackStore",
    "compress_feedback",
    "expand_feedback",
    "sequence_keys",
    "warm_cache",
]

StoreDtype = Literal["float32", "bfloat16", "float16"]
STORE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
_RANK = {level: i for i, level in enumerate(ACCESS_LEVELS)}
_FORMAT = 1


def _store_dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise ValueError(f"unknown store dtype {name!r}; choose one of {', '.join(STORE_DTYPES)}")
    return STORE_DTYPES[name]


# ----------------------------------------------------------------------------- compact storage


@dataclass(frozen=True)
class CompactFeedback:
    """Teacher feedback of ``R`` sequences packed over their ``N`` valid tokens (row-major).

    Attributes:
        access: the richest signal present (``sampled`` ⊂ ``topk`` ⊂ ``full``).
        offsets_R1: ``int64 [R + 1]``; row ``r`` owns tokens ``offsets[r]:offsets[r + 1]``.
        sampled_N: fp32 sampled-token log-probs.
        topk_ids_NK: ``int32`` top-k ids (sorted by decreasing log-prob), or None.
        topk_logprobs_NK: top-k log-probs in the store dtype, or None.
        logits_NV: tempered full logits in the store dtype (``access="full"``, small vocabularies).
        hidden_NH: final hidden states in the store dtype (``access="full"`` through the
            hidden-state accessor; the head lives in the store).
        topk_request: the ``topk`` the signal was requested with (a returned ``K`` below it
            means ``K = V``: the top-k covers the whole vocabulary).
    """

    access: Access
    offsets_R1: Tensor
    sampled_N: Tensor
    topk_ids_NK: Tensor | None = None
    topk_logprobs_NK: Tensor | None = None
    logits_NV: Tensor | None = None
    hidden_NH: Tensor | None = None
    topk_request: int = 0

    @property
    def rows(self) -> int:
        return int(self.offsets_R1.numel()) - 1

    @property
    def tokens(self) -> int:
        return int(self.sampled_N.numel())

    @property
    def k(self) -> int:
        return 0 if self.topk_ids_NK is None else int(self.topk_ids_NK.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values (the offsets included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty tensors by name (the layout of a disk shard)."""
        named = {"offsets": self.offsets_R1, "sampled": self.sampled_N, "topk_ids": self.topk_ids_NK,
                 "topk_logprobs": self.topk_logprobs_NK, "logits": self.logits_NV, "hidden": self.hidden_NH}
        return {k: v for k, v in named.items() if v is not None}

    def satisfies(self, access: Access, topk: int) -> bool:
        """Whether this signal answers a request ``(access, topk)`` exactly as the teacher would."""
        if _RANK[self.access] < _RANK[access]:
            return False
        return access == "sampled" or self.k >= topk or self.topk_request >= topk

    def row(self, r: int) -> "CompactFeedback":
        """Sequence ``r`` alone (views, no copy)."""
        a, b = int(self.offsets_R1[r]), int(self.offsets_R1[r + 1])

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[a:b]

        return CompactFeedback(self.access, torch.tensor([0, b - a]), self.sampled_N[a:b], cut(self.topk_ids_NK),
                               cut(self.topk_logprobs_NK), cut(self.logits_NV), cut(self.hidden_NH),
                               self.topk_request)


def compress_feedback(feedback: Feedback, mask_BT: Tensor, *, store_dtype: StoreDtype = "float16",
                      topk: int | None = None, topk_request: int = 0) -> CompactFeedback:
    """Pack ``feedback`` over the valid tokens ``mask_BT`` (on CPU).

    ``topk`` keeps only the first ``topk`` entries of the teacher's top-k (they are sorted by
    decreasing log-prob, so this is the top-``topk``); None keeps all. Sampled log-probs stay
    fp32; top-k ids become ``int32``; top-k log-probs, logits and hidden states are cast to
    ``store_dtype``.

    Raises:
        ValueError: ``mask_BT`` does not match the feedback's ``[B, T]``.
    """
    dtype = _store_dtype(store_dtype)
    mask = mask_BT.bool().cpu()
    if mask.shape != feedback.sampled_logprobs_BT.shape:
        raise ValueError(f"mask_BT has shape {tuple(mask.shape)}; expected "
                         f"{tuple(feedback.sampled_logprobs_BT.shape)} like feedback.sampled_logprobs_BT")
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = mask.sum(dim=1).cumsum(0)

    def pack(t: Tensor | None, cast: torch.dtype | None) -> Tensor | None:
        if t is None:
            return None
        packed = t.detach().cpu()[mask]
        return packed.to(cast).contiguous() if cast is not None else packed.contiguous()

    ids = lps = None
    if feedback.topk_ids_BTK is not None:
        k = feedback.topk_ids_BTK.shape[-1] if topk is None else min(topk, feedback.topk_ids_BTK.shape[-1])
        ids = pack(feedback.topk_ids_BTK[..., :k], torch.int32)
        lps = pack(feedback.topk_logprobs_BTK[..., :k].float(), dtype)
    logits = pack(feedback.logits_BTV.float(), dtype) if feedback.logits_BTV is not None else None
    hidden = pack(feedback.hidden_BTH, dtype) if feedback.hidden_BTH is not None else None
    return CompactFeedback(feedback.access, offsets, pack(feedback.sampled_logprobs_BT.float(), None),
                           ids, lps, logits, hidden, topk_request=topk_request)


def expand_feedback(entries: Sequence[CompactFeedback], mask_BT: Tensor, *, access: Access, topk: int,
                    head: tuple[Tensor, Tensor | None] | None = None,
                    device: torch.device | str | None = None) -> Feedback:
    """The :class:`~opd.types.Feedback` of ``B`` sequences from one single-row entry per row.

    Row ``b`` of ``mask_BT`` must have as many valid tokens as ``entries[b]``. The result has the
    live teacher's layout: zeros on padding, ``K = min(topk, stored K)``, ``int64`` ids, fp32
    log-probs and logits, hidden states in the head's dtype; only the parts ``access`` asks for.

    Raises:
        ValueError: a length mismatch, an entry that does not satisfy ``(access, topk)``, or a
            hidden-state entry without ``head``.
    """
    mask = mask_BT.bool()
    device = mask.device if device is None else torch.device(device)
    if len(entries) != mask.shape[0]:
        raise ValueError(f"{len(entries)} entries for {mask.shape[0]} rows")
    lengths = mask.sum(dim=1).tolist()
    for b, (entry, n) in enumerate(zip(entries, lengths)):
        if entry.tokens != n:
            raise ValueError(f"row {b}: the entry holds {entry.tokens} tokens but the mask has {n}")
        if not entry.satisfies(access, topk):
            raise ValueError(f"row {b}: the stored signal ({entry.access}, k={entry.k}) cannot answer "
                             f"access={access!r}, topk={topk}")
    mask = mask.to(device)
    b, t = mask.shape

    def scatter(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        values = torch.cat(parts).to(device=device, dtype=dtype)
        out = torch.zeros((b, t, *values.shape[1:]), dtype=dtype, device=device)
        out[mask] = values
        return out

    fb: dict[str, Any] = {"sampled_logprobs_BT": scatter([e.sampled_N for e in entries], torch.float32)}
    if access != "sampled" and entries:
        k = min(topk, min(e.k for e in entries))
        fb["topk_ids_BTK"] = scatter([e.topk_ids_NK[:, :k] for e in entries], torch.int64)
        fb["topk_logprobs_BTK"] = scatter([e.topk_logprobs_NK[:, :k] for e in entries], torch.float32)
    elif access != "sampled":
        fb["topk_ids_BTK"] = torch.zeros(b, t, 0, dtype=torch.int64, device=device)
        fb["topk_logprobs_BTK"] = torch.zeros(b, t, 0, device=device)
    if access == "full" and entries:
        if all(e.logits_NV is not None for e in entries):
            fb["logits_BTV"] = scatter([e.logits_NV for e in entries], torch.float32)
        else:
            if head is None or any(e.hidden_NH is None for e in entries):
                raise ValueError("full feedback stored as hidden states needs the teacher's head (store.head)")
            weight, bias = head
            fb["hidden_BTH"] = scatter([e.hidden_NH for e in entries], weight.dtype)
            fb["head_weight_VH"] = weight.to(device)
            fb["head_bias_V"] = None if bias is None else bias.to(device)
    return Feedback(access=access, **fb)


# ----------------------------------------------------------------------------- keys


def sequence_keys(prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor,
                  completion_mask_BT: Tensor, extras: Sequence[str] | None = None) -> list[str]:
    """One key per row: a 128-bit BLAKE2b digest of the real prompt ids, the valid completion ids
    and ``extras[b]`` (length-prefixed, so no two different inputs share a byte string)."""
    p_ids, p_mask = prompt_ids_BP.cpu().numpy().astype(np.int64), prompt_mask_BP.cpu().numpy() != 0
    c_ids, c_mask = completion_ids_BT.cpu().numpy().astype(np.int64), completion_mask_BT.cpu().numpy() != 0
    keys = []
    for b in range(p_ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for part in (p_ids[b][p_mask[b]], c_ids[b][c_mask[b]]):
            h.update(np.int64(part.size).tobytes())
            h.update(part.tobytes())
        extra = "" if extras is None else extras[b]
        h.update(extra.encode())
        keys.append(h.hexdigest())
    return keys


def _example_extras(rollouts: Rollouts) -> list[str] | None:
    """What else of an example may change a teacher's answer: its context and routing fields."""
    if not rollouts.examples:
        return None
    return [json.dumps([e.teacher_context, sorted((str(k), repr(v)) for k, v in e.fields.items())])
            for e in rollouts.examples]


def default_keys(teacher: Any, rollouts: Rollouts) -> list[str]:
    """Keys of ``rollouts`` for ``teacher``: its own prompt ids when it exposes ``prompt_batch``
    (what a :class:`~opd.teachers.ModelTeacher` reads, context included), else the student's."""
    if hasattr(teacher, "prompt_batch"):
        ids, mask = teacher.prompt_batch(rollouts)
    else:
        ids, mask = rollouts.prompt_ids_BP, rollouts.prompt_mask_BP
    return sequence_keys(ids, mask, rollouts.completion_ids_BT, rollouts.completion_mask_BT,
                         _example_extras(rollouts))


# ----------------------------------------------------------------------------- stores


class FeedbackStore:
    """An in-memory store of compact feedback: shards of packed rows plus a key → (shard, row) index.

    Args:
        store_dtype: dtype of stored top-k log-probs, logits and hidden states.
    """

    def __init__(self, store_dtype: StoreDtype = "float16"):
        _store_dtype(store_dtype)
        self.store_dtype: StoreDtype = store_dtype
        self.index: dict[str, tuple[int, int]] = {}
        self.head: tuple[Tensor, Tensor | None] | None = None
        self._shards: list[CompactFeedback | None] = []

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored shard (superseded rows included)."""
        return sum(self._shard_nbytes(i) for i in range(len(self._shards)))

    def _shard_nbytes(self, i: int) -> int:
        shard = self._shards[i]
        return 0 if shard is None else shard.nbytes

    def lookup(self, keys: Sequence[str]) -> list[CompactFeedback | None]:
        """The stored single-row entry of each key, or None."""
        return [None if loc is None else self._row(*loc) for loc in (self.index.get(k) for k in keys)]

    def _row(self, shard: int, row: int) -> CompactFeedback:
        return self._shards[shard].row(row)

    def add(self, keys: Sequence[str], compact: CompactFeedback,
            head: tuple[Tensor, Tensor | None] | None = None) -> None:
        """Store ``compact`` (one row per key); a key already present now points to the new row."""
        if len(keys) != compact.rows:
            raise ValueError(f"{len(keys)} keys for {compact.rows} rows")
        if head is not None and self.head is None:
            self.head = (head[0].detach().cpu(), None if head[1] is None else head[1].detach().cpu())
        shard = self._append(compact, keys)
        for row, key in enumerate(keys):
            self.index[key] = (shard, row)

    def _append(self, compact: CompactFeedback, keys: Sequence[str]) -> int:  # noqa: ARG002 (disk stores write them)
        self._shards.append(compact)
        return len(self._shards) - 1


class DiskFeedbackStore(FeedbackStore):
    """A :class:`FeedbackStore` kept in ``folder`` (one safetensors shard per stored batch, read
    lazily by row), so a later run — or an offline precomputation — reuses it. ``nbytes`` counts
    the shard files (headers included).

    ``signature`` describes the teacher (model, temperature, context, ...); it is written to
    ``meta.json`` on creation and must match on every later open.

    Raises:
        ValueError: the folder holds a cache of another teacher or store dtype.
    """

    def __init__(self, folder: str | Path, store_dtype: StoreDtype = "float16",
                 signature: dict[str, Any] | None = None):
        super().__init__(store_dtype)
        self.folder = Path(folder)
        self.signature = dict(signature or {})
        self._handles: dict[int, Any] = {}
        self._paths: list[Path] = []
        self._sizes: list[int] = []
        self._meta: list[tuple[Access, int]] = []
        meta_path = self.folder / "meta.json"
        wanted = {"format": _FORMAT, "store_dtype": store_dtype, "signature": self.signature}
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            if found != json.loads(json.dumps(wanted)):
                raise ValueError(f"the teacher cache in {self.folder} was written for {found}, not {wanted}; use "
                                 "another teacher.cache_dir or delete that folder")
            self._load_index()
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(wanted, indent=1))

    def _load_index(self) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        head_path = self.folder / "head.safetensors"
        if head_path.exists():
            head = load_file(str(head_path))
            self.head = (head["weight"], head.get("bias"))
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            shard = self._register(path, meta["access"], int(meta["topk_request"]), path.stat().st_size)
            for row, key in enumerate(json.loads(meta["keys"])):
                self.index[key] = (shard, row)

    def _register(self, path: Path, access: str, topk_request: int, size: int) -> int:
        self._shards.append(None)
        self._paths.append(path)
        self._sizes.append(size)
        self._meta.append((access, topk_request))  # type: ignore[arg-type]
        return len(self._shards) - 1

    def _shard_nbytes(self, i: int) -> int:
        return self._sizes[i]

    def add(self, keys: Sequence[str], compact: CompactFeedback,
            head: tuple[Tensor, Tensor | None] | None = None) -> None:
        if head is not None and self.head is None:
            from safetensors.torch import save_file

            tensors = {"weight": head[0].detach().cpu().contiguous()}
            if head[1] is not None:
                tensors["bias"] = head[1].detach().cpu().contiguous()
            save_file(tensors, str(self.folder / "head.safetensors"))
        super().add(keys, compact, head)

    def _append(self, compact: CompactFeedback, keys: Sequence[str]) -> int:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self._paths):06d}.safetensors"
        save_file({k: v.contiguous() for k, v in compact.tensors().items()}, str(path),
                  metadata={"access": compact.access, "topk_request": str(compact.topk_request),
                            "keys": json.dumps(list(keys))})
        return self._register(path, compact.access, compact.topk_request, path.stat().st_size)

    def _row(self, shard: int, row: int) -> CompactFeedback:
        from safetensors import safe_open

        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self._paths[shard]), framework="pt")
        offsets = handle.get_slice("offsets")[row:row + 2]
        a, b = int(offsets[0]), int(offsets[1])
        names = set(handle.keys())
        part = {n: handle.get_slice(n)[a:b] for n in ("sampled", "topk_ids", "topk_logprobs", "logits", "hidden")
                if n in names}
        access, topk_request = self._meta[shard]
        return CompactFeedback(access, torch.tensor([0, b - a]), part["sampled"], part.get("topk_ids"),
                               part.get("topk_logprobs"), part.get("logits"), part.get("hidden"), topk_request)


# ----------------------------------------------------------------------------- the cached teacher


class CachedTeacher:
    """A :class:`~opd.teachers.Teacher` that answers repeated sequences from a store.

    Args:
        teacher: the inner (frozen) teacher that scores misses; None for an offline cache that only
            answers hits (a miss raises).
        store: where the compact signal lives (:class:`FeedbackStore` / :class:`DiskFeedbackStore`).
        key_fn: ``(teacher, rollouts) -> list[str]``; default :func:`default_keys`.

    Counters ``hits`` / ``misses`` count sequences (rows), ``hit_tokens`` / ``miss_tokens`` their
    valid tokens. Other attributes (``model``, ``routes``, ``tokenizer``, ...) are the inner
    teacher's.
    """

    def __init__(self, teacher: Any | None, store: FeedbackStore,
                 key_fn: Callable[[Any, Rollouts], list[str]] | None = None):
        self.teacher = teacher
        self.store = store
        self.key_fn = key_fn or default_keys
        self.hits = self.misses = self.hit_tokens = self.miss_tokens = 0

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found on self
        if name == "teacher":
            raise AttributeError(name)
        inner = self.__dict__.get("teacher")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def stats(self) -> dict[str, float]:
        """Hits, misses, their tokens, the hit rate, stored entries and bytes."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens,
                "miss_tokens": self.miss_tokens, "hit_rate": self.hits / total if total else 0.0,
                "entries": len(self.store), "bytes": self.store.nbytes}

    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Feedback on ``rollouts`` as the inner teacher gives it (rounded to the store dtype)."""
        if access not in ACCESS_LEVELS:
            raise ValueError(f"unknown access {access!r}; choose one of {ACCESS_LEVELS}")
        keys = self.key_fn(self.teacher, rollouts)
        entries = self.store.lookup(keys)
        miss = [b for b, e in enumerate(entries) if e is None or not e.satisfies(access, topk)]
        mask = rollouts.completion_mask_BT.bool()
        lengths = mask.sum(dim=1).tolist()
        if miss:
            if self.teacher is None:
                raise ValueError(f"the offline teacher cache has no {access!r} signal (topk={topk}) for "
                                 f"{len(miss)} of {len(keys)} sequences and there is no teacher to score them; "
                                 "warm the cache over these rollouts first (opd.teachers.cache.warm_cache)")
            sub = rollouts if len(miss) == len(keys) else rollouts.select(miss)
            live = self.teacher.score(sub, access=access, topk=topk)
            compact = compress_feedback(live, sub.completion_mask_BT, store_dtype=self.store.store_dtype,
                                        topk_request=topk)
            head = None if live.head_weight_VH is None else (live.head_weight_VH, live.head_bias_V)
            self.store.add([keys[b] for b in miss], compact, head)
            for i, b in enumerate(miss):
                entries[b] = compact.row(i)
        self.misses += len(miss)
        self.hits += len(keys) - len(miss)
        missed = set(miss)
        self.miss_tokens += sum(lengths[b] for b in missed)
        self.hit_tokens += sum(n for b, n in enumerate(lengths) if b not in missed)
        return expand_feedback(entries, mask, access=access, topk=topk, head=self.store.head)


def warm_cache(teacher: CachedTeacher, batches: Iterable[Rollouts], *, access: Access = "topk",
               topk: int = 32) -> dict[str, float]:
    """Score every batch once so later calls hit (Lightning OPD's offline teacher pass); returns
    the cache statistics after the pass."""
    for rollouts in batches:
        teacher.score(rollouts, access=access, topk=topk)
    return teacher.stats
