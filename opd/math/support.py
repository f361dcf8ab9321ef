"""Support construction: which tokens a distributional (route R1) loss compares, and how.

A support ``S_t ⊆ V`` is chosen per token (docs/methods.md §1, §3.4 "Top-K truncated losses"):

* ``full``                  the whole vocabulary (GKD, arXiv 2306.13649; DistiLLM, 2402.03898);
* ``teacher_topk``          the teacher's top-k (Fu et al. 2603.25562 "top-K local support matching");
* ``student_topk``          the student's top-k (teacher log-probs at student-chosen ids): the top-k of
                            the student log-probs given, or ids fixed by the caller
                            (``student_topk_ids``, e.g. chosen when a served teacher scored them);
* ``union``                 teacher top-k ∪ student top-k (verl-style);
* ``sampled``               ``{y_t}`` only;
* ``teacher_topk_sampled``  teacher top-k ∪ ``{y_t}``.

and the two distributions are put on it in one of three ways (``norm``):

* ``renorm``  ``π̄^S(v) = π(v) / Σ_{u∈S} π(u)`` for both student and teacher (a log-softmax over the
              support entries of the full-vocabulary log-probs);
* ``tail``    support entries keep their full-vocabulary probabilities and one extra bucket holds
              ``1 − Σ_{u∈S} π(u)`` (TRL ``loss_add_tail``). For the student the bucket is computed
              exactly and differentiably as ``logsumexp_{v∉S} log π_S(v)``; for a teacher known only
              through top-k log-probs it is ``log(1 − exp(logsumexp_{u∈S} log π_T(u)))`` (detached),
              floored at ``log(K·eps)``, the resolution of ``1 − Σ`` in the data's dtype [INFER].
              On ``{y_t}`` this is the Bernoulli "sampled token vs the rest";
* ``none``    support entries keep their full-vocabulary probabilities, nothing is renormalised and
              no bucket is added (verl's union top-k without renormalisation). The result is a pair
              of sub-probability vectors; divergences on them are *not* divergences any more (an
              FKL can be negative, and teacher == student gives 0 but a nonzero gradient that pulls
              student mass into the support) — provided for parity with frameworks that do this.

On ``full`` the three norms coincide (the tail is empty), so ``norm`` is ignored there. On
``sampled`` the ``renorm`` norm is degenerate (both distributions are the point mass on ``y_t``,
every divergence is 0) and is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_range, check_same_shape

SupportKind = Literal["full", "teacher_topk", "student_topk", "union", "sampled", "teacher_topk_sampled"]
SupportNorm = Literal["renorm", "tail", "none"]
SUPPORT_KINDS: tuple[str, ...] = get_args(SupportKind)
SUPPORT_NORMS: tuple[str, ...] = get_args(SupportNorm)

_NEEDS_TEACHER_LOGITS = ("full", "student_topk", "union")  # student_topk: unless student_topk_ids are given
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SupportSpec:
    """How the per-token support is built (see the module docstring).

    ``k`` is the top-k size for the top-k kinds (clamped to ``V``; ignored for ``full`` and
    ``sampled``). It holds whatever the teacher returns: explicit ``teacher_topk_ids`` (or
    ``student_topk_ids``) with more than ``k`` columns are cut to their ``k`` most likely ids
    (:func:`slice_topk`), so a served teacher that returns more ids than asked for cannot widen
    the support. Temperatures divide the logits before the log-softmax (no ``τ²`` factor, as in
    TRL GKD).
    """

    kind: SupportKind = "full"
    k: int = 32
    norm: SupportNorm = "renorm"
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SUPPORT_KINDS:
            raise ValueError(f"unknown support kind {self.kind!r}; choose one of {', '.join(SUPPORT_KINDS)}")
        if self.norm not in SUPPORT_NORMS:
            raise ValueError(f"unknown support norm {self.norm!r}; choose one of {', '.join(SUPPORT_NORMS)}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        check_range("teacher_temperature", self.teacher_temperature, 0.0, low_open=True)
        check_range("student_temperature", self.student_temperature, 0.0, low_open=True)
        if self.kind == "sampled" and self.norm == "renorm":
            raise ValueError(
                "kind='sampled' with norm='renorm' is degenerate (both distributions are the point mass "
                "on y_t, so every divergence is 0); use norm='tail' (the Bernoulli 'y_t vs the rest')"
            )

    @property
    def needs_teacher_logits(self) -> bool:
        """True when the teacher must be available as full logits (full, student_topk, union) — for
        ``student_topk`` unless the caller fixes the ids and gives the teacher's log-probs there
        (``student_topk_ids`` of :func:`build_support`)."""
        return self.kind in _NEEDS_TEACHER_LOGITS


@dataclass(frozen=True)
class SupportDistributions:
    """Student and teacher log-probs over a per-token support of width ``K'`` (last dim).

    ``valid`` is False on padding entries (duplicates in a union, ``-1`` ids); they hold ``-inf``.
    ``ids`` are vocabulary ids, ``-1`` for the tail bucket and for padding.
    """

    student_logp: Tensor  # [..., K'] differentiable w.r.t. the student logits
    teacher_logp: Tensor  # [..., K'] detached
    valid: Tensor  # [..., K'] bool
    ids: Tensor  # [..., K'] long


def tempered_log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / τ)`` over the last dim, in fp32 (fp64 inputs stay fp64)."""
    check_range("temperature", temperature, 0.0, low_open=True)
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def build_support(
    student_logits: Tensor,
    spec: SupportSpec,
    *,
    sampled_ids: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    student_topk_ids: Tensor | None = None,
) -> SupportDistributions:
    """Build the support distributions from student logits ``[..., V]`` and a teacher signal.

    Args:
        student_logits: ``[..., V]``; the result is differentiable w.r.t. it.
        spec: the support kind, ``k``, norm and temperatures.
        sampled_ids: ``[...]`` sampled tokens ``y_t`` (``sampled``, ``teacher_topk_sampled``);
            ``-1`` marks a token without a sample (padding): it gets an empty support.
        teacher_logits: ``[..., V]`` teacher logits (detached here); tempered with
            ``spec.teacher_temperature``. Required by ``full``, ``student_topk`` and ``union``.
        teacher_topk_ids, teacher_topk_logprobs: ``[..., K]`` the teacher's top-k ids and its
            full-vocabulary log-probs there (temperature already applied by the producer; ``-1`` ids
            are padding). If given, their ``spec.k`` most likely ids (:func:`slice_topk`) fix the
            teacher's part of the support, however many columns there are; the log-probs are read
            only when ``teacher_logits`` is absent. Without teacher logits, ``sampled`` and
            ``teacher_topk_sampled`` look ``y_t`` up among these ids, so append the sampled token's
            teacher log-prob as a column (as vLLM ``prompt_logprobs`` returns it).
    """
    if teacher_logits is not None:
        check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    student_logp = tempered_log_softmax(student_logits, spec.student_temperature)
    teacher_logp = None
    if teacher_logits is not None:
        teacher_logp = tempered_log_softmax(teacher_logits.detach(), spec.teacher_temperature)
    return support_from_logprobs(
        student_logp, spec, sampled_ids=sampled_ids, teacher_logp=teacher_logp,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        student_topk_ids=student_topk_ids,
    )


