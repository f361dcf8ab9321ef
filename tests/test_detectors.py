"""Failure detectors: each is provoked on purpose (a crafted teacher, a hooked student, a config
that truncates every rollout) and stays silent on a healthy run; the stop / apply actions and the
NaN guard (the skipped step leaves weights and optimizer state untouched) are checked end to end.

Runs use the shipped smoke checkpoints (2-digit arith) with one torch thread and a few steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

import opd.assemble as components
import opd.train as train
from opd.config import PRESETS, load_config
from opd.config.schema import MonitorConfig
from opd.monitor import DETECTORS, RECIPES, History, Monitor, apply_recipe, recipe_for
from opd.step import train_step
from opd.types import Feedback

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=8", "eval.every=0", "eval.teacher=false", "train.threads=1",
    "logging.progress=false", "logging.report=false", "monitor.warmup_steps=3", "monitor.window=3",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(tmp_path, *overrides, wrap_teacher=None, student_hook=None, steps=8):
    """distill() on the smoke checkpoints; returns (summary, events as dicts)."""
    cfg = load_config(None, [*SMOKE, f"train.steps={steps}", f"logging.run_dir={tmp_path}", *overrides])
    original_teacher, original_student = components.build_teacher, components.build_student

    def teacher(cfg, student, tokenizer, device):
        t = original_teacher(cfg, student, tokenizer, device)
        return t if wrap_teacher is None else wrap_teacher(t, tokenizer)

    def student(cfg, device):
        model, tokenizer = original_student(cfg, device)
        if student_hook is not None:
            model.lm_head.register_forward_hook(student_hook)
        return model, tokenizer

    components.build_teacher, components.build_student = teacher, student
    try:
        summary = train.distill(cfg)
    finally:
        components.build_teacher, components.build_student = original_teacher, original_student
    path = tmp_path / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return summary, events


def fired(events):
    return [e["detector"] for e in events]


class CraftedTeacher:
    """Replaces the teacher's answer by ``make(rollouts, feedback) -> Feedback`` (same interface)."""

    def __init__(self, inner, make):
        self.inner, self.make = inner, make
        self.model = getattr(inner, "model", None)

    def score(self, rollouts, *, access="sampled", topk=32):
        return self.make(rollouts, self.inner.score(rollouts, access=access, topk=topk))

    def local_models(self):
        return []  # the context checks skip it, as before


def _full_feedback(rollouts, logits_BTV):
    mask = rollouts.completion_mask_BT.bool()
    logp = torch.log_softmax(logits_BTV, -1)
    sampled = logp.gather(-1, rollouts.completion_ids_BT[..., None])[..., 0] * mask
    return Feedback(access="full", sampled_logprobs_BT=sampled, logits_BTV=logits_BTV * mask[..., None])


# ------------------------------------------------------------------------------------ healthy run
def test_healthy_smoke_run_stays_silent(tmp_path):
    """A real run with every detector armed (short warm-up and window) reports nothing."""
    summary, events = run(tmp_path, "rollout.prompts_per_step=32", steps=25)
    assert events == [], [e["message"] for e in events]
    assert summary.stop_reason is None and not summary.stopped_early
    assert all(not h.get("skipped") for h in summary.history)
    last = summary.history[-1]
    for key in ("diag/truncation_rate", "diag/repetition_rate", "diag/student_entropy", "diag/teacher_entropy",
                "diag/reward_neg_frac", "diag/teacher_offsupport_frac", "grad_norm"):
        assert key in last and math.isfinite(last[key]), key


# ------------------------------------------------------------------------------------ each detector
def test_truncation_collapse_fires_when_every_rollout_is_truncated(tmp_path):
    # an answer needs at least 2 tokens (a digit and EOS): with 1 new token every rollout is
    # truncated unless the student emits EOS first (rare for the warm-started student)
    summary, events = run(tmp_path, "rollout.max_new_tokens=1", steps=5)
    assert fired(events) == ["length"]
    ev = events[0]
    assert ev["step"] == 3  # the first step after the warm-up (3 steps, window 3)
    window = [h["diag/truncation_rate"] for h in summary.history if h["step"] <= 3]
    assert ev["evidence"]["recent diag/truncation_rate"] == pytest.approx(sum(window) / 3)
    assert ev["evidence"]["recent diag/truncation_rate"] > 0.9
    assert "regularization.ref_kl_coef=0.05" in ev["overrides"] and "StableOPD" in ev["recipe"]


