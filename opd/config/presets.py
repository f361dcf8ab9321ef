"""Method presets: a published method is a named point in the space of design variables.

``method: NAME`` in a config file (or the override ``method=NAME``) applies the preset's values
on top of the schema defaults and *under* the file's own values and the overrides, so any
variable of a method can still be changed. Each preset sets, explicitly, every variable that
defines the method — including ``route1.divergence: none`` or ``route2.coef: 0`` for the route it
does not use — and cites its source; constants that the source does not attest are labelled
**[INFER]** (our reconstruction) or **[MEMORY]** (recalled, not re-verified), as in
``shared/reference/methods.md``.

``opd methods`` and ``opd config-help`` print them (:mod:`opd.config.docs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd.config.fields import field_specs, suggest

__all__ = ["PRESETS", "Preset", "unknown_method_message"]


@dataclass(frozen=True)
class Preset:
    """A named method: ``values`` maps section → {option: value}; ``notes`` records deviations and
    provenance of constants ([INFER] / [MEMORY])."""

    name: str
    summary: str
    citation: str
    values: dict[str, dict[str, Any]]
    notes: str = ""

    def settings(self) -> list[tuple[str, Any]]:
        """The preset's (dotted option, value) pairs in schema order."""
        return [(spec.path, self.values[spec.section][spec.name]) for spec in field_specs().values()
                if spec.section in self.values and spec.name in self.values[spec.section]]


_ROUTE1_OFF = {"divergence": "none"}
_ROUTE2_OFF = {"coef": 0.0}
_ON_POLICY = {"on_policy_fraction": 1.0, "teacher_mix": 0.0}

