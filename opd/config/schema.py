"""The configuration schema: one section per design variable of the survey, in pipeline order.

A config file reads as the method's formula (docs/methods.md §3.1):

    rollout (state compatibility) → teacher (feedback) → support → route1 (distributional loss)
    → route2 (log-ratio reward + temporal credit) → routing → gates → regularization → outcome
    → train → eval → monitor

Every field carries its documentation in ``metadata["doc"]`` (shown by ``opd config-help``),
optional ``choices`` and numeric bounds; :mod:`opd.config.load` validates against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opd.math.credit import CREDIT_KINDS
from opd.math.f_rewards import F_DIVERGENCE_NAMES


def opt(default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
        low: float | None = None, high: float | None = None,
        low_open: bool = False, high_open: bool = False) -> Any:
    """A documented config field with optional choices / numeric bounds."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_ACTIONS: tuple[str, ...] = ("off", "warn", "stop", "apply")


@dataclass
class StudentConfig:
    """The model being trained."""
    model: str = opt("builtin:arith/student",
                     "student model: a local folder, a hub id, or builtin:<task>/<name> for a shipped checkpoint")
    tokenizer: str | None = opt(None, "tokenizer folder or hub id (default: the model's)")
    dtype: str = opt("float32", "parameter dtype", choices=("float32", "bfloat16", "float16"))
    lora_rank: int = opt(0, "LoRA rank r (0 = off: full fine-tuning). > 0 trains low-rank adapters through peft "
                         "(opd/lora.py): W x + (lora_alpha / r)·B A x, base weights frozen; checkpoints hold the "
                         "adapter, final/ and `opd export` merged weights; a frozen self-teacher is the base with "
                         "the adapter switched off (no second copy)", low=0)
    lora_alpha: float = opt(32.0, "LoRA α: the adapter's update is scaled by lora_alpha / lora_rank", low=0.0,
                            low_open=True)
    lora_dropout: float = opt(0.0, "LoRA dropout on the adapter's input (training only)", low=0.0, high=1.0,
                              high_open=True)
    lora_target_modules: list[str] = opt(["all-linear"], "modules that get an adapter (peft names: a module is "
                                         "adapted when its name equals or ends with an entry, e.g. [q_proj, v_proj]); "
                                         "all-linear = every linear layer except the output head")


@dataclass
class DataConfig:
    """Where prompts come from: a built-in task, a JSONL file or a Hugging Face dataset."""
    task: str = opt("arith", "built-in task name (arith, or arith_chat: multi-turn conversations with tool turns; "
                    "the case studies fork, route, modes, long, reach of opd/tasks/cases.py, each with "
                    "builtin:<task>/teacher and builtin:<task>/student) or 'jsonl' / 'hf' for user data",
                    choices=("arith", "arith_chat", "fork", "route", "modes", "long", "reach", "jsonl", "hf"))
    path: str | None = opt(None, "JSONL file (task=jsonl) or dataset id / local dataset folder (task=hf)")
    split: str = opt("train", "dataset split used for training prompts (task=hf)")
    eval_path: str | None = opt(None, "held-out JSONL file / dataset for evaluation (default: hold out eval.size prompts)")
    eval_split: str | None = opt(None, "dataset split for evaluation (task=hf); default: hold out from `split`")
    prompt_field: str = opt("prompt", "field holding the prompt text")
    answer_field: str | None = opt("answer", "field holding the reference answer (optional; verifier and SFT baselines)")
    context_field: str | None = opt(None, "field holding teacher-only context (privileged information the student never sees)")
    route_field: str | None = opt(None, "field whose value selects the teacher in teacher.routes (multi-teacher)")
    format: str = opt("prompt", "record format (task=jsonl/hf): prompt — one prompt text per record (prompt_field); "
                      "chat — a conversation per record (messages_field: a list of {role, content}), rendered with "
                      "the student's chat template; the student writes the assistant turns (docs/data_formats.md)",
                      choices=("prompt", "chat"))
    messages_field: str = opt("messages", "format=chat: the field holding the list of {role, content} messages "
                              "(roles system, user, assistant, tool)")
    train_turns: str = opt("last", "format=chat: the assistant turns the student writes and is trained on — the last "
                           "of each conversation, or all (each given the conversation before it); system, user and "
                           "tool turns and the template's own tokens are never trained on", choices=("last", "all"))
    eval_seed: int = opt(0, "seed of the held-out split; fixed across run seeds so that runs are compared on the same "
                         "prompts (the run's `seed` drives the training stream and sampling)")
    verifier: str = opt("auto", "how completions are scored: auto (the task's own), exact_match, contains, none, "
                        "or python:module:function taking (example, completion) -> float; task=jsonl/hf only (a "
                        "built-in task uses its own, and another value is refused)")
    digits: int = opt(3, "arith: operand digits", low=1, high=9)
    reverse_operands: bool = opt(True, "arith: write operands least-significant digit first (see opd/tasks/arith.py)")
    length: int | None = opt(None, "case tasks (fork, route, modes, long): input digits, so the answer has about as "
                             "many tokens (default 6, range 2-12); rollout.max_new_tokens "
                             "must cover the answer and its EOS", low=2, high=12)


