"""CR-OPD decomposed: the reachability rule, the routing temperature and how much mass is moved.

The survey (arXiv 2606.22793) names CR-OPD and says only that it "routes probability mass toward
teacher-supported, student-reachable alternatives"; every form below is **[INFER]**, options of
the reconstruction in :mod:`opd.math.routing` (docs/methods.md §3.4). On a routed token (feedback
``A_t < −τ_A``, candidate set ``C_t ≠ ∅``) the logit gradient of every option is

    ∂L_t/∂z = c_t · (e_{y_t} − ρ̃_t),      ρ̃_t = (1−η) π_S + η ρ_t,
    ρ_t(v) ∝ (π_T(v)^κ · π_S(v)^{1−κ})^{1/T_r}   on C_t            (T_r: ``routing.temperature``)

and the options choose ``C_t`` (*reachability*) and the scale ``c_t`` (*mass*):

* **Reachability** (``v`` student-reachable if any criterion that is set holds): the student's
  top-``K′`` (``student_k``, the shipped rule), ``π_S(v) ≥ τ_S`` (``tau_s``), or ``v`` in the
  student's **nucleus** of mass ``p`` (``reach_p``: the smallest set of its most probable tokens
  whose mass reaches ``p``; ties at the boundary count). None set: every token is reachable.
* **Mass** (``mass``):

  - ``unit`` (shipped): ``c_t = −A_t``. The target ``ρ̃`` puts no mass on ``y_t``, so the step
    moves ``1/(1 − (1−η)π_S(y_t))`` times as much as plain PG at the sampled token;
  - ``matched``: ``c_t = −A_t (1 − π_S(y_t)) / (1 − (1−η) π_S(y_t))`` — the sampled token's logit
    gets exactly the plain-PG push; only *where* the freed mass goes changes. With every token a
    candidate, ``κ = 0``, ``T_r = 1`` and ``η = 1`` this **is** plain PG (softmax routing);
  - ``excess`` (a route-1-style reconstruction): the target distribution
    ``q_t = π_S + δ_t (ρ̃_t − e_{y_t})`` takes the sampled token's *excess* mass
    ``δ_t = π_S(y_t) (1 − e^{A_t})`` away (with the immediate log-ratio reward and no baseline
    ``δ_t = π_S(y_t) − π_T(y_t)``) and gives it to the routed alternatives; the gradient of
    ``KL(sg[q_t] ‖ π_S)`` is ``π_S − q_t = δ_t (e_{y_t} − ρ̃_t)``, so ``c_t = δ_t``.

The loss **value** of every token stays the plain PG value ``−A_t log π_S(y_t)`` (the added terms
are centred, ``x − sg[x]``), so logged losses compare across options; only gradients differ.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math._checks import check_range

__all__ = ["MassRule", "MASS_RULES", "check_options", "nucleus_reachable", "route_weights", "routing_scale",
           "routed_surrogate"]

MassRule = Literal["unit", "matched", "excess"]
MASS_RULES: tuple[str, ...] = get_args(MassRule)


def check_options(temperature: float, reach_p: float | None, mass: str) -> None:
    """``ValueError`` unless ``temperature > 0``, ``reach_p`` is ``None`` or in ``(0, 1]`` and ``mass``
    is one of :data:`MASS_RULES`."""
    check_range("temperature", temperature, 0.0, low_open=True)
    if reach_p is not None:
        check_range("reach_p", reach_p, 0.0, 1.0, low_open=True)
    if mass not in MASS_RULES:
        raise ValueError(f"unknown routing mass rule {mass!r}; choose one of {', '.join(MASS_RULES)}")


@torch.no_grad()
def nucleus_reachable(student_logp_NV: Tensor, student_logp_NK: Tensor, p: float) -> Tensor:
    """``[..., K]`` bool: the entries whose student probability lies in its top-``p`` nucleus.

    The nucleus is the smallest prefix of the student's distribution sorted by decreasing
    probability whose mass reaches ``p``; an entry is in it when ``π_S(v) ≥`` the prefix's smallest
    probability (ties at the boundary count). ``student_logp_NK`` are ``log π_S`` at the entries.
    """
    probs = student_logp_NV.detach().exp()
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p                     # mass strictly before each sorted slot
    inside = before < p                                         # the slots of the nucleus (≥ 1)
    floor = torch.where(inside, sorted_p, torch.full_like(sorted_p, float("inf"))).amin(-1, keepdim=True)
    return student_logp_NK.detach().exp() >= floor


@torch.no_grad()
def route_weights(cand_NK: Tensor, teacher_logp_NK: Tensor, student_logp_NK: Tensor, *, kappa: float,
                  temperature: float) -> Tensor:
    """``ρ`` on ``K`` entries: ``∝ (π_T^κ π_S^{1−κ})^{1/T_r}`` on the candidates, 0 elsewhere (rows
    without a candidate are all 0). Detached."""
    neg_inf = torch.full_like(student_logp_NK, -float("inf"))
    score = torch.where(cand_NK, (kappa * teacher_logp_NK + (1.0 - kappa) * student_logp_NK) / temperature, neg_inf)
    has = cand_NK.any(dim=-1, keepdim=True)
    score = torch.where(has, score, torch.zeros_like(score))    # no softmax of all -inf
    return torch.where(cand_NK, torch.softmax(score, dim=-1), torch.zeros_like(score))


def routing_scale(mass: MassRule, adv_N: Tensor, logp_y_N: Tensor, eta: float) -> Tensor:
    """``c_t`` of the mass rule (module docstring), detached; meaningful on routed tokens (``A_t < 0``)."""
    adv = adv_N.detach()
    pi_y = logp_y_N.detach().exp()
    if mass == "unit":
        return -adv
    if mass == "matched":
        return -adv * (1.0 - pi_y) / (1.0 - (1.0 - eta) * pi_y).clamp(min=1e-12)
    if mass == "excess":
        return pi_y * -torch.expm1(adv.clamp(max=0.0))
    raise ValueError(f"unknown routing mass rule {mass!r}; choose one of {', '.join(MASS_RULES)}")


def routed_surrogate(adv_N: Tensor, logp_y_N: Tensor, scale_N: Tensor, routing_term_N: Tensor,
                     routed_N: Tensor) -> Tensor:
    """Per-token loss with the plain PG value ``−A log π(y)`` and, on routed tokens, the gradient
    ``c (e_y − ρ̃)``::

        L = −A log π(y) + (c + A)(log π(y) − sg[log π(y)]) − c · R

    where ``R = η Σ_{v∈C} ρ(v)(log π(v) − sg[log π(v)])`` is ``routing_term_N`` (value 0) — the
    ``(1−η) π`` part of ``ρ̃`` has zero gradient (``Σ_v π ∇log π = 0``)."""
    adv = adv_N.detach()
    c = torch.where(routed_N, scale_N.detach(), -adv)
    centred_y = logp_y_N - logp_y_N.detach()
    return -adv * logp_y_N + torch.where(routed_N, (c + adv) * centred_y - c * routing_term_N,
                                         torch.zeros_like(centred_y))
