"""Vocabulary routing: where probability mass goes when a sampled token is pushed down.

Identities (docs/methods.md §1, §3.4). With logits ``z``, ``π = softmax(z)`` and the sampled-token PG
loss ``−A log π(y)``, the logit gradient is ``−A (e_y − π)``; a descent step with ``A < 0``
lowers ``z_y`` and raises every other logit *in proportion to the student's own probability*:
the freed mass is routed by the student prior ("softmax" routing).

**CR-OPD** (Counterfactual Routed OPD; survey arXiv 2606.22793 names it, the formulas here are
our reconstruction, docs/methods.md §3.4, **[INFER]**) replaces that implicit target, on tokens with
negative feedback, by an explicit distribution over alternatives that are teacher-supported and
student-reachable:

    C_t  = { v ≠ y_t : v ∈ TopK_T, π_T(v) ≥ τ_T, v reachable }
    ρ_t(v) ∝ π_T(v)^κ · π_θ(v)^{1−κ}  on C_t, 0 elsewhere
    ρ̃_t  = (1−η) π_θ + η ρ_t                                     (all stop-gradient)
    L_t  = −A_t (log π_θ(y_t) − Σ_v sg[ρ̃_t(v)] log π_θ(v))        if A_t < −τ_A and C_t ≠ ∅
    L_t  = −A_t log π_θ(y_t)                                       otherwise

so that ``∂L_t/∂z = −A_t (e_{y_t} − ρ̃_t)`` on routed tokens. Options of the reconstruction (a
nucleus reachability rule, a routing temperature, the mass moved: ``unit`` as above, ``matched``
to plain PG, or the route-1-style ``excess``) are in :mod:`opd.math.routing_options`. Nearest published relative:
AOPD (Jia et al., arXiv 2605.06387), which replaces negative reinforcement by a local divergence
(:func:`aopd_loss`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from opd.math import routing_options as ro
from opd.math._checks import check_leading_shape, check_range, check_same_shape

__all__ = [
    "RoutingKind",
    "ROUTINGS",
    "softmax_routing_loss",
    "cr_opd_target",
    "cr_opd_loss",
    "aopd_loss",
    "routing_loss",
]

RoutingKind = Literal["softmax", "cr_opd"]
ROUTINGS: tuple[str, ...] = get_args(RoutingKind)


def _zero(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _token_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    check_same_shape(sampled_ids_N=like, mask_N=mask)
    return mask.bool()


def _gather_sampled(student_logp_NV: Tensor, sampled_ids_N: Tensor, keep_N: Tensor) -> Tensor:
    """``log π(y)`` per token; masked tokens read index 0 and are zeroed (ids there may be -1)."""
    check_leading_shape("sampled_ids_N", sampled_ids_N, student_logp_NV=student_logp_NV)
    if student_logp_NV.dim() != sampled_ids_N.dim() + 1:
        raise ValueError(f"student_logp_NV has shape {tuple(student_logp_NV.shape)}; it must be "
                         f"sampled_ids_N's shape {tuple(sampled_ids_N.shape)} plus a vocabulary dim")
    ids = torch.where(keep_N, sampled_ids_N, torch.zeros_like(sampled_ids_N)).long()
    V = student_logp_NV.shape[-1]
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"sampled_ids_N must lie in [0, {V}) on unmasked tokens")
    logp_y = student_logp_NV.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep_N, logp_y, _zero(logp_y))


def softmax_routing_loss(student_logp_NV: Tensor, sampled_ids_N: Tensor, advantages_N: Tensor,
                         *, mask_N: Tensor | None = None) -> Tensor:
    """Plain sampled-token PG, ``L_t = −sg[A_t] · log π_θ(y_t)`` (student-prior routing).

    Logit gradient ``−A_t (e_{y_t} − π_θ)`` (docs/methods.md §1 identity 3). Shapes: ``[..., V]``,
    ``[...]``, ``[...]``. Masked tokens (``mask_N`` False) give exactly 0 with no gradient.
    """
    keep = _token_mask(mask_N, sampled_ids_N)
    check_same_shape(sampled_ids_N=sampled_ids_N, advantages_N=advantages_N)
    logp_y = _gather_sampled(student_logp_NV, sampled_ids_N, keep)
    adv = torch.where(keep, advantages_N.detach(), _zero(advantages_N)).to(logp_y.dtype)
    return -adv * logp_y


def _check_knobs(V: int, student_k: int | None, tau_s: float, tau_t: float, kappa: float,
                 eta: float) -> None:
    if student_k is not None and not 1 <= student_k <= V:
        raise ValueError(f"student_k must be in [1, {V}] (the vocabulary size), got {student_k}")
    for name, val in (("tau_s", tau_s), ("tau_t", tau_t), ("kappa", kappa), ("eta", eta)):
        check_range(name, val, 0.0, 1.0)


def _route_on_topk(
    student_logp_NV: Tensor,
    sampled_ids_N: Tensor,
    teacher_topk_ids_NK: Tensor,
    teacher_topk_logprobs_NK: Tensor,
    *,
    student_k: int | None,
    tau_s: float,
    tau_t: float,
    kappa: float,
    temperature: float = 1.0,
    reach_p: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidate logic, entirely on the teacher's ``K`` entries (``C_t ⊆ TopK_T``).

    Returns ``(candidates_NK, rho_NK, student_logp_NK, valid_NK)``: ``rho`` (detached) is ``ρ_t``
    on the candidates and 0 elsewhere; ``student_logp_NK = log π_θ`` at the teacher ids (with
    gradient); ``valid`` marks real, first-occurrence entries (no padding, no duplicate ids).
    """
    if teacher_topk_ids_NK.shape != teacher_topk_logprobs_NK.shape:
        raise ValueError(f"teacher_topk_ids_NK has shape {tuple(teacher_topk_ids_NK.shape)} but "
                         f"teacher_topk_logprobs_NK has shape "
                         f"{tuple(teacher_topk_logprobs_NK.shape)}; they must be equal")
    if teacher_topk_ids_NK.shape[:-1] != student_logp_NV.shape[:-1]:
        raise ValueError(f"teacher_topk_ids_NK has shape {tuple(teacher_topk_ids_NK.shape)}; its "
                         f"leading dimensions must equal those of student_logp_NV "
                         f"{tuple(student_logp_NV.shape)}")
    check_leading_shape("sampled_ids_N", sampled_ids_N, student_logp_NV=student_logp_NV)
    t_ids = teacher_topk_ids_NK.long()
    pad = t_ids < 0
    safe = torch.where(pad, torch.zeros_like(t_ids), t_ids)
    s_lp = student_logp_NV.gather(-1, safe)                          # [..., K], with gradient
    with torch.no_grad():
        s_lp_d = s_lp.detach()
        t_lp = teacher_topk_logprobs_NK.detach().to(s_lp_d.dtype)
        k_ = t_ids.shape[-1]
        earlier = torch.ones(k_, k_, dtype=torch.bool, device=t_ids.device).tril(-1)
        dup = ((safe.unsqueeze(-1) == safe.unsqueeze(-2)) & earlier & ~pad.unsqueeze(-2)).any(-1)
        valid = ~pad & ~dup
        supported = valid & (t_lp > -float("inf")) & (t_lp.exp() >= tau_t)
        if student_k is None and tau_s == 0 and reach_p is None:
            reachable = torch.ones_like(supported)
        else:
            reachable = torch.zeros_like(supported)
            if student_k is not None:   # ties at the k'-th largest probability count as reachable
                kth = student_logp_NV.detach().topk(student_k, dim=-1).values[..., -1:]
                reachable = reachable | (s_lp_d >= kth)
            if tau_s > 0:
                reachable = reachable | (s_lp_d.exp() >= tau_s)
            if reach_p is not None:
                reachable = reachable | ro.nucleus_reachable(student_logp_NV, s_lp_d, reach_p)
        not_sampled = safe != sampled_ids_N.long().unsqueeze(-1)
        cand = supported & reachable & not_sampled & (s_lp_d > -float("inf"))
        rho = ro.route_weights(cand, t_lp, s_lp_d, kappa=kappa, temperature=temperature)
    return cand, rho, s_lp, valid