def test_repetition_saturation_fires_with_a_teacher_that_rewards_repetition(tmp_path):
    def repeat(teacher, tokenizer):
        def make(rollouts, fb):  # logits favour repeating the previous token and forbid EOS
            prev = torch.cat([rollouts.prompt_ids_BP[:, -1:], rollouts.completion_ids_BT[:, :-1]], dim=1)
            logits = torch.zeros(*prev.shape, fb.logits_BTV.shape[-1]).scatter_(-1, prev[..., None], 5.0)
            logits[..., tokenizer.eos_token_id] = -5.0
            return _full_feedback(rollouts, logits)
        return CraftedTeacher(teacher, make)

    summary, events = run(tmp_path, "train.lr=3e-2", "monitor.length_action=off", "monitor.reward_sign_action=off",
                          wrap_teacher=repeat, steps=14)
    assert "repetition" in fired(events)
    ev = next(e for e in events if e["detector"] == "repetition")
    assert ev["evidence"]["recent diag/repetition_rate"] >= 0.5
    # the baseline (first steps, before the student learned to repeat) was clean
    assert ev["evidence"]["baseline diag/repetition_rate"] < 0.1


def test_entropy_collapse_fires_when_the_student_entropy_falls(tmp_path):
    """Sampled-only access (no teacher entropy): after 3 normal steps the student's logits are
    sharpened more at every training forward, so its entropy falls from its baseline."""
    calls = {"n": 0}

    def sharpen(module, inputs, output):
        if module.training:
            calls["n"] += 1
            return output * (1.0 + 3.0 * max(calls["n"] - 3, 0))
        return output

    summary, events = run(tmp_path, "method=thinking-machines", "monitor.reward_sign_action=off",
                          "monitor.support_action=off", student_hook=sharpen, steps=10)
    assert fired(events) == ["entropy"]
    ev = events[0]
    assert ev["evidence"]["recent diag/student_entropy"] <= 0.25 * ev["evidence"]["baseline diag/student_entropy"]
    assert "EOPD" in ev["recipe"]


def test_reward_sign_imbalance_fires_when_every_reward_is_negative(tmp_path):
    def pessimist(teacher, tokenizer):  # the teacher gives every sampled token log-prob −20: r_t < 0 everywhere
        def make(rollouts, fb):
            return Feedback(access="sampled", sampled_logprobs_BT=torch.full_like(fb.sampled_logprobs_BT, -20.0)
                            * rollouts.completion_mask_BT)
        return CraftedTeacher(teacher, make)

    summary, events = run(tmp_path, "method=thinking-machines", "monitor.support_action=off", wrap_teacher=pessimist)
    assert fired(events) == ["reward_sign"]
    ev = events[0]
    assert ev["evidence"]["recent diag/reward_neg_frac"] == 1.0 and ev["evidence"]["recent diag/reward_p95"] < 0
    # sampled-token OPD: the recipe switches to teacher top-k local support matching (Fu et al.)
    assert "support.kind=teacher_topk" in ev["overrides"] and "teacher.access=topk" in ev["overrides"]


def test_support_mismatch_fires_when_samples_are_off_the_teacher_topk(tmp_path):
    def off_support(teacher, tokenizer):  # the teacher's least likely token is always the sampled one
        def make(rollouts, fb):
            logits = fb.logits_BTV.clone()
            low = logits.amin(-1, keepdim=True) - 30.0
            logits.scatter_(-1, rollouts.completion_ids_BT[..., None], low)
            return _full_feedback(rollouts, logits)
        return CraftedTeacher(teacher, make)

    summary, events = run(tmp_path, "teacher.topk=4", "monitor.reward_sign_action=off", wrap_teacher=off_support)
    assert fired(events) == ["support"]
    ev = events[0]
    assert ev["evidence"]["recent diag/teacher_offsupport_frac"] == 1.0
    assert "gates.coverage_gate=true" in ev["overrides"]


def test_support_mismatch_with_sampled_access_uses_the_teacher_probability(tmp_path):
    def improbable(teacher, tokenizer):
        def make(rollouts, fb):
            lp = torch.where(rollouts.completion_mask_BT.bool(), torch.tensor(math.log(1e-4)), torch.tensor(0.0))
            return Feedback(access="sampled", sampled_logprobs_BT=lp)
        return CraftedTeacher(teacher, make)

    summary, events = run(tmp_path, "method=thinking-machines", "monitor.reward_sign_action=off",
                          wrap_teacher=improbable, steps=5)
    assert fired(events) == ["support"]
    assert events[0]["evidence"]["recent diag/teacher_prob_sampled"] == pytest.approx(1e-4, rel=1e-3)


def test_gradient_spike_fires_on_a_sudden_large_gradient(tmp_path):
    calls = {"n": 0}

    def spike(module, inputs, output):  # step 7: same logits, 1000× their gradient
        if module.training:
            calls["n"] += 1
            if calls["n"] == 7:
                return output + 999.0 * (output - output.detach())
        return output

    summary, events = run(tmp_path, "monitor.reward_sign_action=off", student_hook=spike, steps=8)
    assert fired(events) == ["grad_spike"]
    ev = events[0]
    assert ev["step"] == 7 and ev["evidence"]["ratio"] > 10