@dataclass
class RolloutConfig:
    """State compatibility: on which states the student is taught (survey variable 1)."""
    prompts_per_step: int = opt(128, "prompts per optimizer step (global, across processes)", low=1)
    samples_per_prompt: int = opt(1, "G: completions sampled per prompt (group baselines need G ≥ 2)", low=1)
    max_new_tokens: int = opt(8, "maximum completion length", low=1)
    temperature: float = opt(1.0, "sampling temperature of the behaviour policy μ", low=0.0, low_open=True)
    top_p: float = opt(1.0, "nucleus sampling mass (Fu et al. 2603.25562 recommend < 1)", low=0.0, high=1.0, low_open=True)
    top_k: int = opt(0, "top-k sampling (0 = off)", low=0)
    truncated: str = opt("keep", "rollouts that hit max_new_tokens without EOS: keep their tokens in the loss, or mask them out",
                         choices=("keep", "mask"))
    on_policy_fraction: float = opt(1.0, "GKD λ: fraction of prompts whose completions the student samples; the rest "
                                    "use `off_policy_source` (arXiv 2306.13649)", low=0.0, high=1.0)
    off_policy_source: str = opt("teacher", "completions for the off-policy fraction: teacher samples or dataset answers",
                                 choices=("teacher", "answer"))
    teacher_mix: float = opt(0.0, "MiniLLM α: sample each token from α·π_T + (1−α)·π_S and weight by π_S/mix "
                             "(arXiv 2306.08543; default there 0.2)", low=0.0, high=1.0)
    prefix_tokens: int | None = opt(None, "partial rollouts: generate and train on only the first n completion tokens "
                                    "(Prefix-OPD); such prefixes are not treated as truncated", low=1)
    updates_per_rollout: int = opt(1, "optimizer passes over each rollout batch (> 1 makes samples stale: use route2.is_correction)", low=1)
    overlap: bool = opt(False, "asynchronous rollouts: sample step k+1's rollouts (and score them) in a background "
                        "thread while step k trains — one step of policy lag, corrected by route 2's importance "
                        "ratios (route2.is_correction); the sampler holds its own copy of the weights "
                        "(opd/overlap.py)")
    engine: str = opt("hf", "who samples the student's rollouts: hf (opd's own KV-cached decode loop over the live "
                      "student; opd/rollout/engine.py) or vllm (a vLLM engine in this process, or the vLLM server at "
                      "rollout.server; the student's weights are pushed to it every rollout.sync_every steps; "
                      "docs/serving.md)", choices=("hf", "vllm"))
    server: str | None = opt(None, "engine=vllm: URL of a vLLM server (`vllm serve STUDENT --logprobs-mode "
                             "processed_logprobs`, started with VLLM_SERVER_DEV_MODE=1 so that it accepts weight "
                             "reloads) that samples the rollouts; null = a vLLM engine inside the training process")
    sync_every: int = opt(1, "engine=vllm: push the student's weights to the engine every k optimizer steps; with "
                          "k > 1 rollouts come from a policy up to k−1 updates old, which route2.is_correction "
                          "corrects through the recorded behaviour log-probs log μ", low=1)
    sync_dir: str | None = opt(None, "engine=vllm with rollout.server: a folder both this process and the server can "
                               "read, where the weights are written for the server to reload (default: a temporary "
                               "folder on this machine)")
    vllm_memory: float = opt(0.1, "engine=vllm in-process: vLLM's gpu_memory_utilization, the share of GPU memory "
                             "(of RAM on CPU) it reserves for weights and KV cache", low=0.0, high=1.0, low_open=True)
    vllm_max_model_len: int | None = opt(None, "engine=vllm in-process: longest prompt + completion the engine "
                                         "accepts (null = the model's own limit)", low=1)
    server_timeout: float = opt(120.0, "seconds one request to the rollout server may take before it is retried",
                                low=0.0, low_open=True)
    server_retries: int = opt(3, "retries of a failed request to the rollout server (exponential back-off) before "
                              "the run stops with a resumable checkpoint", low=0)