@torch.no_grad()
def cr_opd_target(
    student_logp_NV: Tensor,
    sampled_ids_N: Tensor,
    teacher_topk_ids_NK: Tensor,
    teacher_topk_logprobs_NK: Tensor,
    *,
    student_k: int | None = None,
    tau_s: float = 0.0,
    tau_t: float = 0.0,
    kappa: float = 1.0,
    eta: float = 1.0,
    temperature: float = 1.0,
    reach_p: float | None = None,
) -> tuple[Tensor, Tensor]:
    """CR-OPD routing target ``ρ̃`` and candidate set ``C`` on the vocabulary (docs/methods.md §3.4,
    **[INFER]**). Dense ``[..., V]`` view for diagnostics and tests; :func:`cr_opd_loss` never
    materialises it.

    * Teacher support: ``v ∈ TopK_T`` (entries of ``teacher_topk_ids_NK``; ids ``< 0`` are padding,
      a repeated id counts once) with ``π_T(v) ≥ τ_T`` (``teacher_topk_logprobs_NK`` are
      full-vocabulary teacher log-probs).
    * Reachability: ``v`` in the student's top-``student_k`` or ``π_θ(v) ≥ τ_S``; each criterion
      applies only when set (``student_k`` given, ``tau_s > 0``). Neither set: every token is
      reachable.
    * ``C_t`` = teacher-supported ∧ reachable ∧ ``v ≠ y_t`` ∧ ``π_θ(v) > 0``.
    * ``ρ_t(v) ∝ π_T(v)^κ π_θ(v)^{1−κ}`` on ``C_t`` (κ = 1 teacher-only, κ = 0 student-only).
    * ``ρ̃_t = (1−η) π_θ + η ρ_t`` where ``C_t ≠ ∅``; ``ρ̃_t = π_θ`` where ``C_t = ∅`` (plain PG).

    Knobs: ``student_k ∈ [1, V]``, ``tau_s, tau_t, kappa, eta ∈ [0, 1]``; the options
    ``temperature`` (``ρ ∝ (π_T^κ π_S^{1−κ})^{1/T_r}``) and ``reach_p`` (nucleus reachability) of
    :mod:`opd.math.routing_options`.
    Returns ``(rho_tilde_NV, candidates_NV)``: detached, ``ρ̃`` in the student's dtype
    (rows sum to 1), ``candidates`` bool.
    """
    _check_knobs(student_logp_NV.shape[-1], student_k, tau_s, tau_t, kappa, eta)
    ro.check_options(temperature, reach_p, "unit")
    cand, rho, _, _ = _route_on_topk(
        student_logp_NV, sampled_ids_N, teacher_topk_ids_NK, teacher_topk_logprobs_NK,
        student_k=student_k, tau_s=tau_s, tau_t=tau_t, kappa=kappa, temperature=temperature, reach_p=reach_p)
    logp = student_logp_NV.detach()
    safe = teacher_topk_ids_NK.long().clamp(min=0)
    rho_V = torch.zeros_like(logp).scatter_add(-1, safe, rho)      # ρ is 0 off the candidates
    cand_V = torch.zeros_like(logp).scatter_add(-1, safe, cand.to(logp.dtype)) > 0
    probs = logp.exp()
    has = cand.any(dim=-1, keepdim=True)
    return torch.where(has, (1.0 - eta) * probs + eta * rho_V, probs), cand_V


