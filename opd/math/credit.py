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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from opd.math._checks import check_ndim, check_range, check_same_shape
from opd.math.registry import Registry
from opd.math.window_credit import windowed_returns

#: Value estimates ``V(s_t)`` for ``gae`` / ``baseline=value`` (``route2.value``): the closed form
#: :func:`closed_form_value`, zero, :func:`decomposed_value` with a learned head, or one computed with
#: the batch outside the objective (:data:`EXTERNAL_VALUES`).
VALUE_ESTIMATES: tuple[str, ...] = ("closed_form", "zero", "decomposed", "exact_mc", "critic")
#: The value estimates computed when the batch is prepared, not by the objective ([INFER] oracle
#: ablations of GAE-OPD): ``exact_mc``, the current student's value by Monte-Carlo continuations
#: (:mod:`opd.math.value_targets`), and ``critic``, a separate small critic network.
EXTERNAL_VALUES: tuple[str, ...] = ("exact_mc", "critic")


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


@dataclass(frozen=True)
class CreditParams:
    """The knobs of the credit estimators: discount ``gamma``, GAE ``lam``, the ``window`` length
    and MiniLLM's ``length_normalize``; each estimator reads the ones it uses."""

    gamma: float = 1.0
    lam: float = 1.0
    window: int = 1
    length_normalize: bool = False


@dataclass(frozen=True)
class CreditEstimator:
    """One temporal credit rule: ``returns(rewards_BT, mask_BT, values_BT, params) -> R_BT`` (detached,
    0 on masked positions).

    ``uses_values``: the rule subtracts ``values_BT`` itself (GAE): it needs them, and
    ``baseline=value`` would subtract them twice. ``uses_gamma``: it reads ``params.gamma`` (the
    others ignore it: one place decides what γ means for a rule). ``length_normalize``: it accepts
    ``params.length_normalize``.
    """

    returns: Callable[[Tensor, Tensor, Tensor | None, CreditParams], Tensor]
    uses_gamma: bool = False
    uses_values: bool = False
    length_normalize: bool = False


@dataclass(frozen=True)
class Baseline:
    """One baseline: ``compute(returns_BT, mask_BT, group_index_B, values_BT) -> b_BT``, subtracted
    from the returns (``None``: nothing is subtracted); ``needs_groups`` / ``needs_values`` say which
    optional input it reads."""

    compute: Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor] | None
    needs_groups: bool = False
    needs_values: bool = False


def _rtg(r: Tensor, m: Tensor, _v: Tensor | None, p: CreditParams) -> Tensor:
    return length_normalized_returns(r, m) if p.length_normalize else discounted_returns(r, m, 1.0)


#: The credit rules of ``route2.credit``, in the order ``opd config-help`` lists them (CONTRIBUTING.md,
#: "Adding a credit estimator").
CREDIT_ESTIMATORS: Registry[CreditEstimator] = Registry("credit kind", {
    "immediate": CreditEstimator(lambda r, m, v, p: discounted_returns(r, m, 0.0)),
    "return_to_go": CreditEstimator(_rtg, length_normalize=True),
    "discounted": CreditEstimator(lambda r, m, v, p: discounted_returns(r, m, p.gamma), uses_gamma=True),
    "gae": CreditEstimator(lambda r, m, v, p: gae_advantages(r, v, m, gamma=p.gamma, lam=p.lam)[0],
                           uses_gamma=True, uses_values=True),
    "window": CreditEstimator(lambda r, m, v, p: windowed_returns(r, m, p.window, p.gamma), uses_gamma=True),
})
#: The baselines of ``route2.baseline``.
BASELINES: Registry[Baseline] = Registry("baseline", {
    "none": Baseline(None),
    "batch_mean": Baseline(lambda g, m, groups, v: batch_mean_baseline(g, m)),
    "group_mean": Baseline(lambda g, m, groups, v: group_mean_baseline(g, m, groups, leave_one_out=False),
                           needs_groups=True),
    "leave_one_out": Baseline(lambda g, m, groups, v: group_mean_baseline(g, m, groups, leave_one_out=True),
                              needs_groups=True),
    "value": Baseline(lambda g, m, groups, v: _prepare("values_BT", v, m)[0], needs_values=True),
})
#: The registered names, read live.
CREDIT_KINDS = CREDIT_ESTIMATORS.names()
BASELINE_NAMES = BASELINES.names()


def uses_values(kind: str, baseline: str) -> bool:
    """Whether credit ``kind`` with ``baseline`` reads a value estimate ``V(s_t)``."""
    return CREDIT_ESTIMATORS.lookup(kind).uses_values or BASELINES.lookup(baseline).needs_values


def temporal_credit(rewards_BT: Tensor, mask_BT: Tensor, *, kind: str, gamma: float = 1.0,
                    lam: float = 1.0, values_BT: Tensor | None = None,
                    baseline: str = "none", group_index_B: Tensor | None = None,
                    length_normalize: bool = False, window: int = 1) -> Tensor:
    """Advantages ``A_BT`` (detached, 0 on masked positions) for the named credit rule.

    Returns ``R_t`` by ``kind`` (:data:`CREDIT_ESTIMATORS`) — ``immediate``: ``r_t``;
    ``return_to_go``: ``Σ_{t'≥t} r_{t'}``; ``discounted``: :func:`discounted_returns` with ``gamma``;
    ``gae``: :func:`gae_advantages` with ``gamma``, ``lam`` and ``values_BT`` (required); ``window``:
    :func:`opd.math.window_credit.windowed_returns` ``Σ_{k<window} γ^k r_{t+k}`` (``gamma`` is read
    only by the rules that discount) — then subtracts the ``baseline`` (:data:`BASELINES`) computed
    from those ``R``: ``none``; ``batch_mean``; ``group_mean`` / ``leave_one_out`` (need
    ``group_index_B``); ``value`` (``R_t − V(s_t)`` with ``values_BT``; not allowed with ``gae``,
    which already subtracts ``V``). ``length_normalize`` replaces the return-to-go by
    :func:`length_normalized_returns` (MiniLLM; only with ``return_to_go``). See the module
    docstring for which combinations are unbiased.
    """
    rule, base = CREDIT_ESTIMATORS.lookup(kind), BASELINES.lookup(baseline)
    if length_normalize and not rule.length_normalize:
        raise ValueError(f"length_normalize=True needs kind='return_to_go', got kind={kind!r}")
    if (rule.uses_values or base.needs_values) and values_BT is None:
        raise ValueError(f"kind={kind!r} with baseline={baseline!r} needs values_BT")
    if rule.uses_values and base.needs_values:
        raise ValueError(f"kind={kind!r} already subtracts values_BT; use baseline='none' "
                         "(or a batch/group baseline)")
    if base.needs_groups and group_index_B is None:
        raise ValueError(f"baseline={baseline!r} needs group_index_B (the prompt id of each row)")

    params = CreditParams(gamma=gamma, lam=lam, window=window, length_normalize=length_normalize)
    returns = rule.returns(rewards_BT, mask_BT, values_BT, params)
    if base.compute is None:
        return returns
    b = base.compute(returns, mask_BT, group_index_B, values_BT)
    return _zero_masked(returns - b.to(returns.dtype), mask_BT.bool())
