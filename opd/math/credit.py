"""Temporal credit: turning per-token rewards into per-token advantages (route R2).

Reward convention (:mod:`opd.math`): ``r_t = log π_T(y_t) − log π_S(y_t)`` and the advantage
``A_t`` enters the loss as ``−sg[A_t] · log π_S(y_t)``. Every output here is **detached**
(except :func:`value_loss` w.r.t. the predicted values and :func:`decomposed_value` w.r.t.
the learned continuation).

Masks and time (one rule for every function): a row is the sequence of its **valid**
tokens (``mask_BT`` True), in column order. Masked positions are not actions: they get
advantage/return ``0``, carry no reward, are skipped by the discount (``γ`` counts valid
tokens, so a masked column inside a row neither adds a reward nor a factor ``γ``), and hold no
value (``V`` there is ignored, whatever it contains, ``nan`` included). A sequence ends at its
last valid token, with ``V(s_{T+1}) = 0`` after it. Returns never cross rows. Consequently
inserting or appending masked columns leaves every result on valid tokens unchanged.

Bias boundaries (docs/methods.md §3.2, derivations [INFER] there; unbiased set from Liu, Jiang & Fu,
https://yuqianfu.notion.site/policy-gradient-bias-and-variance-of-opd): on-policy,
``return_to_go`` and ``return_to_go − b(s_t)`` for any state-only ``b`` (including the
leave-one-out group mean) are unbiased for the sequence reverse-KL gradient; ``immediate``,
``discounted`` (γ < 1), ``batch_mean``/``group_mean`` including the sample itself and GAE with
λ < 1 and an inexact ``V`` are biased. ``opd bias-lab`` (:mod:`opd.lab.bias_lab`) checks each
claim exactly by enumeration.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_range, check_same_shape
from opd.math.window_credit import windowed_returns

CreditKind = Literal["immediate", "return_to_go", "discounted", "gae", "window"]
BaselineKind = Literal["none", "batch_mean", "group_mean", "leave_one_out", "value"]
CREDIT_KINDS: tuple[str, ...] = get_args(CreditKind)
BASELINES: tuple[str, ...] = get_args(BaselineKind)


def _prepare(name: str, values_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Checked, detached float copy of ``values_BT`` with masked entries set to 0, and the bool mask."""
    check_ndim(name, values_BT, 2)
    check_same_shape(**{name: values_BT, "mask_BT": mask_BT})
    v = values_BT.detach()
    if not v.is_floating_point() or v.dtype in (torch.float16, torch.bfloat16):
        v = v.to(torch.float32)
    m = mask_BT.bool()
    return torch.where(m, v, torch.zeros((), dtype=v.dtype, device=v.device)), m


