"""What other frameworks run, as configs of the same pipeline: verl's top-k forward KL and k3 estimator,
NeMo-RL's ``opd`` advantage with ICE-POP truncation, prime-rl's teacher_tau/adv_tau hybrid and slime's
A − λ·KL."""

from __future__ import annotations

from opd.config.presets.base import Preset, route1_values, route2_values, sampled_token

PRESETS: tuple[Preset, ...] = (
    Preset(
        name="verl-fkl-topk",
        summary="verl's forward_kl_topk as a supervised loss: forward KL restricted to the teacher's top-128 "
                "tokens with full-vocabulary probabilities (no renormalisation, no tail), log-probs floored at "
                "−10, the per-token value clamped to [0, 10].",
        citation="verl distillation losses (verl/trainer/distillation/losses.py compute_forward_kl_topk, "
                 "fsdp/losses.py; DistillationLossConfig topk=128, log_prob_min_clamp=-10, loss_max_clamp=10, "
                 "use_policy_gradient=False), https://github.com/verl-project/verl",
        formula="L = mean_t clip(Σ_{v∈TopK_T} π_T(v)·(max(log π_T(v), −10) − max(log π_S(v), −10)), 0, 10),  K = 128",
        notes="verl clamps the top-k FKL at 0 because the restricted sum can be negative (support.norm=none); "
              "with verl's default use_policy_gradient=True the same value would instead be a reward — verl "
              "itself recommends the supervised use for this loss. With support.norm=tail (verl's tail bucket) "
              "the −10 floor applies to the top-k entries only — the bucket log(1 − Σ_{TopK} π) keeps its exact "
              "mass — and clamp_low is not applied (the value is then a true KL ≥ 0), as in verl's tail mode. "
              "With a top-k-only teacher, opd floors the teacher's bucket at the resolution of 1 − Σ, "
              "log(K·eps) (≈ 1.5e-5 at K = 128 in fp32), where verl's floor is 1e-7.",
        values=route1_values({"divergence": "fkl", "coef": 1.0, "logprob_floor": -10.0, "clamp_low": 0.0,
                              "clamp_high": 10.0},
                             teacher={"access": "topk", "topk": 128},
                             support={"kind": "teacher_topk", "k": 128, "norm": "none"}),
    ),
    Preset(
        name="verl-k3",
        summary="verl's low_var_kl (k3) estimator as a supervised loss: π_T(y_t)/π_S(y_t) − 1 − log(π_T/π_S) on "
                "the sampled token, back-propagated through log π_S(y_t) and clamped to ±10; its expected "
                "gradient is the forward-KL gradient, not the reverse one.",
        citation="verl distillation losses (loss_mode=low_var_kl / k3 via core_algos.kl_penalty_forward, "
                 "use_policy_gradient=False, loss_max_clamp=10), https://github.com/verl-project/verl ; k3: "
                 "Schulman, http://joschu.net/blog/kl-approx.html ; gradient: Tang & Munos, arXiv 2506.09477",
        formula="δ_t = log π_T(y_t) − log π_S(y_t);  L = mean_t clip(e^δ_t − 1 − δ_t, −10, 10)",
        notes="verl also clamps δ to ±20 before the exponential; opd does not (it changes nothing unless "
              "|δ| > 20). verl's default runs k3 as a policy-gradient reward (use_policy_gradient=True); its "
              "documentation recommends k3 as a supervised loss, which this preset is.",
        values=route1_values({"divergence": "k3", "coef": 1.0, "clamp_low": -10.0, "clamp_high": 10.0},
                             teacher={"access": "sampled"}, support={}),
    ),
    Preset(
        name="nemo-rl-opd",
        summary="NeMo-RL's MOPD estimator (adv_estimator: opd): the sampled-token log-ratio as a REINFORCE "
                "advantage, weighted by the training/inference importance ratio, with ICE-POP truncation — "
                "tokens whose ratio leaves [0.2, 5] are dropped.",
        citation="NVIDIA NeMo-RL, nemo_rl/algorithms/advantage_estimator.py OPDAdvantageEstimator and "
                 "loss/loss_functions.py (truncated_importance_sampling_type=icepop, recipe "
                 "mopd-qwen3-1.7b: ratio_min 0.2, ratio 5.0), https://github.com/NVIDIA-NeMo/RL ; MOPD: Xiaomi "
                 "MiMo, arXiv 2601.02780",
        formula="A_t = sg[log π_T(y_t) − log π_S(y_t)],  w_t = sg[π_S(y_t)/μ(y_t)]·1[0.2 ≤ π_S/μ ≤ 5];  "
                "L = −mean_t w_t A_t log π_S(y_t)  (same gradient as −mean_t 1[band] ρ_t A_t)",
        notes="NeMo-RL's prev_logprobs (the training engine's log-probs before the update) are the current "
              "student's on the first pass over a batch; with rollout.updates_per_rollout > 1 opd recomputes "
              "them. Token-level loss (NeMo-RL's default LossType.TOKEN_LEVEL).",
        values=route2_values(sampled_token(is_correction="icepop", icepop_low=0.2, icepop_high=5.0),
                             gates={"reduction": "token_mean"}),
    ),
    Preset(
        name="prime-rl-hybrid",
        summary="prime-rl's teacher_tau/adv_tau hybrid: the verifier's group-centred reward advantage plus "
                "teacher_tau = 0.5 times the sampled-token log-ratio, DPPO's sign-conditioned trust-region mask "
                "(δ = 0.2, keyed by the reward advantage) and a kl_tau = 1e-3 mismatch penalty.",
        citation="prime-rl default_loss_fn (src/prime_rl/trainer/rl/loss.py, dppo_mask_low/high=0.2, "
                 "adv_tau=1, kl_tau=1e-3) and docs/on_policy_distillation.md (teacher_tau=0.5), "
                 "https://github.com/PrimeIntellect-ai/prime-rl ; DPPO: arXiv 2602.04879",
        formula="A_t = adv_tau·(R − mean_group R) + teacher_tau·sg[log π_T(y_t) − log π_S(y_t)];  "
                "keep_t = ¬DPPO(sign(R − mean R));  L = mean_t [−keep_t ρ_t A_t + kl_tau (log π_S − log μ)²]",
        notes="prime-rl's advantage is reward minus the group mean (no std: outcome.normalize_std=false) and its "
              "DPPO mask is keyed by that reward advantage before the teacher term is added, with A = 0 on the "
              "low band (route2.dppo_sign=outcome). [INFER]: 4 samples per prompt (rollouts_per_example is "
              "task-specific). Pure OPD in prime-rl is teacher_tau=1, adv_tau=0.",
        values=route2_values(sampled_token(is_correction="dppo", clip_low=0.2, clip_high=0.2, dppo_sign="outcome"),
                             rollout={"samples_per_prompt": 4}, regularization={"mismatch_coef": 1e-3},
                             outcome={"adv_tau": 1.0, "teacher_tau": 0.5, "normalize_std": False}),
    ),
    Preset(
        name="slime-opd",
        summary="slime's OPD: the sampled-token reverse-KL penalty subtracted from the GRPO advantage, "
                "Â_t = A_t − λ·(log π_S(y_t) − log π_T(y_t)) with λ = 1, under PPO clipping (ε = 0.2).",
        citation="THUDM slime, slime/backends/megatron_utils/loss.py apply_opd_kl_to_advantages "
                 "(--opd-kl-coef 1.0) and docs/en/advanced/on-policy-distillation.md, https://github.com/THUDM/slime",
        formula="Â_t = (R − mean_group R)/std_group R − λ·(log π_S(y_t) − log π_T(y_t)),  λ = 1;  "
                "L = −mean_t min(ρ_t Â_t, clip(ρ_t, 0.8, 1.2) Â_t)",
        notes="[INFER]: GRPO's std normalisation on, 4 samples per prompt and PPO ε = 0.2 (slime's defaults "
              "for its GRPO runs); slime's log π_S is the recomputed (training-engine) log-prob, the current "
              "student's on the first pass.",
        values=route2_values(sampled_token(is_correction="ppo_clip", clip_low=0.2, clip_high=0.2),
                             rollout={"samples_per_prompt": 4},
                             outcome={"adv_tau": 1.0, "teacher_tau": 1.0, "normalize_std": True}),
    ),
)