@dataclass
class TeacherConfig:
    """Feedback: who scores the student's tokens, and what it returns."""
    model: str = opt("builtin:arith/teacher", "teacher model (folder / hub id / builtin:...), or 'self' for the student itself")
    self_mode: str = opt("frozen", "self-teacher weights: a frozen copy of the initial student, or the live student",
                         choices=("frozen", "live"))
    use_context: bool = opt(False, "prepend the example's teacher-only context (data.context_field) to the teacher's prompt")
    context_template: str = opt("{context}", "how the context is rendered before the prompt ({context} is replaced; add a separator "
                               "your tokenizer knows, e.g. '{context}\\n')")
    temperature: float = opt(1.0, "teacher temperature applied to its logits before log-softmax", low=0.0, low_open=True)
    access: str = opt("auto", "what the teacher returns: sampled-token log-probs, top-k log-probs, full logits, "
                      "or auto (the least the objective needs)", choices=("auto", "sampled", "topk", "full"))
    topk: int = opt(32, "k for access=topk (and for diagnostics)", low=1)
    dtype: str = opt("float32", "teacher dtype", choices=("float32", "bfloat16", "float16"))
    routes: dict[str, str] = opt({}, "multi-teacher routing: {value of data.route_field: teacher model}; "
                                 "prompts whose value is missing use `model`")
    check_tokenizer: bool = opt(True, "stop before training when teacher and student tokenizers disagree")
    server: str | None = opt(None, "URL of a teacher server that scores the rollouts instead of an in-process model "
                             "(teacher.protocol says which API; teacher.routes values may be URLs too; "
                             "docs/serving.md)")
    protocol: str = opt("opd", "API of teacher servers: opd (`opd serve-teacher MODEL`: sampled-token, top-k and "
                        "caller-chosen-id log-probs, temperature applied by the server) or vllm (vLLM's "
                        "OpenAI-compatible /v1/completions with prompt_logprobs; k up to the server's "
                        "--max-logprobs)", choices=("opd", "vllm"))
    server_dtype: str = opt("float32", "protocol=opd: dtype of the log-probs (payload=logprobs) or hidden states "
                            "(payload=hidden; bfloat16 only there) the server sends back (ids are int32)",
                            choices=("float32", "float16", "bfloat16"))
    payload: str = opt("logprobs", "protocol=opd: what the server sends per token: logprobs (sampled / top-k / "
                       "chosen-id log-probs; full distribution only for V <= 8192) or hidden (the teacher's final hidden "
                       "states, H values; the trainer holds the teacher's head and computes every log-prob, any "
                       "support, full vocabulary included: docs/serving.md)", choices=("logprobs", "hidden"))
    server_timeout: float = opt(120.0, "seconds one request to a teacher server may take before it is retried",
                                low=0.0, low_open=True)
    server_retries: int = opt(3, "retries of a failed request to a teacher server (exponential back-off) before the "
                              "run stops with a resumable checkpoint", low=0)
    tokenizer: str = opt("same", "same: the teacher reads the student's token ids, so the tokenizers must agree "
                         "(checked before training); own: the teacher keeps its own tokenizer — the student's text is "
                         "re-tokenized for it, the two tokenizations are aligned by character offsets and its "
                         "log-probs merged onto the student's tokens (cross-tokenizer OPD; docs/data_formats.md)",
                         choices=("same", "own"))
    system_prompt: str | None = opt(None, "a teacher-only system prompt: every example's teacher-only context, which "
                                    "the student never sees (data.format=chat: a system message in the teacher's "
                                    "rendering; plain prompts: rendered with context_template). A row's "
                                    "data.context_field value takes precedence. Needs use_context=true")
    cache: str = opt("none", "reuse the teacher's signal for sequences it has already scored (same prompt and "
                     "completion ids; opd/teacher_cache.py): none, memory (this run) or disk (teacher.cache_dir, "
                     "reused across runs: Lightning OPD's offline teacher)", choices=("none", "memory", "disk"))
    cache_dir: str | None = opt(None, "folder of the disk cache (teacher.cache=disk); it records the teacher and "
                                "refuses another one")
    store_dtype: str = opt("float16", "dtype of cached top-k log-probs, logits and hidden states (sampled-token "
                           "log-probs stay float32; float32 makes hits exact)",
                           choices=("float32", "bfloat16", "float16"))