def support_from_logprobs(
    student_logp: Tensor,
    spec: SupportSpec,
    *,
    sampled_ids: Tensor | None = None,
    teacher_logp: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    student_topk_ids: Tensor | None = None,
) -> SupportDistributions:
    """:func:`build_support` from full-vocabulary log-probs whose temperatures are already applied.

    The memory-efficient loss uses this to share one log-softmax between the loss and diagnostics.
    ``spec``'s temperatures are not applied again here.
    """
    lead, V = student_logp.shape[:-1], student_logp.shape[-1]
    _check_inputs(student_logp, spec, sampled_ids, teacher_logp, teacher_topk_ids, teacher_topk_logprobs,
                  student_topk_ids)
    if teacher_logp is not None:
        teacher_logp = teacher_logp.detach().to(student_logp.dtype)
    if spec.kind == "full":
        ids = torch.arange(V, device=student_logp.device).expand(*lead, V)
        valid = torch.ones((), dtype=torch.bool, device=student_logp.device).expand(*lead, V)
        return SupportDistributions(student_logp, teacher_logp, valid, ids)

    ids = _support_ids(student_logp, spec, sampled_ids, teacher_logp, teacher_topk_ids, student_topk_ids,
                       teacher_topk_logprobs)
    valid = ids >= 0
    safe_ids = torch.where(valid, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    neg_inf = torch.full((), _NEG_INF, dtype=student_logp.dtype, device=student_logp.device)
    s = torch.where(valid, student_logp.gather(-1, safe_ids), neg_inf)
    if teacher_logp is not None:
        t = torch.where(valid, teacher_logp.gather(-1, safe_ids), neg_inf)
    else:
        t = _lookup_teacher(ids, valid, teacher_topk_ids, teacher_topk_logprobs, student_logp.dtype)

    if spec.norm == "renorm":
        s, t = _masked_log_softmax(s, valid), _masked_log_softmax(t, valid)
    elif spec.norm == "tail":
        in_support = _support_mask(ids, valid, V)
        s_tail = _complement_logsumexp(student_logp, in_support)
        if teacher_logp is not None:
            t_tail = _complement_logsumexp(teacher_logp, in_support)
        else:
            # Only the top-k is known: the tail is 1 − Σ top-k, which cannot be resolved below the
            # rounding of that sum (≈ K·eps of the dtype). Floor it there instead of claiming an
            # exact zero: a zero teacher tail would make RKL infinite wherever the student puts any
            # mass off the teacher's top-k (the verl-style clamp, at the resolution of the data).
            k_known = valid.sum(dim=-1).clamp(min=1).to(t.dtype)
            floor = math.log(torch.finfo(t.dtype).eps) + torch.log(k_known)
            t_tail = torch.maximum(_log1mexp(torch.logsumexp(t, dim=-1)), floor)
            t_tail = torch.where(in_support.all(dim=-1), neg_inf, t_tail)  # nothing left outside
        s = torch.cat([s, s_tail[..., None]], dim=-1)
        t = torch.cat([t, t_tail[..., None]], dim=-1)
        valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
        ids = torch.cat([ids, torch.full_like(ids[..., :1], -1)], dim=-1)
    return SupportDistributions(s, t.detach(), valid, ids)


# ----------------------------------------------------------------------------- internals


def _check_inputs(student_logp, spec, sampled_ids, teacher_logp, topk_ids, topk_logprobs, student_ids) -> None:
    lead, V = student_logp.shape[:-1], student_logp.shape[-1]
    if student_ids is not None:
        if spec.kind != "student_topk":
            raise ValueError(f"student_topk_ids fix the support of kind 'student_topk' only, not {spec.kind!r}")
        if student_ids.dim() != len(lead) + 1 or student_ids.shape[:-1] != lead:
            raise ValueError(
                f"student_topk_ids has shape {tuple(student_ids.shape)}; expected [..., K] with leading "
                f"dimensions {tuple(lead)} of student_logits {tuple(student_logp.shape)}"
            )
        _check_id_range("student_topk_ids", student_ids, V)
        if teacher_logp is None and topk_ids is None:
            raise ValueError("student_topk_ids without teacher_logits need the teacher's log-probs at those ids: "
                             "pass them as teacher_topk_ids / teacher_topk_logprobs")
    if teacher_logp is not None:
        check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp)
    if topk_logprobs is not None and topk_ids is None:
        raise ValueError("teacher_topk_logprobs needs the ids they belong to: pass teacher_topk_ids")
    if topk_ids is not None and topk_logprobs is None and teacher_logp is None:
        raise ValueError("teacher_topk_ids without teacher_logits needs teacher_topk_logprobs: pass them")
    if topk_ids is not None:
        if topk_ids.dim() != len(lead) + 1 or topk_ids.shape[:-1] != lead:
            raise ValueError(
                f"teacher_topk_ids has shape {tuple(topk_ids.shape)}; expected [..., K] with leading "
                f"dimensions {tuple(lead)} of student_logits {tuple(student_logp.shape)}"
            )
        if topk_logprobs is not None:
            check_same_shape(teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_logprobs)
        _check_id_range("teacher_topk_ids", topk_ids, V)
    if sampled_ids is not None:
        if sampled_ids.shape != lead:
            raise ValueError(
                f"sampled_ids has shape {tuple(sampled_ids.shape)}; it must equal the leading dimensions "
                f"{tuple(lead)} of student_logits {tuple(student_logp.shape)}"
            )
        _check_id_range("sampled_ids", sampled_ids, V)
    kind = spec.kind
    if kind in _NEEDS_TEACHER_LOGITS and teacher_logp is None and student_ids is None:
        raise ValueError(
            f"support kind {kind!r} needs the teacher's log-probs at every vocabulary id: pass teacher_logits"
            + (" (or fix the ids with student_topk_ids and give the teacher's log-probs there)"
               if kind == "student_topk" else "")
        )
    if kind in ("teacher_topk", "sampled", "teacher_topk_sampled") and teacher_logp is None and topk_ids is None:
        raise ValueError(
            f"support kind {kind!r} needs a teacher signal: pass teacher_logits, or teacher_topk_ids "
            "with teacher_topk_logprobs"
        )
    if kind in ("sampled", "teacher_topk_sampled") and sampled_ids is None:
        raise ValueError(f"support kind {kind!r} needs the sampled tokens: pass sampled_ids")


