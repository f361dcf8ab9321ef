"""The reporting checklist (the survey's reporting checklist, arXiv 2606.22793, **[INFER]**: mapped
onto its design variables), filled from a run's resolved config, its logs and ``run_info.json``.

Every item is always present; an item the run cannot answer is flagged ``missing`` with the
reason, so two reports can be compared line by line. Compute: the teacher's forward FLOPs are
estimated as ``2·N_T`` per scored token (``N_T`` the teacher's parameter count from
``run_info.json``; Kaplan et al. 2020, arXiv 2001.08361), where the scored tokens are the training
completion tokens the teacher scored (prompt tokens and evaluation passes are not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from opd.report.compare import legacy_teacher_kl
from opd.report.load import RunData, series

__all__ = ["CHECKLIST", "Item", "checklist"]

#: (section, item) pairs in report order; every report lists all of them.
CHECKLIST: tuple[tuple[str, str], ...] = (
    ("Teacher", "identity"), ("Teacher", "access level"), ("Teacher", "tokenizer and template match"),
    ("Teacher", "temperature"), ("Teacher", "privileged context"),
    ("State compatibility", "sampler μ"), ("State compatibility", "max length"),
    ("State compatibility", "truncated rollouts"), ("State compatibility", "policy lag and IS correction"),
    ("State compatibility", "teacher mixing / on-policy fraction"), ("State compatibility", "prefix truncation"),
    ("State compatibility", "SFT cold start"), ("State compatibility", "teacher consistency"),
    ("State compatibility", "prompt source"),
    ("Route and divergence", "route"), ("Route and divergence", "divergence"),
    ("Support", "support"),
    ("Temporal credit", "credit estimator"), ("Temporal credit", "baseline / critic"),
    ("Temporal credit", "stop-gradient placement"), ("Temporal credit", "advantage normalization"),
    ("Routing", "mass routing"),
    ("Gates and weights", "masks and gates"), ("Gates and weights", "% tokens kept"),
    ("Gates and weights", "position weights"), ("Gates and weights", "IS clipping / masking"),
    ("Gates and weights", "loss normalization"),
    ("Regularization", "reference KL"), ("Regularization", "entropy term"), ("Regularization", "SFT / PT mixing"),
    ("Diagnostics", "length curve"), ("Diagnostics", "truncation rate"), ("Diagnostics", "repetition"),
    ("Diagnostics", "entropy"), ("Diagnostics", "teacher_kl"), ("Diagnostics", "calibration"),
    ("Compute", "scored tokens"), ("Compute", "teacher forward FLOPs"), ("Compute", "wall time"),
    ("Compute", "hardware"),
    ("Evaluation and seeds", "decoding"), ("Evaluation and seeds", "number of samples"),
    ("Evaluation and seeds", "pass@1"), ("Evaluation and seeds", "pass@k"), ("Evaluation and seeds", "seeds"),
)


@dataclass(frozen=True)
class Item:
    """One checklist line: ``value`` answers it, or ``missing`` says the run cannot (``value`` says why)."""

    section: str
    name: str
    value: str
    missing: bool = False


def _mean(run: RunData, key: str) -> float | None:
    _, ys = series(run.train, key)
    ys = [y for y in ys if math.isfinite(y)]
    return sum(ys) / len(ys) if ys else None


def _fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _curve(run: RunData, key: str, what: str) -> tuple[str, bool]:
    pairs = [(x, y) for x, y in zip(*series(run.train, key), strict=True) if math.isfinite(y)]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if not ys:
        return f"not logged ({what})", True
    return f"logged every {max(1, int(round((xs[-1] - xs[0]) / max(len(xs) - 1, 1))))} step(s); " \
           f"first {_fmt(ys[0])}, last {_fmt(ys[-1])} ({key})", False


def _answers(run: RunData) -> dict[str, tuple[str, bool]]:  # noqa: C901 — one line per checklist item
    c = run.cfg
    info: dict[str, Any] = run.info or {}
    t_info: dict[str, Any] = info.get("teacher") or {}
    r1_on = c("route1.divergence") not in (None, "none") and (c("route1.coef") or 0) > 0
    r2_on = (c("route2.coef") or 0) > 0
    card = info.get("student_card") or {}
    a: dict[str, tuple[str, bool]] = {}
    teacher = c("teacher.model")
    a["identity"] = (f"{teacher}" + (f" ({t_info['parameters']:,} parameters)" if t_info.get("parameters") else "")
                     + (f"; routes {c('teacher.routes')}" if c("teacher.routes") else ""), teacher is None)
    access = t_info.get("access") or c("teacher.access")
    a["access level"] = (f"{access}" + (" (resolved from auto: the least the objective needs)"
                                        if c("teacher.access") == "auto" and t_info.get("access") else ""),
                         access in (None, "auto"))
    a["tokenizer and template match"] = (
        ("checked at start: teacher and student tokenizers agree (teacher.check_tokenizer=true)", False)
        if c("teacher.check_tokenizer") else ("not checked (teacher.check_tokenizer=false)", True))
    a["temperature"] = (f"teacher τ={c('teacher.temperature')}, student τ in the loss="
                        f"{c('support.student_temperature')}", c("teacher.temperature") is None)
    a["privileged context"] = ((f"teacher sees data.{c('data.context_field')} via template "
                                f"{c('teacher.context_template')!r}" if c("teacher.use_context") else
                                "none (the teacher reads the student's prompt)"), c("teacher.use_context") is None)
    a["sampler μ"] = (f"temperature {c('rollout.temperature')}, top-p {c('rollout.top_p')}, top-k "
                      f"{c('rollout.top_k') or 'off'}, {c('rollout.samples_per_prompt')} sample(s) per prompt, "
                      f"{c('rollout.prompts_per_step')} prompts per step", c("rollout.temperature") is None)
    a["max length"] = (f"{c('rollout.max_new_tokens')} new tokens", c("rollout.max_new_tokens") is None)
    a["truncated rollouts"] = (f"rollout.truncated={c('rollout.truncated')} (keep: trained on; mask: left out of "
                               "the loss)", c("rollout.truncated") is None)
    a["policy lag and IS correction"] = (
        f"{c('rollout.updates_per_rollout')} update(s) per rollout batch; route2.is_correction="
        f"{c('route2.is_correction')}" + ("" if r2_on else " (route 2 off: unused)"),
        c("rollout.updates_per_rollout") is None)
    a["teacher mixing / on-policy fraction"] = (
        f"on-policy fraction λ={c('rollout.on_policy_fraction')} (rest: {c('rollout.off_policy_source')}), "
        f"teacher-mixed sampling α={c('rollout.teacher_mix')}", c("rollout.on_policy_fraction") is None)
    a["prefix truncation"] = (f"first {c('rollout.prefix_tokens')} tokens only" if c("rollout.prefix_tokens")
                              else "none (whole completions)", False)
    if card.get("sft_teacher"):
        a["SFT cold start"] = (f"student warm-started by SFT on samples of '{card['sft_teacher']}' "
                               f"({card.get('steps')} steps, held-out accuracy {card.get('heldout_accuracy')}; "
                               "opd_card.json)", False)
        same = str(teacher).rstrip("/").split("/")[-1] == card["sft_teacher"]
        a["teacher consistency"] = (("the SFT teacher is the OPD teacher" if same else
                                     f"different: SFT on '{card['sft_teacher']}', OPD with '{teacher}' "
                                     "(Lightning OPD 2604.13010: irreducible gradient bias)"), False)
    else:
        a["SFT cold start"] = ("unknown: the student folder has no opd_card.json; state how the student was made", True)
        a["teacher consistency"] = ("unknown: is the OPD teacher the one the student was fine-tuned from?", True)
    task = c("data.task")
    a["prompt source"] = ((f"built-in arith, {c('data.digits')}-digit operands" if task == "arith" else
                           f"{task}: {c('data.path')} (split {c('data.split')})"), task is None)
    a["route"] = ("hybrid (route 1 + route 2)" if r1_on and r2_on else "route 1 (distributional loss)" if r1_on
                  else "route 2 (log-ratio policy gradient)" if r2_on else "SFT only", False)
    div = c("route1.divergence")
    params = {"jsd": f", β={c('route1.beta')}", "skl": f", α={c('route1.alpha')}",
              "srkl": f", α={c('route1.alpha')}", "srkl_sg": f", α={c('route1.alpha')}",
              "akl": f", μ={c('route1.mu')}"}.get(div, "")
    r2 = (f"route 2 reward {c('route2.reward')}" + (f" (Box–Cox α={c('route2.box_cox_alpha')})"
                                                    if c("route2.reward") == "box_cox" else "")) if r2_on else ""
    a["divergence"] = ("; ".join(x for x in (f"{div}{params} × {c('route1.coef')}" if r1_on else "", r2) if x)
                       or "none", False)
    kind = c("support.kind")
    a["support"] = ((f"{kind}" + (f", k={c('support.k')}" if kind not in ("full", "sampled") else "")
                     + (f", {c('support.norm')}" if kind != "full" else "")) if r1_on
                    else "sampled token only (route 2)", kind is None)
    if r2_on:
        cr = c("route2.credit")
        gl = {"discounted": f", γ={c('route2.gamma')}",
              "gae": f", γ={c('route2.gamma')}, λ={c('route2.lam')}"}.get(cr, "")
        a["credit estimator"] = (f"{cr}{gl}" + (", from t+1 on" if c("route2.future_only") else ""), False)
        base = c("route2.baseline")
        uses_value = base == "value" or cr == "gae"
        a["baseline / critic"] = (f"{base}" + (f"; value {c('route2.value')}" if uses_value else ""), False)
        a["advantage normalization"] = (f"whiten={c('route2.whiten')}, adv_clip={c('route2.adv_clip')}, "
                                        f"length_normalize={c('route2.length_normalize')}", False)
    else:
        a["credit estimator"] = ("none: route 1 only (a per-state loss, no temporal credit)", False)
        a["baseline / critic"] = ("none (route 2 off)", False)
        a["advantage normalization"] = ("none (route 2 off)", False)
    a["stop-gradient placement"] = ("rewards, advantages and teacher log-probs detached (opd.objective); the "
                                    "student's log-probs carry the gradient", False)
    a["mass routing"] = ((f"{c('routing.kind')}" + (f" (K′={c('routing.student_k')}, κ={c('routing.kappa')}, "
                                                     f"η={c('routing.eta')})" if c("routing.kind") == "cr_opd" else
                                                     " (student prior)")) if r2_on else "n/a (route 2 off)", False)
    a["masks and gates"] = (f"special tokens masked={c('gates.mask_special_tokens')}, entropy gate="
                            f"{c('gates.entropy_gate')}, coverage gate={c('gates.coverage_gate')}",
                            c("gates.entropy_gate") is None)
    kept = _mean(run, "diag/gate_keep_frac")
    a["% tokens kept"] = ((f"{100 * kept:.1f} % of tokens kept by the gates (run mean)", False) if kept is not None
                          else ("not logged (monitor.diagnostics=false)", True))
    a["position weights"] = (f"{c('gates.position')}", c("gates.position") is None)
    if r2_on and c("route2.is_correction") != "none":
        fr = {k: _mean(run, f"diag/{k}") for k in ("is_clip_frac", "is_mask_frac", "is_cap_frac")}
        logged = ", ".join(f"{k} {100 * v:.2f} %" for k, v in fr.items() if v is not None)
        a["IS clipping / masking"] = (f"{c('route2.is_correction')} (clip {c('route2.clip_low')}/"
                                      f"{c('route2.clip_high')}, cap {c('route2.ratio_cap')})"
                                      + (f"; run means: {logged}" if logged else ""), False)
    else:
        a["IS clipping / masking"] = ("none", False)
    a["loss normalization"] = (f"{c('gates.reduction')}", c("gates.reduction") is None)
    coef = c("regularization.ref_kl_coef") or 0
    a["reference KL"] = ((f"{coef} × KL(π_S‖π_ref), π_ref={c('regularization.reference')}, estimator "
                          f"{c('regularization.ref_kl_estimator')}") if coef > 0 else "off", False)
    a["entropy term"] = (f"bonus {c('regularization.entropy_coef')}" if (c("regularization.entropy_coef") or 0) > 0
                         else "off", False)
    sft = c("regularization.sft_coef") or 0
    a["SFT / PT mixing"] = (f"{sft} × CE on off-policy rows" if sft > 0 else "off", False)
    a["length curve"] = _curve(run, "diag/length_mean" if run.has("diag/length_mean") else "mean_length", "length")
    a["truncation rate"] = _curve(run, "diag/truncation_rate" if run.has("diag/truncation_rate") else "truncation_rate",
                                  "truncation")
    a["repetition"] = _curve(run, "diag/repetition_rate", "repetition rate")
    a["entropy"] = _curve(run, "diag/student_entropy", "student entropy")
    a["teacher_kl"] = _teacher_kl(run)
    a["calibration"] = ("not measured (no ECE / confidence-vs-accuracy curve; CaOPD 2604.16830)", True)
    tokens = sum(y for y in series(run.train, "tokens")[1] if math.isfinite(y))
    every = c("train.log_every") or 1
    a["scored tokens"] = ((f"{tokens:,.0f} completion tokens scored by the teacher in training"
                           + (f" (sum over logged steps, logged every {every})" if every > 1 else ""), False)
                          if tokens else ("not logged", True))
    n_t = t_info.get("parameters")
    if n_t and tokens:
        a["teacher forward FLOPs"] = (f"≈ {2 * n_t * tokens:.3e} (2·N_T per scored token, N_T={n_t:,})", False)
    else:
        a["teacher forward FLOPs"] = ("unknown: " + ("no teacher parameter count (run_info.json)" if not n_t
                                                     else "no token count"), True)
    secs = (run.summary or {}).get("seconds")
    if secs is None and run.train:
        _, times = series(run.train, "time")
        secs = times[-1] - times[0] if len(times) > 1 else None
    a["wall time"] = ((f"{secs:.1f} s" + (" (summary.json)" if run.summary else " (first to last logged step)"))
                      if secs is not None else "unknown (no summary.json)", secs is None)
    a["hardware"] = _hardware(run, info, secs)
    max_new = c("eval.max_new_tokens") or c("rollout.max_new_tokens")
    a["decoding"] = (f"greedy, up to {max_new} new tokens", max_new is None)
    n = next((r.get("eval/n") for r in reversed(run.evals) if r.get("eval/n") is not None), None)
    a["number of samples"] = ((f"{int(n)} held-out prompts × 1 greedy sample, evaluated at steps "
                               f"{', '.join(str(int(r['step'])) for r in run.evals)}"), False) if n else \
        ("no evaluation logged", True)
    accs = [r for r in run.evals if isinstance(r.get("eval/accuracy"), (int, float))]
    a["pass@1"] = ((f"{accs[0]['eval/accuracy']:.3f} → {accs[-1]['eval/accuracy']:.3f} (steps "
                    f"{int(accs[0]['step'])} → {int(accs[-1]['step'])})"
                    + (f"; teacher {run.teacher_eval['teacher/accuracy']:.3f}"
                       + (" (served: its argmax on the reference answers, teacher-forced)"
                          if run.teacher_eval.get("decoding") == "teacher-forced" else "")
                       if run.teacher_eval else ""), False)
                   if accs else ("no evaluation logged", True))
    a["pass@k"] = ("not measured (greedy pass@1 only)", True)
    a["seeds"] = (f"seed {c('seed')} (prompts, sampling and initialisation); one seed — rerun with other seeds "
                  "for error bars", c("seed") is None)
    return a


def _teacher_kl(run: RunData) -> tuple[str, bool]:
    """teacher_kl is ``mean log π_S − log π_T`` on the student's own samples; off-policy rows give
    ``offpolicy_logratio`` (not a KL). Older logs mixed the two under ``teacher_kl``."""
    off = _curve(run, "offpolicy_logratio", "")
    if not run.has("teacher_kl"):
        if not off[1]:
            return ("no student samples in training (on-policy fraction 0), so no teacher_kl; off-policy rows: "
                    f"log π_S − log π_T (not a KL) {off[0]}", True)
        return _curve(run, "teacher_kl", "teacher_kl")
    value, missing = _curve(run, "teacher_kl", "teacher_kl")
    if legacy_teacher_kl(run):
        value += (f"; includes the off-policy rows (on-policy fraction {run.cfg('rollout.on_policy_fraction')}), "
                  "where it is log π_S − log π_T on teacher samples / dataset answers, not a KL")
    elif not off[1]:
        value += f"; off-policy rows: log π_S − log π_T (not a KL) {off[0]}"
    return value, missing


def _hardware(run: RunData, info: dict[str, Any], secs: float | None) -> tuple[str, bool]:
    """What ran (``run_info.json``: device, precision), and what the config asked when it differs."""
    dev = info.get("device")
    if not dev:
        return "unknown (no run_info.json)", True
    world = info.get("world_size", 1)
    gpu = str(dev).startswith("cuda")
    hours = f"; {world * (secs or 0) / 3600:.3f} GPU-hours" if gpu else "; 0 GPU-hours"
    asked_dev, asked_prec = run.cfg("train.device"), run.cfg("train.precision")
    dev_note = f" (config asked train.device={asked_dev})" if asked_dev not in (None, "auto") and \
        not str(dev).startswith(asked_dev) else ""
    prec = info.get("precision")
    if prec is None:
        precision = f"precision not recorded (config asked train.precision={asked_prec})"
    else:
        precision = ("no mixed precision" if prec == "no" else f"mixed precision {prec}") + (
            "" if prec == asked_prec or asked_prec is None else
            f" (config asked train.precision={asked_prec})")
    dtypes = f"student {run.cfg('student.dtype')}, teacher {run.cfg('teacher.dtype')}"
    return (f"ran on {dev}{dev_note} × {world} ({info.get('device_name') or 'unknown'}), {precision}, weights "
            f"{dtypes}, torch {info.get('versions', {}).get('torch')}, {info.get('torch_threads')} threads{hours}",
            False)


def checklist(run: RunData) -> list[Item]:
    """The filled checklist of ``run``, every item of :data:`CHECKLIST` in order."""
    if run.config is None:
        return [Item(s, n, "unknown: the run folder has no config.yaml", True) for s, n in CHECKLIST]
    answers = _answers(run)
    return [Item(section, name, *answers[name]) for section, name in CHECKLIST]