@dataclass
class SupportConfig:
    """Support construction: over which tokens the teacher signal is defined (route 1)."""
    kind: str = opt("full", "support of the distributional loss (full, student_topk and union need the teacher's full "
                    "logits; student_topk also works with teacher.server + teacher.protocol=opd, which scores the "
                    "student's top-k ids: docs/serving.md)", choices=(
        "full", "teacher_topk", "student_topk", "union", "sampled", "teacher_topk_sampled"))
    k: int = opt(32, "top-k size of the support", low=1)
    norm: str = opt("renorm", "renormalise both distributions on the support, or keep a tail bucket for the rest",
                    choices=("renorm", "tail", "none"))
    student_temperature: float = opt(1.0, "student temperature inside the loss", low=0.0, low_open=True)


@dataclass
class Route1Config:
    """Route 1: a direct distributional loss at every visited state."""
    divergence: str = opt("rkl", "per-token divergence D(π_T ‖ π_S) on the support (none = route 1 off)",
                          choices=("none", "fkl", "rkl", "jsd", "skl", "srkl", "srkl_sg", "tvd", "akl", "k3"))
    coef: float = opt(1.0, "weight of the route-1 term", low=0.0)
    beta: float = opt(0.5, "generalized JSD β (0 = forward KL, 1 = reverse KL; GKD convention)", low=0.0, high=1.0)
    alpha: float = opt(0.1, "skew KL / skew reverse KL α (DistiLLM)", low=0.0, high=1.0)
    mu: float = opt(0.5, "AKL head mass threshold μ (Wu et al. 2404.02657)", low=0.0, high=1.0)
    uld_coef: float = opt(1.0, "teacher.tokenizer=own: weight of the ULD term on the teacher tokens no student token "
                          "maps to (Boizard et al. 2402.12030; the mapped tokens go through the divergence above; "
                          "[INFER] weight)", low=0.0)
    chunk_size: int = opt(0, "memory-efficient path: tokens per chunk (0 = auto: chunked only when the vocabulary is large)", low=0)
    off_policy_divergence: str | None = opt(
        None, "divergence on the off-policy rows (teacher samples / dataset answers; rollout.on_policy_fraction < 1); "
        "null = route1.divergence on every row. DistiLLM-2 (arXiv 2503.07067): skl on teacher outputs, srkl_sg "
        "(srkl with α·π_S detached in the mixture, as its released trainer) on the student's", choices=("fkl", "rkl", "jsd", "skl", "srkl", "srkl_sg", "tvd", "akl", "k3"))
    fkl_coef: float = opt(0.0, "add c·1[H_T > fkl_entropy_min]·FKL on the same support to the divergence, H_T the "
                          "teacher's entropy there (EOPD arXiv 2603.07079: forward KL where the teacher is uncertain; "
                          "0 = off)", low=0.0)
    fkl_entropy_min: float = opt(0.0, "entropy threshold τ (nats) of the added forward-KL term (0 with fkl_coef > 0 "
                                 "adds it wherever the teacher is not certain)", low=0.0)
    logprob_floor: float | None = opt(None, "clamp student and teacher log-probs on the support to ≥ this before the "
                                      "divergence (verl log_prob_min_clamp = -10; the clamp stops the gradient)")
    clamp_low: float | None = opt(None, "clamp the per-token divergence from below (verl clamps top-k FKL at 0; "
                                  "not applied with a tail bucket, support.norm=tail, where the value is a true KL)")
    clamp_high: float | None = opt(None, "clamp the per-token divergence from above (verl loss_max_clamp = 10)")