def _zero_masked(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _reverse_scan(x_BT: Tensor, m_BT: Tensor, decay: float) -> Tensor:
    """``out_t = x_t + decay · out_{next valid t'}`` over valid tokens; 0 on masked positions.

    Masked positions pass the running value through unchanged (and ``x`` is 0 there), so the
    decay counts valid tokens only. ``decay = 1`` is a reversed cumulative sum.
    """
    if decay == 0.0:
        return _zero_masked(x_BT, m_BT)
    if decay == 1.0:
        return _zero_masked(x_BT.flip(1).cumsum(1).flip(1), m_BT)
    carry = torch.zeros_like(x_BT[:, 0])
    cols = []
    for t in range(x_BT.shape[1] - 1, -1, -1):
        carry = torch.where(m_BT[:, t], x_BT[:, t] + decay * carry, carry)
        cols.append(carry)
    return _zero_masked(torch.stack(cols[::-1], dim=1), m_BT)


def discounted_returns(rewards_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """Discounted return-to-go ``G_t = Σ_{t' ≥ t} γ^{k(t, t')} r_{t'}`` over the row's valid tokens.

    ``k(t, t')`` is the distance counted in valid tokens (equal to ``t' − t`` when the row has
    no masked column inside). ``γ = 0`` is the immediate
    reward ``r_t`` (Thinking Machines / tinker default ``kl_discount_factor = 0``), ``γ = 1`` the
    undiscounted log-ratio-to-go of MiniLLM (arXiv 2306.08543) and the unbiased E-rtg of
    docs/methods.md §3.2; 0 < γ < 1 is tinker's ``kl_discount_factor`` (biased for the sequence KL).

    Args:
        rewards_BT: ``[B, T]`` per-token rewards (detached here).
        mask_BT: ``[B, T]`` bool/0-1 mask of valid tokens.
        gamma: discount, ``0 <= γ <= 1``.

    Returns:
        ``[B, T]`` detached returns, 0 at masked positions.

    >>> discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3), 0.5)  # 1+1+1, 2+2, 4
    tensor([[3., 4., 4.]])
    """
    check_range("gamma", gamma, 0.0, 1.0)
    r, m = _prepare("rewards_BT", rewards_BT, mask_BT)
    return _reverse_scan(r, m, float(gamma))


def length_normalized_returns(rewards_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Length-normalised return-to-go ``G_t / (L_b − t) = mean of r_{t'} over valid t' ≥ t``.

    ``L_b − t`` is the number of valid tokens from ``t`` to the end of the row (inclusive).
    MiniLLM's length normalisation (Gu et al., arXiv 2306.08543) counters the short-response
    bias of the reverse-KL return; MiniLLM normalises the *future* part ``R_{t+1}``, we normalise
    the whole return-to-go as the API plan states. It is a reweighting (biased for the sequence
    KL gradient), not a variance-reduction device (docs/methods.md §3.2).
    """
    r, m = _prepare("rewards_BT", rewards_BT, mask_BT)
    rtg = _reverse_scan(r, m, 1.0)
    count = _reverse_scan(m.to(r.dtype), m, 1.0)
    return _zero_masked(rtg / count.clamp(min=1.0), m)


def batch_mean_baseline(returns_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``b_t`` = mean of ``returns[:, t]`` over the rows valid at column ``t`` (0 if none; 0 when masked).

    Includes the row itself, so ``G_t − b_t`` is **biased** for the policy gradient: with ``n``
    independent rows the expectation is scaled by ``1 − 1/n`` (docs/methods.md §3.2 "action-dependent
    baseline"). Useful as a cheap centring; prefer :func:`group_mean_baseline` with
    ``leave_one_out=True`` when unbiasedness matters.
    """
    x, m = _prepare("returns_BT", returns_BT, mask_BT)
    mf = m.to(x.dtype)
    count = mf.sum(0)
    mean = x.sum(0) / count.clamp(min=1.0)
    return _zero_masked(mean.expand_as(x), m)


def group_mean_baseline(returns_BT: Tensor, mask_BT: Tensor, group_index_B: Tensor, *,
                        leave_one_out: bool) -> Tensor:
    """Per-prompt mean of the returns at each column, over the rows of the same group.

        b_{i,t} = mean{ G_{j,t} : group(j) = group(i), row j valid at t, (j ≠ i if leave_one_out) }

    0 where that set is empty, and 0 at masked positions. ``leave_one_out=True`` is the RLOO
    baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et
    al., arXiv 2402.14740): independent of sample ``i``, hence unbiased. ``leave_one_out=False``
    (the GRPO-style group mean, arXiv 2402.03300) includes ``G_{i,t}`` itself: with ``G``
    samples per prompt all valid at ``t`` the expected gradient is scaled by ``(1 − 1/G)``.

    Args:
        returns_BT: ``[B, T]`` returns (detached here).
        mask_BT: ``[B, T]`` valid tokens.
        group_index_B: ``[B]`` integer prompt id of each row (any integers).
    """
    x, m = _prepare("returns_BT", returns_BT, mask_BT)
    check_ndim("group_index_B", group_index_B, 1)
    if group_index_B.shape[0] != x.shape[0]:
        raise ValueError(f"group_index_B has shape {tuple(group_index_B.shape)} but returns_BT has "
                         f"shape {tuple(x.shape)}; it needs one entry per row")
    if group_index_B.is_floating_point():
        raise ValueError("group_index_B must hold integers")
    _, inverse_B = torch.unique(group_index_B, return_inverse=True)
    num_groups = int(inverse_B.max().item()) + 1 if inverse_B.numel() else 0
    mf = m.to(x.dtype)
    sums = x.new_zeros(num_groups, x.shape[1]).index_add_(0, inverse_B, x)[inverse_B]
    counts = x.new_zeros(num_groups, x.shape[1]).index_add_(0, inverse_B, mf)[inverse_B]
    if leave_one_out:
        sums, counts = sums - x, counts - mf
    mean = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.zeros_like(sums))
    return _zero_masked(mean, m)


def gae_advantages(rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """GAE-OPD: generalised advantage estimation on the log-ratio reward.

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),        V(s_{T+1}) = 0 after the last valid token
        A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}            value target  = A_t + V(s_t)

    (``t + 1``, ``t + l`` step over valid tokens.) GAE: Schulman et al., arXiv 1506.02438;
    its use on OPD log-ratio returns is the survey's "value-based hypothesis" GAE-OPD (Zhang,
    arXiv 2606.22793), whose explicit form here is [INFER] (docs/methods.md §3.3). Corners:
    γ = 0, V ≡ 0 → immediate; γ = 0, V = −RKL_t → vOPD (arXiv 2605.07865); λ = 1 → discounted
    return minus V (unbiased for any state-only V when γ = 1); λ < 1 is unbiased only with the
    exact value ``V = V^π_γ``.

    Args:
        rewards_BT, values_BT, mask_BT: ``[B, T]``; rewards and values are detached here.
        gamma, lam: in ``[0, 1]``.

    Returns:
        ``(advantages_BT, value_targets_BT)``, both detached, 0 at masked positions.
    """
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("lam", lam, 0.0, 1.0)
    r, m = _prepare("rewards_BT", rewards_BT, mask_BT)
    v, _ = _prepare("values_BT", values_BT, mask_BT)
    v = v.to(r.dtype)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    cols = []
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + (gamma * lam) * running
        valid = m[:, t]
        running = torch.where(valid, adv, running)
        next_value = torch.where(valid, v[:, t], next_value)
        cols.append(adv)
    adv_BT = _zero_masked(torch.stack(cols[::-1], dim=1), m)
    return adv_BT, _zero_masked(adv_BT + v, m)


def value_loss(values_pred_BT: Tensor, value_targets_BT: Tensor) -> Tensor:
    """Per-token critic loss ``½ (V_φ(s_t) − sg[target_t])²`` (reduce with :mod:`opd.math.reduce`).

    The GAE-OPD critic (docs/methods.md §3.3 [INFER]); gradient ``V_φ − target`` w.r.t. the prediction.
    """
    check_same_shape(values_pred_BT=values_pred_BT, value_targets_BT=value_targets_BT)
    return 0.5 * (values_pred_BT - value_targets_BT.detach()) ** 2


def closed_form_value(rkl_BT: Tensor) -> Tensor:
    """vOPD closed-form value ``V(s_t) = −sg[RKL_t]`` (Oh et al., "KL for a KL", arXiv 2605.07865).

    ``RKL_t = KL(π_S(·|s_t) ‖ π_T(·|s_t))`` from the forward pass (full vocabulary or a top-K
    approximation — any function of the state keeps the baseline unbiased). It is the exact
    value of the γ = 0 (immediate) problem: ``E[r_t | s_t] = −RKL_t``.
    """
    return -rkl_BT.detach()


def decomposed_value(rkl_BT: Tensor, continuation_BT: Tensor, gamma: float) -> Tensor:
    """Decomposed GAE-OPD value ``V(s_t) = −sg[RKL_t] + γ U_φ(s_t)``  [INFER] (docs/methods.md §3.3).

    From ``V^π_γ(s_t) = −RKL_t + γ E_{y_t~π}[V^π_γ(s_{t+1})]``: the immediate part is closed form,
    only the continuation ``U_φ(s_t) ≈ E[V(s_{t+1}) | s_t]`` is learned. The gradient flows into
    ``continuation_BT`` (so a critic loss on this value trains ``U_φ``), never into ``rkl_BT``.
    """
    check_range("gamma", gamma, 0.0, 1.0)
    check_same_shape(rkl_BT=rkl_BT, continuation_BT=continuation_BT)
    return -rkl_BT.detach() + gamma * continuation_BT


def temporal_credit(rewards_BT: Tensor, mask_BT: Tensor, *, kind: CreditKind, gamma: float = 1.0,
                    lam: float = 1.0, values_BT: Tensor | None = None,
                    baseline: BaselineKind = "none", group_index_B: Tensor | None = None,
                    length_normalize: bool = False, window: int = 1) -> Tensor:
    """Advantages ``A_BT`` (detached, 0 on masked positions) for the named credit rule.

    Returns ``R_t`` by ``kind`` — ``immediate``: ``r_t``; ``return_to_go``: ``Σ_{t'≥t} r_{t'}``
    (``gamma`` ignored); ``discounted``: :func:`discounted_returns` with ``gamma``; ``gae``:
    :func:`gae_advantages` with ``gamma``, ``lam`` and ``values_BT`` (required); ``window``:
    :func:`opd.math.window_credit.windowed_returns` ``Σ_{k<window} γ^k r_{t+k}`` — then subtracts
    the ``baseline`` computed from those ``R``: ``none``; ``batch_mean``; ``group_mean`` /
    ``leave_one_out`` (need ``group_index_B``); ``value`` (``R_t − V(s_t)`` with ``values_BT``;
    not allowed with ``gae``, which already subtracts ``V``). ``length_normalize`` replaces the
    return-to-go by :func:`length_normalized_returns` (MiniLLM; only with ``return_to_go``).
    See the module docstring for which combinations are unbiased.
    """
    if kind not in CREDIT_KINDS:
        raise ValueError(f"unknown credit kind {kind!r}; choose one of {', '.join(CREDIT_KINDS)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if length_normalize and kind != "return_to_go":
        raise ValueError(f"length_normalize=True needs kind='return_to_go', got kind={kind!r}")
    if (kind == "gae" or baseline == "value") and values_BT is None:
        raise ValueError(f"kind={kind!r} with baseline={baseline!r} needs values_BT")
    if kind == "gae" and baseline == "value":
        raise ValueError("kind='gae' already subtracts values_BT; use baseline='none' "
                         "(or a batch/group baseline)")
    if baseline in ("group_mean", "leave_one_out") and group_index_B is None:
        raise ValueError(f"baseline={baseline!r} needs group_index_B (the prompt id of each row)")

    if kind == "immediate":
        returns = discounted_returns(rewards_BT, mask_BT, 0.0)
    elif kind == "return_to_go":
        returns = (length_normalized_returns(rewards_BT, mask_BT) if length_normalize
                   else discounted_returns(rewards_BT, mask_BT, 1.0))
    elif kind == "discounted":
        returns = discounted_returns(rewards_BT, mask_BT, gamma)
    elif kind == "window":
        returns = windowed_returns(rewards_BT, mask_BT, window, gamma)
    else:
        returns, _ = gae_advantages(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)

    if baseline == "none":
        return returns
    if baseline == "batch_mean":
        b = batch_mean_baseline(returns, mask_BT)
    elif baseline in ("group_mean", "leave_one_out"):
        b = group_mean_baseline(returns, mask_BT, group_index_B,
                                leave_one_out=baseline == "leave_one_out")
    else:
        b, _ = _prepare("values_BT", values_BT, mask_BT)
    return _zero_masked(returns - b.to(returns.dtype), mask_BT.bool())
