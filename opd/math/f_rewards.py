"""OPD+ de-biased f-divergence rewards for sampled-token (route R2) OPD (arXiv 2606.01039).

Per visited state the student minimises an f-divergence to the teacher written as an expectation
under its own samples, with ``u(v) = π_T(v|s_t) / π_S(v|s_t)``:

    D_f(π_T ‖ π_S)(s_t) = E_{v~π_S}[ f(u(v)) ]          (f(u) = −log u gives the reverse KL)

Its exact gradient is (differentiate ``Σ_v π_S(v) f(u(v))``, using ``∇u = −u ∇log π_S``)

    ∇ D_f = E_{v~π_S}[ (f(u) − u f'(u)) ∇log π_S(v) ],

so the cost to detach is ``c_t = f(u_t) − u_t f'(u_t)``, not ``f(u_t)``. Detaching ``f(u_t)`` alone
(the usual stop-gradient reward) drops ``−E[u f'(u) ∇log π_S]``: zero for the reverse KL
(``u f'(u) = −1``, a constant whose score expectation vanishes), non-zero for every other ``f``.
OPD+ uses the corrected coefficient; in the package's reward convention (higher is better)

    r_t^{f+} = −(f(u_t) − u_t f'(u_t)),   u_t = exp(log π_T(y_t) − log π_S(y_t)).

The closed forms of ``f(u) − u f'(u)`` below are our derivation **[INFER]** (the paper states the
correction for a general f; the per-f expressions were not retrieved):

====================  ==============================  ===========================
name                  f(u)                            f(u) − u f'(u)
====================  ==============================  ===========================
``rkl``               −log u                          1 − log u
``fkl``               u log u                         −u
``hellinger``         (√u − 1)²                       1 − √u
``jsd``               ½[u log u − (u+1) log((u+1)/2)]  −½ log((u+1)/2)
====================  ==============================  ===========================

Rewards are detached (the gradient reaches the student only through the policy-gradient loss
``−sg[r_t] log π_S(y_t)``), exactly 0 at masked positions, computed in at least float32.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_same_shape

FDivergence = Literal["rkl", "fkl", "hellinger", "jsd"]
#: the f-divergences with an OPD+ corrected reward (the registry the schema's choices read)
F_DIVERGENCE_NAMES: tuple[str, ...] = get_args(FDivergence)


def _log_u(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, mask_BT: Tensor | None) -> Tensor:
    check_same_shape(student_logprobs_BT=student_logprobs_BT, teacher_logprobs_BT=teacher_logprobs_BT,
                     mask_BT=mask_BT)
    dtype = torch.promote_types(student_logprobs_BT.dtype, torch.float32)
    s = student_logprobs_BT.detach().to(dtype)
    t = teacher_logprobs_BT.detach().to(dtype)
    if mask_BT is not None:  # padding may hold -inf: replace before subtracting (no nan)
        keep = mask_BT.bool()
        s = torch.where(keep, s, torch.zeros((), dtype=dtype, device=s.device))
        t = torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))
    return t - s


def f_cost(log_u_BT: Tensor, f: FDivergence) -> Tensor:
    """``f(u) − u f'(u)`` at ``u = exp(log_u_BT)`` for the named ``f`` (table in the module docstring).

    Computed from ``log u`` for stability: ``u`` itself is only exponentiated where the formula needs it.
    """
    if f == "rkl":
        return 1.0 - log_u_BT
    if f == "fkl":
        return -log_u_BT.exp()
    if f == "hellinger":
        return 1.0 - (0.5 * log_u_BT).exp()
    if f == "jsd":  # log((u+1)/2) = softplus(log u) − log 2
        return -0.5 * (torch.nn.functional.softplus(log_u_BT) - math.log(2.0))
    raise ValueError(f"unknown f-divergence {f!r}; choose one of {', '.join(F_DIVERGENCE_NAMES)}")


def f_value(log_u_BT: Tensor, f: FDivergence) -> Tensor:
    """``f(u)`` itself (the biased stop-gradient cost; its expectation under π_S is D_f)."""
    if f == "rkl":
        return -log_u_BT
    if f == "fkl":
        return log_u_BT.exp() * log_u_BT
    if f == "hellinger":
        return ((0.5 * log_u_BT).exp() - 1.0) ** 2
    if f == "jsd":
        u = log_u_BT.exp()
        return 0.5 * (u * log_u_BT - (u + 1.0) * (torch.nn.functional.softplus(log_u_BT) - math.log(2.0)))
    raise ValueError(f"unknown f-divergence {f!r}; choose one of {', '.join(F_DIVERGENCE_NAMES)}")


def corrected_f_reward(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, *, f: FDivergence,
                       mask_BT: Tensor | None = None) -> Tensor:
    """OPD+ reward ``r_t = −(f(u_t) − u_t f'(u_t))``, ``u_t = π_T(y_t)/π_S(y_t)`` (arXiv 2606.01039).

    ``−sg[r_t] ∇log π_S(y_t)`` is then an unbiased single-sample estimate of ``∇D_f`` at ``s_t``
    (module docstring). Detached; 0 at masked positions.
    """
    if f not in F_DIVERGENCE_NAMES:
        raise ValueError(f"unknown f-divergence {f!r}; choose one of {', '.join(F_DIVERGENCE_NAMES)}")
    log_u = _log_u(student_logprobs_BT, teacher_logprobs_BT, mask_BT)
    r = -f_cost(log_u, f)
    if mask_BT is not None:
        r = torch.where(mask_BT.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))
    return r.detach()
