"""Near-future window credit: the reward of the next W tokens credited to each token
(Bridging / trajectory-aware OPD, arXiv 2606.00305).

Token-level OPD credits each sampled token with its own log-ratio only (immediate credit); the
return-to-go credits it with every later one. The near-future guidance of arXiv 2606.00305
"distributes guidance across multiple future tokens", since a reasoning failure unfolds as a
short-horizon drift rather than at one token. The estimator in between is a truncated return:

    A_t = Σ_{k=0}^{W−1} γ^k r_{t+k}      (terms past the end of the completion are 0)

W = 1 is immediate credit; W ≥ T with γ = 1 is the return-to-go. The window form and its
constants are our reconstruction **[INFER]**: the paper's exact weighting was not retrieved.
Like every credit rule with W > 1 it adds the effect of y_t on the next W−1 log-ratios, which
the immediate estimator omits (docs/methods.md §3.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_range, check_same_shape


def windowed_returns(rewards_BT: Tensor, mask_BT: Tensor, window: int, gamma: float = 1.0) -> Tensor:
    """``A_t = Σ_{k=0}^{W−1} γ^k r_{t+k}`` over valid positions of the same row; 0 at masked positions.

    ``rewards_BT`` ``[B, T]`` (detached inside), ``mask_BT`` ``[B, T]`` bool; ``window`` W ≥ 1,
    ``gamma`` in [0, 1]. Rewards at masked positions never enter a sum (a gap in the mask — e.g. a
    gated token — contributes nothing but does not stop the window).
    """
    check_same_shape(rewards_BT=rewards_BT, mask_BT=mask_BT)
    check_ndim("rewards_BT", rewards_BT, 2)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    check_range("gamma", gamma, 0.0, 1.0)
    keep = mask_BT.bool()
    dtype = torch.promote_types(rewards_BT.dtype, torch.float32)
    r = torch.where(keep, rewards_BT.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards_BT.device))
    T = r.shape[-1]
    out = torch.zeros_like(r)
    for k in range(min(window, T)):
        out[:, : T - k] += (gamma ** k) * r[:, k:]
    return torch.where(keep, out, torch.zeros((), dtype=dtype, device=out.device))