_PRESETS: tuple[Preset, ...] = (
    Preset(
        name="thinking-machines",
        summary="Sampled-token OPD: per-token reward r_t = log π_T(y_t) − log π_S(y_t) on the student's own "
                "samples, immediate credit (γ = 0), no baseline, importance-sampling loss with π_S/μ, "
                "student-prior (softmax) routing; the teacher returns only sampled-token log-probs.",
        citation="Lu & Thinking Machines Lab, 'On-Policy Distillation' (2025), "
                 "https://thinkingmachines.ai/blog/on-policy-distillation/ ; tinker-cookbook "
                 "distillation/train_on_policy.py (kl_penalty_coef=1, kl_discount_factor=0, "
                 "loss_fn=importance_sampling)",
        notes="route2.coef is tinker's kl_penalty_coef; its kl_discount_factor γ > 0 is "
              "route2.credit=discounted with route2.gamma=γ.",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "sampled"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "log_ratio", "credit": "immediate", "baseline": "none",
                       "future_only": False, "length_normalize": False, "is_correction": "ratio"},
            "routing": {"kind": "softmax"},
        },
    ),
    Preset(
        name="gkd",
        summary="Generalized knowledge distillation: generalized JSD_β (β = 0.5) between teacher and student "
                "over the full vocabulary at every visited state (route 1); a fraction λ = 0.5 of the prompts "
                "use the student's samples (at temperature 0.9), the rest the dataset answers.",
        citation="Agarwal et al., 'On-Policy Distillation of Language Models: Learning from Self-Generated "
                 "Mistakes', arXiv 2306.13649 (ICLR 2024); TRL GKDConfig defaults lmbda=0.5, beta=0.5, "
                 "temperature=0.9",
        notes="TRL samples at temperature 0.9 but computes the loss at temperature 1 (teacher.temperature and "
              "support.student_temperature stay 1). Off-policy rows are dataset answers (TRL seq_kd=False; "
              "rollout.off_policy_source=teacher is seq_kd=True). TRL's max_new_tokens=128 is task-dependent "
              "and left to the task.",
        values={
            "rollout": {"on_policy_fraction": 0.5, "off_policy_source": "answer", "temperature": 0.9,
                        "teacher_mix": 0.0},
            "teacher": {"access": "full", "temperature": 1.0},
            "support": {"kind": "full", "student_temperature": 1.0},
            "route1": {"divergence": "jsd", "beta": 0.5, "coef": 1.0},
            "route2": dict(_ROUTE2_OFF),
        },
    ),
    Preset(
        name="minillm",
        summary="Sequence-level reverse KL by policy gradient with MiniLLM's tricks: single-step decomposition "
                "(the immediate step as an exact full-vocabulary reverse KL, route 1; the future as a "
                "length-normalised return-to-go from t+1, route 2), teacher-mixed sampling α = 0.2 with "
                "importance weights π_S/mix, and PPO-style ratio clipping (ε = 0.2).",
        citation="Gu et al., 'MiniLLM: Knowledge Distillation of Large Language Models', arXiv 2306.08543 "
                 "(ICLR 2024); code microsoft/LMOps minillm (--teacher-mixed-alpha 0.2, --cliprange 0.2, "
                 "--length-norm, --single-step-reg)",
        notes="Follows the paper's decomposition (R_{t+1}, length-normalised, undiscounted). The LMOps code "
              "differs: its policy-gradient return also contains r_t, is discounted (gamma 0.95) before length "
              "normalisation and whitened, and each rollout batch gets 4 PPO epochs "
              "(rollout.updates_per_rollout=4). The pre-training loss L_PT needs a pre-training corpus and is "
              "not included.",
        values={
            "rollout": {"on_policy_fraction": 1.0, "teacher_mix": 0.2},
            "teacher": {"access": "full"},
            "support": {"kind": "full"},
            "route1": {"divergence": "rkl", "coef": 1.0},
            "route2": {"coef": 1.0, "reward": "log_ratio", "credit": "return_to_go", "future_only": True,
                       "length_normalize": True, "baseline": "none", "is_correction": "ppo_clip",
                       "clip_low": 0.2, "clip_high": 0.2},
            "routing": {"kind": "softmax"},
        },
    ),
    Preset(
        name="vopd",
        summary="vOPD ('KL for a KL'): the sampled-token log-ratio policy gradient with immediate credit and the "
                "closed-form value V(s_t) = −RKL_t subtracted as a detached baseline: unbiased for the "
                "immediate objective, with lower variance.",
        citation="Oh et al., 'KL for a KL' (vOPD), arXiv 2605.07865",
        notes="The exact full-vocabulary value (support.kind=full, teacher.access=full). The paper's cheaper "
              "top-K baseline uses the student's top-K (support.kind=student_topk, still full teacher logits); "
              "with top-k teacher feedback use support.kind=teacher_topk support.norm=tail teacher.access=topk "
              "(any state function is a valid baseline). is_correction=ratio (π_S/μ = 1 on-policy) is [INFER].",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "full"},
            "support": {"kind": "full"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "log_ratio", "credit": "immediate", "baseline": "value",
                       "value": "closed_form", "future_only": False, "is_correction": "ratio"},
            "routing": {"kind": "softmax"},
        },
    ),
    Preset(
        name="gae-opd",
        summary="GAE-OPD: the log-ratio reward as a dense return estimated with GAE(γ = 1, λ = 0.95) and a "
                "decomposed value V(s_t) = −RKL_t + γ·U_φ(s_t): the immediate part in closed form on the "
                "teacher's top-32 (with a tail bucket), the continuation U_φ a learned value head.",
        citation="Zhang, 'A Formula-Driven Survey and Research Agenda for On-Policy Distillation', arXiv "
                 "2606.22793 (GAE-OPD, 'a value-based hypothesis for log-ratio returns'); formulas [INFER], "
                 "methods.md §3.3",
        notes="All constants are [INFER]: γ = 1 keeps the sequence reverse-KL objective; λ < 1 trades bias for "
              "variance (λ = 1 is unbiased for any state value); value_coef = 0.5 as in PPO.",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "topk", "topk": 32},
            "support": {"kind": "teacher_topk", "k": 32, "norm": "tail"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "log_ratio", "credit": "gae", "gamma": 1.0, "lam": 0.95,
                       "baseline": "none", "value": "decomposed", "value_coef": 0.5, "future_only": False,
                       "is_correction": "ratio"},
            "routing": {"kind": "softmax"},
        },
    ),
    Preset(
        name="cr-opd",
        summary="Counterfactual Routed OPD: immediate log-ratio credit with the vOPD baseline; when a sampled "
                "token gets negative credit its freed mass is routed to teacher-supported (teacher top-16), "
                "student-reachable (student top-8) alternatives, ρ ∝ π_T, instead of the student prior.",
        citation="Zhang, arXiv 2606.22793 (CR-OPD: routes mass 'toward teacher-supported, student-reachable "
                 "alternatives'); routing target and constants [INFER], methods.md §3.4",
        notes="The baseline's RKL_t is taken on the teacher's top-16 with a tail bucket, so top-k feedback "
              "suffices. κ = 1 (teacher-only target), η = 1 (full routing) and τ's = 0 are [INFER].",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "topk", "topk": 16},
            "support": {"kind": "teacher_topk", "k": 16, "norm": "tail"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "log_ratio", "credit": "immediate", "baseline": "value",
                       "value": "closed_form", "future_only": False, "is_correction": "ratio"},
            "routing": {"kind": "cr_opd", "student_k": 8, "tau_s": 0.0, "tau_t": 0.0, "kappa": 1.0,
                        "eta": 1.0, "tau_a": 0.0},
        },
    ),
    Preset(
        name="opsd",
        summary="On-policy self-distillation: the frozen initial student, shown the example's privileged "
                "context (e.g. the solution), is the teacher; full-vocabulary reverse KL to it on the "
                "student's own samples.",
        citation="Zhao et al., 'Self-Distilled Reasoner' (OPSD), arXiv 2601.18734 (code siyan-zhao/OPSD); the "
                 "full-vocabulary reverse-KL default is [MEMORY]",
        notes="The built-in arith task supplies a teacher-only hint; for your data set data.context_field. "
              "The paper's generalized-JSD variant: route1.divergence=jsd.",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"model": "self", "self_mode": "frozen", "use_context": True, "access": "full"},
            "support": {"kind": "full"},
            "route1": {"divergence": "rkl", "coef": 1.0},
            "route2": dict(_ROUTE2_OFF),
        },
    ),
    Preset(
        name="sft-teacher",
        summary="The honest off-policy baseline: continued supervised fine-tuning on teacher samples (no student "
                "rollouts, no teacher scoring). Compare any OPD run against it at the same budget.",
        citation="Sequence-level KD (Kim & Rush, arXiv 1606.07947) [MEMORY]; the off-policy distillation stage "
                 "of Qwen3 (arXiv 2505.09388)",
        values={
            "rollout": {"on_policy_fraction": 0.0, "off_policy_source": "teacher", "teacher_mix": 0.0},
            "teacher": {"access": "sampled"},
            "route1": dict(_ROUTE1_OFF),
            "route2": dict(_ROUTE2_OFF),
            "regularization": {"sft_coef": 1.0},
        },
    ),
    Preset(
        name="fu-topk",
        summary="Teacher top-k local support matching: reverse KL between student and teacher renormalised on "
                "the teacher's top-32 tokens at each visited state, with top-p rollouts and special-token "
                "masking.",
        citation="Fu et al., 'Revisiting On-Policy Distillation: failure modes and simple fixes', arXiv "
                 "2603.25562 (K = 32 from the authors' visualisation)",
        notes="top_p = 0.95 is [INFER]: the paper recommends top-p rollouts; the value was not retrieved.",
        values={
            "rollout": {"on_policy_fraction": 1.0, "teacher_mix": 0.0, "top_p": 0.95},
            "teacher": {"access": "topk", "topk": 32},
            "support": {"kind": "teacher_topk", "k": 32, "norm": "renorm"},
            "route1": {"divergence": "rkl", "coef": 1.0},
            "route2": dict(_ROUTE2_OFF),
            "gates": {"mask_special_tokens": True},
        },
    ),
    Preset(
        name="distillm",
        summary="Skew reverse KL, SRKL_α = KL(π_S ‖ (1 − α)·π_T + α·π_S) with α = 0.1, over the full "
                "vocabulary on the student's samples (the skew bounds the log-ratio).",
        citation="Ko et al., 'DistiLLM: Towards Streamlined Distillation for Large Language Models', arXiv "
                 "2402.03898 (ICML 2024); α = 0.1 is [MEMORY]",
        notes="DistiLLM's adaptive off-policy scheduler (replayed student outputs mixed with fixed data) is not "
              "reproduced: every prompt is sampled on-policy.",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "full"},
            "support": {"kind": "full"},
            "route1": {"divergence": "srkl", "alpha": 0.1, "coef": 1.0},
            "route2": dict(_ROUTE2_OFF),
        },
    ),
    Preset(
        name="power-opd",
        summary="PowerOPD: sampled-token OPD with the bounded Box–Cox reward ((π_T/π_S)^α − 1)/α, α = 0.5 "
                "(bounded below by −1/α), instead of the unbounded log-ratio; immediate credit.",
        citation="Zhao et al., PowerOPD, arXiv 2606.17199; the explicit transform and α = 0.5 are [INFER]",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "sampled"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "box_cox", "box_cox_alpha": 0.5, "credit": "immediate",
                       "baseline": "none", "future_only": False, "is_correction": "ratio"},
            "routing": {"kind": "softmax"},
        },
    ),
    Preset(
        name="exopd",
        summary="ExOPD (G-OPD with reward scale λ = 1.25 > 1): reward λ·log π_T + (1 − λ)·log π_ref − log π_S "
                "extrapolates past the teacher relative to the reference (the initial student).",
        citation="Yang et al., G-OPD / ExOPD, arXiv 2602.12125; λ = 1.25 is [INFER] (no default was retrieved)",
        notes="For strong-to-weak distillation the paper's reward correction uses the teacher's pre-RL base model "
              "as the reference: regularization.reference=PATH.",
        values={
            "rollout": dict(_ON_POLICY),
            "teacher": {"access": "sampled"},
            "route1": dict(_ROUTE1_OFF),
            "route2": {"coef": 1.0, "reward": "extrapolated", "extrapolation_lambda": 1.25,
                       "credit": "immediate", "baseline": "none", "future_only": False, "is_correction": "ratio"},
            "routing": {"kind": "softmax"},
            "regularization": {"reference": "initial"},
        },
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def unknown_method_message(name: str) -> str:
    """The error for an unknown ``method`` name: a suggestion and the list of presets."""
    hint = suggest(str(name), list(PRESETS))
    return (f"method={name!r} is not a preset" + (f"; did you mean {hint}?" if hint else "")
            + f" The presets are: {', '.join(PRESETS)} (see `opd methods`)")
