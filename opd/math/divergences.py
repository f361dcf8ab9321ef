"""Per-token divergences between a student and a teacher distribution (route R1, docs/methods.md §3.1).

Both distributions are given as log-probs over the last dim (the full vocabulary or a support
built by :mod:`opd.math.support`), with an optional ``valid`` mask over that dim (False entries
are ignored: padding, union duplicates). ``S = student_logp`` (differentiable), ``T = teacher_logp``
(detached inside), ``p_S = exp S``, ``p_T = exp T``. Every function returns ``[...]``.

``-inf`` entries (zero probability) follow ``0·log 0 = 0`` and never create NaN in the value or the
gradient; a genuinely infinite divergence (``p > 0`` against ``q = 0``) is returned as ``+inf``.
A NaN in a valid entry propagates to that token's value (it is never read as zero probability).

Formulas (docs/methods.md §1, §4.1):

* ``fkl``   ``Σ p_T (log p_T − log p_S)``                          KL(T‖S), mass-covering
* ``rkl``   ``Σ p_S (log p_S − log p_T)``                          KL(S‖T), mode-seeking
* ``jsd``   ``β KL(T‖M) + (1−β) KL(S‖M)``, ``M = βT + (1−β)S``     GKD, arXiv 2306.13649; β = 0 is
            defined as FKL and β = 1 as RKL (the GKD/TRL convention; the limits are
            ``JSD_β/β → FKL`` as β → 0 and ``JSD_β/(1−β) → RKL`` as β → 1)
* ``skl``   ``KL(T ‖ αT + (1−α)S)``                                DistiLLM skew KL, arXiv 2402.03898
* ``srkl``  ``KL(S ‖ (1−α)T + αS)``                                DistiLLM skew reverse KL
* ``srkl_sg`` the value of ``srkl`` with the student's share ``α·p_S`` of the mixture under
            stop-gradient, as DistiLLM-2's released trainer computes it (arXiv 2503.07067):
            ``∇ = Σ ∇p_S (log p_S − log m)`` with ``m = (1−α)p_T + α·sg(p_S)``
* ``tvd``   ``½ Σ |p_T − p_S|``                                    f-DISTILL, arXiv 2307.15190
* ``akl``   ``w_head·FKL + w_tail·RKL``                            AKL, arXiv 2404.02657 (see below)

Logit gradients (identities checked in the tests): ``∂FKL/∂z = p_S − p_T`` and
``∂RKL/∂z_j = p_S(j)(ℓ(j) − RKL)`` with ``ℓ = log p_S − log p_T`` (times ``1/τ`` with a temperature).

:class:`DivergenceShaping` turns any of them into a shaped per-token loss (applied in this order):

* ``logprob_floor = f``: both log-probs are clamped to ``≥ f`` on the valid entries first (verl's
  ``log_prob_min_clamp``; the clamp stops the gradient below ``f``);
* ``fkl_coef = c``, ``fkl_entropy_min = τ``: ``D + c · 1[H_T > τ] · FKL`` on the same support, with
  ``H_T = −Σ p_T log p_T`` the teacher's entropy on the support (EOPD, Jin et al., arXiv 2603.07079,
  adds forward KL where the teacher's entropy is high; the hard gate and τ are **[INFER]**);
* ``clamp_low`` / ``clamp_high``: the per-token value is clamped (verl clamps top-k FKL at 0 from
  below and every distillation loss at ``±loss_max_clamp``; a clamped token has no gradient).

With ``tail_bucket`` (the support's last entry is the tail bucket ``1 − Σ_{u∈S} π(u)``,
``support.norm=tail``) the floor applies to the top-k entries only and ``clamp_low`` is not applied:
the bucket is not a token log-prob, and the value is then a true divergence ≥ 0 (the guard is for
the restricted sum without a bucket, which can be negative). This is verl's tail mode: it floors
the top-k log-probs, appends ``log(1 − Σ p)`` unfloored, and does not clamp from below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from opd.math._checks import check_range, check_same_shape
from opd.math.registry import Registry

_Mask = Tensor | None  # None means "every entry is kept" (the fast path: no masking ops)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor, valid: Tensor | None = None) -> Tensor:
    """``FKL = KL(T‖S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))`` over valid entries."""
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    return _kl_sum(t, _prob(t, kt), kt, s, ks)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor, valid: Tensor | None = None) -> Tensor:
    """``RKL = KL(S‖T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))`` over valid entries."""
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    return _kl_sum(s, _prob(s, ks), ks, t, kt)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5,
                    valid: Tensor | None = None) -> Tensor:
    """Generalized JSD of GKD (Agarwal et al., arXiv 2306.13649), TRL's convention.

    ``JSD_β = β KL(T‖M) + (1−β) KL(S‖M)`` with ``M = βT + (1−β)S`` (the same mixture as TRL's
    ``M = (1−β)S + βT``). ``β = 0`` returns exactly :func:`forward_kl` and ``β = 1`` exactly
    :func:`reverse_kl` (the literal formula would be 0 there). ``0 ≤ JSD_β ≤ H_b(β)``.
    """
    check_range("beta", beta, 0.0, 1.0)
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp, valid)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp, valid)
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    log_m, km = _log_mix(t, kt, s, ks, beta)
    return beta * _kl_sum(t, _prob(t, kt), kt, log_m, km) + (1.0 - beta) * _kl_sum(s, _prob(s, ks), ks, log_m, km)


def skew_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1,
            valid: Tensor | None = None) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., arXiv 2402.03898): ``KL(T ‖ αT + (1−α)S)``; α = 0 is FKL."""
    check_range("alpha", alpha, 0.0, 1.0)
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    log_m, km = _log_mix(t, kt, s, ks, alpha)
    return _kl_sum(t, _prob(t, kt), kt, log_m, km)


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1,
                    valid: Tensor | None = None) -> Tensor:
    """Skew reverse KL of DistiLLM (arXiv 2402.03898): ``KL(S ‖ (1−α)T + αS)``; α = 0 is RKL."""
    check_range("alpha", alpha, 0.0, 1.0)
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    log_m, km = _log_mix(t, kt, s, ks, 1.0 - alpha)
    return _kl_sum(s, _prob(s, ks), ks, log_m, km)


