"""Foundations: the sampled-token reverse KL of Thinking Machines / tinker, GKD, MiniLLM, the DistiLLM
family, the f-divergence baselines (TVD, AKL), the supervised baseline, and self-distillation — the teacher
is the student itself shown a privileged context (a solution, a demonstration, feedback), frozen at its
initial weights or live (OPSD, SDFT, SDPO)."""

from __future__ import annotations

from opd.config.presets.base import (
    ROUTE1_OFF,
    ROUTE2_OFF,
    SELF_TEACHER,
    Preset,
    route1_values,
    route2_values,
    sampled_token,
)

PRESETS: tuple[Preset, ...] = (
    # Teacher-student distillation.
    Preset(
        name="thinking-machines",
        summary="Sampled-token OPD as tinker runs it: per-token reward r_t = log π_T(y_t) − log μ(y_t) from the "
                "sampler's own log-probs, immediate credit (γ = 0), no baseline, the importance-sampling loss "
                "with π_S/μ summed over tokens and sequences, student-prior (softmax) routing; the teacher "
                "returns only sampled-token log-probs.",
        citation="Lu & Thinking Machines Lab, 'On-Policy Distillation' (2025), "
                 "https://thinkingmachines.ai/blog/on-policy-distillation/ ; tinker-cookbook "
                 "distillation/train_on_policy.py (kl_penalty_coef=1, kl_discount_factor=0, "
                 "loss_fn=importance_sampling); tinker importance_sampling loss "
                 "https://tinker-docs.thinkingmachines.ai/tinker/losses/importance-sampling",
        formula="A_t = −c·(log μ(y_t) − log π_T(y_t)), c = 1;  L = −Σ_{b,t} (π_S(y_t)/μ(y_t)) · A_t  (a sum, "
                "not a mean)",
        notes="route2.coef is tinker's kl_penalty_coef; its kl_discount_factor γ > 0 is route2.credit=discounted "
              "with route2.gamma=γ. The reward uses the sampler's log-probs (route2.reward_logprobs=behaviour) and "
              "the loss is summed (gates.reduction=sum), as tinker does; opd's other presets use the current "
              "student's log-probs and a token mean. The two choices agree only when μ = π_S (one update per "
              "rollout batch, temperature 1, no top-p/top-k) and up to the 1/N scale of the mean.",
        values=route2_values(sampled_token(length_normalize=False, reward_logprobs="behaviour"),
                             gates={"reduction": "sum"}),
    ),
    Preset(
        name="gkd",
        summary="Generalized knowledge distillation: generalized JSD_β (β = 0.5) between teacher and student "
                "over the full vocabulary at every visited state (route 1); a fraction λ = 0.5 of the prompts "
                "use the student's samples (at temperature 0.9), the rest the dataset answers.",
        citation="Agarwal et al., 'On-Policy Distillation of Language Models: Learning from Self-Generated "
                 "Mistakes', arXiv 2306.13649 (ICLR 2024); TRL GKDConfig defaults lmbda=0.5, beta=0.5, "
                 "temperature=0.9",
        formula="L = mean_t JSD_β(π_T ‖ π_S)(s_t),  JSD_β = β·KL(π_T ‖ M) + (1−β)·KL(π_S ‖ M),  "
                "M = β·π_T + (1−β)·π_S;  s_t from π_S with probability λ, else from the dataset answer",
        notes="TRL samples at temperature 0.9 but computes the loss at temperature 1 (teacher.temperature and "
              "support.student_temperature stay 1). Off-policy rows are dataset answers (TRL seq_kd=False; "
              "rollout.off_policy_source=teacher is seq_kd=True). TRL's max_new_tokens=128 is task-dependent "
              "and left to the task. Deliberate difference: opd's on-policy split is deterministic per batch "
              "(the first round(λ·n) prompts of every batch are the student's samples), where TRL draws one "
              "Bernoulli(λ) per batch (the whole batch is on-policy or none of it): the same fraction in "
              "expectation, without whole off-policy steps.",
        values=route1_values({"divergence": "jsd", "beta": 0.5, "coef": 1.0},
                             rollout={"on_policy_fraction": 0.5, "off_policy_source": "answer", "temperature": 0.9},
                             teacher={"temperature": 1.0}, support={"kind": "full", "student_temperature": 1.0}),
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
        formula="L = mean_t RKL_t  +  mean_t −min(ρ_t A_t, clip(ρ_t, 0.8, 1.2) A_t),  "
                "A_t = mean_{t'>t} (log π_T(y_t') − log π_S(y_t')),  y ~ α·π_T + (1−α)·π_S,  ρ_t = π_S/mix",
        notes="Follows the paper's decomposition (R_{t+1}, length-normalised, undiscounted). The LMOps code "
              "differs: its policy-gradient return also contains r_t, is discounted (gamma 0.95) before length "
              "normalisation and whitened, and each rollout batch gets 4 PPO epochs "
              "(rollout.updates_per_rollout=4). The pre-training loss L_PT needs a pre-training corpus and is "
              "not included. α = 0.2 is [MEMORY] (LMOps' script default). Deliberate difference from the "
              "paper: the single-step term RKL_t is unweighted, as in LMOps (its single-step regulariser "
              "carries no importance weight for the teacher-mixed sampling); the paper's gradient weights it "
              "by ρ_t = π_S/mix like the policy-gradient term [MEMORY].",
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
        name="sft-teacher",
        summary="The honest off-policy baseline: continued supervised fine-tuning on teacher samples (no student "
                "rollouts, no teacher scoring). Compare any OPD run against it at the same budget.",
        citation="Sequence-level KD (Kim & Rush, arXiv 1606.07947); the off-policy distillation stage "
                 "of Qwen3 (arXiv 2505.09388)",
        formula="L = mean_t −log π_S(y_t),  y ~ π_T",
        values={
            "rollout": {"on_policy_fraction": 0.0, "off_policy_source": "teacher", "teacher_mix": 0.0},
            "teacher": {"access": "sampled"},
            "route1": dict(ROUTE1_OFF),
            "route2": dict(ROUTE2_OFF),
            "regularization": {"sft_coef": 1.0},
        },
    ),
    Preset(
        name="distillm",
        summary="Skew reverse KL, SRKL_α = KL(π_S ‖ (1 − α)·π_T + α·π_S) with α = 0.1, over the full "
                "vocabulary on the student's samples (the skew bounds the log-ratio).",
        citation="Ko et al., 'DistiLLM: Towards Streamlined Distillation for Large Language Models', arXiv "
                 "2402.03898 (ICML 2024)",
        formula="L = mean_t KL(π_S ‖ (1−α)·π_T + α·π_S)(s_t),  α = 0.1",
        notes="α = 0.1 is [MEMORY]. DistiLLM's adaptive off-policy scheduler (replayed student outputs mixed "
              "with fixed data) is not reproduced: every prompt is sampled on-policy.",
        values=route1_values({"divergence": "srkl", "alpha": 0.1, "coef": 1.0}),
    ),
    Preset(
        name="distillm-2",
        summary="DistiLLM-2's contrastive loss as its released trainer computes it: skew forward KL (raises the "
                "likelihood of the teacher's responses) on teacher-generated rows and skew reverse KL with the "
                "student's share of the mixture detached (lowers it where the student errs) on student-generated "
                "rows, half of each, α = 0.1, full vocabulary; a token mean per sequence, summed over each "
                "teacher/student pair.",
        citation="Ko et al., 'DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs', arXiv "
                 "2503.07067 (ICML 2025); code jongwooko/distillm-2",
        formula="L = mean_pairs [ mean_{t, y~π_T} KL(π_T ‖ α·π_T + (1−α)·π_S)  +  mean_{t, y~π_S} KL(π_S ‖ "
                "(1−α)·π_T + α·sg(π_S)) ]  = 2 · mean_rows mean_t D_row (route1.coef=2, gates.reduction="
                "sequence_mean)",
        notes="As the released trainer: the student-side skew reverse KL detaches α·π_S inside the mixture "
              "(route1.divergence=srkl_sg; srkl differentiates through it, which adds −α Σ_v (π_S/m)·∇π_S to the "
              "gradient, as DistiLLM-1 does), and the loss is a per-sequence token mean summed over the "
              "chosen (teacher) + rejected (student) pair, averaged over pairs — 2 × the mean over rows of "
              "per-sequence means when half the rows are teacher samples (rollout.on_policy_fraction=0.5 "
              "splits every batch exactly). route1.coef=1 gates.reduction=token_mean gives opd's earlier "
              "one-token-mean form (about half the scale, and longer sequences weigh more). [INFER]: the 50/50 "
              "mix and a fixed α = 0.1 — the paper uses a curriculum for α and regenerates the student's "
              "outputs once per epoch (batch on-policy) rather than every step.",
        values=route1_values({"divergence": "srkl_sg", "off_policy_divergence": "skl", "alpha": 0.1, "coef": 2.0},
                             rollout={"on_policy_fraction": 0.5, "off_policy_source": "teacher"},
                             gates={"reduction": "sequence_mean"}),
    ),
    Preset(
        name="akl",
        summary="Adaptive KL: forward KL on the teacher's head and reverse KL on its tail, weighted by the "
                "head/tail probability gaps (μ = 0.5), over the full vocabulary on the student's samples.",
        citation="Wu et al., 'Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language "
                 "Models', arXiv 2404.02657 (COLING 2025); code wutaiqiang/LLM_KD_AKL",
        formula="L = mean_t [g_head/(g_head+g_tail)·FKL_t + g_tail/(g_head+g_tail)·RKL_t],  head = smallest "
                "teacher-sorted prefix with mass ≤ μ,  g = Σ |π_T − sg π_S| over head / tail",
        notes="[INFER]: the paper distils on fixed responses; here the states are the student's own samples "
              "(rollout.on_policy_fraction=0 with off_policy_source=answer reproduces the paper's setting).",
        values=route1_values({"divergence": "akl", "mu": 0.5, "coef": 1.0}),
    ),
    Preset(
        name="tvd",
        summary="Total variation distance, ½ Σ_v |π_T − π_S|, over the full vocabulary (bounded per-token "
                "gradient), on a half-and-half mix of student and teacher samples.",
        citation="Wen et al., 'f-Divergence Minimization for Sequence-Level Knowledge Distillation' (f-DISTILL), "
                 "arXiv 2307.15190 (ACL 2023)",
        formula="L = mean_t ½ Σ_v |π_T(v|s_t) − π_S(v|s_t)|,  s_t from π_S or π_T (half each)",
        notes="The half-and-half sampling from both models is [MEMORY] (f-DISTILL's symmetric losses sample from "
              "both); rollout.on_policy_fraction=1 gives TVD on the student's states only.",
        values=route1_values({"divergence": "tvd", "coef": 1.0},
                             rollout={"on_policy_fraction": 0.5, "off_policy_source": "teacher"}),
    ),

    # Self-distillation: the teacher is the student shown a privileged context.
    Preset(
        name="opsd",
        summary="On-policy self-distillation: the frozen initial student, shown the example's privileged "
                "context (e.g. the solution), is the teacher; full-vocabulary reverse KL to it on the "
                "student's own samples.",
        citation="Zhao et al., 'Self-Distilled Reasoner: On-Policy Self-Distillation for Large Language Models' "
                 "(OPSD), arXiv 2601.18734 (code siyan-zhao/OPSD)",
        formula="L = mean_t KL(π_S(·|x, y_<t) ‖ sg π_S0(·|c, x, y_<t)),  c = privileged context",
        notes="The full-vocabulary reverse-KL default is [MEMORY]; the paper's generalized-JSD variant: "
              "route1.divergence=jsd. The built-in arith task supplies a teacher-only hint; for your data set "
              "data.context_field.",
        values=route1_values({"divergence": "rkl", "coef": 1.0}, teacher=SELF_TEACHER),
    ),
    Preset(
        name="sdft",
        summary="SDFT: the frozen base student shown an expert demonstration in context is the teacher; the "
                "sampled-token log-ratio to it is the advantage of tinker's importance-sampling loss, on the "
                "student's own samples (new skills with less forgetting than SFT).",
        citation="Shenfeld et al., 'Self-Distillation Enables Continual Learning' (SDFT), arXiv 2601.19897; "
                 "tinker-cookbook distillation/sdft.py",
        formula="A_t = log π_S0(y_t|c, x, y_<t) − log μ(y_t|x, y_<t);  L = −Σ_{b,t} (π_S(y_t)/μ(y_t)) · A_t,  "
                "c = demonstration",
        notes="Follows the tinker-cookbook recipe (static base weights as teacher, importance-sampling loss "
              "summed, reward from the sampler's log-probs); its lr 2e-5 and LoRA rank 128 are task-specific "
              "and left to the run. The demonstration comes from data.context_field (the arith task's hint).",
        values=route2_values(sampled_token(reward_logprobs="behaviour"), teacher=SELF_TEACHER,
                             gates={"reduction": "sum"}),
    ),
    Preset(
        name="sdpo",
        summary="SDPO: the live student conditioned on feedback (errors, a judge's text, a successful sibling) "
                "is the teacher; full-vocabulary reverse KL to it (stop-gradient) on the student's own samples.",
        citation="Hübotter et al., 'Reinforcement Learning via Self-Distillation' (SDPO), arXiv 2601.20802 (code "
                 "lasgroup/SDPO)",
        formula="L = mean_t KL(π_θ(·|x, y_<t) ‖ sg π_θ(·|x, f, y_<t)),  f = feedback in context",
        notes="The paper uses a top-K approximation for memory (support.kind=teacher_topk support.norm=tail "
              "teacher.access=topk) and can mix in GRPO (outcome.adv_tau with route 2); the full vocabulary "
              "here is exact. The feedback comes from data.context_field (the arith task's hint stands in).",
        values=route1_values({"divergence": "rkl", "coef": 1.0}, teacher={**SELF_TEACHER, "self_mode": "live"}),
    ),
)