# ------------------------------------------------------------------------------------ actions
def test_stop_action_ends_the_run_cleanly_with_checkpoint_and_report(tmp_path):
    summary, events = run(tmp_path, "rollout.max_new_tokens=1", "monitor.length_action=stop", "logging.report=true",
                          steps=20)
    assert fired(events) == ["length"] and events[0]["action"] == "stop"
    assert summary.stopped_early and "length" in summary.stop_reason
    assert len(summary.history) == 3
    assert (tmp_path / "checkpoints" / "step-000003" / "trainer_state.pt").is_file()
    assert summary.after is not None  # final evaluation still ran
    assert summary.report_path is not None and summary.report_path.is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"] == summary.stop_reason


def test_apply_action_turns_on_the_reference_kl_and_rebuilds_the_objective(tmp_path):
    summary, events = run(tmp_path, "rollout.max_new_tokens=1", "monitor.length_action=apply", steps=6)
    assert fired(events) == ["length"]
    assert events[0]["outcome"].startswith("applied regularization.ref_kl_coef=0.05")
    before, after = summary.history[2], summary.history[3]  # event at step 3: steps 4.. use the new objective
    assert "loss/ref_kl" not in before and "loss/ref_kl" in after
    assert "ref_kl_coef: 0.05" in (tmp_path / "config.applied.yaml").read_text()
    assert "ref_kl_coef: 0.0" in (tmp_path / "config.yaml").read_text()  # the starting config is kept


def test_resume_keeps_events_reported_once_and_reapplies_recipes(tmp_path):
    run(tmp_path, "rollout.max_new_tokens=1", "monitor.length_action=apply", "train.stop_after=4", steps=6)
    threads = torch.get_num_threads()
    resumed = train.distill(load_config(None, []), resume=tmp_path)
    torch.set_num_threads(threads)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert fired(events) == ["length"]  # not reported again after the resume
    assert [h["step"] for h in resumed.history] == [5, 6]
    assert all("loss/ref_kl" in h for h in resumed.history)  # the applied recipe is applied again


def test_apply_with_a_conflicting_recipe_is_reported_and_the_run_continues():
    cfg = load_config(None, SMOKE)

    def refuse(overrides):
        raise ValueError("conflicts with outcome.adv_tau")

    mon = Monitor(cfg, echo=None, apply_fn=refuse)
    ev = mon._act(mon._event("length", "t", 5, "apply", "m", {}))
    assert ev.outcome.startswith("could not apply the recipe (conflicts") and mon.stop_reason is None


# ------------------------------------------------------------------------------------ NaN / Inf guard
def test_nan_student_logits_skip_the_step_before_the_optimizer_touches_the_weights(tmp_path):
    cfg = load_config(None, [*SMOKE, "train.lr=1e-2", "route1.divergence=rkl", "teacher.access=full"])
    parts = components.build_components(cfg, tmp_path, Accelerator(cpu=True))
    student, optimizer, mon = parts.student, parts.optimizer, parts.monitor
    poison = {"on": False}

    def nan_logits(module, inputs, output):
        return output * float("nan") if (module.training and poison["on"]) else output

    student.lm_head.register_forward_hook(nan_logits)
    mon.echo = None
    train_step(parts, 0)  # a clean step: Adam has state
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    lr_before = optimizer.param_groups[0]["lr"]

    poison["on"] = True
    metrics = train_step(parts, 1)
    assert metrics["skipped"] == 1.0
    for n, p in student.named_parameters():
        assert torch.equal(p, weights[n]), n
    for k, s in optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n  # Adam's step count and moments did not move
    assert all(p.grad is None for p in parts.params)
    assert parts.scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == lr_before
    events = mon.observe(2, metrics)
    assert [e.detector for e in events] == ["nonfinite"]
    # log π_S(y_t) is NaN on every counted token; the reported loss may hide it (the −inf-safe masks
    # keep entries with log p > −inf, which NaN is not), but teacher_kl and the gradient norm show it
    evidence = events[0].evidence
    assert evidence["tokens/teacher_kl"] == float(parts.objective.base_mask(mon._last_batch[0]).sum())
    assert math.isnan(evidence["grad_norm"])

    poison["on"] = False
    clean = train_step(parts, 2)
    assert "skipped" not in clean
    assert any(not torch.equal(p, weights[n]) for n, p in student.named_parameters())
    assert mon.observe(3, clean) == [] and mon.skipped_steps == 1


