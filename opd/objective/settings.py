"""Typed settings of the objective's terms, built once from the resolved config.

Each term of :mod:`opd.objective` reads only its own frozen settings record (and the micro-batch's
:class:`~opd.objective.outputs.TermInputs`), never the config:

==========================  ==========================================  ==============================
settings                    term                                        from the config sections
==========================  ==========================================  ==============================
:class:`Route1Settings`     :func:`~opd.objective.route1.route1_term`   route1, support, teacher.topk
:class:`Route2Settings`     :func:`~opd.objective.route2.route2_term`   route2, outcome, routing
:class:`GateSettings`       :func:`~opd.objective.weights.token_weights`  gates (+ the reward's log-probs)
:class:`RegularizationSettings`  :func:`~opd.objective.regularization.regularization_terms`  regularization
==========================  ==========================================  ==============================

A settings record whose fields share their names with a config section is filled from it by
:func:`section_values`: an option added to that section reaches the term by adding a field of the
same name here (and a test of the term).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from opd.config.schema import Config
from opd.math.credit import CREDIT_ESTIMATORS, uses_values
from opd.math.divergences import DivergenceShaping
from opd.math.fused import DivergenceOptions
from opd.math.routing import CrOpdKnobs
from opd.math.support import SupportSpec

__all__ = ["DiagnosticSettings", "GateSettings", "ObjectiveSettings", "OutcomeSettings", "RegularizationSettings",
           "Route1Settings", "Route2Settings", "RoutingSettings", "section_values"]


def section_values(cls: type, section: Any, **computed: Any) -> Any:
    """An instance of the settings dataclass ``cls``: the ``computed`` fields as given, every other field
    read from the config ``section`` attribute of the same name (a ``TypeError`` names a missing one)."""
    values = dict(computed)
    for f in fields(cls):
        if f.name in values:
            continue
        if not hasattr(section, f.name):
            raise TypeError(f"{cls.__name__}.{f.name} is neither computed nor an option of {type(section).__name__}")
        values[f.name] = getattr(section, f.name)
    return cls(**values)


@dataclass(frozen=True)
class DiagnosticSettings:
    """Per-token actionability diagnostics (``monitor.diagnostics``) and their top-k (``teacher.topk``)."""

    on: bool = True
    topk: int = 32


@dataclass(frozen=True)
class Route1Settings:
    """Route 1 (``route1.*`` and the support): the divergence, its knobs and shaping, the chunking,
    and whether the closed-form value of route 2 needs the RKL on the support (``rkl_for_value``)."""

    divergence: str
    off_policy_divergence: str | None
    coef: float
    uld_coef: float
    beta: float
    alpha: float
    mu: float
    chunk_size: int | None            # None: automatic from the vocabulary
    shaping: DivergenceShaping
    support: SupportSpec
    rkl_for_value: bool
    diagnostics: DiagnosticSettings

    @property
    def on(self) -> bool:
        return self.divergence != "none" and self.coef > 0

    def options(self, divergence: str, *, shaped: bool = True) -> DivergenceOptions:
        """The :class:`~opd.math.fused.DivergenceOptions` of ``divergence`` with these knobs (unshaped
        with ``shaped=False``)."""
        return DivergenceOptions(divergence, self.support, beta=self.beta, alpha=self.alpha, mu=self.mu,
                                 shaping=self.shaping if shaped else None, chunk_size=self.chunk_size)

    @classmethod
    def from_config(cls, cfg: Config, *, rkl_for_value: bool, diagnostics: DiagnosticSettings) -> "Route1Settings":
        r1, s = cfg.route1, cfg.support
        # feedback arrives at the teacher's temperature already (opd.types.Feedback)
        spec = SupportSpec(kind=s.kind, k=s.k, norm=s.norm, teacher_temperature=1.0,
                           student_temperature=s.student_temperature)
        # a support with a tail bucket (support.norm=tail) floors only its top-k entries and is not
        # clamped from below (verl's tail mode, DivergenceShaping)
        shaping = DivergenceShaping(fkl_coef=r1.fkl_coef, fkl_entropy_min=r1.fkl_entropy_min,
                                    logprob_floor=r1.logprob_floor, clamp_low=r1.clamp_low,
                                    clamp_high=r1.clamp_high, tail_bucket=spec.norm == "tail" and spec.kind != "full")
        return section_values(cls, r1, chunk_size=r1.chunk_size or None, shaping=shaping, support=spec,
                              rkl_for_value=rkl_for_value, diagnostics=diagnostics)


@dataclass(frozen=True)
class OutcomeSettings:
    """The verifier's outcome reward beside the teacher signal (``outcome.*``)."""

    adv_tau: float
    teacher_tau: float
    normalize_std: bool
    sign_gate: bool