def skew_reverse_kl_sg(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1,
                       valid: Tensor | None = None) -> Tensor:
    """Skew reverse KL with a stop-gradient on the student inside the mixture (DistiLLM-2, arXiv 2503.07067).

    Value ``KL(S ‖ m)``, ``m = (1−α)T + α·sg(S)`` — equal to :func:`skew_reverse_kl` — but the
    gradient treats ``m`` as a constant: ``∇ = Σ_v ∇p_S(v) (log p_S(v) − log m(v))`` (the
    ``Σ p_S ∇log p_S`` part is 0). The released DistiLLM-2 trainer detaches the student's log-probs
    in the mixture of its student-side term; :func:`skew_reverse_kl` differentiates through them
    (DistiLLM, arXiv 2402.03898), which adds ``−α Σ_v (p_S/m) ∇p_S``. α = 0 is RKL; teacher ==
    student still gives zero value and zero gradient (``log p_S = log m`` there).
    """
    check_range("alpha", alpha, 0.0, 1.0)
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    log_m, km = _log_mix(t, kt, s.detach(), ks, 1.0 - alpha)
    return _kl_sum(s, _prob(s, ks), ks, log_m, km)


def total_variation(student_logp: Tensor, teacher_logp: Tensor, valid: Tensor | None = None) -> Tensor:
    """Total variation ``TVD = ½ Σ_v |p_T(v) − p_S(v)|`` (f-DISTILL, Wen et al., arXiv 2307.15190)."""
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    return 0.5 * (_prob(t, kt) - _prob(s, ks)).abs().sum(dim=-1)


def adaptive_kl(student_logp: Tensor, teacher_logp: Tensor, mu: float = 0.5,
                valid: Tensor | None = None) -> Tensor:
    """Adaptive KL (Wu et al., arXiv 2404.02657; docs/methods.md §4.1).

    Sort the entries by teacher probability (descending). The head ``H`` holds the entries whose
    inclusive cumulative teacher mass is ``≤ μ``, and always the teacher's top-1. With the student
    detached, ``g_head = Σ_{v∈H} |p_T(v) − p_S(v)|`` and ``g_tail = Σ_{v∉H} |p_T(v) − p_S(v)|``;

        ``AKL = g_head/(g_head+g_tail) · FKL + g_tail/(g_head+g_tail) · RKL``.

    When both gaps are 0 (teacher == student) the weights are taken as ½ / ½ (both KLs are 0).
    Ties in ``p_T`` are ordered by a stable sort (by position).
    """
    check_range("mu", mu, 0.0, 1.0)
    s, t, ks, kt = _prepare(student_logp, teacher_logp, valid)
    p_t, p_s = _prob(t, kt), _prob(s, ks)
    with torch.no_grad():
        p_t_sorted, order = p_t.sort(dim=-1, descending=True, stable=True)
        gap = (p_t_sorted - p_s.detach().gather(-1, order)).abs()
        head = p_t_sorted.cumsum(dim=-1) <= mu
        head[..., 0] = True
        g_head = torch.where(head, gap, 0.0).sum(dim=-1)
        total = gap.sum(dim=-1)
        w_head = torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)
    fkl = _kl_sum(t, p_t, kt, s, ks)
    rkl = _kl_sum(s, p_s, ks, t, kt)
    return w_head * fkl + (1.0 - w_head) * rkl


