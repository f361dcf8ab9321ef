"""Route 1: a distributional loss ``Σ_t w_t D(π_T ‖ π_S)(s_t)`` at every visited state (docs/methods.md §3.1).

``D`` is ``route1.divergence`` on the support (``opd.math.support``), shaped by the route-1 options
(:class:`~opd.math.divergences.DivergenceShaping`: an added teacher-entropy-gated forward KL, a
log-prob floor, a clamp), or ``k3``: the sampled-token estimator ``π_T(y_t)/π_S(y_t) − 1 −
log(π_T(y_t)/π_S(y_t))`` of ``KL(π_S ‖ π_T)`` used as a loss — its expected gradient is the
*forward*-KL gradient (Tang & Munos, arXiv 2506.09477). With ``route1.off_policy_divergence`` the
off-policy rows (teacher samples, dataset answers) get their own divergence (DistiLLM-2).

``support.kind=student_topk`` without full teacher logits reads its support from the feedback:
the student's top-k ids chosen when a teacher server scored the rollouts, with the teacher's
log-probs there (``Feedback.student_topk_ids_BTK``; opd.teachers.student_support) — the student's
current top-k while its weights have not moved since scoring.

Only the ``N`` valid tokens are packed and evaluated: padding positions (whose teacher signal is a
placeholder) never enter a distribution, so they cannot produce inf/NaN in the loss or its
gradient, and no work is spent on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from opd.math.diagnostics import diagnostics_extra_fn
from opd.math.divergences import DivergenceShaping, reverse_kl
from opd.math.fused import DivergenceOptions, SupportTokens, fused_linear_divergence
from opd.math.reduce import masked_sum
from opd.math.regularizers import sampled_kl
from opd.math.support import build_support, support_from_logprobs
from opd.objective.outputs import TermInputs
from opd.objective.settings import Route1Settings


@dataclass
class Route1Result:
    """Per-token divergence (detached), per-token RKL on the support (closed-form values), the
    weighted loss, diagnostics from the chunked pass and — on request — ``log π_S(y_t)`` (detached)."""

    divergence_BT: Tensor
    rkl_BT: Tensor | None
    loss: Tensor
    diag: dict[str, Tensor] = field(default_factory=dict)
    sampled_logp_BT: Tensor | None = None


def k3_estimator(student_logp_BT: Tensor, teacher_logp_BT: Tensor, shaping: DivergenceShaping,
                 mask_BT: Tensor) -> Tensor:
    """Per-token k3 ``e^δ − 1 − δ``, ``δ = log π_T(y_t) − log π_S(y_t)`` (Schulman,
    http://joschu.net/blog/kl-approx.html; verl's ``low_var_kl``), differentiable through the student,
    with the shaping's log-prob floor and clamp (its forward-KL term needs a distribution: not used)."""
    s, t = student_logp_BT, teacher_logp_BT.detach()
    if shaping.logprob_floor is not None:
        s, t = s.clamp(min=shaping.logprob_floor), t.clamp(min=shaping.logprob_floor)
    k3 = sampled_kl(s, t, estimator="k3", mask_BT=mask_BT)
    if shaping.clamp_low is not None or shaping.clamp_high is not None:
        k3 = k3.clamp(min=shaping.clamp_low, max=shaping.clamp_high)
    return k3


def route1_term(inputs: TermInputs, settings: Route1Settings, *, want_sampled: bool = False) -> Route1Result:
    """The route-1 term, row groups by divergence (see the module docstring); with route 1 off it only
    computes the RKL the closed-form value needs (``settings.rkl_for_value``)."""
    mask_BT, weight_BT = inputs.mask_BT, inputs.weights()[1]
    if settings.on:
        off = settings.off_policy_divergence
        if off is None or off == settings.divergence:
            groups = [(settings.divergence, mask_BT)]
        else:
            on_BT = inputs.on_policy_BT
            groups = [(settings.divergence, on_BT), (off, mask_BT & ~on_BT)]
        weights_on = True
    else:
        groups, weights_on = [("rkl", mask_BT)], False
    want_rkl = settings.rkl_for_value
    d_BT = torch.zeros(mask_BT.shape, dtype=torch.float32, device=mask_BT.device)
    loss = torch.zeros((), dtype=torch.float32, device=mask_BT.device)
    rkl_BT: Tensor | None = None
    diag: dict[str, Tensor] = {}
    sampled: Tensor | None = None
    for i, (name, rows_BT) in enumerate(groups):
        if not bool(rows_BT.any()):
            continue
        w_BT = weight_BT * rows_BT if weights_on else torch.zeros_like(weight_BT)
        if name == "k3":
            if inputs.sampled_logp_BT is None:
                raise ValueError("route1.divergence=k3 needs log π_S(y_t) with gradient")
            k3_BT = k3_estimator(inputs.sampled_logp_BT, inputs.feedback.sampled_logprobs_BT.float(),
                                 settings.shaping, rows_BT)
            d_BT = d_BT + torch.where(rows_BT, k3_BT.detach().float(), torch.zeros((), device=d_BT.device))
            loss = loss + masked_sum(k3_BT, w_BT)
            continue
        # the RKL for a closed-form value comes from the first (on-policy) group
        part = _support_pass(inputs, settings, settings.options(name), rows_BT, w_BT,
                             want_rkl=want_rkl and i == 0, want_sampled=want_sampled)
        d_BT = d_BT + part.divergence_BT
        loss = loss + part.loss
        if part.rkl_BT is not None:
            rkl_BT = part.rkl_BT
        for key, value in part.diag.items():
            diag[key] = diag[key] + value if key in diag else value
        if part.sampled_logp_BT is not None:
            sampled = part.sampled_logp_BT if sampled is None else sampled + part.sampled_logp_BT
    if want_rkl and rkl_BT is None:  # e.g. route1.divergence=k3 with a closed-form value: RKL on its own
        rkl_BT = _support_pass(inputs, settings, settings.options("rkl", shaped=False), mask_BT,
                               torch.zeros_like(weight_BT), want_rkl=True, want_sampled=False).rkl_BT
    if want_sampled and sampled is None:
        raise ValueError("the chunked path expected log π_S(y_t) from a route-1 support pass")
    return Route1Result(d_BT, rkl_BT, loss, diag, sampled)


def _support_pass(inputs: TermInputs, settings: Route1Settings, options: DivergenceOptions, mask_BT: Tensor,
                  weight_BT: Tensor, *, want_rkl: bool, want_sampled: bool) -> Route1Result:
    """Divergence ``options`` on the support for the tokens of ``mask_BT`` (dense or chunked path)."""
    student, feedback, ids_BT = inputs.student, inputs.feedback, inputs.ids_BT
    name, spec = options.divergence, options.spec
    weight_N = weight_BT[mask_BT]
    ids_N = ids_BT[mask_BT]

    def pack(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[mask_BT]

    def unpack(x_N: Tensor) -> Tensor:
        out = torch.zeros(mask_BT.shape, dtype=x_N.dtype, device=x_N.device)
        out[mask_BT] = x_N
        return out

    plain = options.shaping is None or options.shaping.plain
    # the teacher's columns the support reads: its own top-k, or its log-probs at the student's top-k ids
    # chosen when the rollouts were scored (a served teacher without full logits: Feedback docstring)
    fixed = spec.kind == "student_topk" and feedback.student_topk_ids_BTK is not None and not feedback.has_full
    student_ids_N = pack(feedback.student_topk_ids_BTK) if fixed else None
    sup_ids_N = student_ids_N if fixed else pack(feedback.topk_ids_BTK)
    sup_lp_N = pack(feedback.student_topk_teacher_logprobs_BTK if fixed else feedback.topk_logprobs_BTK)
    if student.logits_BTV is not None:
        sup = build_support(
            pack(student.logits_BTV), spec, sampled_ids=ids_N, teacher_logits=pack(feedback.logits_BTV),
            teacher_topk_ids=sup_ids_N, teacher_topk_logprobs=sup_lp_N, student_topk_ids=student_ids_N,
        )
        d_N = options.resolve()(sup.student_logp, sup.teacher_logp, sup.valid)
        rkl_BT = None
        if want_rkl:
            rkl_BT = unpack(d_N.detach() if (name == "rkl" and plain)
                            else reverse_kl(sup.student_logp.detach(), sup.teacher_logp, sup.valid))
        return Route1Result(unpack(d_N.detach()), rkl_BT, masked_sum(d_N, weight_N))

    topk_ids_N, topk_lp_N = pack(feedback.topk_ids_BTK), pack(feedback.topk_logprobs_BTK)
    diag_fn = None
    if settings.diagnostics.on:
        diag_fn = diagnostics_extra_fn(
            ids_N, teacher_topk_ids_NK=topk_ids_N, teacher_topk_logprobs_NK=topk_lp_N,
            teacher_sampled_logprobs_N=pack(feedback.sampled_logprobs_BT), k=settings.diagnostics.topk,
        )
    rkl_extra = want_rkl and not (name == "rkl" and plain)

    def extra_fn(s_logp: Tensor, t_logp: Tensor | None, rows: slice) -> dict[str, Tensor]:
        out = {} if diag_fn is None else {f"diag/{k}": v for k, v in diag_fn(s_logp, t_logp, rows).items()}
        if want_sampled:
            out["sampled_logp"] = s_logp.gather(-1, ids_N[rows, None].to(s_logp.device).long()).squeeze(-1)
        if rkl_extra:  # RKL on the configured support, from the same chunk
            sup = support_from_logprobs(
                s_logp, spec, sampled_ids=ids_N[rows], teacher_logp=t_logp,
                teacher_topk_ids=None if sup_ids_N is None else sup_ids_N[rows],
                teacher_topk_logprobs=None if sup_lp_N is None else sup_lp_N[rows],
                student_topk_ids=None if student_ids_N is None else student_ids_N[rows],
            )
            out["rkl"] = reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid)
        return out

    tokens = SupportTokens(
        teacher_hidden_NH=pack(feedback.hidden_BTH), teacher_weight_VH=feedback.head_weight_VH,
        teacher_bias_V=feedback.head_bias_V, teacher_logits_NV=pack(feedback.logits_BTV),
        teacher_topk_ids_NK=sup_ids_N, teacher_topk_logprobs_NK=sup_lp_N, sampled_ids_N=ids_N,
        student_topk_ids_NK=student_ids_N,
    )
    loss, d_N, extras = fused_linear_divergence(
        pack(student.hidden_BTH), student.head_weight_VH, weight_N, options, tokens, student_bias_V=student.head_bias_V,
        extra_fn=extra_fn if (diag_fn is not None or rkl_extra or want_sampled) else None,
    )
    rkl_N = d_N if (want_rkl and not rkl_extra) else extras.pop("rkl", None)
    sampled_N = extras.pop("sampled_logp", None)
    diag = {k: unpack(v) for k, v in extras.items()}
    return Route1Result(unpack(d_N), None if rkl_N is None else unpack(rkl_N), loss, diag,
                        None if sampled_N is None else unpack(sampled_N))


def cross_vocab_uld_term(inputs: TermInputs) -> Tensor | None:
    """Route 1 across vocabularies, the part the shared tokens cannot carry (``teacher.tokenizer=own``):

        L_ULD = Σ_t w_t · 1[s_t is a teacher state] · Σ_i |sort↓ p_T|U_T (i) − sort↓ q_S|U_S (i)|

    the Universal Logit Distillation distance (Boizard et al., arXiv 2402.12030) between the
    teacher's probabilities on the tokens no student token maps to and the student's on its own
    unmapped tokens (:func:`opd.token_alignment.uld.unmapped_uld`: the ``U`` largest of each, sorted, plus one
    bucket for the rest). The mapped tokens are trained exactly by the route-1 divergence on the
    teacher's top-k support. Only student states that are also teacher states carry a teacher
    distribution (``state_aligned_BT``). None when the feedback has no cross-vocabulary part.
    """
    from opd.token_alignment.uld import unmapped_uld

    student, logp_BTV, feedback, mask_BT = inputs.student, inputs.logp_BTV, inputs.feedback, inputs.mask_BT
    weight_BT = inputs.weights()[1]
    cv = feedback.cross_vocab
    if cv is None or cv.unmapped_topk_BTU is None or cv.student_unmapped_V is None:
        return None
    rows_BT = mask_BT & cv.state_aligned_BT.to(mask_BT.device).bool()
    if not bool(rows_BT.any()):
        return torch.zeros((), device=mask_BT.device)
    if logp_BTV is not None:
        logp_NV = logp_BTV[rows_BT]
    else:  # chunked path: project only the teacher states through the head
        logits_NV = torch.nn.functional.linear(student.hidden_BTH[rows_BT], student.head_weight_VH,
                                               student.head_bias_V)
        logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    d_N = unmapped_uld(logp_NV, cv.student_unmapped_V.to(logp_NV.device), cv.unmapped_topk_BTU[rows_BT],
                       cv.unmapped_mass_BT[rows_BT])
    return masked_sum(d_N, weight_BT[rows_BT])
