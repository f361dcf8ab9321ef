"""Helpers shared by the diagnostics modules (detached float copies, lengths, first occurrences)."""

from __future__ import annotations

import torch
from torch import Tensor

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