def test_nan_teacher_rewards_are_caught_and_reported_once(tmp_path):
    def nan_teacher(teacher, tokenizer):
        def make(rollouts, fb):
            lp = fb.sampled_logprobs_BT.clone()
            lp[0, 0] = float("nan")
            return Feedback(access=fb.access, sampled_logprobs_BT=lp, logits_BTV=fb.logits_BTV)
        return CraftedTeacher(teacher, make)

    summary, events = run(tmp_path, "method=thinking-machines", wrap_teacher=nan_teacher, steps=4)
    assert fired(events) == ["nonfinite"]  # every step is skipped, reported once
    assert events[0]["evidence"]["teacher/sampled_logprobs"] == 1.0
    assert all(h.get("skipped") == 1.0 for h in summary.history)
    # a run that never updated the weights does not end as "done" (issue: summary and exit code say so)
    assert summary.status == "no updates" and summary.exit_code == 1
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "no updates"


def test_repeated_nan_steps_stop_the_run():
    cfg = load_config(None, [*SMOKE, "monitor.nonfinite_max_skips=3"])
    mon = Monitor(cfg, echo=None)
    for step in range(1, 4):
        mon.skip_step(step, {"grad_norm": float("inf")})
        events = mon.observe(step, {"skipped": 1.0})
    assert [e.detector for e in mon.events] == ["nonfinite", "nonfinite_repeated"]
    assert mon.stop_reason is not None and events[-1].action == "stop"


def test_nonfinite_stop_action_stops_at_the_first_bad_step():
    cfg = load_config(None, [*SMOKE, "monitor.nonfinite_action=stop"])
    mon = Monitor(cfg, echo=None)
    mon.skip_step(4, {"loss": 1.0})
    assert [e.action for e in mon.observe(4, {"skipped": 1.0})] == ["stop"] and "step 4" in mon.stop_reason


# ------------------------------------------------------------------------------------ rules (unit level)
def _history(rows, window=3):
    return History([dict(r) for r in rows], window)


def test_entropy_rule_with_teacher_entropy_compares_student_with_teacher():
    m = MonitorConfig()
    collapsing = _history([{"diag/student_entropy": 0.1, "diag/teacher_entropy": 1.0}] * 3)
    assert DETECTORS["entropy"].rule(collapsing, m) is not None
    healthy = _history([{"diag/student_entropy": 0.5, "diag/teacher_entropy": 1.0}] * 3)
    assert DETECTORS["entropy"].rule(healthy, m) is None
    # a near-deterministic teacher (H_T below the floor) never counts
    sharp = _history([{"diag/student_entropy": 0.001, "diag/teacher_entropy": 0.05}] * 3)
    assert DETECTORS["entropy"].rule(sharp, m) is None


def test_length_inflation_rule_compares_with_the_baseline():
    m = MonitorConfig()
    rows = [{"diag/length_mean": 10.0, "diag/truncation_rate": 0.0}] * 3
    assert DETECTORS["length"].rule(_history(rows + [{"diag/length_mean": 19.0, "diag/truncation_rate": 0.0}] * 3),
                                    m) is None
    found = DETECTORS["length"].rule(_history(rows + [{"diag/length_mean": 21.0, "diag/truncation_rate": 0.0}] * 3), m)
    assert found is not None and "length inflation" in found[0]
    assert found[1]["baseline diag/length_mean"] == 10.0


def test_window_means_need_every_step_of_the_window():
    h = _history([{"x": 1.0}, {"x": float("nan")}, {"x": 1.0}])
    assert h.recent("x") is None
    assert _history([{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]).recent("x") == 2.0
    assert _history([{"x": 1.0}] * 5).baseline("x") is None  # baseline needs 2·window steps


def test_detectors_report_once_and_respect_warmup_and_off():
    cfg = load_config(None, [*SMOKE, "monitor.warmup_steps=4", "monitor.window=2", "monitor.repetition_action=off"])
    mon = Monitor(cfg, echo=None)
    bad = {"diag/truncation_rate": 1.0, "diag/repetition_rate": 1.0, "grad_norm": 1.0}
    reported = [[e.detector for e in mon.observe(s, bad)] for s in range(1, 8)]
    assert reported == [[], [], [], ["length"], [], [], []]


@pytest.mark.parametrize("method", [None, *PRESETS])
def test_every_recipe_gives_a_valid_config_for_every_preset(method):
    cfg = load_config(None, [] if method is None else [f"method={method}"])
    for name in RECIPES:
        recipe = recipe_for(name, cfg)
        if recipe.overrides:
            new = apply_recipe(cfg, recipe.overrides)  # raises ConfigError when invalid
            assert new != cfg, (name, recipe.overrides)


def test_every_detector_has_a_recipe_with_a_source():
    cfg = load_config(None, SMOKE)
    for name in [*DETECTORS, "nonfinite"]:
        recipe = recipe_for(name, cfg)
        assert recipe.text and any(src in recipe.text for src in ("arXiv", "TRL", "[INFER]")), name
        assert DETECTORS[name].rule.__doc__ if name in DETECTORS else True
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        recipe_for("nope", cfg)
