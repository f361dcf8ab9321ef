"""Per-token actionability diagnostics from one forward pass (full, top-k or sampled teacher signal)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from opd.math._checks import check_same_shape
from opd.math.diagnostics._common import _NEG_INF, _first_occurrence, _float
from opd.math.divergences import forward_kl, reverse_kl
from opd.math.regularizers import entropy
from opd.math.support import SupportSpec, support_from_logprobs


@torch.no_grad()
def token_diagnostics(
    student_logp_NV: Tensor,
    sampled_ids_N: Tensor,
    *,
    teacher_logp_NV: Tensor | None = None,
    teacher_topk_ids_NK: Tensor | None = None,
    teacher_topk_logprobs_NK: Tensor | None = None,
    teacher_sampled_logprobs_N: Tensor | None = None,
    mask_N: Tensor | None = None,
    k: int = 8,
    workspace: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-token detached diagnostics ``dict[str, Tensor[...]]`` (docs/methods.md §3.7).

    Args:
        student_logp_NV: ``[..., V]`` student log-probs (normalised; temperature already applied).
        sampled_ids_N: ``[...]`` sampled tokens ``y_t``; negative ids mark tokens without a sample
            (treated as masked).
        teacher_logp_NV: ``[..., V]`` full teacher log-probs (the *full* mode: every key is exact).
        teacher_topk_ids_NK, teacher_topk_logprobs_NK: ``[..., K]`` teacher top-K ids and their
            full-vocabulary log-probs (the *top-k* mode, used when ``teacher_logp_NV`` is absent);
            ``-1`` ids are padding, duplicate ids are ignored after their first occurrence, so an
            appended column with the sampled token's log-prob (support.py convention) is fine.
        teacher_sampled_logprobs_N: ``[...]`` ``log π_T(y_t)`` (the teacher's sampled-token access).
        mask_N: ``[...]`` bool; masked tokens give 0 in every key (ids there are not read).
        k: top-k size of the overlap / coverage / teachability sets, ``k_eff = min(k, V)`` in full
            mode and ``min(k, V, K)`` in top-k mode (top-K_T = the ``k_eff`` highest given entries).
        workspace: optional two scratch tensors of the student log-probs' shape and float dtype,
            overwritten here (full mode); a caller that runs chunk after chunk passes the same two
            to save the allocation of fresh ``[..., V]`` tensors. Results do not depend on it.

    Keys (``TopK_S`` / ``TopK_T`` are the student's / teacher's top-``k_eff`` ids). Always, exact:
    ``student_entropy`` ``H(π_S)``, ``student_top1_prob`` ``max_v π_S(v)``.

    When ``log π_T(y_t)`` is known (full mode, ``teacher_sampled_logprobs_N``, or top-k mode with
    ``y_t`` among the given ids for *every* kept token; otherwise omitted), exact:
    ``teacher_kl`` ``ℓ_t = log π_S(y_t) − log π_T(y_t)``, ``reward`` ``r_t = −ℓ_t``,
    ``teacher_prob_sampled`` ``π_T(y_t)``.

    Full or top-k mode, exact: ``teacher_top1_prob`` ``max_v π_T(v)``, ``overlap_ratio``
    ``|TopK_S ∩ TopK_T| / k_eff``, ``overlap_mass`` ``Σ_{v∈TopK_S∩TopK_T} π_S(v)``,
    ``sampled_in_teacher_topk`` ``1[y_t ∈ TopK_T]``.

    Full mode exact, top-k mode **approximate**: ``rkl`` ``Σ p_S (log p_S − log p_T)`` and ``fkl``
    ``Σ p_T (log p_T − log p_S)`` (top-k: both renormalised on the given teacher ids, support kind
    ``teacher_topk``); ``teacher_entropy`` ``H(π_T)`` (top-k: a **lower bound**, the entropy of the
    given entries plus one tail bucket of mass ``1 − Σ_K π_T``).

    Full mode only (omitted in top-k mode): ``teachability`` ``Σ_{v∈TopK_S} π_T(v)`` [INFER].

    "Exact" in top-k mode assumes the given ids really are the teacher's highest-probability tokens.
    Values are fp32 (fp64 inputs stay fp64); indicators are 0/1 floats.
    """
    s = _float(student_logp_NV)
    lead, V = s.shape[:-1], s.shape[-1]
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if sampled_ids_N.shape != lead:
        raise ValueError(f"sampled_ids_N has shape {tuple(sampled_ids_N.shape)}; it must equal the leading "
                         f"dimensions {tuple(lead)} of student_logp_NV {tuple(s.shape)}")
    if sampled_ids_N.is_floating_point():
        raise ValueError(f"sampled_ids_N must be an integer tensor, got dtype {sampled_ids_N.dtype}")
    check_same_shape(sampled_ids_N=sampled_ids_N, mask_N=mask_N,
                     teacher_sampled_logprobs_N=teacher_sampled_logprobs_N)
    check_same_shape(student_logp_NV=s, teacher_logp_NV=teacher_logp_NV)
    if (teacher_topk_ids_NK is None) != (teacher_topk_logprobs_NK is None):
        raise ValueError("pass teacher_topk_ids_NK and teacher_topk_logprobs_NK together")
    if teacher_topk_ids_NK is not None:
        check_same_shape(teacher_topk_ids_NK=teacher_topk_ids_NK,
                         teacher_topk_logprobs_NK=teacher_topk_logprobs_NK)
        if teacher_topk_ids_NK.shape[:-1] != lead or teacher_topk_ids_NK.dim() != len(lead) + 1:
            raise ValueError(f"teacher_topk_ids_NK has shape {tuple(teacher_topk_ids_NK.shape)}; expected "
                             f"[..., K] with leading dimensions {tuple(lead)}")

    keep = sampled_ids_N >= 0
    if mask_N is not None:
        keep = keep & mask_N.bool()
    y = torch.where(keep, sampled_ids_N, torch.zeros_like(sampled_ids_N)).long()
    if y.numel() and int(y.max()) >= V:
        raise ValueError(f"sampled_ids_N holds ids >= V = {V} on unmasked tokens")
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    out: dict[str, Tensor] = {}

    def put(name: str, value: Tensor) -> None:
        out[name] = torch.where(keep, value.to(s.dtype), zero)

    kk = min(int(k), V)
    if teacher_logp_NV is None and teacher_topk_ids_NK is not None:
        kk = min(kk, teacher_topk_ids_NK.shape[-1])
    s_top_lp, s_top_ids = s.topk(kk, dim=-1)
    t_full = None if teacher_logp_NV is None else _float(teacher_logp_NV).to(s.dtype)
    # Full mode with every entry finite (the usual case): entropies and both KLs share exp(S),
    # exp(T) and S − T instead of four separate passes — the same operations on the same values,
    # so bitwise the same results; -inf / NaN entries take the general path below.
    shared = _shared_full_mode(s, t_full, workspace) if (
        t_full is not None and s.numel() and bool(s.amin() > _NEG_INF) and bool(t_full.amin() > _NEG_INF)) else None
    put("student_entropy", shared["student_entropy"] if shared else entropy(s))
    put("student_top1_prob", s_top_lp[..., 0].exp())  # the top-1 of topk is the max

    # --- teacher at the sampled token
    t_y = None
    if t_full is not None:
        t_y = t_full.gather(-1, y[..., None])[..., 0]
    elif teacher_sampled_logprobs_N is not None:
        t_y = _float(teacher_sampled_logprobs_N).to(s.dtype)
    elif teacher_topk_ids_NK is not None:
        ids = teacher_topk_ids_NK.long()
        match = (ids == y[..., None]) & (ids >= 0)
        if bool((match.any(dim=-1) | ~keep).all()):
            lps = _float(teacher_topk_logprobs_NK).to(s.dtype)
            t_y = torch.where(match, lps, torch.full((), _NEG_INF, dtype=s.dtype, device=s.device)).amax(-1)
    if t_y is not None:
        ell = s.gather(-1, y[..., None])[..., 0] - t_y
        put("teacher_kl", ell)
        put("reward", -ell)
        put("teacher_prob_sampled", t_y.exp())

    # --- distribution-level teacher keys
    if t_full is not None:
        t_top_lp, t_top_ids = t_full.topk(kk, dim=-1)
        put("rkl", shared["rkl"] if shared else reverse_kl(s, t_full))
        put("fkl", shared["fkl"] if shared else forward_kl(s, t_full))
        put("teacher_entropy", shared["teacher_entropy"] if shared else entropy(t_full))
        put("teachability", t_full.gather(-1, s_top_ids).exp().sum(dim=-1))
    elif teacher_topk_ids_NK is not None:
        ids = teacher_topk_ids_NK.long()
        lps = _float(teacher_topk_logprobs_NK).to(s.dtype)
        given = _first_occurrence(ids)
        t_lp = torch.where(given, lps, torch.full((), _NEG_INF, dtype=s.dtype, device=s.device))
        t_top_lp, pos = t_lp.topk(kk, dim=-1)
        t_top_ids = ids.gather(-1, pos)
        sup = support_from_logprobs(
            s, SupportSpec(kind="teacher_topk", k=ids.shape[-1], norm="renorm"),
            teacher_topk_ids=torch.where(given, ids, torch.full_like(ids, -1)), teacher_topk_logprobs=lps)
        put("rkl", reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid))
        put("fkl", forward_kl(sup.student_logp, sup.teacher_logp, sup.valid))
        lse = torch.logsumexp(t_lp, dim=-1).clamp(max=0.0)
        log_tail = torch.log(-torch.expm1(lse))  # log(1 − Σ_K π_T); -inf when the top-k holds all mass
        put("teacher_entropy", entropy(torch.cat([t_lp, log_tail[..., None]], dim=-1)))
    else:
        return out
    t_top_valid = t_top_lp > _NEG_INF
    put("teacher_top1_prob", t_top_lp[..., 0].exp())
    in_both = ((s_top_ids[..., :, None] == t_top_ids[..., None, :]) & t_top_valid[..., None, :]).any(-1)
    put("overlap_ratio", in_both.sum(dim=-1).to(s.dtype) / kk)
    put("overlap_mass", torch.where(in_both, s_top_lp.exp(), zero).sum(dim=-1))
    put("sampled_in_teacher_topk", ((t_top_ids == y[..., None]) & t_top_valid).any(dim=-1))
    return out