@dataclass
class Route2Config:
    """Route 2: policy-gradient-style update from the per-token log-ratio reward."""
    coef: float = opt(0.0, "weight of the route-2 term (0 = off)", low=0.0)
    reward: str = opt("log_ratio", "per-token reward r_t (f_corrected: OPD+'s de-biased f-divergence reward "
                      "−(f(u) − u f'(u)), u = π_T(y_t)/π_S(y_t), f = route2.f_divergence; arXiv 2606.01039. "
                      "contrastive: RLCSD's log π(y_t|correct hint) − log π(y_t|wrong hint), the teacher read with "
                      "the example's context and regularization.reference with another prompt's; arXiv 2606.11709)",
                      choices=("log_ratio", "clipped", "box_cox", "extrapolated", "constant", "entropy_rank",
                               "f_corrected", "contrastive"))
    f_divergence: str = opt("rkl", "reward=f_corrected: the f of D_f(π_T ‖ π_S) = E_{π_S}[f(π_T/π_S)] "
                            "(opd/math/f_rewards.py; rkl gives log-ratio − 1)", choices=F_DIVERGENCE_NAMES)
    reward_logprobs: str = opt("current", "student log-probs in the log-ratio reward: the current student's (recomputed "
                               "in the loss's forward pass) or the sampler's μ (behaviour; tinker builds r_t = log π_T − "
                               "log μ from the sampling client's log-probs). They agree when μ = π_S (one update per "
                               "rollout batch, temperature 1, no top-p/top-k)", choices=("current", "behaviour"))
    constant_reward: float = opt(-1.0, "teacher-free rewards (arXiv 2608.31046): reward=constant is r_t = c (a placebo "
                                 "baseline); reward=entropy_rank is OPSA's r_t = c·(1 + Ĥ_t)/2, Ĥ_t the student "
                                 "entropy min–max ranked over the trained tokens")
    reward_low: float | None = opt(None, "clipped reward: lower bound")
    reward_high: float | None = opt(None, "clipped reward: upper bound")
    box_cox_alpha: float = opt(0.5, "PowerOPD Box–Cox α (> 0 bounds the reward below by −1/α)", low=0.0)
    extrapolation_lambda: float = opt(1.0, "G-OPD λ (1 = plain OPD, > 1 = ExOPD); needs regularization.reference", low=0.0)
    credit: str = opt("immediate", "temporal credit estimator (window: Σ_{k<route2.window} γ^k r_{t+k}, the "
                      "near-future window of arXiv 2606.00305)", choices=CREDIT_KINDS)
    window: int = opt(4, "credit=window: tokens W of the near-future window (1 = immediate)", low=1)
    gamma: float = opt(1.0, "discount γ (discounted, gae, window)", low=0.0, high=1.0)
    lam: float = opt(0.95, "GAE λ", low=0.0, high=1.0)
    baseline: str = opt("none", "baseline subtracted from the credit", choices=(
        "none", "batch_mean", "group_mean", "leave_one_out", "value"))
    value: str = opt("closed_form", "value estimate for gae / baseline=value: closed_form V = −RKL_t (vOPD), "
                     "zero, or decomposed V = −RKL_t + γ·U with a learned head U",
                     choices=("closed_form", "zero", "decomposed"))
    value_coef: float = opt(0.5, "weight of the value-head regression loss (value=decomposed)", low=0.0)
    off_policy_rows: bool = opt(False, "apply route 2 also to the off-policy rows (dataset answers / teacher samples) "
                                "with ρ = 1, as offline OPD on fixed data does (Lightning OPD arXiv 2604.13010)")
    future_only: bool = opt(False, "credit from t+1 on (MiniLLM's long-term term); pair with a route-1 term that "
                            "covers the immediate step (MiniLLM single-step decomposition)")
    length_normalize: bool = opt(False, "MiniLLM length normalisation of the return (mean of remaining rewards)")
    whiten: bool = opt(False, "whiten advantages over the batch's valid tokens")
    adv_clip: float | None = opt(None, "clip advantages to ±adv_clip (rllm uses 5)", low=0.0, low_open=True)
    is_correction: str = opt("ratio", "importance correction for stale samples: ratio (plain IS), ppo_clip, dppo "
                             "(sign-conditioned trust-region mask), icepop (drop tokens whose ratio leaves "
                             "[icepop_low, icepop_high]), none (on-policy surrogate)",
                             choices=("none", "ratio", "ppo_clip", "dppo", "icepop"))
    clip_low: float = opt(0.2, "PPO clip ε_low / DPPO δ_low", low=0.0)
    clip_high: float = opt(0.2, "PPO clip ε_high / DPPO δ_high", low=0.0)
    ratio_cap: float | None = opt(None, "truncate importance ratios at this value (TIS)", low=0.0, low_open=True)
    icepop_low: float = opt(0.2, "is_correction=icepop: lowest kept ratio π_S/μ (NeMo-RL MOPD recipe: 0.2)", low=0.0)
    icepop_high: float = opt(5.0, "is_correction=icepop: highest kept ratio π_S/μ (NeMo-RL MOPD recipe: 5)", low=0.0,
                             low_open=True)
    dppo_sign: str = opt("advantage", "is_correction=dppo: whose sign picks the band — the final advantage (A = 0 "
                         "kept), or the outcome advantage alone with A ≤ 0 on the low band (prime-rl masks before "
                         "adding the teacher term)", choices=("advantage", "outcome"))


