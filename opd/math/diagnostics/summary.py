"""Reductions of per-token diagnostics to logged floats: means, sign balance, position buckets, CR-OPD."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_same_shape
from opd.math.diagnostics._common import _BUCKET_NAMES_3, _float, _lengths
from opd.math.reduce import masked_mean


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


# ----------------------------------------------------------------------------- CR-OPD


@torch.no_grad()
def summarize_cr_opd(metrics: Mapping[str, Tensor], mask_N: Tensor | None = None) -> dict[str, float]:
    """Summaries of :func:`opd.math.routing.cr_opd_loss` per-token metrics (docs/methods.md §3.4, [INFER]).

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
