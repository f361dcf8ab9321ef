"""Soft issues: settings that run but probably do not do what the user meant.

:func:`config_warnings` lists them — a knob that has no effect in the chosen configuration
(``route2.gamma`` with route 2 off), stale or tempered samples without importance correction, a
gradient counted twice, ... Nothing here stops a run: ``opd distill`` prints each warning when it
starts and records them in the run folder (``warnings.json``) and the report.
"""

from __future__ import annotations

from opd.config.fields import Problem, field_specs, get_value, section_keys
from opd.config.schema import Config
from opd.config.validate import (
    MONITOR_THRESHOLDS,
    credit_uses_gamma,
    discounting_credit_kinds,
    route1_on,
    route2_on,
    scores_student_topk,
    support_used,
    uses_value,
    value_uses_rkl,
)

__all__ = ["config_warnings", "warning_problems"]



def _either(names: list[str]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

def _ignored_knobs(cfg: Config) -> list[Problem]:
    """Options set away from their default that have no effect in this configuration."""
    specs = field_specs()
    r1, r2, rt, g = cfg.route1, cfg.route2, cfg.routing, cfg.gates
    changed = {p for p, spec in specs.items() if get_value(cfg, p) != spec.default}
    served = bool(cfg.teacher.server) or any(str(v).startswith(("http://", "https://"))
                                             for v in [cfg.teacher.model, *cfg.teacher.routes.values()])
    P = []
    groups = [
        ("route1", not route1_on(cfg) and r1.divergence == "none", "route 1 is off (route1.divergence=none)",
         {"route1.coef", "route1.divergence"}),
        ("route2", not route2_on(cfg), "route 2 is off (route2.coef=0)", {"route2.coef"}),
        ("routing", not route2_on(cfg), "routing applies to route 2, which is off (route2.coef=0)", set()),
        ("support", not support_used(cfg), "nothing uses the support (route 1 is off and no closed-form value)",
         set()),
    ]
    silenced: set[str] = set()
    for section, off, why, exempt in groups:
        if off:
            keys = [p for p in specs if p.startswith(section + ".") and p in changed and p not in exempt]
            silenced.update(p for p in specs if p.startswith(section + "."))
            if keys:
                P.append(Problem(f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect: {why}",
                                 tuple(keys)))
    knobs = [
        ("route1.beta", "jsd" in (r1.divergence, r1.off_policy_divergence), "route1.divergence=jsd"),
        ("route1.alpha", bool({"skl", "srkl", "srkl_sg"} & {r1.divergence, r1.off_policy_divergence}),
         "route1.divergence=skl, srkl or srkl_sg"),
        ("route1.mu", "akl" in (r1.divergence, r1.off_policy_divergence), "route1.divergence=akl"),
        ("route1.uld_coef", cfg.teacher.tokenizer == "own", "teacher.tokenizer=own"),
        ("route1.fkl_entropy_min", r1.fkl_coef > 0, "route1.fkl_coef > 0"),
        ("route1.off_policy_divergence", cfg.rollout.on_policy_fraction < 1, "rollout.on_policy_fraction < 1"),
        ("route2.constant_reward", r2.reward in ("constant", "entropy_rank"), "route2.reward=constant or entropy_rank"),
        ("route2.reward_logprobs", r2.reward not in ("constant", "entropy_rank"), "a log-ratio route2.reward"),
        ("route2.icepop_low", r2.is_correction == "icepop", "route2.is_correction=icepop"),
        ("route2.icepop_high", r2.is_correction == "icepop", "route2.is_correction=icepop"),
        ("route2.dppo_sign", r2.is_correction == "dppo", "route2.is_correction=dppo"),
        ("route2.off_policy_rows", cfg.rollout.on_policy_fraction < 1, "rollout.on_policy_fraction < 1"),
        ("gates.drift_gamma", g.position == "drift_share", "gates.position=drift_share"),
        ("gates.logprob_fraction", g.logprob_gate, "gates.logprob_gate=true"),
        ("outcome.sign_gate", route2_on(cfg), "route2.coef > 0"),
        ("route2.reward_low", r2.reward == "clipped", "route2.reward=clipped"),
        ("route2.reward_high", r2.reward == "clipped", "route2.reward=clipped"),
        ("route2.box_cox_alpha", r2.reward == "box_cox", "route2.reward=box_cox"),
        ("route2.extrapolation_lambda", r2.reward == "extrapolated", "route2.reward=extrapolated"),
        ("route2.gamma", credit_uses_gamma(cfg), "route2.credit=" + _either(discounting_credit_kinds())),
        ("route2.window", r2.credit == "window", "route2.credit=window"),
        ("route2.f_divergence", r2.reward == "f_corrected", "route2.reward=f_corrected"),
        ("route2.lam", r2.credit == "gae", "route2.credit=gae"),
        ("route2.value", uses_value(cfg), "route2.baseline=value or route2.credit=gae"),
        ("route2.value_coef", r2.credit == "gae" and r2.value == "decomposed", "route2.credit=gae, value=decomposed"),
        ("route2.clip_low", r2.is_correction in ("ppo_clip", "dppo"), "route2.is_correction=ppo_clip or dppo"),
        ("route2.clip_high", r2.is_correction in ("ppo_clip", "dppo"), "route2.is_correction=ppo_clip or dppo"),
        ("route2.ratio_cap", r2.is_correction != "none", "an importance correction (route2.is_correction)"),
        ("gates.keep_fraction", g.entropy_gate in ("q1", "q1_or_q3"), "gates.entropy_gate=q1 or q1_or_q3"),
        ("gates.entropy_low", g.entropy_gate in ("q3", "q1_or_q3"), "gates.entropy_gate=q3 or q1_or_q3"),
        ("gates.divergence_high", g.entropy_gate in ("q3", "q1_or_q3"), "gates.entropy_gate=q3 or q1_or_q3"),
        ("gates.prefix_fraction", g.position == "prefix", "gates.position=prefix"),
        ("gates.decay_to", g.position == "linear_decay", "gates.position=linear_decay"),
        ("gates.drift_beta", g.position == "drift", "gates.position=drift"),
        ("support.k", cfg.support.kind not in ("full", "sampled"), "a top-k support kind"),
        ("support.norm", cfg.support.kind != "full", "a support smaller than the vocabulary"),
        ("regularization.ref_kl_estimator", cfg.regularization.ref_kl_coef > 0, "regularization.ref_kl_coef > 0"),
        ("rollout.off_policy_source", cfg.rollout.on_policy_fraction < 1, "rollout.on_policy_fraction < 1"),
        ("rollout.teacher_mix", cfg.rollout.on_policy_fraction > 0, "rollout.on_policy_fraction > 0"),
        ("teacher.self_mode", cfg.teacher.model == "self", "teacher.model=self"),
        *[(f"rollout.{k}", cfg.rollout.engine == "vllm", "rollout.engine=vllm")
          for k in ("server", "sync_every", "vllm_memory", "vllm_max_model_len")],
        *[(f"rollout.{k}", cfg.rollout.server is not None, "rollout.server")
          for k in ("sync_dir", "server_timeout", "server_retries")],
        *[(f"teacher.{k}", served, "a teacher server (teacher.server, or URLs in teacher.routes)")
          for k in ("protocol", "server_dtype", "payload", "server_timeout", "server_retries")],
        ("teacher.context_template", cfg.teacher.use_context and not _chat(cfg), "teacher.use_context=true on plain "
         "prompts (a conversation gets its teacher-only context as a system message)"),
        *[(f"data.{k}", _chat(cfg), "data.format=chat (or data.task=arith_chat)") for k in ("messages_field",
                                                                                            "train_turns")],
        ("outcome.normalize_std", cfg.outcome.adv_tau > 0, "outcome.adv_tau > 0"),
        *_data_knobs(cfg),
    ] + [(f"routing.{k}", rt.kind == "cr_opd", "routing.kind=cr_opd") for k in section_keys("routing") if k != "kind"]
    m = cfg.monitor
    knobs += [(f"monitor.{key}", getattr(m, f"{detector}_action") != "off", f"monitor.{detector}_action ≠ off")
              for detector, keys in MONITOR_THRESHOLDS.items() for key in keys]
    for key, used, when in knobs:
        if key in changed and key not in silenced and not used:
            P.append(Problem(f"{key}={get_value(cfg, key)!r} has no effect: it is used only with {when}", (key,)))
    return P


def warning_problems(cfg: Config) -> list[Problem]:
    r, t, r1, r2, s = cfg.rollout, cfg.teacher, cfg.route1, cfg.route2, cfg.support
    on1, on2 = route1_on(cfg), route2_on(cfg)
    P: list[Problem] = []

    def add(message: str, *keys: str) -> None:
        P.append(Problem(message, keys))

    if on2 and r2.future_only and not on1:
        add("route2.future_only=true drops the immediate step from route 2 and no route-1 term covers it "
            "(route 1 is off): the immediate reverse-KL step is never trained; add route1.divergence=rkl "
            "(MiniLLM's single-step term) or set future_only=false", "route2.future_only", "route1.divergence")
    if on2 and r2.future_only and r2.credit == "immediate":
        add("route2.future_only=true with credit=immediate credits each token with the next token's reward only "
            "(A_t = r_{t+1}); MiniLLM pairs future_only with credit=return_to_go", "route2.future_only",
            "route2.credit")
    if (on1 and on2 and r1.divergence == "rkl" and r2.reward == "log_ratio" and not r2.future_only
            and r2.credit == "immediate"):
        add("route1 (rkl) and route 2 (immediate log-ratio) both train the immediate step, so its reverse-KL "
            "gradient is counted twice; set route2.future_only=true with credit=return_to_go (MiniLLM) "
            "or turn one route off", "route1.divergence", "route2.credit", "route2.future_only")
    reasons = [why for cond, why in (
        (r.temperature != 1, f"rollout.temperature={r.temperature}"), (r.top_p < 1, f"rollout.top_p={r.top_p}"),
        (r.top_k > 0, f"rollout.top_k={r.top_k}"), (r.teacher_mix > 0, f"rollout.teacher_mix={r.teacher_mix}"),
    ) if cond]
    if on2 and r2.is_correction == "none" and reasons:
        add(f"the rollouts come from μ ≠ π_S ({', '.join(reasons)}) but route2.is_correction=none treats them as "
            "the student's own samples, which biases the update; set route2.is_correction=ratio (or ppo_clip)",
            "route2.is_correction", "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.teacher_mix")
    if r.overlap and on2 and r2.is_correction == "none":
        add("rollout.overlap samples each batch one step before it is used, but route2.is_correction=none ignores "
            "that lag; set route2.is_correction=ratio (or ppo_clip)", "rollout.overlap", "route2.is_correction")
    if r.overlap and on1 and not on2:
        add("rollout.overlap: route 1 takes the lagged states as they are (no importance ratio corrects a "
            "distributional loss); the lag is one step", "rollout.overlap", "route1.divergence")
    if on2 and r2.is_correction == "none" and r.updates_per_rollout > 1:
        add(f"rollout.updates_per_rollout={r.updates_per_rollout} reuses each batch after the student moved, but "
            "route2.is_correction=none ignores that staleness; set route2.is_correction=ppo_clip (or ratio, dppo)",
            "rollout.updates_per_rollout", "route2.is_correction")
    if on2 and r2.is_correction != "none" and (r.top_p < 1 or r.top_k > 0):
        add("top-p / top-k sampling never proposes tokens outside the kept set, so the importance ratio π_S/μ "
            "cannot correct for them (and is below 1 on every kept token at temperature 1); expect a small "
            "bias, or sample with rollout.top_p=1 and rollout.top_k=0", "rollout.top_p", "rollout.top_k")
    if on1 and t.temperature != s.student_temperature:
        add(f"teacher.temperature={t.temperature} differs from support.student_temperature="
            f"{s.student_temperature}: route 1 pulls the student towards the teacher's tempered distribution; "
            "set both to the same value unless that is intended", "teacher.temperature", "support.student_temperature")
    if on2 and t.temperature != 1:
        add(f"teacher.temperature={t.temperature}: route 2's reward compares the tempered teacher with the "
            "untempered student, so r_t is not 0 even where the models agree; set teacher.temperature=1 unless "
            "intended", "teacher.temperature")
    served = bool(t.server) or t.model.startswith(("http://", "https://"))
    if t.temperature != 1 and served and t.protocol == "vllm":
        add(f"teacher.temperature={t.temperature} with a vLLM teacher server: servers usually return untempered "
            "log-probs (vLLM ignores the temperature of prompt log-probs); opd detects that with a probe request "
            "and tempers the full distribution itself, which needs the server started with --max-logprobs ≥ the "
            "vocabulary size (else the run stops); teacher.protocol=opd applies the temperature on the server",
            "teacher.temperature", "teacher.protocol")
    if scores_student_topk(cfg) and (r.updates_per_rollout > 1 or r.overlap):
        add("support.kind=student_topk with a teacher server: the support is the student's top-k when the rollouts "
            "were scored, so with rollout.updates_per_rollout > 1 or rollout.overlap it is the top-k of older weights "
            "than the update's (a fixed support: the divergence stays proper); one update per batch without overlap "
            "makes it the current top-k", "support.kind", "rollout.updates_per_rollout", "rollout.overlap")
    if r.engine == "vllm" and r.teacher_mix > 0:
        add(f"rollout.teacher_mix={r.teacher_mix}: teacher-mixed sampling needs both models' next-token "
            "distributions at every step and runs opd's own decode loop, so rollout.engine=vllm is not used for it",
            "rollout.engine", "rollout.teacher_mix")
    if r.engine == "vllm" and r.sync_every > 1 and (not on2 or r2.is_correction == "none"):
        add(f"rollout.sync_every={r.sync_every}: rollouts come from weights up to {r.sync_every - 1} update(s) old, and "
            "only route 2's importance ratio π_S/μ (route2.is_correction) corrects that; "
            + ("route 2 is off" if not on2 else "route2.is_correction=none") + ", so the lag is not corrected; "
            "set rollout.sync_every=1 or use route 2 with route2.is_correction=ratio",
            "rollout.sync_every", "route2.is_correction")
    if on2 and r2.reward == "extrapolated" and r2.extrapolation_lambda == 1:
        add("route2.reward=extrapolated with extrapolation_lambda=1 equals reward=log_ratio but still loads a "
            "reference model; use reward=log_ratio, or λ > 1 for ExOPD", "route2.reward",
            "route2.extrapolation_lambda")
    if on2 and r2.credit == "gae" and r2.value == "decomposed" and r2.value_coef == 0:
        add("route2.value=decomposed with value_coef=0 never trains its value head (U stays 0); "
            "set route2.value_coef > 0 (e.g. 0.5)", "route2.value", "route2.value_coef")
    if on2 and r2.baseline == "value" and r2.value == "zero":
        add("route2.baseline=value with value=zero subtracts 0; use value=closed_form (vOPD) or baseline=none",
            "route2.baseline", "route2.value")
    if value_uses_rkl(cfg) and s.kind == "sampled":
        add("the closed-form value V = −RKL_t is computed on support.kind=sampled, a two-point (token vs rest) "
            "approximation; use support.kind=teacher_topk (or full) for a useful value",
            "route2.value", "support.kind")
    if cfg.route1.divergence != "none" and cfg.route1.coef == 0:
        add(f"route1.divergence={cfg.route1.divergence} with route1.coef=0: route 1 is off; "
            "write route1.divergence=none to say so", "route1.divergence", "route1.coef")
    if t.model == "self" and t.self_mode == "frozen" and not t.use_context:
        add("teacher.model=self without use_context is the initial student: this only regularises towards the "
            "starting point; set teacher.use_context=true for self-distillation", "teacher.model",
            "teacher.use_context")
    if cfg.data.context_field is not None and not t.use_context and cfg.data.task in ("jsonl", "hf"):
        add(f"data.context_field={cfg.data.context_field!r} is set but teacher.use_context=false, so the "
            "context is never shown; set teacher.use_context=true", "data.context_field", "teacher.use_context")
    m = cfg.monitor
    needs_diag = [f"monitor.{d}_action={getattr(m, f'{d}_action')}" for d in ("entropy", "reward_sign", "support")
                  if getattr(m, f"{d}_action") in ("stop", "apply")]
    if not m.diagnostics and needs_diag:
        add(f"{', '.join(needs_diag)} never acts with monitor.diagnostics=false: those detectors read the per-token "
            "diagnostics; set monitor.diagnostics=true", "monitor.diagnostics")
    active = [d for d in MONITOR_THRESHOLDS if d != "nonfinite" and getattr(m, f"{d}_action") != "off"]
    if active and m.warmup_steps >= cfg.train.steps:
        add(f"monitor.warmup_steps={m.warmup_steps} ≥ train.steps={cfg.train.steps}: the failure detectors never "
            "run (the NaN/Inf guard still does); lower monitor.warmup_steps", "monitor.warmup_steps", "train.steps")
    if cfg.train.warmup_steps >= cfg.train.steps:
        add(f"train.warmup_steps={cfg.train.warmup_steps} ≥ train.steps={cfg.train.steps}: the learning rate "
            "never reaches its peak", "train.warmup_steps", "train.steps")
    return P + _chat_and_tokenizer_warnings(cfg) + _ignored_knobs(cfg)


def _data_knobs(cfg: Config) -> list[tuple[str, bool, str]]:
    """The data options only some tasks read (opd/factories.py: a built-in task reads none of the file options;
    its verifier is refused by validation instead, since it decides what the accuracy means)."""
    task = cfg.data.task
    user = task in ("jsonl", "hf")
    files = "data.task=jsonl or hf (a built-in task has its own prompts and fields)"
    return [*[(f"data.{k}", user, files) for k in ("path", "eval_path", "prompt_field", "answer_field",
                                                   "context_field")],
            *[(f"data.{k}", task == "hf", "data.task=hf") for k in ("split", "eval_split")],
            *[(f"data.{k}", task == "arith", "data.task=arith") for k in ("digits", "reverse_operands")]]


def _chat(cfg: Config) -> bool:
    return cfg.data.format == "chat" or cfg.data.task == "arith_chat"


def _chat_and_tokenizer_warnings(cfg: Config) -> list[Problem]:
    """data.format=chat, teacher.system_prompt and teacher.tokenizer=own (opd/chat.py, opd/token_alignment)."""
    t = cfg.teacher
    P = []
    if t.system_prompt is not None and cfg.data.context_field is not None:
        P.append(Problem(f"teacher.system_prompt is used only for rows without data.context_field="
                         f"{cfg.data.context_field!r}, and that field must be on every row: the system prompt is never "
                         "shown; unset one of them", ("teacher.system_prompt", "data.context_field")))
    if t.tokenizer == "own":
        if not t.check_tokenizer:
            P.append(Problem("teacher.check_tokenizer=false has no effect with teacher.tokenizer=own: the comparison "
                             "runs anyway and reports what opd aligns", ("teacher.check_tokenizer",)))
        if route1_on(cfg) and cfg.route1.uld_coef == 0:
            P.append(Problem("teacher.tokenizer=own with route1.uld_coef=0: route 1 then trains only on the tokens both "
                             "vocabularies share; the teacher's mass on tokens the student's vocabulary lacks is "
                             "ignored (set route1.uld_coef > 0 for the ULD term)", ("route1.uld_coef",)))
    return P


def config_warnings(cfg: Config) -> list[str]:
    """Soft issues: settings that run but probably do not do what was meant (empty when none)."""
    return [p.message for p in warning_problems(cfg)]