#: The one table of divergences (``route1.divergence`` and its off-policy twin take these names):
#: ``DIVERGENCES[name](student_logp, teacher_logp, valid, *, beta, alpha, mu) -> [...]``, each entry
#: using the knobs it needs. Adding one: write its function above and add a line here, or
#: ``DIVERGENCES.register(name, fn)`` from another module (CONTRIBUTING.md, "Adding a divergence").
DIVERGENCES: Registry[Callable[..., Tensor]] = Registry("divergence", {
    "fkl": lambda s, t, valid=None, **knobs: forward_kl(s, t, valid),
    "rkl": lambda s, t, valid=None, **knobs: reverse_kl(s, t, valid),
    "jsd": lambda s, t, valid=None, *, beta=0.5, **knobs: generalized_jsd(s, t, beta, valid),
    "skl": lambda s, t, valid=None, *, alpha=0.1, **knobs: skew_kl(s, t, alpha, valid),
    "srkl": lambda s, t, valid=None, *, alpha=0.1, **knobs: skew_reverse_kl(s, t, alpha, valid),
    "srkl_sg": lambda s, t, valid=None, *, alpha=0.1, **knobs: skew_reverse_kl_sg(s, t, alpha, valid),
    "tvd": lambda s, t, valid=None, **knobs: total_variation(s, t, valid),
    "akl": lambda s, t, valid=None, *, mu=0.5, **knobs: adaptive_kl(s, t, mu, valid),
})
#: The registered divergence names, read live (a name registered later is included).
DIVERGENCE_NAMES = DIVERGENCES.names()


@dataclass(frozen=True)
class DivergenceShaping:
    """Optional shaping of a per-token divergence (module docstring): a log-prob floor, an added
    teacher-entropy-gated forward-KL term and a clamp of the per-token value. The default is no
    shaping (:attr:`plain`). ``tail_bucket``: the last support entry is a tail bucket (module
    docstring): it is not floored, and ``clamp_low`` is not applied."""

    fkl_coef: float = 0.0
    fkl_entropy_min: float = 0.0
    logprob_floor: float | None = None
    clamp_low: float | None = None
    clamp_high: float | None = None
    tail_bucket: bool = False

    def __post_init__(self) -> None:
        check_range("fkl_coef", self.fkl_coef, 0.0)
        if self.clamp_low is not None and self.clamp_high is not None and self.clamp_low > self.clamp_high:
            raise ValueError(f"clamp_low={self.clamp_low} must be <= clamp_high={self.clamp_high}")

    @property
    def plain(self) -> bool:
        """True when nothing is shaped (the divergence is returned as is)."""
        return (self.fkl_coef == 0.0 and self.logprob_floor is None and self.clamp_low is None
                and self.clamp_high is None)


