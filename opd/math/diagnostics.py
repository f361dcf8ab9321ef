"""Actionability diagnostics: per-token and per-sequence metrics (methods.md §3.7, §3.8).

Everything here is pure and detached: inputs are detached, every function runs under
``torch.no_grad()`` and nothing returned carries a gradient. Per-token functions accept any
leading dimensions (``[..., V]`` → ``[...]``; ``[B, T, V]`` or ``[N, V]`` in practice). Sequence
functions take right-padded ``[B, T]`` ids and masks whose rows may have different lengths.

The question these metrics answer is "is the teacher signal at this state something the student
can act on?" (the survey's metric set is assembled from several papers, **[INFER]**):

* teacher_kl ``ℓ_t = log π_S(y_t) − log π_T(y_t)`` (tinker / prime-rl ``teacher_kl``), its sign
  balance and heavy negative tail (Fu et al. 2603.25562; AOPD 2605.06387);
* full or top-K reverse / forward KL (vOPD 2605.07865, Rethinking OPD 2604.13016);
* top-K overlap ratio and mass (Rethinking OPD 2604.13016: 97–99 % of the student's mass on the
  shared set in successful OPD);
* teacher coverage of the sample ``1[y_t ∈ TopK_T]`` (prime-rl ``sampled_token_in_teacher_topk``);
* teachability ``Σ_{v∈TopK_S} π_T(v)`` (TA-OPD 2605.26844, exact form unverified, **[INFER]**);
* entropies and top-1 confidences (TIP 2604.14084, EOPD 2603.07079, SFD 2605.30833), by position
  (late tokens teach little, 2606.22600);
* length, truncation, EOS and n-gram repetition (Demystifying OPD 2604.08527: length inflation →
  truncation collapse + repetition saturation);
* CR-OPD routing summaries from :func:`opd.math.routing.cr_opd_loss` metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_same_shape
from opd.math.divergences import forward_kl, reverse_kl
from opd.math.reduce import masked_mean
from opd.math.regularizers import entropy
from opd.math.support import SupportSpec, support_from_logprobs

__all__ = [
    "token_diagnostics",
    "diagnostics_extra_fn",
    "summarize_diagnostics",
    "position_bucket_index",
    "position_buckets",
    "summarize_by_position",
    "ngram_repetition_rate",
    "repetition_rate",
    "ends_with_eos",
    "eos_rate",
    "truncation_flags",
    "truncation_rate",
    "sequence_diagnostics",
    "summarize_cr_opd",
]

_NEG_INF = float("-inf")
_BUCKET_NAMES_3 = ("early", "middle", "late")


def _float(x: Tensor) -> Tensor:
    """Detached fp32 copy (fp64 stays fp64)."""
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _first_occurrence(ids: Tensor) -> Tensor:
    """``[..., K]`` bool: True at non-negative ids that did not appear earlier in the row."""
    K = ids.shape[-1]
    earlier = torch.ones(K, K, dtype=torch.bool, device=ids.device).tril(diagonal=-1)
    dup = ((ids[..., :, None] == ids[..., None, :]) & earlier).any(dim=-1)
    return (ids >= 0) & ~dup


def _lengths(mask_BT: Tensor) -> Tensor:
    """``[B]`` long: 1 + the last kept index of each row (0 for an empty row)."""
    m = mask_BT.bool()
    if m.shape[1] == 0:
        return torch.zeros(m.shape[0], dtype=torch.long, device=m.device)
    t = torch.arange(m.shape[1], device=m.device)
    return torch.where(m, t, -1).amax(dim=1) + 1


# ----------------------------------------------------------------------------- per token


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
    """Per-token detached diagnostics ``dict[str, Tensor[...]]`` (methods.md §3.7).

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


