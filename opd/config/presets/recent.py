"""Recent recipes. What other frameworks run, as configs of the same pipeline: verl's top-k forward KL and k3
estimator, NeMo-RL's ``opd`` advantage with ICE-POP truncation, prime-rl's teacher_tau/adv_tau hybrid and
slime's A − λ·KL. Methods published since mid-2026: de-biased f-divergence rewards (OPD+), a
teacher-reliability trust region (TrOPD), per-domain teachers with an outcome advantage (MOPD), stale
rollouts with the signal recomputed under the current student (AsyncOPD), near-future window credit
(Bridging / trajectory-aware OPD), a truncated rollout horizon (TOPD of arXiv 2605.31490) and a correct-
minus wrong-hint self-teacher contrast (RLCSD).

Each method published since mid-2026 was checked against the paper's abstract and, where it was found, its
method text; what the text does not pin is labelled **[INFER]** in the notes."""

from __future__ import annotations

import math

from opd.config.presets.base import SELF_TEACHER, Preset, route1_values, route2_values, sampled_token

PRESETS: tuple[Preset, ...] = (
    # What other frameworks run.
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

    # Methods published since mid-2026.
    Preset(
        name="opd-plus",
        summary="OPD+: the sampled-token policy gradient of an f-divergence D_f(π_T ‖ π_S) = E_{π_S}[f(π_T/π_S)] "
                "with the de-biased advantage −(f(u) − u·f'(u)) instead of the stop-gradient reward −f(u), which "
                "is biased for every f but the reverse KL; Jensen–Shannon f here.",
        citation="Zhao, Chen, Lin, Winata, Yao & Tang, 'OPD+: Rethinking the Advantage Design for On-Policy "
                 "Distillation', arXiv 2606.01039",
        formula="u_t = π_T(y_t)/π_S(y_t),  A_t = −(f(u_t) − u_t f'(u_t)) = ½ log((u_t + 1)/2)  (f = JS);  "
                "L = −mean_t ρ_t A_t",
        notes="From the paper: the f-divergence framing, that the stop-gradient reward is biased for general f, "
              "and a corrected advantage on sampled-token (not top-k) OPD. [INFER]: the corrected coefficient "
              "f(u) − u f'(u) is our derivation of the unbiased single-sample gradient (the paper's per-f "
              "expressions were not retrieved), and f = Jensen–Shannon (route2.f_divergence: rkl, fkl, hellinger, "
              "jsd); immediate credit and ρ = π_S/μ as in sampled-token OPD.",
        values=route2_values(sampled_token(reward="f_corrected", f_divergence="jsd")),
    ),
    Preset(
        name="tropd",
        summary="Trust Region OPD: the K1 reverse-KL policy gradient only on tokens the teacher would accept, "
                "decoding agreement min(π_T/π_S, 1) ≥ δ = 0.1; the outliers below it are masked out.",
        citation="Xing, Wang, Gao, Li & Tang, 'Trust Region On-Policy Distillation' (TrOPD), arXiv 2606.01249 "
                 "(project github.com/Xingrun-Xing2/TrOPD)",
        formula="m_t = 1[min(π_T(y_t)/π_S(y_t), 1) ≥ δ],  δ = 0.1;  A_t = log π_T(y_t) − log π_S(y_t);  "
                "L = −Σ_t m_t ρ_t A_t / N",
        notes="From the paper: OPD with the K1 estimator only in a teacher-verifiable trust region set by "
              "teacher–student decoding agreement; outliers handled by clipping, masking or a top-k forward-KL "
              "estimator; off-policy guidance from teacher prefixes. This preset is the masking variant. "
              "[INFER]: the fixed δ = 0.1 (the paper's threshold is adaptive). Not reproduced: the forward-KL "
              "estimator on the outliers and the teacher-prefix guidance (opd has no route-1 term restricted "
              "to the outliers nor teacher-prefix continuation).",
        values=route2_values(gates={"trust_min": 0.1}),
    ),
    Preset(
        name="tropd-clip",
        summary="Trust Region OPD, clipping variant: the K1 policy gradient on every token, with the outliers' "
                "log-ratio clipped at the trust-region edge log δ = log 0.1, so a token the teacher rejects "
                "pushes with a bounded, not an unbounded, weight.",
        citation="Xing, Wang, Gao, Li & Tang, 'Trust Region On-Policy Distillation' (TrOPD), arXiv 2606.01249 "
                 "(project github.com/Xingrun-Xing2/TrOPD)",
        formula="A_t = max(log π_T(y_t) − log π_S(y_t), log δ),  δ = 0.1;  L = −mean_t ρ_t A_t",
        notes="From the paper: outliers outside the decoding-agreement trust region are handled by gradient "
              "clipping, masking (the `tropd` preset) or a top-k forward-KL estimator. [INFER]: clipping is "
              "read as a floor on the outlier's log-ratio at the trust-region edge log δ (route2.reward=clipped, "
              "route2.reward_low = log 0.1), which bounds its per-token gradient weight; δ = 0.1 as in `tropd`.",
        values=route2_values(sampled_token(reward="clipped", reward_low=math.log(0.1))),
    ),
    Preset(
        name="mopd",
        summary="Multi-teacher OPD: each prompt is scored by its domain's RL teacher (teacher.routes keyed by "
                "data.route_field); the sampled-token log-ratio to that teacher plus the verifier's "
                "group-normalised outcome advantage, with ICE-POP truncated importance weights and a "
                "per-sequence mean.",
        citation="Ma et al., 'MOPD: Multi-Teacher On-Policy Distillation for Capability Integration in LLM "
                 "Post-Training', arXiv 2606.30406 (MiMo-V2-Flash, arXiv 2601.02780)",
        formula="A_t = sg[log π_{T_d(x)}(y_t) − log π_S(y_t)] + α·(R − mean_g R)/std_g R,  α = 1;  "
                "w_t = 1[0.2 ≤ π_S/μ ≤ 5];  L = −mean_seq (1/|y|) Σ_t w_t ρ_t A_t",
        notes="From the paper: per-domain RL teachers distilled into one student on its own rollouts with "
              "dense token-level teacher rewards. [MEMORY]: the outcome-advantage mix and the truncated "
              "importance weight (from the MiMo-V2-Flash report). [INFER]: α = 1, the ICE-POP band [0.2, 5] "
              "(NeMo-RL's MOPD recipe), 4 samples per prompt. The routing is opd's routed teachers: set "
              "data.route_field and teacher.routes={DOMAIN: TEACHER, ...}; prompts without a route (and the "
              "demo, which has one domain) use teacher.model.",
        values=route2_values(sampled_token(is_correction="icepop", icepop_low=0.2, icepop_high=5.0),
                             rollout={"samples_per_prompt": 4}, gates={"reduction": "sequence_mean"},
                             outcome={"adv_tau": 1.0, "teacher_tau": 1.0, "normalize_std": True}),
    ),
    Preset(
        name="async-opd",
        summary="AsyncOPD: rollouts sampled one step stale in a background thread; the sampled-token reverse-KL "
                "reward is recomputed under the current student at learner time (not taken from the stale "
                "sampler), with the teacher's scores cached and plain per-token importance ratios.",
        citation="Kang, Galim et al., 'AsyncOPD: How Stale Can On-Policy Distillation Be?', arXiv 2606.24143 "
                 "(code github.com/furiosa-ai/async-opd)",
        formula="y ~ μ = π_S one update old;  A_t = log π_T(y_t)[cache] − log π_S(y_t)[current];  "
                "L = −mean_t (π_S(y_t)/μ(y_t))·A_t",
        notes="From the paper: asynchronous rollouts (stale-policy data), finite teacher-score caches, and, for "
              "the vulnerable reverse KL, recomputing the signal under the current student at learner time, "
              "which RL stabilisers (PPO clipping, decoupled PPO, M2PO) did not beat. [INFER]: one step of lag "
              "(rollout.overlap), the sampled-token estimator, plain token-level ratios π_S/μ "
              "(route2.is_correction=ratio) for the lag, and teacher.cache=memory as the score cache. Not "
              "reproduced: the paper's multi-sample Monte Carlo estimator and its sparse top-k cache variant "
              "(route 1 on support.kind=teacher_topk is the closest; opd warns that it has no lag correction).",
        values=route2_values(sampled_token(reward_logprobs="current", is_correction="ratio"),
                             rollout={"overlap": True}, teacher={"cache": "memory"}),
    ),
    Preset(
        name="bridging",
        summary="Bridging / trajectory-aware OPD: each token is credited with the log-ratio rewards of a "
                "near-future window of W = 4 tokens instead of its own alone, so guidance reaches the short "
                "drift that follows a real divergence.",
        citation="Jiang et al., 'Bridging Reasoning Trajectories in On-Policy Distillation via Near-Future "
                 "Guidance' (TOPD, trajectory-aware OPD), arXiv 2606.00305",
        formula="A_t = Σ_{k=0}^{W−1} γ^k r_{t+k},  r = log π_T − log π_S,  W = 4, γ = 1;  L = −mean_t ρ_t A_t",
        notes="From the paper: near-future trajectory information identifies real divergent states and "
              "distributes guidance over several future tokens; suppressing non-divergent high-loss tokens "
              "also helps. [INFER]: the truncated-return form, W = 4 and γ = 1 (route2.window, route2.gamma). "
              "Not reproduced: the paper's suppression of non-divergent high-loss tokens. The paper also calls "
              "its method TOPD; opd's `topd` preset is the truncated-rollout TOPD of arXiv 2605.31490.",
        values=route2_values(sampled_token(credit="window", window=4, gamma=1.0)),
    ),
    Preset(
        name="topd",
        summary="Truncated OPD: rollouts generated and distilled only up to a short horizon (the first 4 "
                "completion tokens here), where the teacher's feedback is reliable; the prefixes are not "
                "treated as truncated.",
        citation="Zhang et al., 'Are Full Rollouts Necessary for On-Policy Distillation?' (POPD / TOPD), arXiv "
                 "2605.31490",
        formula="y_{1:H} ~ π_S,  H = 4;  A_t = log π_T(y_t) − log π_S(y_t), t ≤ H;  L = −mean_{t≤H} ρ_t A_t",
        notes="From the paper: TOPD distils permanently on truncated rollouts and matches OPD with 10 % of the "
              "horizon; POPD grows the horizon during training. [INFER]: H = 4 tokens (half of the demo's "
              "8-token horizon; set rollout.prefix_tokens to ~10 % of your max_new_tokens) and sampled-token "
              "OPD as the loss. POPD's growing horizon is not a preset (no schedule for rollout.prefix_tokens).",
        values=route2_values(rollout={"prefix_tokens": 4}),
    ),
    Preset(
        name="rlcsd",
        summary="RLCSD: GRPO's outcome advantage plus a contrastive self-distillation reward — the frozen initial "
                "student read with the correct hint minus the same model read with a wrong hint (another "
                "prompt's), which cancels the style shift any hint induces and keeps the task-bearing signal.",
        citation="Pan et al., 'RLCSD: Reinforcement Learning with Contrastive On-Policy Self-Distillation', arXiv "
                 "2606.11709",
        formula="A_t = [log π_S0(y_t|c⁺, x, y_<t) − log π_S0(y_t|c⁻, x, y_<t)] + (R − mean_g R)/std_g R;  "
                "L = −mean_t ρ_t A_t,  c⁺ = correct hint, c⁻ = wrong hint",
        notes="From the paper: the OPSD gap under a correct hint contrasted with the gap under a wrong hint "
              "(the student term cancels), inside RL with verifiable rewards, beating GRPO and OPSD. [INFER]: the "
              "contrast as the sampled-token reward added to the group-normalised outcome advantage (weights 1 "
              "and 1), the wrong hint as the context of another prompt in the batch (opd/teachers/wrong_hint.py), "
              "the frozen initial student as both hinted models (regularization.reference=initial holds the "
              "wrong-hint copy), 4 samples per prompt.",
        values=route2_values(sampled_token(reward="contrastive"), rollout={"samples_per_prompt": 4},
                             teacher=SELF_TEACHER, regularization={"reference": "initial"},
                             outcome={"adv_tau": 1.0, "teacher_tau": 1.0, "normalize_std": True}),
    ),
)
