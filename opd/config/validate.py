"""Validation of a configuration: field types and ranges, incompatible combinations, soft warnings,
and the teacher access the objective needs.

Three levels, each collecting *every* problem before anything is raised:

* **fields** — type (converted by :func:`opd.config.load.coerce_value`: an ``int`` is accepted for
  a ``float``, a ``bool`` is never a number, ``null`` only for ``X | None`` options, a float written
  ``1e-3`` is read even where YAML 1.1 made it a string), ``choices`` and numeric bounds from the
  schema metadata, and a few option-specific rules (``data.verifier``, ``train.betas``);
* **combinations** (:func:`check_combinations`) — settings that cannot work together, e.g. a
  full-vocabulary loss with a teacher that only returns sampled-token log-probs;
* **warnings** (:func:`opd.config.advice.config_warnings`) — settings that run but probably do not
  do what the user meant (a knob that has no effect, stale samples without importance correction, ...).

Errors are :class:`ConfigError`, a ``ValueError`` whose message lists one problem per line, each
saying what is wrong and how to fix it; :mod:`opd.config.load` adds where each value came from.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from opd.config.fields import (
    ConfigError,
    FieldSpec,
    Problem,
    coerce_value,
    field_specs,
    get_value,
    range_text,
    suggest,
)
from opd.config.formats import chat_and_tokenizer_problems
from opd.config.presets import PRESETS, unknown_method_message
from opd.config.schema import Config
from opd.config.serving import served_student_topk, serving_problems

__all__ = [
    "Access", "ConfigError", "MONITOR_THRESHOLDS", "Problem", "check_combinations", "check_field",
    "collect_problems", "format_problem", "normalize_config", "required_teacher_access",
    "resolve_teacher_access", "route1_on", "route2_on", "scores_student_topk", "support_used", "uses_value",
    "validate_config", "value_uses_rkl",
]

Access = Literal["sampled", "topk", "full"]
ACCESS_ORDER: tuple[str, ...] = ("sampled", "topk", "full")
VERIFIERS: tuple[str, ...] = ("auto", "exact_match", "contains", "none")
_USER_DATA = ("jsonl", "hf")  # the data.task values that read a prompt file or dataset (opd/data.py)
_PYTHON_VERIFIER = re.compile(r"^python:[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# the thresholds each failure detector reads (monitor section; opd.monitor.detectors)
MONITOR_THRESHOLDS: dict[str, tuple[str, ...]] = {
    "length": ("truncation_rate_max", "length_growth_max"), "repetition": ("repetition_rate_max",),
    "entropy": ("entropy_ratio_min", "entropy_floor"), "reward_sign": ("reward_neg_frac_max",),
    "support": ("support_off_frac_max", "support_prob_floor"), "grad_spike": ("grad_spike_factor",),
    "nonfinite": ("nonfinite_max_skips",),
}
# teacher signal each support construction needs (opd.math.support: student_topk and union need teacher
# log-probs at student-chosen ids, which only full logits give; student_topk: see scores_student_topk)
_SUPPORT_NEED: dict[str, str] = {"full": "full", "student_topk": "full", "union": "full",
                                 "teacher_topk": "topk", "teacher_topk_sampled": "topk", "sampled": "sampled"}


def scores_student_topk(cfg: Config) -> bool:
    """``support.kind=student_topk`` answered by an ``opd`` teacher server at the student's top-k ids
    (:func:`opd.config.serving.served_student_topk`): no full teacher logits needed."""
    return served_student_topk(cfg, support_used=support_used(cfg))


def _support_need(cfg: Config) -> str:
    return "sampled" if scores_student_topk(cfg) else _SUPPORT_NEED[cfg.support.kind]


def check_field(spec: FieldSpec, value: Any) -> str | None:
    """Choices, bounds and option-specific rules for an already-typed value; a message or None."""
    if value is None:
        return None
    p = spec.path
    if p == "monitor.nonfinite_action" and value == "off":
        return ("monitor.nonfinite_action=off is not allowed: a NaN/Inf step would write NaN into the weights; "
                "use warn (skip the step and report it), stop or apply")
    if spec.choices and value not in spec.choices:
        hint = suggest(str(value), spec.choices)
        return (f"{p}={value!r} is not one of: {', '.join(spec.choices)}"
                + (f"; did you mean {hint}?" if hint else ""))
    if isinstance(value, float) and not math.isfinite(value):
        return f"{p}={value!r} is not a finite number; give a finite value" + (
            " (or null to turn it off)" if spec.default is None else "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.low, spec.high
        bad = ((lo is not None and (value < lo or (spec.low_open and value == lo)))
               or (hi is not None and (value > hi or (spec.high_open and value == hi))))
        if bad:
            return f"{p}={value!r} is out of range: it must be {range_text(spec)}"
    if p == "data.verifier" and value not in VERIFIERS and not _PYTHON_VERIFIER.match(value):
        return (f"data.verifier={value!r} is not a verifier: use one of {', '.join(VERIFIERS)} "
                "or python:module:function (a function (example, completion) -> float)")
    if p == "train.betas" and (len(value) != 2 or not all(0.0 <= b < 1.0 for b in value)):
        return f"train.betas={value!r}: AdamW needs two numbers in [0, 1), e.g. [0.9, 0.98]"
    if p == "student.lora_target_modules" and (not value or not all(v.strip() for v in value)):
        return (f"student.lora_target_modules={value!r}: name at least one module, e.g. [all-linear] or "
                "[q_proj, v_proj]")
    return None


def normalize_config(cfg: Config) -> tuple[Config, list[Problem]]:
    """A copy of ``cfg`` with every value converted to its schema type, and the field problems.

    A value that cannot be converted, or is out of range / not a choice, is reported and replaced by
    its default in the copy, so that the combination checks run on well-typed values only.
    """
    clean = copy.deepcopy(cfg)
    problems = []
    for spec in field_specs().values():
        raw = get_value(cfg, spec.path)
        try:
            value = coerce_value(raw, spec.type)
            message = check_field(spec, value)
        except TypeError as err:
            value, message = spec.default, f"{spec.path}: {err}"
        if message:
            problems.append(Problem(message, (spec.path,)))
            value = copy.deepcopy(spec.default)
        owner = clean if spec.section is None else getattr(clean, spec.section)
        setattr(owner, spec.name, value)
    if clean.method is not None:
        if clean.method not in PRESETS:
            problems.append(Problem(unknown_method_message(clean.method), ("method",)))
    return clean, problems


# ---------------------------------------------------------------------------------------------
# what the objective uses
def route1_on(cfg: Config) -> bool:
    """Route 1 (a distributional loss) contributes to the loss."""
    return cfg.route1.divergence != "none" and cfg.route1.coef > 0


def route2_on(cfg: Config) -> bool:
    """Route 2 (the log-ratio policy gradient) contributes to the loss."""
    return cfg.route2.coef > 0


def uses_value(cfg: Config) -> bool:
    return route2_on(cfg) and (cfg.route2.credit == "gae" or cfg.route2.baseline == "value")


def value_uses_rkl(cfg: Config) -> bool:
    return uses_value(cfg) and cfg.route2.value in ("closed_form", "decomposed")


def support_used(cfg: Config) -> bool:
    return route1_on(cfg) or value_uses_rkl(cfg)


def _max_access(*levels: str) -> str:
    return max(levels, key=ACCESS_ORDER.index)


def _access_needs(cfg: Config) -> list[tuple[str, str, tuple[str, ...]]]:
    """(level, what needs it, keys) for every part of the objective that reads teacher feedback."""
    kind = cfg.support.kind
    needs = []
    if route1_on(cfg):
        r1 = cfg.route1
        for key, name in (("route1.divergence", r1.divergence), ("route1.off_policy_divergence",
                                                                  r1.off_policy_divergence)):
            if name is None or (key == "route1.off_policy_divergence" and cfg.rollout.on_policy_fraction >= 1):
                continue
            if name == "k3":  # the sampled-token estimator reads only log π_T(y_t)
                needs.append(("sampled", f"{key}=k3", (key,)))
            else:
                needs.append((_support_need(cfg), f"{key}={name} on support.kind={kind}", (key, "support.kind")))
    if route2_on(cfg) and cfg.routing.kind == "cr_opd":
        needs.append(("topk", "routing.kind=cr_opd (it routes mass to the teacher's top-k alternatives)",
                      ("routing.kind",)))
    if value_uses_rkl(cfg):
        needs.append((_max_access("topk", _support_need(cfg)),
                      f"route2.value={cfg.route2.value} (V(s_t) = −RKL_t computed on support.kind={kind})",
                      ("route2.value", "support.kind")))
    if cfg.gates.coverage_gate and (route1_on(cfg) or route2_on(cfg)):
        needs.append(("topk", "gates.coverage_gate (is y_t in the teacher's top-k?)", ("gates.coverage_gate",)))
    return needs


def required_teacher_access(cfg: Config) -> Access:
    """The least teacher signal the objective needs: ``sampled`` < ``topk`` < ``full``.

    ``full`` for a route-1 loss on the full / student_topk / union support (teacher log-probs at
    tokens the teacher did not choose; not for student_topk with an opd server: :func:`scores_student_topk`);
    ``topk`` for a route-1 loss on a teacher_topk(_sampled)
    support, CR-OPD routing, the closed-form or decomposed value ``V = −RKL_t`` (vOPD, GAE-OPD;
    ``full`` when that RKL is taken on a full-vocabulary support) and the teacher-coverage gate;
    ``sampled`` otherwise (sampled-token log-ratio rewards, the one-token ``sampled`` support).
    ``teacher.access=auto`` resolves to this value.
    """
    return _max_access("sampled", *(level for level, _, _ in _access_needs(cfg)))  # type: ignore[return-value]


def resolve_teacher_access(cfg: Config) -> Access:
    """``teacher.access``, with ``auto`` replaced by :func:`required_teacher_access`."""
    return required_teacher_access(cfg) if cfg.teacher.access == "auto" else cfg.teacher.access  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# incompatible combinations
def _combination_problems(cfg: Config) -> list[Problem]:
    r, t, s, r1, r2 = cfg.rollout, cfg.teacher, cfg.support, cfg.route1, cfg.route2
    d, reg, out = cfg.data, cfg.regularization, cfg.outcome
    on1, on2 = route1_on(cfg), route2_on(cfg)
    P: list[Problem] = []

    def add(message: str, *keys: str) -> None:
        P.append(Problem(message, keys))

    if not on1 and not on2 and reg.sft_coef == 0:
        r1_state = "route1.divergence=none" if r1.divergence == "none" else "route1.coef=0"
        add(f"no loss term is on ({r1_state}, route2.coef=0, regularization.sft_coef=0): nothing would be "
            "trained; turn one on, e.g. route1.divergence=rkl, route2.coef=1, or method=<preset> (`opd methods`)",
            "route1.divergence", "route1.coef", "route2.coef", "regularization.sft_coef")
    # teacher feedback
    unmet = [(level, what, keys) for level, what, keys in _access_needs(cfg)
             if t.access != "auto" and ACCESS_ORDER.index(level) > ACCESS_ORDER.index(t.access)]
    if unmet:
        level = _max_access(*(u[0] for u in unmet))
        add(f"teacher.access={t.access} is too little: " + "; ".join(f"{w} needs {lv} teacher feedback"
                                                                     for lv, w, _ in unmet)
            + f"; set teacher.access={level} (or auto)",
            "teacher.access", *dict.fromkeys(k for u in unmet for k in u[2]))
    if s.kind == "sampled" and s.norm == "renorm":
        add("support.kind=sampled with support.norm=renorm is degenerate: a one-token support renormalises to "
            "probability 1 for both models, so the divergence is always 0; set support.norm=tail "
            "(the sampled token vs the rest)", "support.kind", "support.norm")
    if (support_used(cfg) and s.kind in ("teacher_topk", "teacher_topk_sampled")
            and resolve_teacher_access(cfg) == "topk" and s.k > t.topk):
        add(f"support.k={s.k} exceeds teacher.topk={t.topk}: with top-k feedback the teacher returns only its "
            f"{t.topk} best tokens; set teacher.topk={s.k} or support.k={t.topk}", "support.k", "teacher.topk")
    # route 2 and temporal credit
    if r2.coef > 0 and r.on_policy_fraction == 0 and not r2.off_policy_rows:
        add("route2.coef > 0 but rollout.on_policy_fraction=0: route 2 is the policy gradient on the student's "
            "own samples and there are none; raise rollout.on_policy_fraction, set route2.off_policy_rows=true "
            "(offline OPD on the fixed rows) or set route2.coef=0",
            "route2.coef", "rollout.on_policy_fraction", "route2.off_policy_rows")
    if on2 and r2.off_policy_rows and r2.reward_logprobs == "behaviour" and r.on_policy_fraction < 1:
        add("route2.off_policy_rows=true with route2.reward_logprobs=behaviour: the off-policy rows (dataset "
            "answers, teacher samples) carry no student sampler log-probs; use route2.reward_logprobs=current",
            "route2.off_policy_rows", "route2.reward_logprobs")
    if on2 and r2.is_correction == "icepop" and r2.icepop_low > r2.icepop_high:
        add(f"route2.icepop_low={r2.icepop_low} > route2.icepop_high={r2.icepop_high}: the kept band is empty; "
            "swap them", "route2.icepop_low", "route2.icepop_high")
    if on2 and r2.reward in ("constant", "entropy_rank") and r2.credit != "immediate":
        add(f"route2.reward={r2.reward} is a teacher-free per-token advantage (arXiv 2608.31046); temporal "
            f"credit would sum it along the rollout: use route2.credit=immediate", "route2.reward", "route2.credit")
    r1o = cfg.route1
    if r1o.clamp_low is not None and r1o.clamp_high is not None and r1o.clamp_low > r1o.clamp_high:
        add(f"route1.clamp_low={r1o.clamp_low} > route1.clamp_high={r1o.clamp_high}; swap them",
            "route1.clamp_low", "route1.clamp_high")
    if cfg.routing.kind == "cr_opd" and not on2:
        add("routing.kind=cr_opd reroutes the route-2 update, but route2.coef=0; set route2.coef > 0 "
            "(e.g. 1) or routing.kind=softmax", "routing.kind", "route2.coef")
    if on2 and r2.baseline in ("group_mean", "leave_one_out") and r.samples_per_prompt < 2:
        add(f"route2.baseline={r2.baseline} averages over the samples of a prompt, but "
            f"rollout.samples_per_prompt={r.samples_per_prompt}; set rollout.samples_per_prompt ≥ 2 "
            "(e.g. 4) or route2.baseline=batch_mean", "route2.baseline", "rollout.samples_per_prompt")
    if on2 and r2.length_normalize and r2.credit != "return_to_go":
        add(f"route2.length_normalize=true normalises the return-to-go (MiniLLM) and needs "
            f"route2.credit=return_to_go, not {r2.credit}", "route2.length_normalize", "route2.credit")
    if on2 and r2.credit == "gae" and r2.baseline == "value":
        add("route2.credit=gae already subtracts the value V(s_t); set route2.baseline=none "
            "(or batch_mean / group_mean)", "route2.credit", "route2.baseline")
    if on2 and r2.value == "decomposed" and r2.baseline == "value" and r2.credit != "gae":
        add("route2.value=decomposed needs a value head, which is trained only with route2.credit=gae; "
            "use route2.value=closed_form for a baseline (vOPD), or route2.credit=gae",
            "route2.value", "route2.baseline", "route2.credit")
    if on2 and r2.reward == "clipped":
        if r2.reward_low is None and r2.reward_high is None:
            add("route2.reward=clipped needs a bound: set route2.reward_low and/or route2.reward_high "
                "(e.g. route2.reward_low=-5)", "route2.reward", "route2.reward_low", "route2.reward_high")
        elif r2.reward_low is not None and r2.reward_high is not None and r2.reward_low > r2.reward_high:
            add(f"route2.reward_low={r2.reward_low} > route2.reward_high={r2.reward_high}; swap them",
                "route2.reward_low", "route2.reward_high")
    if on2 and r2.reward == "contrastive" and not reg.reference:
        add("route2.reward=contrastive (RLCSD) scores the wrong hint with a reference copy of the model, but "
            "regularization.reference is unset; set regularization.reference=initial", "route2.reward",
            "regularization.reference")
    if on2 and r2.reward == "contrastive" and not cfg.teacher.use_context:
        add("route2.reward=contrastive (RLCSD) contrasts a correct hint with a wrong one, but teacher.use_context is "
            "off; set teacher.use_context=true (and data.context_field for your data)", "route2.reward",
            "teacher.use_context")
    if on2 and r2.reward == "extrapolated" and not reg.reference:
        add("route2.reward=extrapolated (G-OPD) scores against a reference policy, but "
            "regularization.reference is unset; set regularization.reference=initial (or a model path)",
            "route2.reward", "regularization.reference")
    if reg.ref_kl_coef > 0 and not reg.reference:
        add("regularization.ref_kl_coef > 0 needs a reference policy; set regularization.reference=initial "
            "(or a model path), or ref_kl_coef=0", "regularization.ref_kl_coef", "regularization.reference")
    if out.sign_gate:
        if d.verifier == "none":
            add("outcome.sign_gate=true needs the verifier's verdict on every rollout, but data.verifier=none; "
                "set data.verifier (auto, exact_match, contains or python:module:function)",
                "outcome.sign_gate", "data.verifier")
        if not on2:
            add("outcome.sign_gate=true gates the route-2 reward, but route2.coef=0; set route2.coef > 0 (e.g. 1) "
                "or outcome.sign_gate=false", "outcome.sign_gate", "route2.coef")
    if out.adv_tau > 0:
        if d.verifier == "none":
            add(f"outcome.adv_tau={out.adv_tau} mixes in a verifier's outcome advantage, but data.verifier=none; "
                "set data.verifier (auto, exact_match, contains or python:module:function) or outcome.adv_tau=0",
                "outcome.adv_tau", "data.verifier")
        if not on2:
            add(f"outcome.adv_tau={out.adv_tau} enters through the route-2 advantage, but route2.coef=0; "
                "set route2.coef > 0 (e.g. 1) or outcome.adv_tau=0", "outcome.adv_tau", "route2.coef")
        if r.samples_per_prompt < 2:
            add("the outcome advantage is group-normalised (GRPO) and is always 0 with "
                "rollout.samples_per_prompt=1; set rollout.samples_per_prompt ≥ 2",
                "outcome.adv_tau", "rollout.samples_per_prompt")
    # state compatibility and data
    if r.prefix_tokens is not None and r.prefix_tokens > r.max_new_tokens:
        add(f"rollout.prefix_tokens={r.prefix_tokens} exceeds rollout.max_new_tokens={r.max_new_tokens}: "
            f"a prefix cannot be longer than a completion; lower prefix_tokens or raise max_new_tokens",
            "rollout.prefix_tokens", "rollout.max_new_tokens")
    has_answers = d.task == "arith" or d.answer_field is not None
    if r.on_policy_fraction < 1 and r.off_policy_source == "answer" and not has_answers:
        add(f"rollout.on_policy_fraction={r.on_policy_fraction} with rollout.off_policy_source=answer trains "
            "on dataset answers, but data.answer_field is unset; set data.answer_field to the field holding "
            "the answer, or rollout.off_policy_source=teacher",
            "rollout.on_policy_fraction", "rollout.off_policy_source", "data.answer_field")
    if reg.sft_coef > 0:
        if r.on_policy_fraction >= 1:
            add("regularization.sft_coef > 0 trains on the off-policy rows (teacher samples or dataset answers), "
                "but rollout.on_policy_fraction=1 leaves none; lower rollout.on_policy_fraction "
                "(0 = pure SFT, method=sft-teacher) or set sft_coef=0",
                "regularization.sft_coef", "rollout.on_policy_fraction")
    if d.task not in _USER_DATA and d.verifier != "auto":  # a built-in task has its own verifier
        add(f"data.verifier={d.verifier} is not used by data.task={d.task}: a built-in task scores completions with "
            "its own verifier (data.verifier=auto); remove data.verifier, or set data.task=jsonl (or hf) and "
            "data.path to score your own prompts with it", "data.verifier", "data.task")
    if d.task in ("jsonl", "hf") and not d.path:
        what = "the JSONL prompt file" if d.task == "jsonl" else "a dataset id or local dataset folder"
        add(f"data.task={d.task} needs data.path ({what})", "data.task", "data.path")
    # teachers
    if t.use_context and d.context_field is None and d.task != "arith" and t.system_prompt is None:
        add(f"teacher.use_context=true but there is no teacher-only context: data.context_field and "
            f"teacher.system_prompt are unset and data.task={d.task} has none built in; set data.context_field "
            "(or teacher.system_prompt), or teacher.use_context=false",
            "teacher.use_context", "data.context_field", "data.task")
    if t.use_context and "{context}" not in t.context_template:
        add(f"teacher.context_template={t.context_template!r} has no {{context}} placeholder, so the context "
            "would never reach the teacher; e.g. teacher.context_template='{context}\\n'",
            "teacher.context_template")
    if t.model == "self" and t.routes:
        add("teacher.model=self cannot be combined with teacher.routes (multi-teacher routing needs teacher "
            "models); remove teacher.routes or name a teacher model", "teacher.model", "teacher.routes")
    if t.model == "self" and t.self_mode == "live" and not t.use_context:
        add("teacher.model=self with self_mode=live and use_context=false is the student itself: every teacher "
            "signal is exactly 0; set teacher.use_context=true (with a context source) or self_mode=frozen",
            "teacher.model", "teacher.self_mode", "teacher.use_context")
    if t.cache != "none" and t.model == "self" and t.self_mode == "live":
        add("teacher.cache reuses scores of a fixed teacher, but teacher.model=self with self_mode=live changes "
            "with every step; set teacher.cache=none or self_mode=frozen", "teacher.cache", "teacher.self_mode")
    if t.cache == "disk" and not t.cache_dir:
        add("teacher.cache=disk needs teacher.cache_dir (the folder that holds the cache)", "teacher.cache",
            "teacher.cache_dir")
    if d.route_field is not None and not t.routes:
        add(f"data.route_field={d.route_field!r} selects a teacher from teacher.routes, but teacher.routes is "
            "empty; add teacher.routes={value: model, ...} or unset data.route_field", "data.route_field",
            "teacher.routes")
    if t.routes and d.route_field is None:
        add("teacher.routes is set but data.route_field is unset, so no prompt can be routed; set "
            "data.route_field to the prompt field whose value picks the teacher", "teacher.routes", "data.route_field")
    if t.routes and (r.teacher_mix > 0 or (r.on_policy_fraction < 1 and r.off_policy_source == "teacher")):
        add("sampling from the teacher (rollout.teacher_mix > 0, or off-policy teacher samples) needs one "
            "in-process teacher, not teacher.routes; remove the routes or sample from the student only",
            "teacher.routes", "rollout.teacher_mix", "rollout.off_policy_source")
    if (cfg.student.lora_rank > 0 and t.model == "self" and t.self_mode == "frozen"
            and (r.teacher_mix > 0 or (r.on_policy_fraction < 1 and r.off_policy_source == "teacher"))):
        add("a LoRA student's frozen self-teacher is the student's own module with the adapter switched off while "
            "it scores (opd/lora.py), so it cannot also sample rollouts (rollout.teacher_mix > 0 or off-policy "
            "teacher samples); set rollout.teacher_mix=0 and rollout.off_policy_source=answer, or student.lora_rank=0",
            "student.lora_rank", "teacher.model", "rollout.teacher_mix", "rollout.off_policy_source")
    if cfg.student.lora_rank > 0 and t.model == "self" and t.self_mode == "frozen" and r.overlap:
        add("rollout.overlap scores the next batch in a background thread while the student trains, but a LoRA "
            "student's frozen self-teacher is the student's own module with the adapter switched off while it scores "
            "(opd/lora.py): the training forward would see the adapter off; set rollout.overlap=false, or "
            "student.lora_rank=0 (a frozen copy)", "student.lora_rank", "teacher.model", "rollout.overlap")
    if r.overlap and r.teacher_mix > 0:
        add("rollout.overlap samples in the background from a snapshot of the student, but rollout.teacher_mix > 0 "
            "mixes the live student and teacher at every token; set rollout.teacher_mix=0 or rollout.overlap=false",
            "rollout.overlap", "rollout.teacher_mix")
    if r.overlap and t.model == "self" and t.self_mode == "live":
        add("rollout.overlap scores the next batch in the background while the student trains, but "
            "teacher.self_mode=live makes the training student the teacher; use self_mode=frozen or "
            "rollout.overlap=false", "rollout.overlap", "teacher.self_mode")
    if cfg.student.model == "self":
        add("student.model=self: only the teacher can be 'self'; name the student model", "student.model")
    P += chat_and_tokenizer_problems(cfg, support_used=support_used(cfg))
    P += serving_problems(cfg, support_used=support_used(cfg))
    P += _case_task_problems(cfg)
    return P


_CASE_TASKS = ("fork", "route", "modes", "long", "reach")


def _case_task_problems(cfg: Config) -> list[Problem]:
    """The case-study tasks (opd/tasks/cases.py): length range, completion budget, their own checkpoints."""
    d, P = cfg.data, []
    if d.task not in _CASE_TASKS:
        if d.length is not None:
            P.append(Problem(f"data.length is an option of the case tasks ({', '.join(_CASE_TASKS)}), not of "
                             f"data.task={d.task}; remove it (arith uses data.digits)", ("data.length",)))
        return P
    from opd.tasks.cases import CASE_TASKS

    task_cls = CASE_TASKS[d.task]
    n = task_cls.default_length if d.length is None else d.length
    if not task_cls.min_length <= n <= task_cls.max_length:
        return [Problem(f"data.length={n} is out of range for data.task={d.task}: it must be in "
                        f"[{task_cls.min_length}, {task_cls.max_length}]", ("data.length",))]
    need = n + (2 if d.task == "fork" else 1)  # answer tokens (+ fork's path token) + EOS
    for key, value in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if value is not None and value < need:
            P.append(Problem(f"{key}={value} cannot hold a data.task={d.task} answer of length {n} with its EOS; set "
                             f"{key}={need} (or more)", (key, "data.length")))
    for role, model in (("student", cfg.student.model), ("teacher", cfg.teacher.model)):
        if isinstance(model, str) and model.startswith("builtin:arith"):
            P.append(Problem(f"data.task={d.task} with {role}.model={model}: the arith checkpoints do not know this "
                             f"task's format; use student.model=builtin:{d.task}/student teacher.model=builtin:"
                             f"{d.task}/teacher (or your own models)", (f"{role}.model", "data.task")))
    return P


def check_combinations(cfg: Config) -> list[str]:
    """Messages for every incompatible combination of settings in ``cfg`` (empty when none)."""
    return [p.message for p in _combination_problems(cfg)]


# ---------------------------------------------------------------------------------------------
def format_problem(problem: Problem, sources: Mapping[str, str] | None = None) -> str:
    """The problem's message, followed by where its non-default values came from."""
    if problem.source is not None:
        return f"{problem.message} (from {problem.source})"
    if not sources:
        return problem.message
    cited = [(k, sources[k]) for k in problem.keys if sources.get(k, "default") != "default"]
    if not cited:
        return problem.message
    labels = {label for _, label in cited}
    if len(labels) == 1 and len(problem.keys) == 1:
        return f"{problem.message} (from {cited[0][1]})"
    return f"{problem.message} ({'; '.join(f'{k} from {label}' for k, label in cited)})"


def collect_problems(cfg: Config) -> tuple[Config, list[Problem]]:
    """The type-converted copy of ``cfg`` and every field problem and incompatible combination."""
    clean, problems = normalize_config(cfg)
    bad = {key for p in problems for key in p.keys}
    # combinations are judged on the sanitised copy; those about an already-reported key are noise
    problems += [p for p in _combination_problems(clean) if not bad.intersection(p.keys)]
    return clean, problems


def validate_config(cfg: Config, sources: Mapping[str, str] | None = None) -> Config:
    """Check ``cfg`` (e.g. one built or edited in code) and return its type-converted copy.

    Raises :class:`ConfigError` listing every field problem and incompatible combination;
    ``sources`` maps dotted keys to where their values came from (``preset 'gkd'``, ``file 'x.yaml'``,
    ``override 'a.b=c'``) and the messages cite them. Warnings are not raised: :func:`opd.config.advice.config_warnings`.
    """
    clean, problems = collect_problems(cfg)
    if problems:
        raise ConfigError([format_problem(p, sources) for p in problems])
    return clean