def _check_id_range(name: str, ids: Tensor, V: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() and (ids >= V).any():
        raise ValueError(f"{name} holds ids >= V = {V} (max {int(ids.max())}); ids must lie in [-1, V)")


def slice_topk(ids: Tensor, logprobs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely columns of a top-k signal: ``(ids, logprobs)`` of shape ``[..., min(k, K)]``.

    ``ids [..., K]`` (``-1`` = padding) and ``logprobs [..., K]`` are what a teacher returned (a
    served teacher may return more than the ``k`` ids asked for, or append the sampled token as an
    extra column). Repeated ids keep their first occurrence and become padding ``(-1, -inf)``. With
    ``K ≤ k`` every column is kept in place; otherwise the kept columns are the valid ids with the
    highest log-probs, in descending order (ties by position), padding last. A pure function: the
    support builder and the feedback path both cut with it.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    check_same_shape(ids=ids, logprobs=logprobs)
    clean = _dedup(ids.long().clamp(min=-1))
    valid = clean >= 0
    lp = logprobs.detach()
    if ids.shape[-1] <= k:
        return clean, torch.where(valid, lp, torch.full((), _NEG_INF, dtype=lp.dtype, device=lp.device))
    # valid ids sort before padding even at log-prob -inf (a zero-probability id is still an id)
    key = torch.where(valid, lp.nan_to_num(nan=_NEG_INF).clamp(min=torch.finfo(lp.dtype).min),
                      torch.full((), _NEG_INF, dtype=lp.dtype, device=lp.device))
    order = key.sort(dim=-1, descending=True, stable=True).indices[..., : min(int(k), ids.shape[-1])]
    kept_ids = clean.gather(-1, order)
    kept_lp = torch.where(kept_ids >= 0, lp.gather(-1, order),
                          torch.full((), _NEG_INF, dtype=lp.dtype, device=lp.device))
    return kept_ids, kept_lp


def _support_ids(student_logp, spec, sampled_ids, teacher_logp, topk_ids, student_ids=None,
                 topk_logprobs=None) -> Tensor:
    """``[..., K']`` long ids of the support; ``-1`` marks padding (duplicates, missing tokens).

    Given id columns are cut to the ``k`` most likely (:func:`slice_topk`): the teacher's by its
    log-probs, the student's by the current student's (its top-k among them while it has not moved).
    """
    k = min(spec.k, student_logp.shape[-1])

    def at(logp: Tensor, ids: Tensor) -> Tensor:
        safe = ids.long().clamp(min=0)
        return logp.detach().gather(-1, safe)

    def teacher_ids() -> Tensor:
        if topk_ids is not None:
            scores = at(teacher_logp, topk_ids) if teacher_logp is not None else topk_logprobs
            return slice_topk(topk_ids, scores, k)[0]
        return teacher_logp.topk(k, dim=-1).indices

    if spec.kind == "teacher_topk":
        return teacher_ids()
    if spec.kind == "student_topk":
        if student_ids is not None:
            return slice_topk(student_ids, at(student_logp, student_ids), k)[0]
        return student_logp.detach().topk(k, dim=-1).indices
    if spec.kind == "union":
        return _union(teacher_ids(), student_logp.detach().topk(k, dim=-1).indices)
    y = sampled_ids.long().clamp(min=-1)[..., None]
    if spec.kind == "sampled":
        return y
    return _union(teacher_ids(), y)  # teacher_topk_sampled


def _dedup(ids: Tensor) -> Tensor:
    """Replace repeated ids (keeping the first occurrence) and negative ids by ``-1``."""
    K = ids.shape[-1]
    earlier = torch.ones(K, K, dtype=torch.bool, device=ids.device).tril(diagonal=-1)
    dup = ((ids[..., :, None] == ids[..., None, :]) & earlier).any(dim=-1)
    return torch.where(dup | (ids < 0), torch.full_like(ids, -1), ids)


def _union(first: Tensor, second: Tensor) -> Tensor:
    """``first ++ second`` with entries of ``second`` already in ``first`` replaced by ``-1``."""
    dup = (second[..., :, None] == first[..., None, :]).any(dim=-1)
    return torch.cat([first, torch.where(dup, torch.full_like(second, -1), second)], dim=-1)


def _lookup_teacher(ids, valid, topk_ids, topk_logprobs, dtype) -> Tensor:
    """Teacher log-probs at ``ids`` read from the given (ids, log-probs) columns; raise if absent."""
    known = topk_ids.long()
    match = (ids[..., :, None] == known[..., None, :]) & (known >= 0)[..., None, :]
    vals = torch.where(match, topk_logprobs.detach().to(dtype)[..., None, :],
                       torch.full((), _NEG_INF, dtype=dtype, device=ids.device)).amax(dim=-1)
    missing = valid & ~match.any(dim=-1)
    if missing.any():
        raise ValueError(
            f"the teacher log-prob is unknown for {int(missing.sum())} support entries (a sampled token is "
            "not among teacher_topk_ids): pass teacher_logits, append the sampled token's teacher log-prob "
            "as a column of teacher_topk_ids/teacher_topk_logprobs, or mark padding with sampled_ids = -1"
        )
    return torch.where(valid, vals, torch.full((), _NEG_INF, dtype=dtype, device=ids.device))


def _masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """Log-softmax over the ``valid`` entries of the last dim; ``-inf`` elsewhere; NaN-free."""
    any_valid = valid.any(dim=-1, keepdim=True)
    neg_inf = torch.full((), _NEG_INF, dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x_in = torch.where(any_valid, torch.where(valid, x, neg_inf), zero)
    lse = torch.logsumexp(x_in, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, zero)  # a teacher with no mass on the support
    return torch.where(valid, x - lse, neg_inf)


def _support_mask(ids: Tensor, valid: Tensor, V: int) -> Tensor:
    """``[..., V]`` bool, True at the valid support ids."""
    idx = torch.where(valid, ids, torch.full_like(ids, V))
    mask = torch.zeros(*ids.shape[:-1], V + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(-1, idx, True)[..., :V]


def _complement_logsumexp(logp: Tensor, in_support: Tensor) -> Tensor:
    """``log Σ_{v∉S} exp(logp(v))``, exact and differentiable; ``-inf`` if ``S = V``, ``0`` if ``S = ∅``."""
    x = logp.masked_fill(in_support, _NEG_INF)
    any_out = ~in_support.all(dim=-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if bool(any_out.all()):
        lse = torch.logsumexp(x, dim=-1)
    else:
        lse = torch.logsumexp(torch.where(any_out[..., None], x, zero), dim=-1)
        lse = torch.where(any_out, lse, torch.full((), _NEG_INF, dtype=x.dtype, device=x.device))
    empty = ~in_support.any(dim=-1)  # empty support: the bucket is everything, log 1 = 0 exactly
    return torch.where(empty, zero, lse) if bool(empty.any()) else lse


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 − exp(a))`` for ``a ≤ 0`` (clamped), accurate near both ends (Mächler 2012)."""
    a = a.clamp(max=0.0)
    near_zero = a > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, a, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, a))))