def _shared_full_mode(s: Tensor, t: Tensor, workspace: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """``H(π_S) = −Σ p_S S``, ``H(π_T) = −Σ p_T T``, ``RKL = Σ p_S (S − T)``, ``FKL = −Σ p_T (S − T)``
    for finite ``[..., V]`` log-probs, in two ``[..., V]`` buffers: every product is written into a
    buffer that is already paged in rather than into a fresh tensor (at V = 32,000 the fresh
    allocations' page faults cost more than the arithmetic; bench/breakdown.py). ``workspace``:
    two such buffers to use instead of allocating them."""
    if workspace is not None and all(w.shape == s.shape and w.dtype == s.dtype for w in workspace):
        a, b = workspace
    else:
        a, b = torch.empty_like(s), torch.empty_like(s)
    torch.exp(s, out=a)  # p_S
    h_s = -torch.mul(a, s, out=b).sum(dim=-1)
    torch.sub(s, t, out=b)  # S − T
    rkl = torch.mul(a, b, out=a).sum(dim=-1)
    torch.exp(t, out=a)  # p_T
    fkl = -torch.mul(b, a, out=b).sum(dim=-1)
    h_t = -torch.mul(a, t, out=a).sum(dim=-1)
    return {"student_entropy": h_s, "teacher_entropy": h_t, "rkl": rkl, "fkl": fkl}


def diagnostics_extra_fn(
    sampled_ids_N: Tensor,
    *,
    teacher_topk_ids_NK: Tensor | None = None,
    teacher_topk_logprobs_NK: Tensor | None = None,
    teacher_sampled_logprobs_N: Tensor | None = None,
    mask_N: Tensor | None = None,
    k: int = 8,
) -> Callable[[Tensor, Tensor | None, slice], dict[str, Tensor]]:
    """An ``extra_fn`` for :func:`opd.math.fused.fused_linear_divergence`: :func:`token_diagnostics`
    on each chunk's log-probs (the fused pass's tempered ones; no second student forward).

    The chunk's full teacher log-probs are used when the fused pass has them, else the top-k
    tensors given here (``[N, K]``, sliced by ``rows``). The key set is decided once for all ``N``
    tokens (a top-k-only teacher yields the sampled-token keys only if every kept ``y_t`` is among
    the given ids), so every chunk returns the same keys.
    """
    def pick(x: Tensor | None, rows: slice) -> Tensor | None:
        return None if x is None else x[rows]

    sampled_known = teacher_sampled_logprobs_N is not None
    if not sampled_known and teacher_topk_ids_NK is not None:
        keep = (sampled_ids_N >= 0) & (True if mask_N is None else mask_N.bool())
        found = (teacher_topk_ids_NK.long() == sampled_ids_N.long()[..., None]).any(dim=-1)
        sampled_known = bool((found | ~keep).all())

    scratch: list[Tensor] = []  # two [chunk, V] buffers shared by every chunk of this call

    def workspace(student_logp: Tensor) -> tuple[Tensor, Tensor]:
        n = student_logp.shape[0]
        dtype = torch.float64 if student_logp.dtype == torch.float64 else torch.float32
        if not scratch or scratch[0].shape[0] < n or scratch[0].shape[1:] != student_logp.shape[1:] \
                or scratch[0].dtype != dtype or scratch[0].device != student_logp.device:
            scratch[:] = [torch.empty(student_logp.shape, dtype=dtype, device=student_logp.device) for _ in range(2)]
        return scratch[0][:n], scratch[1][:n]

    def extra_fn(student_logp: Tensor, teacher_logp: Tensor | None, rows: slice) -> dict[str, Tensor]:
        out = token_diagnostics(
            student_logp, sampled_ids_N[rows], teacher_logp_NV=teacher_logp,
            teacher_topk_ids_NK=pick(teacher_topk_ids_NK, rows),
            teacher_topk_logprobs_NK=pick(teacher_topk_logprobs_NK, rows),
            teacher_sampled_logprobs_N=pick(teacher_sampled_logprobs_N, rows), mask_N=pick(mask_N, rows), k=k,
            workspace=None if teacher_logp is None or student_logp.dim() != 2 else workspace(student_logp))
        if teacher_logp is None and not sampled_known:
            for key in ("teacher_kl", "reward", "teacher_prob_sampled"):
                out.pop(key, None)
        return out

    return extra_fn