def cr_opd_loss(
    student_logp_NV: Tensor,
    sampled_ids_N: Tensor,
    advantages_N: Tensor,
    teacher_topk_ids_NK: Tensor,
    teacher_topk_logprobs_NK: Tensor,
    *,
    tau_a: float = 0.0,
    student_k: int | None = None,
    tau_s: float = 0.0,
    tau_t: float = 0.0,
    kappa: float = 1.0,
    eta: float = 1.0,
    temperature: float = 1.0,
    reach_p: float | None = None,
    mass: ro.MassRule = "unit",
    mask_N: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Counterfactual Routed OPD loss per token (docs/methods.md §3.4, **[INFER]**).

    Routed tokens (``A_t < −τ_A`` and ``C_t ≠ ∅``) use

        L_t = −A_t ( log π_θ(y_t) − Σ_v sg[ρ̃_t(v)] (log π_θ(v) − sg[log π_θ(v)]) ),

    all other tokens the plain ``−A_t log π_θ(y_t)``. The routing term is written centred
    (``log π − sg log π``, value 0) so the **value** of every token equals the plain PG value
    ``−A_t log π_θ(y_t)``; the gradient is that of the §3.4 formula,
    ``∂L_t/∂z = −A_t (e_{y_t} − ρ̃_t)`` on routed tokens.

    Computed on the teacher's ``K`` entries only: the ``(1−η) π_θ`` part of ``ρ̃`` has zero
    gradient (``Σ_v π_θ(v) ∇log π_θ(v) = 0``), so the routing term is evaluated as
    ``η Σ_{v∈C_t} ρ_t(v) (log π_θ(v) − sg[·])`` — ``O(N·K)`` extra memory, no ``[N, V]``
    temporaries. With ``η = 0`` the term is identically 0: plain PG in value and gradient.

    Args: see :func:`cr_opd_target` for ``student_k, tau_s, tau_t, kappa, eta``;
        ``tau_a ≥ 0`` gates how negative the feedback must be (strict: ``A_t < −τ_A``);
        ``temperature``, ``reach_p`` and ``mass`` (``unit``: the formula above; ``matched``,
        ``excess``: the scale ``c_t`` of :func:`opd.math.routing_options.routing_scale`, gradient
        ``c_t (e_{y_t} − ρ̃_t)``, value unchanged) are the options of :mod:`opd.math.routing_options`.
        ``advantages_N`` and teacher tensors are detached inside. ``mask_N``: masked tokens
        give 0 with no gradient and are never routed (their ids may be ``-1``).

    Returns:
        ``(loss_N, metrics)``; per-token detached metrics: ``routed`` (bool), ``n_candidates``
        (long, ``|C_t|``) and ``mass_to_teacher_supported``
        ``= Σ_{v∈TopK_T∖{y}} q(v) / (1 − q(y))`` with ``q = ρ̃`` on routed tokens and ``q = π_θ``
        elsewhere (0 on masked tokens): the share of freed mass that lands on teacher-supported
        tokens.
    """
    keep = _token_mask(mask_N, sampled_ids_N)
    check_same_shape(sampled_ids_N=sampled_ids_N, advantages_N=advantages_N)
    check_range("tau_a", tau_a, 0.0)
    _check_knobs(student_logp_NV.shape[-1], student_k, tau_s, tau_t, kappa, eta)
    ro.check_options(temperature, reach_p, mass)
    logp_y = _gather_sampled(student_logp_NV, sampled_ids_N, keep)
    safe_ids = torch.where(keep, sampled_ids_N, torch.zeros_like(sampled_ids_N)).long()
    adv = torch.where(keep, advantages_N.detach(), _zero(advantages_N)).to(logp_y.dtype)

    cand, rho, s_lp, valid = _route_on_topk(
        student_logp_NV, safe_ids, teacher_topk_ids_NK, teacher_topk_logprobs_NK,
        student_k=student_k, tau_s=tau_s, tau_t=tau_t, kappa=kappa, temperature=temperature, reach_p=reach_p)
    n_cand = cand.sum(dim=-1)
    routed = keep & (adv < -tau_a) & (n_cand > 0)

    use = routed.unsqueeze(-1) & cand
    centred = torch.where(use, s_lp - s_lp.detach(), _zero(s_lp))
    routing_term = eta * (torch.where(use, rho, _zero(rho)) * centred).sum(dim=-1)
    if mass == "unit":
        loss = -adv * (logp_y - routing_term)
    else:
        loss = ro.routed_surrogate(adv, logp_y, ro.routing_scale(mass, adv, logp_y, eta), routing_term, routed)

    with torch.no_grad():
        s_lp_d = torch.where(valid, s_lp.detach(), torch.full_like(s_lp.detach(), -float("inf")))
        others = valid & (teacher_topk_ids_NK.long() != safe_ids.unsqueeze(-1))
        pi_topk = torch.where(others, s_lp_d.exp(), _zero(s_lp_d)).sum(-1)   # Σ_{TopK∖y} π
        pi_y = logp_y.detach().exp()
        # routed: Σ_{TopK∖y} ρ̃ = (1−η) Σ_{TopK∖y} π + η (ρ sums to 1 on C ⊆ TopK∖{y})
        num = torch.where(routed, (1.0 - eta) * pi_topk + eta, pi_topk)
        den = torch.where(routed, 1.0 - (1.0 - eta) * pi_y, 1.0 - pi_y).clamp(min=1e-12)
        share = torch.where(keep, num / den, _zero(num))
    metrics = {"routed": routed, "n_candidates": torch.where(keep, n_cand, 0),
               "mass_to_teacher_supported": share}
    return loss, metrics


def aopd_loss(sampled_logprobs_N: Tensor, advantages_N: Tensor, local_divergence_N: Tensor,
              *, mask_N: Tensor | None = None) -> Tensor:
    """Asymmetric OPD (Jia et al., arXiv 2605.06387; docs/methods.md §4.5, **[INFER form]**).

        L_t = 1[A_t > 0] · (−A_t log π_θ(y_t)) + 1[A_t ≤ 0] · D_t

    Positive feedback keeps sampled-token PG; non-positive feedback is replaced by a localized
    divergence ``D_t`` at the same state (e.g. top-K forward or reverse KL from
    :mod:`opd.math.divergences`, computed by the caller, differentiable). Shapes ``[...]``.
    """
    check_same_shape(sampled_logprobs_N=sampled_logprobs_N, advantages_N=advantages_N,
                     local_divergence_N=local_divergence_N, mask_N=mask_N)
    adv = advantages_N.detach()
    pos = adv > 0
    neg = ~pos
    if mask_N is not None:
        pos, neg = pos & mask_N.bool(), neg & mask_N.bool()
    pg = -adv.to(sampled_logprobs_N.dtype) * torch.where(pos, sampled_logprobs_N,
                                                          _zero(sampled_logprobs_N))
    div = torch.where(neg, local_divergence_N, _zero(local_divergence_N))
    return torch.where(pos, pg, div.to(pg.dtype))


def routing_loss(
    kind: RoutingKind,
    student_logp_NV: Tensor,
    sampled_ids_N: Tensor,
    advantages_N: Tensor,
    *,
    teacher_topk_ids_NK: Tensor | None = None,
    teacher_topk_logprobs_NK: Tensor | None = None,
    mask_N: Tensor | None = None,
    **cr_opd_knobs: float | int | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on the routing kind: ``softmax`` (plain PG) or ``cr_opd`` (needs the teacher
    top-K). Returns ``(loss_N, metrics)`` (metrics empty for ``softmax``)."""
    if kind == "softmax":
        if cr_opd_knobs:
            raise ValueError(f"routing 'softmax' takes no CR-OPD knobs, got {sorted(cr_opd_knobs)}")
        return softmax_routing_loss(student_logp_NV, sampled_ids_N, advantages_N,
                                    mask_N=mask_N), {}
    if kind == "cr_opd":
        if teacher_topk_ids_NK is None or teacher_topk_logprobs_NK is None:
            raise ValueError("routing 'cr_opd' needs teacher_topk_ids_NK and "
                             "teacher_topk_logprobs_NK")
        return cr_opd_loss(student_logp_NV, sampled_ids_N, advantages_N, teacher_topk_ids_NK,
                           teacher_topk_logprobs_NK, mask_N=mask_N, **cr_opd_knobs)
    raise ValueError(f"unknown routing {kind!r}; choose one of {', '.join(ROUTINGS)}")