@dataclass
class RoutingConfig:
    """Vocabulary routing: where freed probability mass goes when a sampled token is suppressed."""
    kind: str = opt("softmax", "softmax (student prior, plain PG) or cr_opd (counterfactual routing, [INFER])",
                    choices=("softmax", "cr_opd"))
    student_k: int | None = opt(8, "CR-OPD K′: an alternative is student-reachable if in the student's top-K′", low=1)
    tau_s: float = opt(0.0, "CR-OPD τ_S: ...or if π_S(v) ≥ τ_S", low=0.0, high=1.0)
    tau_t: float = opt(0.0, "CR-OPD τ_T: teacher support threshold π_T(v) ≥ τ_T", low=0.0, high=1.0)
    kappa: float = opt(1.0, "CR-OPD κ: ρ ∝ π_T^κ π_S^(1−κ)", low=0.0, high=1.0)
    eta: float = opt(1.0, "CR-OPD η_r: mix of routed target and student prior (0 = plain PG)", low=0.0, high=1.0)
    tau_a: float = opt(0.0, "CR-OPD τ_A: route only tokens with A_t < −τ_A", low=0.0)
    reach_p: float | None = opt(None, "CR-OPD [INFER] option: ...or if v is in the student's top-p nucleus (the smallest set "
                                "of its most probable tokens with mass >= reach_p; null = off). With student_k, tau_s "
                                "and reach_p all off every token is reachable", low=0.0, high=1.0, low_open=True)
    temperature: float = opt(1.0, "CR-OPD [INFER] option T_r: ρ ∝ (π_T^κ π_S^(1−κ))^(1/T_r) (< 1 sharpens the target "
                             "towards its best candidate, > 1 flattens it)", low=0.0, low_open=True)
    mass: str = opt("unit", "CR-OPD [INFER] option: how much mass a routed token moves, gradient c·(e_y − ρ̃): unit "
                    "(c = −A, shipped), matched (c = −A(1−π_S(y))/(1−(1−η)π_S(y)): the sampled token is pushed "
                    "as much as by plain PG, only the destination changes) or excess (route-1 style: the target "
                    "q = π_S + δ(ρ̃ − e_y) moves the excess δ = π_S(y)(1 − e^A) of the sampled token, c = δ); "
                    "opd/math/routing_options.py", choices=("unit", "matched", "excess"))


@dataclass
class GatesConfig:
    """Gates and weights: which tokens count, by how much, and how per-token losses are reduced."""
    mask_special_tokens: bool = opt(False, "drop special tokens other than EOS from the loss (Fu et al.)")
    entropy_gate: str = opt("none", "TIP token gate ([INFER] form, arXiv 2604.14084)",
                            choices=("none", "q1", "q3", "q1_or_q3"))
    keep_fraction: float = opt(0.5, "TIP: fraction of tokens kept by the entropy quantile", low=0.0, high=1.0, low_open=True)
    entropy_low: float | None = opt(None, "TIP Q3: low-entropy threshold (default: the batch median)")
    divergence_high: float | None = opt(None, "TIP Q3: high-divergence threshold (default: the batch median)")
    coverage_gate: bool = opt(False, "keep only tokens whose sample is in the teacher's top-k")
    trust_min: float | None = opt(None, "TrOPD trust region (arXiv 2606.01249): keep only tokens whose decoding "
                                  "agreement min(π_T(y_t)/π_S(y_t), 1) is at least this (null = off)",
                                  low=0.0, high=1.0)
    position: str = opt("uniform", "position weights", choices=("uniform", "linear_decay", "prefix", "drift",
                                                               "drift_share"))
    prefix_fraction: float = opt(0.3, "position=prefix: keep the first fraction of each completion", low=0.0, high=1.0, low_open=True)
    decay_to: float = opt(0.0, "position=linear_decay: weight of the last token", low=0.0, high=1.0)
    drift_beta: float = opt(1.0, "position=drift: IW-OPD β in exp(−β Σ_{t'<t} d_t') ([INFER])", low=0.0)
    drift_gamma: float = opt(0.5, "position=drift_share: IW-OPD w_t = 1 + γ(1 − Σ_{t'<t}|r_t'| / Σ|r|) (TRL IWOPDTrainer "
                             "iw_opd_gamma; arXiv 2606.22600)", low=0.0)
    logprob_gate: bool = opt(False, "keep only the tokens with the lowest student log-prob log π_S(y_t) in the batch "
                             "(OPSA arXiv 2608.31046)")
    logprob_fraction: float = opt(0.2, "logprob_gate: fraction of the batch's tokens kept (floor, at least one)",
                                  low=0.0, high=1.0, low_open=True)
    reduction: str = opt("token_mean", "how per-token losses become one scalar (sum: no normaliser, as tinker's losses)",
                         choices=("token_mean", "sequence_mean", "constant", "sum"))