def _quantile_sorted(x_sorted: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile of a sorted 1-D tensor (numpy's default method)."""
    pos = q * (x_sorted.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, x_sorted.numel() - 1)
    return x_sorted[lo] + (pos - lo) * (x_sorted[hi] - x_sorted[lo])


@torch.no_grad()
def summarize_diagnostics(diags: Mapping[str, Tensor], mask_N: Tensor | None = None) -> dict[str, float]:
    """Reduce per-token diagnostics to floats for logging.

    Returns ``num_tokens`` and, for every key of ``diags``, its masked mean (0 when no token is
    kept, as :func:`opd.math.reduce.masked_mean`). When ``reward`` is present and at least one token
    is kept, adds the sign balance and tail shape of ``r_t`` (Fu et al. 2603.25562: most sampled
    tokens get negative reward, with a heavy negative tail): ``reward_neg_frac`` (fraction
    ``r_t < 0``), ``reward_std`` (population), ``reward_p05`` / ``reward_p50`` / ``reward_p95``
    (linear interpolation), ``reward_skew`` ``E[c³]/E[c²]^{3/2}`` and ``reward_kurtosis`` (excess,
    ``E[c⁴]/E[c²]² − 3``) with ``c = r − E r``; both 0 when the rewards are constant.
    """
    if not diags:
        return {}
    first = next(iter(diags.values()))
    keep = torch.ones(first.shape, dtype=torch.bool, device=first.device) if mask_N is None else mask_N.bool()
    n = int(keep.sum())
    out: dict[str, float] = {"num_tokens": float(n)}
    for name, value in diags.items():
        check_same_shape(**{name: value, "mask_N": keep})
        out[name] = float(masked_mean(value.detach().to(torch.float64), keep))
    if "reward" in diags and n > 0:
        r = diags["reward"].detach().to(torch.float64)[keep]
        c = r - r.mean()
        m2, m3, m4 = (c ** 2).mean(), (c ** 3).mean(), (c ** 4).mean()
        pos = bool(m2 > 0)
        out["reward_neg_frac"] = float((r < 0).double().mean())
        out["reward_std"] = float(m2.sqrt())
        r_sorted = r.sort().values
        for q in (0.05, 0.5, 0.95):
            out[f"reward_p{round(q * 100):02d}"] = float(_quantile_sorted(r_sorted, q))
        out["reward_skew"] = float(m3 / m2 ** 1.5) if pos else 0.0
        out["reward_kurtosis"] = float(m4 / m2 ** 2 - 3.0) if pos else 0.0
    return out


# ----------------------------------------------------------------------------- by position


@torch.no_grad()
def position_bucket_index(mask_BT: Tensor, n_buckets: int = 3) -> Tensor:
    """``[B, T]`` long bucket of each token, ``-1`` on masked tokens.

    A row's length is ``L_b = 1 + (last index with mask True)``; token ``t`` of that row falls in
    bucket ``⌊n_buckets · t / L_b⌋`` (early / middle / late third for ``n_buckets = 3``). Masked holes
    inside a row keep their positions (they are just not counted); with right padding ``L_b`` is
    the number of valid tokens.
    """
    check_ndim("mask_BT", mask_BT, 2)
    if int(n_buckets) != n_buckets or n_buckets < 1:
        raise ValueError(f"n_buckets must be an integer >= 1, got {n_buckets}")
    m = mask_BT.bool()
    t = torch.arange(m.shape[1], device=m.device)
    bucket = (int(n_buckets) * t) // _lengths(m)[:, None].clamp(min=1)
    return torch.where(m, bucket, -1)


@torch.no_grad()
def position_buckets(values_BT: Tensor, mask_BT: Tensor, n_buckets: int = 3) -> Tensor:
    """``[n_buckets]`` mean of ``values_BT`` over the kept tokens of each position bucket.

    Buckets are those of :func:`position_bucket_index` (relative to each row's own length); the
    mean pools tokens over rows; an empty bucket gives 0. Position bias: late tokens teach little
    (2606.22600), supervision fidelity decays (SFD 2605.30833).
    """
    check_same_shape(values_BT=values_BT, mask_BT=mask_BT)
    bucket = position_bucket_index(mask_BT, n_buckets)
    v = _float(values_BT) if values_BT.is_floating_point() else values_BT.detach().float()
    keep = bucket >= 0
    v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
    idx = bucket.clamp(min=0).reshape(-1)
    sums = torch.zeros(int(n_buckets), dtype=v.dtype, device=v.device).index_add_(0, idx, v.reshape(-1))
    counts = torch.zeros(int(n_buckets), dtype=v.dtype, device=v.device).index_add_(
        0, idx, keep.reshape(-1).to(v.dtype))
    return sums / counts.clamp(min=1.0)


@torch.no_grad()
def summarize_by_position(diags: Mapping[str, Tensor], mask_BT: Tensor, n_buckets: int = 3,
                          keys: Sequence[str] | None = None) -> dict[str, float]:
    """``{f"{key}_{bucket}": mean}`` for ``[B, T]`` diagnostics; buckets are named early / middle /
    late for ``n_buckets = 3`` and ``pos{i}of{n}`` otherwise. Empty buckets are omitted."""
    bucket = position_bucket_index(mask_BT, n_buckets)
    counts = torch.stack([(bucket == i).sum() for i in range(int(n_buckets))])
    names = _BUCKET_NAMES_3 if n_buckets == 3 else tuple(f"pos{i}of{n_buckets}" for i in range(n_buckets))
    out: dict[str, float] = {}
    for key in (diags.keys() if keys is None else keys):
        means = position_buckets(diags[key], mask_BT, n_buckets)
        for i, name in enumerate(names):
            if int(counts[i]) > 0:
                out[f"{key}_{name}"] = float(means[i])
    return out


# ----------------------------------------------------------------------------- per sequence


@torch.no_grad()
def ngram_repetition_rate(ids_BT: Tensor, mask_BT: Tensor, n: int = 3) -> Tensor:
    """``[B]`` fraction of a row's n-grams that repeat an earlier n-gram of the same row.

    An n-gram is ``n`` consecutive positions that are all kept by the mask; a row with ``M`` such
    n-grams of which ``U`` are distinct has rate ``(M − U) / M`` (0 when ``M = 0``, i.e. rows
    shorter than ``n``). Exact (no hashing): n-grams are compared with ``torch.unique``.
    Demystifying OPD (2604.08527): repetition saturation under length inflation.
    """
    total, distinct = _ngram_counts(ids_BT, mask_BT, n)
    return (total - distinct).float() / total.clamp(min=1).float()


def _ngram_counts(ids_BT: Tensor, mask_BT: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``([B], [B])`` long: number of fully kept n-grams per row and how many are distinct."""
    check_ndim("ids_BT", ids_BT, 2)
    check_same_shape(ids_BT=ids_BT, mask_BT=mask_BT)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    B, T = ids_BT.shape
    if T < n or B == 0:
        zeros = torch.zeros(B, dtype=torch.long, device=ids_BT.device)
        return zeros, zeros
    grams = ids_BT.detach().long().unfold(1, n, 1)  # [B, M, n]
    valid = mask_BT.bool().unfold(1, n, 1).all(dim=-1)  # [B, M]
    rows = torch.arange(B, device=ids_BT.device)[:, None].expand(valid.shape)
    keyed = torch.cat([rows[..., None], grams], dim=-1)[valid]  # [Q, n + 1]
    total = valid.sum(dim=1)
    distinct = torch.zeros_like(total)
    if keyed.numel():
        uniq = torch.unique(keyed, dim=0)
        distinct = torch.bincount(uniq[:, 0], minlength=B)
    return total, distinct


repetition_rate = ngram_repetition_rate  # the name used in the shared API plan




@torch.no_grad()
def ends_with_eos(ids_BT: Tensor, mask_BT: Tensor, eos_ids: int | Sequence[int]) -> Tensor:
    """``[B]`` bool: the row's last kept token is one of ``eos_ids`` (False for empty rows)."""
    check_ndim("ids_BT", ids_BT, 2)
    check_same_shape(ids_BT=ids_BT, mask_BT=mask_BT)
    eos = torch.as_tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=ids_BT.device)
    length = _lengths(mask_BT)
    if ids_BT.shape[1] == 0:
        return torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    last = ids_BT.gather(1, (length - 1).clamp(min=0)[:, None])[:, 0]
    return (length > 0) & torch.isin(last, eos.to(last.dtype))


@torch.no_grad()
def eos_rate(ids_BT: Tensor, mask_BT: Tensor, eos_ids: int | Sequence[int]) -> float:
    """Fraction of non-empty rows that end with an EOS id (0 if every row is empty)."""
    nonempty = mask_BT.bool().any(dim=1)
    return float(ends_with_eos(ids_BT, mask_BT, eos_ids).sum()) / max(int(nonempty.sum()), 1)


@torch.no_grad()
def truncation_flags(mask_BT: Tensor, max_new_tokens: int, *, ids_BT: Tensor | None = None,
                     eos_ids: int | Sequence[int] | None = None) -> Tensor:
    """``[B]`` bool: the row reached ``max_new_tokens`` tokens and (if ``ids_BT`` and ``eos_ids``
    are given) does not end with EOS. Prefer the rollout's own ``truncated_B`` when it exists."""
    check_ndim("mask_BT", mask_BT, 2)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    flags = _lengths(mask_BT) >= max_new_tokens
    if ids_BT is not None and eos_ids is not None:
        flags = flags & ~ends_with_eos(ids_BT, mask_BT, eos_ids)
    return flags


@torch.no_grad()
def truncation_rate(mask_BT: Tensor, max_new_tokens: int, *, ids_BT: Tensor | None = None,
                    eos_ids: int | Sequence[int] | None = None) -> float:
    """Fraction of rows flagged by :func:`truncation_flags` (0 for an empty batch)."""
    flags = truncation_flags(mask_BT, max_new_tokens, ids_BT=ids_BT, eos_ids=eos_ids)
    return float(flags.sum()) / max(flags.numel(), 1)


@torch.no_grad()
def sequence_diagnostics(ids_BT: Tensor, mask_BT: Tensor, *, n: int = 3,
                         eos_ids: int | Sequence[int] | None = None, max_new_tokens: int | None = None,
                         truncated_B: Tensor | None = None) -> dict[str, float]:
    """Length / EOS / truncation / repetition summary of a batch of completions (Demystifying OPD).

    Keys: ``length_mean``, ``length_min``, ``length_max`` (kept tokens per row; 0 for an empty
    batch); ``repetition_rate`` (mean of :func:`ngram_repetition_rate` over rows with at least one
    n-gram, omitted if none); ``eos_rate`` when ``eos_ids`` is given; ``truncation_rate`` from
    ``truncated_B`` when given, else from :func:`truncation_flags` when ``max_new_tokens`` is given.
    """
    check_ndim("ids_BT", ids_BT, 2)
    check_same_shape(ids_BT=ids_BT, mask_BT=mask_BT)
    counts = mask_BT.bool().sum(dim=1).double()
    B = ids_BT.shape[0]
    out = {
        "length_mean": float(counts.mean()) if B else 0.0,
        "length_min": float(counts.min()) if B else 0.0,
        "length_max": float(counts.max()) if B else 0.0,
    }
    total, distinct = _ngram_counts(ids_BT, mask_BT, n)
    has = total > 0
    if bool(has.any()):
        rate = (total - distinct).double() / total.clamp(min=1).double()
        out["repetition_rate"] = float(rate[has].mean())
    if eos_ids is not None:
        out["eos_rate"] = eos_rate(ids_BT, mask_BT, eos_ids)
    if truncated_B is not None:
        if truncated_B.shape != (B,):
            raise ValueError(f"truncated_B has shape {tuple(truncated_B.shape)}, expected {(B,)}")
        out["truncation_rate"] = float(truncated_B.bool().sum()) / max(B, 1)
    elif max_new_tokens is not None:
        out["truncation_rate"] = truncation_rate(mask_BT, max_new_tokens, ids_BT=ids_BT, eos_ids=eos_ids)
    return out


# ----------------------------------------------------------------------------- CR-OPD


@torch.no_grad()
def summarize_cr_opd(metrics: Mapping[str, Tensor], mask_N: Tensor | None = None) -> dict[str, float]:
    """Summaries of :func:`opd.math.routing.cr_opd_loss` per-token metrics (methods.md §3.4, [INFER]).

    Keys: ``cr_opd_routed_frac`` (routed / kept tokens, 0 if none kept); over routed tokens
    ``cr_opd_candidates_routed`` (mean ``|C_t|``) and ``cr_opd_mass_routed`` (mean share of the
    freed mass sent to teacher-supported tokens under ``ρ̃``); over kept unrouted tokens
    ``cr_opd_mass_unrouted`` (the same share under the student prior ``π_θ``, i.e. what plain PG
    would do). Conditional keys are omitted when their set is empty.
    """
    routed = metrics["routed"].bool()
    keep = torch.ones_like(routed) if mask_N is None else mask_N.bool()
    check_same_shape(routed=routed, mask_N=keep)
    routed = routed & keep
    unrouted = keep & ~routed
    n_keep, n_routed = int(keep.sum()), int(routed.sum())
    mass = metrics["mass_to_teacher_supported"].detach().to(torch.float64)
    out = {"cr_opd_routed_frac": n_routed / max(n_keep, 1)}
    if n_routed:
        if "n_candidates" in metrics:
            out["cr_opd_candidates_routed"] = float(masked_mean(metrics["n_candidates"].to(torch.float64), routed))
        out["cr_opd_mass_routed"] = float(masked_mean(mass, routed))
    if int(unrouted.sum()):
        out["cr_opd_mass_unrouted"] = float(masked_mean(mass, unrouted))
    return out