def support_entropy(logp: Tensor, valid: Tensor | None = None) -> Tensor:
    """``H = −Σ_v p(v) log p(v)`` over the valid entries of the last dim (``0·log 0 = 0``), detached."""
    with torch.no_grad():
        x = logp.detach()
        keep = x != float("-inf") if valid is None else (x != float("-inf")) & valid.bool()
        safe = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return -torch.where(keep, safe.exp() * safe, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def _shaped(fn: Callable[..., Tensor], shaping: DivergenceShaping, student_logp: Tensor, teacher_logp: Tensor,
            valid: Tensor | None = None) -> Tensor:
    s, t = student_logp, teacher_logp.detach()
    if shaping.logprob_floor is not None:
        floor = shaping.logprob_floor
        keep_s = s != float("-inf") if valid is None else (s != float("-inf")) & valid.bool()
        keep_t = t != float("-inf") if valid is None else (t != float("-inf")) & valid.bool()
        if shaping.tail_bucket:  # the bucket 1 − Σ p is no token log-prob: never floored (verl)
            entry = torch.arange(s.shape[-1], device=s.device) < s.shape[-1] - 1
            keep_s, keep_t = keep_s & entry, keep_t & entry
        s = torch.where(keep_s, s.clamp(min=floor), s)
        t = torch.where(keep_t, t.clamp(min=floor), t)
    d = fn(s, t, valid)
    if shaping.fkl_coef > 0:
        gate = support_entropy(t, valid) > shaping.fkl_entropy_min
        fkl = forward_kl(s, t, valid)
        zero = torch.zeros((), dtype=fkl.dtype, device=fkl.device)
        d = d + shaping.fkl_coef * torch.where(gate, fkl, zero)  # where: an ungated inf/NaN never leaks
    low = None if shaping.tail_bucket else shaping.clamp_low  # with a bucket d is a divergence ≥ 0
    if low is not None or shaping.clamp_high is not None:
        d = d.clamp(min=low, max=shaping.clamp_high)
    return d


def resolve_divergence(name: str, *, beta: float = 0.5, alpha: float = 0.1, mu: float = 0.5,
                       shaping: DivergenceShaping | None = None) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """Validate ``name`` and the knobs once; return ``fn(student_logp, teacher_logp, valid)``
    (shaped by ``shaping`` when given, see :class:`DivergenceShaping`)."""
    entry = DIVERGENCES.lookup(name)
    check_range("beta", beta, 0.0, 1.0)
    check_range("alpha", alpha, 0.0, 1.0)
    check_range("mu", mu, 0.0, 1.0)
    fn = partial(entry, beta=beta, alpha=alpha, mu=mu)
    if shaping is None or shaping.plain:
        return fn
    return partial(_shaped, fn, shaping)


def divergence(name: str, student_logp: Tensor, teacher_logp: Tensor, valid: Tensor | None = None, *,
               beta: float = 0.5, alpha: float = 0.1, mu: float = 0.5,
               shaping: DivergenceShaping | None = None) -> Tensor:
    """Per-token divergence ``name`` (one of :data:`DIVERGENCE_NAMES`); knobs are used where relevant."""
    return resolve_divergence(name, beta=beta, alpha=alpha, mu=mu, shaping=shaping)(student_logp, teacher_logp, valid)


# ----------------------------------------------------------------------------- internals


def _prepare(student_logp: Tensor, teacher_logp: Tensor, valid: Tensor | None):
    """Check shapes, detach the teacher and return ``(S0, T0, keep_S, keep_T)``.

    ``keep_X`` marks valid entries with ``X ≠ −inf``; ``X0`` equals ``X`` there and 0 elsewhere, so
    no later op sees an infinity (no NaN in the gradient). ``keep_X = None`` means all kept. A NaN
    in a valid entry is kept on purpose: it propagates to that token's value instead of being read
    as zero probability.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp)
    if valid is not None:
        check_same_shape(student_logp=student_logp, valid=valid)
        valid = None if bool(valid.all()) else valid.bool()
    s = student_logp
    t = teacher_logp.detach().to(s.dtype)
    ks, kt = _keep(s, valid), _keep(t, valid)
    return _safe(s, ks), _safe(t, kt), ks, kt


def _keep(x: Tensor, valid: _Mask) -> _Mask:
    if valid is None and (x.numel() == 0 or bool(x.amin() > float("-inf"))):  # one reduction, no [.., K] temporary
        return None
    # "not -inf" rather than "> -inf": a NaN entry is kept, so NaN logits propagate to the loss
    # (and the non-finite detector) instead of being silently treated as zero probability
    finite = x != float("-inf")
    return finite if valid is None else finite & valid


def _safe(x: Tensor, keep: _Mask) -> Tensor:
    return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _prob(x0: Tensor, keep: _Mask) -> Tensor:
    p = torch.exp(x0)
    return p if keep is None else torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))


def _kl_sum(lp0: Tensor, p: Tensor, kp: _Mask, lq0: Tensor, kq: _Mask) -> Tensor:
    """``Σ p (lp − lq)`` over the kept entries of ``p`` (``p`` is 0 elsewhere); ``+inf`` if ``q = 0 < p``."""
    out = (p * (lp0 - lq0)).sum(dim=-1)
    if kq is not None:
        bad = ~kq if kp is None else kp & ~kq
        if bool(bad.any()):
            out = torch.where(bad.any(dim=-1), torch.full((), float("inf"), dtype=out.dtype, device=out.device), out)
    return out


def _log_mix(t0: Tensor, kt: _Mask, s0: Tensor, ks: _Mask, w: float) -> tuple[Tensor, _Mask]:
    """``log(w p_T + (1−w) p_S)`` and its keep mask; finite everywhere (0 outside the mask)."""
    if w == 0.0:
        return s0, ks
    if w == 1.0:
        return t0, kt
    a = t0 + math.log(w)
    b = s0 + math.log1p(-w)
    if kt is None and ks is None:
        return torch.logaddexp(a, b), None
    neg_inf = torch.full((), float("-inf"), dtype=s0.dtype, device=s0.device)
    if kt is not None:
        a = torch.where(kt, a, neg_inf)
    if ks is not None:
        b = torch.where(ks, b, neg_inf)
    km = kt | ks if (kt is not None and ks is not None) else None
    if km is not None:
        zero = torch.zeros((), dtype=s0.dtype, device=s0.device)
        a, b = torch.where(km, a, zero), torch.where(km, b, zero)
    return torch.logaddexp(a, b), km
