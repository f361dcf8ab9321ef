"""Recommended settings from the measured pair, each with its number and the paper behind it.

Every rule is a pure function of the measurements (:class:`Measured`) and the current config; the
thresholds are **[INFER]** (the papers document the mechanisms, not these cut-offs):

=========================  ======================================================================
setting                    rule
=========================  ======================================================================
``rollout.max_new_tokens``  ``⌈1.25 · p95⌉`` of the teacher's answer lengths (student tokens, EOS
                           included) when more than 5 % of the teacher's answers or of the
                           student's rollouts would be cut; kept otherwise (Demystifying OPD,
                           arXiv 2604.08527: truncated rollouts dominate and collapse the run)
``route1.fkl_coef``        ``0.5`` when the student's entropy is below half the teacher's at the
                           student's states (EOPD, arXiv 2603.07079: reverse KL's mode seeking
                           collapses entropy; mixing forward KL counters it) and the teacher is at
                           the student's temperature; kept otherwise
``teacher.temperature``    ``support.student_temperature`` when the two differ: route 1 then pulls
                           the student toward a re-tempered teacher, not the teacher (the survey's
                           state-compatibility variable, arXiv 2606.22793; **[INFER]**)
``support.kind``           ``teacher_topk`` (with ``support.k = teacher.topk``) when at least 20 %
                           of the student's tokens are off the teacher's top-k or the top-k overlap
                           mass is below 0.9 (Fu et al., arXiv 2603.25562: teacher top-K local
                           support matching; Rethinking OPD, arXiv 2604.13016: 97–99 % of the mass
                           on the shared top-k in successful OPD); kept otherwise
``route2.credit``          ``immediate`` for route 2 with completions longer than 16 tokens (Fu et
                           al., arXiv 2603.25562: O(T²) worst-case variance vs O(T⁴) for the
                           return-to-go); route 1 only: nothing to set (its credit is immediate)
``rollout.samples_per_prompt``  ≥ 4 when an advantage is normalised within groups
                           (``route2.baseline=group_mean|leave_one_out`` or ``outcome.adv_tau > 0``; GRPO, arXiv
                           2402.03300); otherwise kept (route 1 uses no group baseline)
``train.lr``               the current value, or a third of it when a gradient spike is predicted,
                           or when gradients are not clipped (``train.grad_clip`` null) and the
                           measured gradient norm is above 10
                           (PowerOPD, arXiv 2606.17199: extreme-variance gradients); the range is
                           ``[lr/3, lr]``
=========================  ======================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd.config.schema import Config

__all__ = ["Measured", "Recommendation", "overrides", "recommend"]


@dataclass(frozen=True)
class Measured:
    """The numbers the rules read (None: not measured)."""

    teacher_p95_length: float | None
    teacher_cut_share: float | None
    student_cut_share: float
    mean_length: float
    student_entropy: float | None
    teacher_entropy: float | None
    offsupport_frac: float | None
    overlap_mass: float | None
    grad_norm: float | None
    grad_spike_predicted: bool
    step_shift: float | None = None  # mean |Δ log π_S(y_t)| made by the one measured update


@dataclass(frozen=True)
class Recommendation:
    """``setting`` should be ``value`` (``current`` now): ``measured`` says the number, ``source`` the paper."""

    setting: str
    value: str
    current: str
    measured: str
    source: str

    @property
    def changes(self) -> bool:
        return self.value != self.current


def _f(x: float | None, spec: str = ".3g") -> str:
    return "not measured" if x is None or not math.isfinite(x) else format(x, spec)


def _max_new_tokens(cfg: Config, m: Measured) -> Recommendation:
    cur = cfg.rollout.max_new_tokens
    cut = max(m.student_cut_share, m.teacher_cut_share or 0.0)
    value = cur
    if cut > 0.05 and m.teacher_p95_length is not None:
        value = max(cur, math.ceil(1.25 * m.teacher_p95_length))
    return Recommendation("rollout.max_new_tokens", str(value), str(cur),
                          f"teacher answers cut: {_f(m.teacher_cut_share, '.1%')}, student rollouts cut: "
                          f"{m.student_cut_share:.1%}, teacher p95 length {_f(m.teacher_p95_length, '.0f')} tokens",
                          "Demystifying OPD, arXiv 2604.08527")


def _fkl(cfg: Config, m: Measured) -> Recommendation:
    cur = cfg.route1.fkl_coef
    collapse = (m.student_entropy is not None and m.teacher_entropy is not None and m.teacher_entropy > 0
                and m.student_entropy < 0.5 * m.teacher_entropy)
    same_tau = cfg.teacher.temperature == cfg.support.student_temperature
    value = 0.5 if collapse and same_tau and cfg.route1.divergence != "none" and cur == 0 else cur
    ratio = None if m.student_entropy is None or not m.teacher_entropy else m.student_entropy / m.teacher_entropy
    return Recommendation("route1.fkl_coef", f"{value:g}", f"{cur:g}",
                          f"H_S / H_T = {_f(ratio, '.2f')} (H_S {_f(m.student_entropy)}, H_T {_f(m.teacher_entropy)} "
                          "nats)", "EOPD, arXiv 2603.07079")


def _temperature(cfg: Config, m: Measured) -> Recommendation:
    cur, target = cfg.teacher.temperature, cfg.support.student_temperature
    return Recommendation("teacher.temperature", f"{target:g}", f"{cur:g}",
                          f"H_T {_f(m.teacher_entropy)} nats at τ = {cur:g} vs H_S {_f(m.student_entropy)}",
                          "survey, state compatibility, arXiv 2606.22793 [INFER]")


def _support(cfg: Config, m: Measured) -> Recommendation:
    cur = cfg.support.kind
    off = m.offsupport_frac is not None and m.offsupport_frac >= 0.2
    low = m.overlap_mass is not None and m.overlap_mass < 0.9
    value = "teacher_topk" if (off or low) and cur in ("full", "student_topk", "union") else cur
    return Recommendation("support.kind", value, cur,
                          f"off the teacher's top-k: {_f(m.offsupport_frac, '.1%')}, top-k overlap mass "
                          f"{_f(m.overlap_mass, '.3f')}",
                          "Fu et al., arXiv 2603.25562; Rethinking OPD, arXiv 2604.13016")


def _credit(cfg: Config, m: Measured) -> Recommendation:
    cur = cfg.route2.credit
    if cfg.route2.coef == 0:
        return Recommendation("route2.credit", cur, cur, "route 2 is off (route 1 only: its credit is immediate)",
                              "Fu et al., arXiv 2603.25562")
    value = "immediate" if m.mean_length > 16 else cur
    return Recommendation("route2.credit", value, cur, f"mean completion length {m.mean_length:.1f} tokens",
                          "Fu et al., arXiv 2603.25562")


def _group(cfg: Config) -> Recommendation:
    cur = cfg.rollout.samples_per_prompt
    group_baseline = cfg.route2.baseline in ("group_mean", "leave_one_out")
    grouped = (cfg.route2.coef > 0 and group_baseline) or cfg.outcome.adv_tau > 0
    value = max(cur, 4) if grouped else cur
    why = "an advantage is normalised within each prompt's group" if grouped else "no group baseline is used"
    return Recommendation("rollout.samples_per_prompt", str(value), str(cur), why, "GRPO, arXiv 2402.03300")


def _lr(cfg: Config, m: Measured) -> Recommendation:
    lr, clip = cfg.train.lr, cfg.train.grad_clip
    big = m.grad_norm is not None and clip is None and m.grad_norm > 10
    value = lr / 3 if big or m.grad_spike_predicted else lr
    return Recommendation("train.lr", f"{value:.3g}", f"{lr:.3g}",
                          f"pre-clip gradient norm {_f(m.grad_norm)} at step 1 (train.grad_clip={clip}); one update "
                          f"moves log π_S(y_t) by {_f(m.step_shift)} nats/token; range [{value / 3:.2g}, {value:.2g}]",
                          "PowerOPD, arXiv 2606.17199")


def recommend(cfg: Config, m: Measured) -> list[Recommendation]:
    """Every recommendation (see the module docstring), in config order."""
    return [_max_new_tokens(cfg, m), _group(cfg), _temperature(cfg, m), _support(cfg, m), _fkl(cfg, m),
            _credit(cfg, m), _lr(cfg, m)]


def overrides(recs: list[Recommendation]) -> list[str]:
    """``setting=value`` for the recommendations that change the config (ready for ``opd distill``)."""
    return [f"{r.setting}={r.value}" for r in recs if r.changes]
