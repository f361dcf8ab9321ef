"""Value estimates for GAE-OPD that are not a learned head: Monte-Carlo values and λ-return targets.

Reward convention (:mod:`opd.math.credit`): ``r_t = log π_T(y_t) − log π_S(y_t)``. Its expectation at a
state under the student is ``E_{y~π_S}[r(s, y)] = −KL(π_S ‖ π_T)(s)``, so the discounted value of the
current student is

    V^π_γ(s_t) = E_π[ Σ_{k ≥ 0} γ^k r_{t+k} | s_t ] = E_π[ Σ_{k ≥ 0} γ^k (−KL_{t+k}) | s_t ],

(the tower rule: each sampled log-ratio replaced by its conditional mean, a Rao–Blackwellisation).
:func:`continuation_returns` is one sample of the bracket along a continuation sampled from ``π_S``
starting at ``s_t`` (dense per-state KLs, no sampled log-ratio), :func:`mc_value` the mean of ``K``
such samples and its standard error ``std/√K``. Each continuation is drawn independently of the
training batch, so ``V̂`` is an unbiased estimate of ``V^π_γ`` with noise independent of the batch's
actions given the state; GAE's advantage is linear in ``V`` (:func:`opd.math.credit.gae_advantages`),
so GAE with ``V̂`` has the same expectation as GAE with the exact value — unbiased for every λ
(for ``PG_γ``; for the sequence reverse-KL gradient at γ = 1). This use is [INFER] (an oracle
ablation; the survey, arXiv 2606.22793, names no estimator for the value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_range, check_same_shape
from opd.math.credit import discounted_returns, gae_advantages

__all__ = ["continuation_returns", "lambda_returns", "masked_rmse", "mc_value"]


def continuation_returns(kl_NL: Tensor, mask_NL: Tensor, gamma: float) -> Tensor:
    """``G_n = Σ_k γ^k (−KL_{n,k})`` over the valid steps of each continuation row ``n``.

    Args:
        kl_NL: ``[N, L]`` per-state ``KL(π_S ‖ π_T)`` along each continuation (column 0 is the start
            state ``s_t`` itself).
        mask_NL: ``[N, L]`` True on the states the continuation visited (a prefix of each row: up to and
            including the state where EOS was drawn, or the length limit).
        gamma: discount in ``[0, 1]`` (counts valid steps, as :func:`opd.math.credit.discounted_returns`).

    Returns:
        ``[N]`` detached returns (0 for a row with no valid step).

    >>> continuation_returns(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[True, True, False]]), 0.5)
    tensor([-2.])
    """
    check_ndim("kl_NL", kl_NL, 2)
    check_same_shape(kl_NL=kl_NL, mask_NL=mask_NL)
    if kl_NL.shape[1] == 0:
        return kl_NL.new_zeros(kl_NL.shape[0])
    return discounted_returns(-kl_NL, mask_NL, gamma)[:, 0]


def mc_value(returns_SK: Tensor) -> tuple[Tensor, Tensor]:
    """Monte-Carlo value and its standard error from ``K`` continuation returns per state.

        V̂(s) = (1/K) Σ_j G_j(s),        se(s) = std_j G_j(s) / √K   (unbiased std; 0 when K = 1)

    Args:
        returns_SK: ``[S, K]`` returns (:func:`continuation_returns`) of ``K`` independent continuations
            of each of ``S`` states.

    Returns:
        ``(value_S, stderr_S)``, detached.
    """
    check_ndim("returns_SK", returns_SK, 2)
    k = returns_SK.shape[1]
    if k < 1:
        raise ValueError("returns_SK needs at least one continuation per state (K >= 1)")
    g = returns_SK.detach()
    value = g.mean(1)
    stderr = g.std(1, unbiased=True) / k ** 0.5 if k > 1 else torch.zeros_like(value)
    return value, stderr


def lambda_returns(rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float,
                   lam: float) -> Tensor:
    """The critic's regression target, the λ-return ``G^λ_t = A^{GAE(γ,λ)}_t + V(s_t)``.

    Equivalently ``G^λ_t = r_t + γ((1 − λ) V(s_{t+1}) + λ G^λ_{t+1})`` with ``G^λ = 0`` after the last
    valid token (Sutton & Barto §12.1; Schulman et al., arXiv 1506.02438). λ = 1: the discounted
    return-to-go (no bootstrap); λ = 0: the TD(0) target ``r_t + γV(s_{t+1})``. Detached, 0 on masked
    positions (the mask rules of :mod:`opd.math.credit`).
    """
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("lam", lam, 0.0, 1.0)
    _, targets = gae_advantages(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    return targets.detach()


def masked_rmse(a_BT: Tensor, b_BT: Tensor, mask_BT: Tensor) -> tuple[float, float]:
    """``(sqrt(mean (a − b)²), mean (a − b))`` over the valid tokens (``(nan, nan)`` when none)."""
    check_same_shape(a_BT=a_BT, b_BT=b_BT, mask_BT=mask_BT)
    m = mask_BT.bool()
    if not bool(m.any()):
        return float("nan"), float("nan")
    d = (a_BT.detach().double() - b_BT.detach().double())[m]
    return float(d.pow(2).mean().sqrt()), float(d.mean())
