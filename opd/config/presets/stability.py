"""Stabilisation recipes: local support matching (Fu et al.), entropy-aware mixing (EOPD), reference KL and
rollout mixtures (StableOPD), token-importance gates (TIP), offline teacher scores (Lightning OPD)."""

from __future__ import annotations

from opd.config.presets.base import Preset, route1_values, route2_values, sampled_token

PRESETS: tuple[Preset, ...] = (
    Preset(
        name="fu-topk",
        summary="Teacher top-k local support matching: reverse KL between student and teacher renormalised on "
                "the teacher's top-32 tokens at each visited state, with top-p rollouts and special-token "
                "masking.",
        citation="Fu et al., 'Revisiting On-Policy Distillation: Empirical Failure Modes and Simple Fixes', "
                 "arXiv 2603.25562 (K = 32 from the authors' visualisation)",
        formula="L = mean_t Σ_{v∈TopK_T} π̄_S(v) log(π̄_S(v)/π̄_T(v)),  π̄ = π renormalised on TopK_T;  "
                "special tokens (other than EOS) masked;  y ~ top-p π_S",
        notes="top_p = 0.95 is [INFER]: the paper recommends top-p rollouts; the value was not retrieved. The "
              "renormalised top-k form of the loss is [INFER].",
        values=route1_values({"divergence": "rkl", "coef": 1.0}, rollout={"top_p": 0.95},
                             teacher={"access": "topk", "topk": 32},
                             support={"kind": "teacher_topk", "k": 32, "norm": "renorm"},
                             gates={"mask_special_tokens": True}),
    ),
    Preset(
        name="eopd",
        summary="Entropy-aware OPD: full-vocabulary reverse KL at every visited state, plus forward KL where the "
                "teacher's entropy exceeds τ = 1 nat (mode covering where the teacher is uncertain, mode seeking "
                "elsewhere).",
        citation="Jin et al., 'Entropy-Aware On-Policy Distillation of Language Models' (EOPD), arXiv 2603.07079 "
                 "(ICML 2026)",
        formula="L = mean_t [RKL_t + 1[H(π_T(·|s_t)) > τ]·FKL_t],  τ = 1 nat",
        notes="[INFER]: the hard gate at τ = 1 nat, equal weights and the full vocabulary (the paper reports "
              "top-K approximations: support.kind=teacher_topk support.norm=tail teacher.access=topk); the exact "
              "gate was not retrieved.",
        values=route1_values({"divergence": "rkl", "coef": 1.0, "fkl_coef": 1.0, "fkl_entropy_min": 1.0}),
    ),
    Preset(
        name="stable-opd",
        summary="StableOPD: sampled-token OPD with a reference-KL constraint to the initial student (k3, β = 0.1) "
                "and rollout mixture distillation — half the prompts use golden answers, trained by "
                "cross-entropy — against length inflation and truncation collapse.",
        citation="Luo et al., 'Demystifying OPD: Length Inflation and Stabilization Strategies for Large "
                 "Language Models' (StableOPD), arXiv 2604.08527",
        formula="L = −mean_{t, y~π_S} ρ_t r_t + β·mean_t k3(π_S ‖ π_ref)(y_t) + ν·mean_{t, y=golden} −log π_S(y_t),  "
                "β = 0.1, ν = 1",
        notes="[INFER]: β = 0.1, the k3 estimator, the 50/50 mixture and ν = 1 (the paper names the two "
              "mechanisms; their coefficients were not retrieved). 'Rollout mixture distillation' is read as "
              "SFT on golden answers beside the on-policy rows.",
        values=route2_values(rollout={"on_policy_fraction": 0.5, "off_policy_source": "answer"},
                             regularization={"reference": "initial", "ref_kl_coef": 0.1, "ref_kl_estimator": "k3",
                                             "sft_coef": 1.0}),
    ),
    Preset(
        name="tip",
        summary="TIP token-importance gating: sampled-token OPD trained only on the half of the batch's tokens "
                "with the highest student entropy (TIP's Q1), the others masked out.",
        citation="Xu et al., 'TIP: Token Importance in On-Policy Distillation', arXiv 2604.14084",
        formula="m_t = 1[H_S(t) ≥ q_{0.5}(H_S over the batch)];  L = −Σ_t m_t ρ_t r_t / N",
        notes="[INFER]: the batch quantile form of the gate, and sampled-token OPD as the base loss (TIP gates any "
              "OPD loss). Keeping 50 % by entropy is the paper's headline setting; gates.entropy_gate=q3 or "
              "q1_or_q3 adds the low-entropy, high-divergence tokens (the Q3 form and thresholds are [INFER]).",
        values=route2_values(gates={"entropy_gate": "q1", "keep_fraction": 0.5}),
    ),
    Preset(
        name="lightning-opd",
        summary="Lightning OPD, offline: the log-ratio policy gradient on fixed responses (the dataset's "
                "answers) instead of fresh samples, with the teacher's scores cached and reused (no live teacher "
                "after the first pass over the data).",
        citation="Wu, Han & Cai, 'Lightning OPD' (NVIDIA), arXiv 2604.13010",
        formula="A_t = log π_T(y_t)[cached] − log π_S(y_t),  y from a fixed corpus (μ_0);  L = −mean_t A_t "
                "(ρ = 1: no sampler to correct for)",
        notes="[INFER]: the dataset answers stand for the paper's SFT-model rollouts, and the update is the "
              "sampled-token form with ρ = 1. teacher.cache=memory reuses scores within a run; "
              "teacher.cache=disk teacher.cache_dir=DIR keeps them across runs. The paper's teacher-consistency "
              "condition: use the teacher that produced the SFT data.",
        values=route2_values(sampled_token(off_policy_rows=True, is_correction="none"),
                             rollout={"on_policy_fraction": 0.0, "off_policy_source": "answer"},
                             teacher={"cache": "memory"}),
    ),
)
