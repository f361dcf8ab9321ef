"""Per-sequence diagnostics: n-gram repetition, EOS, truncation (Demystifying OPD, arXiv 2604.08527)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_same_shape
from opd.math.diagnostics._common import _lengths


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
