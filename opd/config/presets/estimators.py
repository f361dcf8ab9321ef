"""Route-2 estimators and rewards: baselines and values (vOPD, GAE-OPD), routing (CR-OPD), bounded and
extrapolated rewards (PowerOPD, ExOPD), position weights (IW-OPD), the verifier's sign (OPDVR) and the
teacher-free placebo (OPSA); and stabilisation recipes: local support matching (Fu et al.), entropy-aware
mixing (EOPD), reference KL and rollout mixtures (StableOPD), token-importance gates (TIP), offline teacher
scores (Lightning OPD)."""

from __future__ import annotations

from opd.config.presets.base import Preset, route1_values, route2_values, sampled_token

PRESETS: tuple[Preset, ...] = (
    # Route-2 estimators and rewards.
    Preset(
        name="vopd",
        summary="vOPD ('KL for a KL'): the sampled-token log-ratio policy gradient with immediate credit and the "
                "closed-form value V(s_t) = −RKL_t subtracted as a detached baseline: unbiased for the "
                "immediate objective, with lower variance.",
        citation="Oh et al., 'KL for a KL' (vOPD), arXiv 2605.07865",
        formula="A_t = r_t − V(s_t) = log π_T(y_t) − log π_S(y_t) + sg[RKL_t];  L = −mean_t ρ_t A_t",
        notes="The exact full-vocabulary value (support.kind=full, teacher.access=full). The paper's cheaper "
              "top-K baseline uses the student's top-K (support.kind=student_topk, still full teacher logits); "
              "with top-k teacher feedback use support.kind=teacher_topk support.norm=tail teacher.access=topk "
              "(any state function is a valid baseline). is_correction=ratio (π_S/μ = 1 on-policy) is [INFER].",
        values=route2_values(sampled_token(baseline="value", value="closed_form"), teacher={"access": "full"},
                             support={"kind": "full"}),
    ),
    Preset(
        name="gae-opd",
        summary="GAE-OPD: the log-ratio reward as a dense return estimated with GAE(γ = 1, λ = 0.95) and a "
                "decomposed value V(s_t) = −RKL_t + γ·U_φ(s_t): the immediate part in closed form on the "
                "teacher's top-32 (with a tail bucket), the continuation U_φ a learned value head.",
        citation="Zhang, 'A Formula-Driven Survey and Research Agenda for On-Policy Distillation', arXiv "
                 "2606.22793 (GAE-OPD, 'a value-based hypothesis for log-ratio returns'); GAE: Schulman et al., "
                 "arXiv 1506.02438; formulas [INFER], docs/methods.md §3.3",
        formula="δ_t = r_t + γV(s_{t+1}) − V(s_t),  A_t = Σ_l (γλ)^l δ_{t+l},  V = −RKL_t + γ·U_φ(s_t);  "
                "L = −mean_t ρ_t A_t + c_V·mean_t ½(V_φ(s_t) − sg[A_t + V(s_t)])²",
        notes="All constants are [INFER]: γ = 1 keeps the sequence reverse-KL objective; λ < 1 trades bias for "
              "variance (λ = 1 is unbiased for any state value); value_coef = 0.5 as in PPO.",
        values=route2_values(sampled_token(credit="gae", gamma=1.0, lam=0.95, value="decomposed", value_coef=0.5),
                             teacher={"access": "topk", "topk": 32},
                             support={"kind": "teacher_topk", "k": 32, "norm": "tail"}),
    ),
    Preset(
        name="cr-opd",
        summary="Counterfactual Routed OPD: immediate log-ratio credit with the vOPD baseline; when a sampled "
                "token gets negative credit its freed mass is routed to teacher-supported (teacher top-16), "
                "student-reachable (student top-8) alternatives, ρ ∝ π_T, instead of the student prior.",
        citation="Zhang, arXiv 2606.22793 (CR-OPD: routes mass 'toward teacher-supported, student-reachable "
                 "alternatives'); routing target and constants [INFER], docs/methods.md §3.4",
        formula="A_t = r_t + sg[RKL_t];  A_t < 0 and C_t ≠ ∅:  L_t = −A_t (log π_S(y_t) − Σ_v sg[ρ̃_t(v)] log π_S(v)),  "
                "ρ̃_t ∝ π_T on C_t = (TopK_T ∩ TopK'_S) \\ {y_t};  else L_t = −A_t log π_S(y_t)",
        notes="The baseline's RKL_t is taken on the teacher's top-16 with a tail bucket, so top-k feedback "
              "suffices. κ = 1 (teacher-only target), η = 1 (full routing) and τ's = 0 are [INFER].",
        values=route2_values(sampled_token(baseline="value", value="closed_form"),
                             teacher={"access": "topk", "topk": 16},
                             support={"kind": "teacher_topk", "k": 16, "norm": "tail"},
                             routing={"kind": "cr_opd", "student_k": 8, "tau_s": 0.0, "tau_t": 0.0, "kappa": 1.0,
                                      "eta": 1.0, "tau_a": 0.0}),
    ),
    Preset(
        name="power-opd",
        summary="PowerOPD: sampled-token OPD with the bounded Box–Cox reward ((π_T/π_S)^α − 1)/α, α = 0.5 "
                "(bounded below by −1/α), instead of the unbounded log-ratio; immediate credit.",
        citation="Zhao et al., 'PowerOPD: Stabilizing On-Policy Distillation with Bounded Power Transformation', "
                 "arXiv 2606.17199",
        formula="A_t = ((π_T(y_t)/π_S(y_t))^α − 1)/α,  α = 0.5;  L = −mean_t ρ_t A_t",
        notes="The explicit transform and α = 0.5 are [INFER] (the paper's family is Box–Cox with α > 0; the "
              "constant was not retrieved).",
        values=route2_values(sampled_token(reward="box_cox", box_cox_alpha=0.5)),
    ),
    Preset(
        name="exopd",
        summary="ExOPD (G-OPD with reward scale λ = 1.25 > 1): reward λ·log π_T + (1 − λ)·log π_ref − log π_S "
                "extrapolates past the teacher relative to the reference (the initial student).",
        citation="Yang et al., 'Learning beyond Teacher: Generalized On-Policy Distillation with Reward "
                 "Extrapolation' (G-OPD / ExOPD), arXiv 2602.12125",
        formula="A_t = λ·log π_T(y_t) + (1−λ)·log π_ref(y_t) − log π_S(y_t),  λ = 1.25;  L = −mean_t ρ_t A_t",
        notes="λ = 1.25 is [INFER] (no default was retrieved); the per-token expansion of J_G is [INFER]. For "
              "strong-to-weak distillation the paper's reward correction uses the teacher's pre-RL base model "
              "as the reference: regularization.reference=PATH.",
        values=route2_values(sampled_token(reward="extrapolated", extrapolation_lambda=1.25),
                             regularization={"reference": "initial"}),
    ),
    Preset(
        name="iw-opd",
        summary="IW-OPD: sampled-token OPD whose advantages are re-weighted by the share of the row's "
                "teacher–student discrepancy still ahead of each token, w_t = 1 + γ(1 − D_{<t}/D), γ = 0.5: "
                "early tokens count up to 1 + γ, tokens after the drift about 1.",
        citation="Xie et al., 'On the Position Bias of On-Policy Distillation', arXiv 2606.22600 (Algorithm 1); "
                 "TRL experimental IWOPDTrainer (iw_opd_gamma=0.5, iw_opd_epsilon=1e-8)",
        formula="a_t = log π_T(y_t) − log π_S(y_t),  w_t = 1 + γ·(1 − Σ_{t'<t}|a_t'| / max(Σ_{t'}|a_t'|, ε)),  "
                "L = −mean_t w_t · a_t · log π_S(y_t)  (same gradient as −mean_t w_t a_t ρ_t at ρ = 1)",
        notes="As TRL implements it: REINFORCE without an importance ratio (route2.is_correction=none), token "
              "mean, top_p = 1 (TRL's IW-OPD table maps the paper's rollouts to top_p 1.0). The paper's own "
              "runs wrap this in verl's PPO clipping, not reproduced here.",
        values=route2_values(sampled_token(is_correction="none"), rollout={"top_p": 1.0, "temperature": 1.0},
                             gates={"position": "drift_share", "drift_gamma": 0.5, "reduction": "token_mean"}),
    ),
    Preset(
        name="opdvr",
        summary="OPDVR: sampled-token OPD whose per-token reward takes its sign from the verifier — correct "
                "rollouts keep only the positive part of log π_T − log π_S, incorrect ones only the negative "
                "part; the teacher sets the size, the verdict the direction (no new hyperparameter).",
        citation="Lin et al., 'On-policy Distillation with Verifiable Reward', arXiv 2608.24696 (code "
                 "LeapLabTHU/OPDVR, a verl fork: CORRECTNESS_GATED=True, threshold 0)",
        formula="r_t = log π_T(y_t) − log π_S(y_t);  r̃_t = max(0, r_t) if R(y) > 0 else min(0, r_t);  "
                "L = −mean_t min(ρ_t r̃_t, clip(ρ_t, 0.8, 1.2) r̃_t)",
        notes="[INFER]: verl's PPO clip 0.2 and token mean (the fork's defaults, not restated in the paper). The "
              "GRPD variant (sign from the group advantage) is not a preset. The loop must pass the verifier's "
              "rewards (Objective.needs_outcome_rewards).",
        values=route2_values(sampled_token(is_correction="ppo_clip", clip_low=0.2, clip_high=0.2),
                             outcome={"sign_gate": True, "adv_tau": 0.0}),
    ),
    Preset(
        name="opsa",
        summary="OPSA, the teacher-free placebo: only the lowest-log-probability 20 % of the batch's sampled "
                "tokens are trained, each with a negative advantage from −½ to −1 by the rank of its student "
                "entropy. No teacher signal enters the loss: run it beside any OPD preset to see how much of "
                "the gain is distillation.",
        citation="Ding & Zhang, 'Does On-Policy Distillation Really Distill? From Noisy Teacher to "
                 "Self-Improvement' (OPSA), arXiv 2608.31046 (code DripNowhy/On-Policy-Self-Adaptation: "
                 "opsa_token_fraction 0.2, advantages in [−1, −0.5])",
        formula="S = lowest ⌊0.2·N⌋ of log π_S(y_t) in the batch;  A_t = −½ − ½·(H_t − min_S H)/(max_S H − min_S H) "
                "on S, 0 elsewhere;  L = −Σ_{t∈S} min(ρ_t A_t, clip(ρ_t, 0.8, 1.2) A_t) / N",
        notes="[INFER]: PPO clip 0.2 (slime's default in the authors' code) and opd's token mean over all N "
              "tokens (the selected 20 % are not renormalised: a 1/0.2 learning-rate scale). The teacher is still "
              "loaded and scored for the teacher_kl diagnostic only; route2.reward=constant (a fixed negative "
              "advantage) is the paper's simpler control.",
        values=route2_values(sampled_token(reward="entropy_rank", constant_reward=-1.0, is_correction="ppo_clip",
                                           clip_low=0.2, clip_high=0.2),
                             gates={"logprob_gate": True, "logprob_fraction": 0.2}),
    ),

    # Stabilisation recipes.
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
