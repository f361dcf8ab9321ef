"""Route 1 across vocabularies: the exact divergence on the tokens both vocabularies share, and the
Universal Logit Distillation distance on the rest (pure functions on tensors).

At a student state that is also a teacher state (the token starts on a teacher token boundary), the
teacher's next-token distribution ``p`` lives on ``V_T`` and the student's ``q`` on ``V_S``. A student
token ``v`` *maps* to the teacher token with the same text, ``φ(v)`` (special tokens by role:
EOS → EOS). ``M ⊆ V_S`` are the mapped student tokens; ``U_T = V_T ∖ φ(M)`` and ``U_S = V_S ∖ M``
are the unmapped parts.

* **ULD** (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss", arXiv 2402.12030): the Wasserstein-1 distance between distributions over different
  vocabularies under a uniform transport cost has the closed form
  ``W₁ = Σ_i |p↓(i) − q↓(i)|`` — both probability vectors sorted in decreasing order, the shorter one
  zero-padded. :func:`uld_distance`.
* **Hybrid** (GOLD, Hugging Face H4, https://huggingfaceh4-on-policy-distillation.hf.space):
  a GKD-style divergence on the matched tokens and ULD on the unmatched ones. Here
  (:func:`hybrid_divergence`)::

      L_t = D(p̄_M ‖ q̄_M) + λ · Σ_i |sort↓(p|U_T)(i) − sort↓(q|U_S)(i)|

  with ``p̄_M(v) = p(φ(v)) / Σ_{u∈M} p(φ(u))`` and ``q̄_M`` the student renormalised on ``M`` (so the
  first term is any divergence of :mod:`opd.math.divergences`, exact on the shared tokens), and the
  unmatched parts *not* renormalised (so the second term also matches the unmatched masses). The
  renormalisation, the weight ``λ`` and truncating the sorted vectors to their ``U`` largest entries
  plus one bucket holding the remaining mass (:func:`sorted_head_and_tail`) are **[INFER]**: GOLD's
  public description does not fix them.

The teacher side arrives precomputed in :class:`opd.types.CrossVocabFeedback` (``unmapped_topk_BTU``
and ``unmapped_mass_BT``, top-``U`` sorted probabilities and total mass of ``U_T``); states that are not
teacher states (``state_aligned_BT`` False) carry no teacher distribution and must be masked out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.math.divergences import divergence

__all__ = ["hybrid_divergence", "sorted_head_and_tail", "uld_distance", "unmapped_uld"]


def sorted_head_and_tail(probs_NV: Tensor, keep_V: Tensor | None, u: int) -> tuple[Tensor, Tensor]:
    """The ``u`` largest entries of ``probs`` on the kept ids, in decreasing order (zero-padded when
    fewer are kept), and the mass of the kept ids outside them: ``([N, u], [N])``. Differentiable."""
    p = probs_NV if keep_V is None else torch.where(keep_V.to(probs_NV.device), probs_NV, torch.zeros_like(probs_NV))
    k = min(u, p.shape[-1])
    head = p.topk(k, dim=-1).values
    if k < u:
        head = torch.nn.functional.pad(head, (0, u - k))
    tail = (p.sum(dim=-1) - head.sum(dim=-1)).clamp(min=0.0)
    return head, tail


def uld_distance(p_sorted_NU: Tensor, q_sorted_NU: Tensor, p_tail_N: Tensor | None = None,
                 q_tail_N: Tensor | None = None) -> Tensor:
    """``Σ_i |p↓(i) − q↓(i)|`` (ULD, arXiv 2402.12030) for two decreasingly sorted probability vectors
    of the same width (zero-pad the shorter), plus ``|p_tail − q_tail|`` when the vectors are
    truncated heads with their remaining masses. Teacher side ``p`` is detached. Returns ``[N]``."""
    if p_sorted_NU.shape != q_sorted_NU.shape:
        raise ValueError(f"p_sorted_NU {tuple(p_sorted_NU.shape)} and q_sorted_NU {tuple(q_sorted_NU.shape)} must "
                         "have the same shape; zero-pad the shorter one")
    d = (p_sorted_NU.detach() - q_sorted_NU).abs().sum(dim=-1)
    if (p_tail_N is None) != (q_tail_N is None):
        raise ValueError("pass both p_tail_N and q_tail_N, or neither")
    if p_tail_N is not None:
        d = d + (p_tail_N.detach() - q_tail_N).abs()
    return d


def unmapped_uld(student_logp_NV: Tensor, student_unmapped_V: Tensor, teacher_unmapped_topk_NU: Tensor,
                 teacher_unmapped_mass_N: Tensor) -> Tensor:
    """ULD between the teacher's unmapped probabilities (given as their ``U`` largest, sorted, and
    their total mass) and the student's probabilities on its unmapped tokens, truncated the same way
    (the rest of each side in one bucket). ``[N]``, differentiable w.r.t. ``student_logp_NV``."""
    u = teacher_unmapped_topk_NU.shape[-1]
    q_head, q_tail = sorted_head_and_tail(student_logp_NV.float().exp(), student_unmapped_V, u)
    p_head = teacher_unmapped_topk_NU.float()
    p_tail = (teacher_unmapped_mass_N.float() - p_head.sum(dim=-1)).clamp(min=0.0)
    return uld_distance(p_head, q_head, p_tail, q_tail)


def _masked_log_softmax(x: Tensor, keep: Tensor) -> Tensor:
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    x = torch.where(keep, x, neg_inf)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(keep, x - lse, neg_inf)


def hybrid_divergence(
    student_logp_NV: Tensor,
    teacher_mapped_logp_NV: Tensor,
    student_mapped_V: Tensor,
    teacher_unmapped_topk_NU: Tensor,
    teacher_unmapped_mass_N: Tensor,
    *,
    name: str = "rkl",
    uld_weight: float = 1.0,
    **divergence_kwargs: float,
) -> Tensor:
    """GOLD-style hybrid loss per token (see the module docstring): divergence ``name`` between the
    teacher and the student renormalised on the mapped student tokens, plus ``uld_weight`` × ULD on
    the unmapped parts.

    Args:
        student_logp_NV: student log-probs over ``V_S`` (differentiable).
        teacher_mapped_logp_NV: the teacher's full-vocabulary log-prob ``log p(φ(v))`` at every mapped
            student id ``v`` (any value elsewhere; it is masked).
        student_mapped_V: ``[V_S]`` bool, True where ``φ(v)`` exists.
        teacher_unmapped_topk_NU, teacher_unmapped_mass_N: the teacher's ``U`` largest probabilities on
            ``U_T`` (sorted) and the total mass of ``U_T``.
        name, divergence_kwargs: a divergence of :func:`opd.math.divergences.divergence`.

    Returns:
        ``[N]`` per-token losses.
    """
    keep = student_mapped_V.to(student_logp_NV.device).expand_as(student_logp_NV)
    s = _masked_log_softmax(student_logp_NV.float(), keep)
    t = _masked_log_softmax(teacher_mapped_logp_NV.detach().float(), keep)
    matched = divergence(name, s, t, keep, **divergence_kwargs)
    if uld_weight == 0:
        return matched
    rest = unmapped_uld(student_logp_NV, ~student_mapped_V.bool(), teacher_unmapped_topk_NU, teacher_unmapped_mass_N)
    return matched + uld_weight * rest