@dataclass
class RegularizationConfig:
    """Regularization: what keeps the student sane."""
    reference: str | None = opt("initial", "reference policy for the KL term and G-OPD: 'initial' (a frozen copy "
                                "of the starting student), a model path, or null (none: ref_kl_coef and "
                                "route2.reward=extrapolated then cannot be used)")
    ref_kl_coef: float = opt(0.0, "weight of KL(π_S ‖ π_ref) (StableOPD)", low=0.0)
    ref_kl_estimator: str = opt("k3", "estimator of the reference KL", choices=("k1", "k2", "k3", "full"))
    entropy_coef: float = opt(0.0, "entropy bonus weight (loss −coef·H(π_S))", low=0.0)
    mismatch_coef: float = opt(0.0, "weight of the train–inference mismatch penalty (log π_S(y_t) − log μ(y_t))² on the "
                               "student's own samples (prime-rl kl_tau = 1e-3)", low=0.0)
    sft_coef: float = opt(0.0, "weight of a cross-entropy term on the batch's off-policy rows (teacher samples or "
                          "dataset answers, rollout.off_policy_source): SFT / rollout-mixture distillation", low=0.0)


@dataclass
class OutcomeConfig:
    """Hybrids: a verifier's outcome reward beside the teacher signal (prime-rl teacher_tau / adv_tau)."""
    adv_tau: float = opt(0.0, "weight of the group-normalised outcome advantage (0 = off)", low=0.0)
    teacher_tau: float = opt(1.0, "weight of the OPD advantage", low=0.0)
    normalize_std: bool = opt(True, "divide group-centred outcome rewards by the group std (GRPO)")
    sign_gate: bool = opt(False, "the verifier sets the sign of every token's route-2 reward: rows it scores > 0 keep "
                          "max(0, r_t), the others min(0, r_t) (OPDVR arXiv 2608.24696)")


