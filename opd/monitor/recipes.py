"""Stabilization recipes (docs/methods.md §3.9): what to do when a failure detector fires.

A recipe is advice (``text``, with its source) plus, where the fix is a configuration change, the
dotted overrides that ``monitor.<detector>_action=apply`` applies mid-run
(``regularization.ref_kl_coef=0.05``). Overrides depend on the current config: a recipe never
re-applies what is already on, and returns no override when nothing automatic fits (the event
then says so and the run continues as with ``warn``).

Constants marked **[INFER]** are our choices, not values from the cited papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opd.config.load import with_overrides
from opd.config.schema import Config
from opd.config.validate import route1_on, route2_on

__all__ = ["RECIPES", "Recipe", "apply_recipe", "recipe_for"]

#: Reference-KL coefficient turned on by the StableOPD recipe (**[INFER]**: the paper's β was not retrieved).
REF_KL_COEF = 0.05
#: Entropy bonus of the entropy-collapse recipe (**[INFER]**).
ENTROPY_COEF = 0.01


@dataclass(frozen=True)
class Recipe:
    """A stabilization recipe: ``text`` to read, ``overrides`` that ``action=apply`` sets."""

    text: str
    overrides: tuple[str, ...] = ()


def _stable_opd(cfg: Config, why: str) -> Recipe:
    reg = cfg.regularization
    coef = REF_KL_COEF if reg.ref_kl_coef == 0 else 2 * reg.ref_kl_coef
    overrides = [f"regularization.ref_kl_coef={coef:g}"]
    if not reg.reference:
        overrides.insert(0, "regularization.reference=initial")
    return Recipe(
        why + " StableOPD (Luo et al., arXiv 2604.08527): constrain the student with a KL to a reference "
        f"policy (regularization.ref_kl_coef={coef:g} against the initial student) and mix in golden or "
        "teacher rollouts (rollout.on_policy_fraction < 1 with regularization.sft_coef > 0). Also check that "
        "EOS is not masked as padding (the student then never learns to stop; TRL PR 6357) and consider "
        "rollout.truncated=mask so truncated rollouts stop dominating the batch [INFER].",
        tuple(overrides))


def _length(cfg: Config) -> Recipe:
    return _stable_opd(cfg, "Truncated, repetitive rollouts dominate the batches and bias the gradient.")


def _repetition(cfg: Config) -> Recipe:
    return _stable_opd(cfg, "Repetitive tokens receive systematically larger OPD advantages, so repetition "
                            "feeds on itself.")


def _entropy(cfg: Config) -> Recipe:
    overrides = []
    if route1_on(cfg) and cfg.route1.divergence in ("rkl", "srkl", "srkl_sg"):
        overrides += ["route1.divergence=jsd", "route1.beta=0.5"]
    if cfg.regularization.entropy_coef == 0:
        overrides.append(f"regularization.entropy_coef={ENTROPY_COEF:g}")
    return Recipe(
        "Reverse KL is mode-seeking and collapses diversity where the teacher is uncertain. EOPD (Jin et al., "
        "arXiv 2603.07079) adds forward KL on high-teacher-entropy tokens; opd's closest switches are a "
        "mass-covering divergence (route1.divergence=jsd with route1.beta=0.5, GKD convention) and a small "
        f"entropy bonus (regularization.entropy_coef={ENTROPY_COEF:g}) [INFER]. Raising rollout.temperature "
        "also restores exploration.",
        tuple(overrides))


def _reward_sign(cfg: Config) -> Recipe:
    text = ("Most sampled tokens get a negative reward r_t, and the negatives are heavy-tailed (Fu et al., arXiv "
            "2603.25562; AOPD 2605.06387). Fu et al.'s fix is teacher top-k local support matching: reverse KL "
            "renormalised on the teacher's top-k at each visited state, with top-p rollouts and special-token "
            "masking (the fu-topk preset). Bounded rewards (route2.reward=box_cox, PowerOPD) also tame the tail.")
    if route1_on(cfg) and cfg.support.kind != "sampled":
        return Recipe(text + f" This run already trains on a distribution over support.kind={cfg.support.kind}, so "
                      "the one-token signal does not drive its loss; nothing is applied automatically.")
    k = min(32, cfg.teacher.topk)
    overrides = ["route1.divergence=rkl", "route1.coef=1", "support.kind=teacher_topk", f"support.k={k}",
                 "support.norm=renorm", "gates.mask_special_tokens=true"]
    if route2_on(cfg):
        overrides.append("route2.coef=0")
        if cfg.routing.kind == "cr_opd":  # routing reroutes route 2, which is now off
            overrides.append("routing.kind=softmax")
        if cfg.outcome.adv_tau > 0 or cfg.outcome.sign_gate:  # verifier hybrids enter through route 2
            overrides += ["outcome.adv_tau=0", "outcome.sign_gate=false"]
    if cfg.teacher.access == "sampled":
        overrides.append("teacher.access=topk")
    return Recipe(text, tuple(overrides))


def _support(cfg: Config) -> Recipe:
    overrides = []
    if cfg.rollout.top_p == 1.0:
        overrides.append("rollout.top_p=0.95")
    if not cfg.gates.coverage_gate:
        overrides.append("gates.coverage_gate=true")
        if cfg.teacher.access == "sampled":
            overrides.append("teacher.access=topk")
    return Recipe(
        "The student samples tokens the teacher would not propose, where the teacher's signal is unreliable "
        "(Fu et al., arXiv 2603.25562: unreliable teacher on student prefixes). Sample with top-p "
        "(rollout.top_p=0.95 [INFER]) and keep only tokens inside the teacher's top-k (gates.coverage_gate); "
        "TrOPD (2606.01249) restricts learning to a teacher-verifiable trust region. If the teacher and the "
        "student use different tokenizers or chat templates, fix that first.",
        tuple(overrides))


def _grad_spike(cfg: Config) -> Recipe:
    overrides = []
    r2 = cfg.route2
    if route2_on(cfg) and r2.reward == "log_ratio":
        overrides += ["route2.reward=box_cox", "route2.box_cox_alpha=0.5"]
    elif route2_on(cfg) and r2.adv_clip is None:
        overrides.append("route2.adv_clip=5")
    if cfg.train.grad_clip is None:
        overrides.append("train.grad_clip=1")
    elif not overrides:
        overrides.append(f"train.grad_clip={cfg.train.grad_clip / 2:g}")
    return Recipe(
        "The log-ratio reward is unbounded, which gives extreme-variance gradients concentrated at early "
        "positions (PowerOPD, Zhao et al., arXiv 2606.17199). Bound the reward (route2.reward=box_cox, α = 0.5 "
        "[INFER]), clip advantages (route2.adv_clip=5, as rllm) and clip the gradient norm (train.grad_clip).",
        tuple(overrides))


def _nonfinite(cfg: Config) -> Recipe:
    overrides = [f"train.lr={cfg.train.lr / 2:g}"]
    if cfg.train.grad_clip is None:
        overrides.append("train.grad_clip=1")
    return Recipe(
        "The step was skipped before the optimizer ran, so the weights are unchanged. Usual causes: fp16/bf16 "
        "overflow (train.precision=no, teacher.dtype=float32), a teacher that gives a sampled token probability "
        "0 (log π_T = −inf: check tokenizer and template agreement), NaN reverse KL on ragged completions (TRL "
        "PR 5594), or a learning rate that is too high. The automatic recipe halves the learning rate and "
        "clips the gradient norm [INFER].",
        tuple(overrides))


#: detector name → recipe builder (the config the run is using → advice and overrides).
RECIPES: dict[str, Callable[[Config], Recipe]] = {
    "length": _length,
    "repetition": _repetition,
    "entropy": _entropy,
    "reward_sign": _reward_sign,
    "support": _support,
    "grad_spike": _grad_spike,
    "nonfinite": _nonfinite,
}


def recipe_for(detector: str, cfg: Config) -> Recipe:
    """The stabilization recipe of ``detector`` for the run configured by ``cfg``."""
    if detector not in RECIPES:
        raise ValueError(f"unknown detector {detector!r}; the detectors are: {', '.join(RECIPES)}")
    return RECIPES[detector](cfg)


def apply_recipe(cfg: Config, overrides: tuple[str, ...] | list[str]) -> Config:
    """A validated copy of ``cfg`` with the recipe's overrides (raises ``ConfigError`` when the
    result is not a valid configuration, e.g. a recipe that conflicts with a hybrid outcome term)."""
    return with_overrides(cfg, list(overrides))