@dataclass(frozen=True)
class RoutingSettings:
    """Where the freed probability mass goes (``routing.*``; CR-OPD's knobs)."""

    kind: str
    student_k: int | None
    tau_s: float
    tau_t: float
    kappa: float
    eta: float
    tau_a: float
    temperature: float
    reach_p: float | None
    mass: str

    @property
    def knobs(self) -> CrOpdKnobs:
        """CR-OPD's routing knobs, as :func:`opd.math.routing.cr_opd_loss` takes them."""
        return CrOpdKnobs(student_k=self.student_k, tau_s=self.tau_s, tau_t=self.tau_t, kappa=self.kappa,
                          eta=self.eta, temperature=self.temperature, reach_p=self.reach_p, mass=self.mass)


@dataclass(frozen=True)
class Route2Settings:
    """Route 2 (``route2.*``): reward → credit → importance correction, with the outcome mix and the
    routing of the freed mass. Field names are the ``route2`` options'."""

    coef: float
    reward: str
    f_divergence: str
    reward_logprobs: str
    constant_reward: float
    reward_low: float | None
    reward_high: float | None
    box_cox_alpha: float
    extrapolation_lambda: float
    credit: str
    window: int
    gamma: float
    lam: float
    baseline: str
    value: str
    value_coef: float
    off_policy_rows: bool
    future_only: bool
    length_normalize: bool
    whiten: bool
    adv_clip: float | None
    is_correction: str
    clip_low: float
    clip_high: float
    ratio_cap: float | None
    icepop_low: float
    icepop_high: float
    dppo_sign: str
    outcome: OutcomeSettings
    routing: RoutingSettings

    @property
    def on(self) -> bool:
        return self.coef > 0

    @property
    def uses_values(self) -> bool:
        """The credit rule or the baseline reads a value estimate ``V(s_t)``."""
        return uses_values(self.credit, self.baseline)

    @property
    def needs_value_head(self) -> bool:
        """The decomposed value ``−RKL_t + γ U_φ(s_t)`` of a rule that subtracts values (GAE-OPD)."""
        return CREDIT_ESTIMATORS.lookup(self.credit).uses_values and self.value == "decomposed"

    @property
    def needs_rkl(self) -> bool:
        """A value estimate built on the per-token RKL (closed_form, decomposed) is read."""
        return self.uses_values and self.value in ("closed_form", "decomposed")

    @classmethod
    def from_config(cls, cfg: Config) -> "Route2Settings":
        return section_values(cls, cfg.route2, outcome=section_values(OutcomeSettings, cfg.outcome),
                              routing=section_values(RoutingSettings, cfg.routing))


@dataclass(frozen=True)
class GateSettings:
    """Gates and weights (``gates.*``), the special tokens the gate drops (EOS excepted) and the reward's
    student log-probs (``route2.reward_logprobs``, read by the drift-share position weights)."""

    mask_special_tokens: bool
    entropy_gate: str
    keep_fraction: float
    entropy_low: float | None
    divergence_high: float | None
    coverage_gate: bool
    trust_min: float | None
    position: str
    prefix_fraction: float
    decay_to: float
    drift_beta: float
    drift_gamma: float
    logprob_gate: bool
    logprob_fraction: float
    reduction: str
    special_ids: tuple[int, ...]
    reward_logprobs: str

    @classmethod
    def from_config(cls, cfg: Config, *, eos_id: int | None, special_ids: tuple[int, ...]) -> "GateSettings":
        return section_values(cls, cfg.gates, special_ids=tuple(i for i in special_ids if i != eos_id),
                              reward_logprobs=cfg.route2.reward_logprobs)


@dataclass(frozen=True)
class RegularizationSettings:
    """Regularization terms (``regularization.*``) and the token reduction of the SFT term."""

    ref_kl_coef: float
    ref_kl_estimator: str
    entropy_coef: float
    sft_coef: float
    mismatch_coef: float
    reduction: str

    @classmethod
    def from_config(cls, cfg: Config) -> "RegularizationSettings":
        return section_values(cls, cfg.regularization, reduction=cfg.gates.reduction)


@dataclass(frozen=True)
class ObjectiveSettings:
    """Every term's settings, and the batch rules: truncated rollouts masked (``rollout.truncated``),
    the constant normaliser's length (``rollout.prefix_tokens`` or ``rollout.max_new_tokens``)."""

    route1: Route1Settings
    route2: Route2Settings
    gates: GateSettings
    regularization: RegularizationSettings
    diagnostics: DiagnosticSettings
    mask_truncated: bool
    max_len: int | None

    @classmethod
    def from_config(cls, cfg: Config, *, eos_id: int | None, special_ids: tuple[int, ...] = (),
                    diagnostics: bool = True) -> "ObjectiveSettings":
        route2 = Route2Settings.from_config(cfg)
        diag = DiagnosticSettings(on=diagnostics, topk=cfg.teacher.topk)
        return cls(
            route1=Route1Settings.from_config(cfg, rkl_for_value=route2.on and route2.needs_rkl, diagnostics=diag),
            route2=route2,
            gates=GateSettings.from_config(cfg, eos_id=eos_id, special_ids=special_ids),
            regularization=RegularizationSettings.from_config(cfg),
            diagnostics=diag,
            mask_truncated=cfg.rollout.truncated == "mask",
            max_len=cfg.rollout.prefix_tokens or cfg.rollout.max_new_tokens or None,
        )