@dataclass
class TrainConfig:
    """Optimisation."""
    steps: int = opt(300, "optimizer steps", low=1)
    lr: float = opt(3e-4, "peak learning rate (AdamW)", low=0.0, low_open=True)
    schedule: str = opt("constant", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps", low=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", low=0.0)
    betas: list[float] = opt([0.9, 0.98], "AdamW betas")
    grad_clip: float | None = opt(1.0, "clip the global gradient norm (None = off)", low=0.0, low_open=True)
    micro_batch_size: int | None = opt(None, "rollouts per forward/backward (gradient accumulation); None = whole local batch", low=1)
    precision: str = opt("no", "mixed precision (accelerate)", choices=("no", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda or auto", choices=("auto", "cpu", "cuda"))
    stop_after: int | None = opt(None, "stop after this step as if interrupted (a checkpoint is written); continue with "
                                 "`opd distill --resume RUN_DIR` (for time-limited jobs)", low=1)
    checkpoint_every: int = opt(0, "save a resumable checkpoint every n steps (0 = only at the end)", low=0)
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep", low=1)
    log_every: int = opt(1, "write metrics every n steps", low=1)
    threads: int | None = opt(None, "torch CPU threads; None = the CPUs available (affinity mask, cgroup quota), "
                              "lowered while other processes use some of them (opd.threads; docs/guarantees.md)",
                              low=1)


@dataclass
class EvalConfig:
    """Held-out evaluation."""
    every: int = opt(50, "evaluate every n steps (0 = only before and after)", low=0)
    size: int | None = opt(None, "held-out prompts (default: 500 for built-in tasks; for a prompt file without "
                           "data.eval_path, 10% of its records up to 500)", low=1)
    batch_size: int = opt(500, "prompts per generation batch", low=1)
    max_new_tokens: int | None = opt(None, "default: rollout.max_new_tokens", low=1)
    teacher: bool = opt(True, "also evaluate the teacher once (for the before/after table)")


@dataclass
class MonitorConfig:
    """Live diagnostics and failure detectors (docs/methods.md §3.7–§3.9; docs/diagnostics.md).

    Each detector compares the mean of its metric over the last ``window`` steps with a
    threshold, never before ``warmup_steps`` (the NaN/Inf guard is always on), and reports once per
    run to ``<run>/events.jsonl``. Its action: ``off``; ``warn`` (report only); ``stop`` (end the run
    cleanly: checkpoint, final evaluation, report); ``apply`` (apply the detector's stabilization
    recipe, a set of config overrides, and continue).
    """
    diagnostics: bool = opt(True, "per-token actionability diagnostics (diag/* metrics: position buckets, overlap, "
                            "coverage, entropies, reward sign balance, ...) from the loss's own forward pass")
    warmup_steps: int = opt(10, "steps before any statistical detector may fire (baselines are measured first)",
                            low=0)
    window: int = opt(5, "trailing window (steps) whose mean each detector compares with its threshold", low=1)
    ngram: int = opt(3, "n of the n-gram repetition rate", low=1)
    samples: int = opt(4, "sample completions (with per-token log-ratios) saved to samples.jsonl at each evaluation",
                       low=0)
    length_action: str = opt("warn", "length inflation / truncation collapse (Demystifying OPD 2604.08527)",
                             choices=_ACTIONS)
    truncation_rate_max: float = opt(0.5, "length: fire when the truncation rate reaches this", low=0.0, high=1.0,
                                     low_open=True)
    length_growth_max: float = opt(2.0, "length: fire when the mean length reaches this multiple of its baseline "
                                   "(the first `window` steps)", low=1.0, low_open=True)
    repetition_action: str = opt("warn", "repetition saturation (Demystifying OPD 2604.08527)", choices=_ACTIONS)
    repetition_rate_max: float = opt(0.5, "repetition: fire when the n-gram repetition rate reaches this",
                                     low=0.0, high=1.0, low_open=True)
    entropy_action: str = opt("warn", "entropy collapse (EOPD 2603.07079)", choices=_ACTIONS)
    entropy_ratio_min: float = opt(0.25, "entropy: fire when the student's entropy falls to this fraction of the "
                                   "teacher's (or, without teacher entropy, of its own baseline)", low=0.0,
                                   high=1.0, low_open=True, high_open=True)
    entropy_floor: float = opt(0.1, "entropy: the reference entropy (teacher's or baseline) must be at least this "
                               "many nats for a collapse to count", low=0.0)
    reward_sign_action: str = opt("warn", "reward sign imbalance (Fu et al. 2603.25562)", choices=_ACTIONS)
    reward_neg_frac_max: float = opt(0.9, "reward sign: fire when the fraction of tokens with r_t < 0 reaches this",
                                     low=0.5, high=1.0)
    support_action: str = opt("warn", "teacher support mismatch (samples off the teacher's top-k; Fu et al. "
                              "2603.25562)", choices=_ACTIONS)
    support_off_frac_max: float = opt(0.5, "support: fire when this fraction of sampled tokens is off the teacher's "
                                      "top-k (sampled-only access: has π_T(y_t) < support_prob_floor)",
                                      low=0.0, high=1.0, low_open=True)
    support_prob_floor: float = opt(0.01, "support: with sampled-only access, a token is off-support when "
                                    "π_T(y_t) is below this", low=0.0, high=1.0, low_open=True)
    grad_spike_action: str = opt("warn", "gradient-norm spikes (PowerOPD 2606.17199)", choices=_ACTIONS)
    grad_spike_factor: float = opt(10.0, "grad spike: fire when the (pre-clip) gradient norm exceeds this multiple "
                                   "of the median of the previous steps", low=1.0, low_open=True)
    nonfinite_action: str = opt("warn", "NaN/Inf in logits, rewards, loss or gradients: the step is always skipped "
                                "before the optimizer runs; warn = report and continue", choices=_ACTIONS[1:])
    nonfinite_max_skips: int = opt(10, "stop the run after this many consecutive skipped (non-finite) steps", low=1)


@dataclass
class LoggingConfig:
    """Where a run writes."""
    run_dir: str | None = opt(None, "run folder (default: runs/<method>-<time>; 'default' when no preset is "
                              "named). A folder that already holds a run is refused: resume it with "
                              "`opd distill --resume DIR`, or set logging.overwrite=true")
    overwrite: bool = opt(False, "replace the run already in logging.run_dir (its files are deleted when this run "
                          "starts); without it opd refuses a folder that holds a run")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(False, "also write TensorBoard events")
    wandb: bool = opt(False, "also log to Weights & Biases (needs `pip install wandb`)")
    report: bool = opt(True, "write the HTML/Markdown report at the end")


@dataclass
class Config:
    """A complete, resolved opd configuration."""
    method: str | None = opt(None, "preset applied before the file's own values (see `opd methods`)")
    seed: int = opt(0, "seed of prompts, sampling and initialisation")
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    route1: Route1Config = field(default_factory=Route1Config)
    route2: Route2Config = field(default_factory=Route2Config)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    outcome: OutcomeConfig = field(default_factory=OutcomeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS: tuple[str, ...] = (
    "student", "data", "rollout", "teacher", "support", "route1", "route2", "routing", "gates",
    "regularization", "outcome", "train", "eval", "monitor", "logging",
)
