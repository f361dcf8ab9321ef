"""Live diagnostics (opd.monitor.live): every reduction against a naive loop written here, the NaN/Inf
check, sample extraction, the monitor config section, and the loop integration (the diagnostics
come from the loss's own forward: no extra student or teacher pass)."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from opd.assemble import build_components
from opd.config import (
    PRESETS,
    SECTIONS,
    ConfigError,
    config_warnings,
    load_config,
)
from opd.monitor import (
    batch_samples,
    nonfinite_evidence,
    sequence_metrics,
    token_metrics,
)
from opd.step import train_step
from opd.types import Feedback, Rollouts

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=12", "train.threads=1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _stats(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 0, 5, 1][:B]
    mask = _mask(lengths, T)
    stats = {
        "mask": mask,
        "teacher_kl": torch.randn(B, T, generator=g) * mask,
        "diag/reward": torch.randn(B, T, generator=g) * mask,
        "diag/student_entropy": torch.rand(B, T, generator=g) * mask,
        "diag/sampled_in_teacher_topk": (torch.rand(B, T, generator=g) > 0.3).float() * mask,
        "diag/teacher_prob_sampled": torch.rand(B, T, generator=g) * mask,
        "advantage": torch.randn(B, T, generator=g) * mask,
        "is_ratio": torch.rand(B, T, generator=g) * 2 * mask,
        "is_clipped": (torch.rand(B, T, generator=g) > 0.7) & mask,
        "gate_keep": (torch.rand(B, T, generator=g) > 0.2) & mask,
    }
    return stats, lengths


# ------------------------------------------------------------------------------------ token metrics
def test_token_metrics_match_naive_loops():
    stats, lengths = _stats()
    out = token_metrics(stats)
    mask = stats["mask"]
    tokens = [(b, t) for b in range(mask.shape[0]) for t in range(lengths[b])]
    r = [float(stats["diag/reward"][b, t]) for b, t in tokens]
    assert out["diag/num_tokens"] == len(tokens)
    assert out["diag/reward"] == pytest.approx(sum(r) / len(r))
    assert out["diag/reward_neg_frac"] == pytest.approx(sum(x < 0 for x in r) / len(r))
    # position thirds: token t of a row of length L is in bucket floor(3t/L), pooled over rows
    for key, src in (("teacher_kl", "teacher_kl"), ("student_entropy", "diag/student_entropy")):
        for i, name in enumerate(("early", "middle", "late")):
            vals = [float(stats[src][b, t]) for b, t in tokens if (3 * t) // lengths[b] == i]
            assert out[f"diag/{key}_{name}"] == pytest.approx(sum(vals) / len(vals)), (key, name)
    adv = [float(stats["advantage"][b, t]) for b, t in tokens]
    mean = sum(adv) / len(adv)
    assert out["diag/advantage_mean"] == pytest.approx(mean)
    assert out["diag/advantage_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in adv) / len(adv)))
    assert out["diag/advantage_max"] == pytest.approx(max(adv)) and out["diag/advantage_min"] == pytest.approx(min(adv))
    assert out["diag/advantage_pos_frac"] == pytest.approx(sum(a > 0 for a in adv) / len(adv))
    assert out["diag/is_ratio_max"] == pytest.approx(max(float(stats["is_ratio"][b, t]) for b, t in tokens))
    for key, src in (("is_clip_frac", "is_clipped"), ("gate_keep_frac", "gate_keep")):
        assert out[f"diag/{key}"] == pytest.approx(sum(bool(stats[src][b, t]) for b, t in tokens) / len(tokens))
    topk = [float(stats["diag/sampled_in_teacher_topk"][b, t]) for b, t in tokens]
    assert out["diag/teacher_offsupport_frac"] == pytest.approx(1 - sum(topk) / len(topk))
    assert all(k.startswith("diag/") for k in out)


def test_offsupport_with_sampled_access_counts_improbable_samples():
    stats, lengths = _stats()
    del stats["diag/sampled_in_teacher_topk"]
    out = token_metrics(stats, support_prob_floor=0.25)
    probs = [float(stats["diag/teacher_prob_sampled"][b, t]) for b in range(5) for t in range(lengths[b])]
    assert out["diag/teacher_offsupport_frac"] == pytest.approx(sum(p < 0.25 for p in probs) / len(probs))


def test_token_metrics_ignore_padding_values_and_need_a_mask():
    stats, _ = _stats()
    noisy = {k: (torch.where(stats["mask"], v, torch.full_like(v, 1e6)) if v.is_floating_point() else v)
             for k, v in stats.items()}
    assert token_metrics(noisy) == pytest.approx(token_metrics(stats))
    with pytest.raises(ValueError, match="need a 'mask' entry"):
        token_metrics({"teacher_kl": torch.zeros(2, 3)})


def test_cr_opd_routing_summary_is_included():
    mask = _mask([3, 2], 3)
    stats = {"mask": mask, "routing_routed": torch.tensor([[1, 0, 1], [0, 0, 0]]).bool(),
             "routing_n_candidates": torch.tensor([[2, 0, 4], [0, 0, 0]]),
             "routing_mass_to_teacher_supported": torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.4, 0.0]])}
    out = token_metrics(stats)
    assert out["diag/cr_opd_routed_frac"] == pytest.approx(2 / 5)
    assert out["diag/cr_opd_candidates_routed"] == pytest.approx(3.0)
    assert out["diag/cr_opd_mass_routed"] == pytest.approx(0.7)
    assert out["diag/cr_opd_mass_unrouted"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)


# ------------------------------------------------------------------------------------ sequence metrics
def _rollouts(ids, lengths, truncated, on_policy):
    B, T = len(ids), len(ids[0])
    mask = _mask(lengths, T)
    return Rollouts(prompt_ids_BP=torch.ones(B, 2, dtype=torch.long), prompt_mask_BP=torch.ones(B, 2, dtype=torch.long),
                    completion_ids_BT=torch.tensor(ids), completion_mask_BT=mask,
                    behaviour_logprobs_BT=torch.zeros(B, T), truncated_B=torch.tensor(truncated),
                    on_policy_B=torch.tensor(on_policy), group_index_B=torch.arange(B))


def test_sequence_metrics_use_the_students_own_rows():
    ro = _rollouts([[5, 5, 5, 5, 5, 5], [3, 4, 2, 0, 0, 0], [7, 7, 7, 7, 7, 7]], [6, 3, 6],
                   [True, False, True], [True, True, False])
    out = sequence_metrics(ro, eos_ids=2, ngram=3)
    # row 0: 4 trigrams, 1 distinct -> 3/4; row 1: 1 trigram -> 0; row 2 is off-policy (ignored)
    assert out["diag/repetition_rate"] == pytest.approx((3 / 4 + 0) / 2)
    assert out["diag/length_mean"] == 4.5 and out["diag/truncation_rate"] == 0.5 and out["diag/eos_rate"] == 0.5
    off = _rollouts([[1, 2]], [2], [False], [False])
    assert sequence_metrics(off, eos_ids=2) == {}


# ------------------------------------------------------------------------------------ NaN / Inf
def test_nonfinite_evidence_counts_only_real_tokens():
    stats, _ = _stats()
    assert nonfinite_evidence(loss_terms={"loss": 1.0}, stats=stats, grad_norm=3.0) == {}
    padded = dict(stats, teacher_kl=torch.where(stats["mask"], stats["teacher_kl"], torch.tensor(float("nan"))))
    assert nonfinite_evidence(loss_terms={"loss": 1.0}, stats=padded, grad_norm=3.0) == {}
    bad = dict(stats, teacher_kl=stats["teacher_kl"].clone())
    bad["teacher_kl"][0, 0] = float("inf")
    bad["teacher_kl"][1, 2] = float("nan")
    out = nonfinite_evidence(loss_terms={"loss": float("nan"), "loss/route1": 1.0}, stats=bad, grad_norm=float("inf"))
    assert out == {"loss": 1.0, "tokens/teacher_kl": 2.0, "grad_norm": float("inf")}


def test_nonfinite_evidence_checks_the_teacher_feedback():
    mask = _mask([2, 1], 3)
    stats = {"mask": mask}
    topk = torch.full((2, 3, 2), -1.0)
    topk[0, 0, 1] = float("-inf")  # a zero-probability entry is legitimate
    fb = Feedback(access="topk", sampled_logprobs_BT=torch.zeros(2, 3), topk_ids_BTK=torch.zeros(2, 3, 2).long(),
                  topk_logprobs_BTK=topk)
    assert nonfinite_evidence(loss_terms={}, stats=stats, feedback=fb) == {}
    sampled = torch.zeros(2, 3)
    sampled[1, 0] = float("-inf")  # log π_T(y_t) = −inf makes the reward infinite
    topk2 = topk.clone()
    topk2[0, 1, 0] = float("nan")
    fb2 = Feedback(access="topk", sampled_logprobs_BT=sampled, topk_ids_BTK=fb.topk_ids_BTK, topk_logprobs_BTK=topk2)
    assert nonfinite_evidence(loss_terms={}, stats=stats, feedback=fb2) == {
        "teacher/sampled_logprobs": 1.0, "teacher/topk_logprobs": 1.0}


# ------------------------------------------------------------------------------------ samples
class _Tok:
    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_batch_samples_carry_the_per_token_log_ratio():
    ro = _rollouts([[5, 6, 7], [1, 2, 0], [3, 3, 3]], [3, 2, 3], [False, False, True], [False, True, True])
    stats = {"mask": ro.completion_mask_BT, "teacher_kl": torch.tensor([[0.1, 0.2, 0.3], [-1.0, 2.0, 9.0],
                                                                         [0.5, 0.5, 0.5]])}
    out = batch_samples(ro, stats, _Tok(), 2)
    assert [s["token_ids"] for s in out] == [[1, 2], [3, 3, 3]]  # on-policy rows first, padding dropped
    assert out[0]["log_ratio"] == [-1.0, 2.0] and out[0]["tokens"] == ["t1", "t2"]
    assert out[1]["truncated"] and out[1]["prompt"] == "1 1"
    assert batch_samples(ro, stats, _Tok(), 0) == []
    assert [x["score"] for x in out] == [None, None]  # no task: not marked


class _LastDigitTask:
    """Scores 1 when the decoded completion ends with the answer (a verifier written for the test)."""

    def verify(self, example, completion):
        return float(completion.endswith(example.answer))


def test_batch_samples_are_marked_by_the_tasks_verifier():
    from opd.tasks.base import Example

    ro = _rollouts([[5, 6, 7], [1, 2, 0], [3, 3, 3]], [3, 2, 3], [False, False, True], [True, True, False])
    ro = Rollouts(**{**{f: getattr(ro, f) for f in ro.__dataclass_fields__},
                     "examples": (Example("p0", "7"), Example("p1", "9"), Example("p2", "3"))})
    stats = {"mask": ro.completion_mask_BT, "teacher_kl": torch.zeros(3, 3)}
    out = batch_samples(ro, stats, _Tok(), 3, task=_LastDigitTask())
    assert [(x["prompt"], x["completion"], x["score"]) for x in out] == [
        ("p0", "5 6 7", 1.0), ("p1", "1 2", 0.0), ("p2", "3 3 3", 1.0)]


def _arith_verdict(completion: str, answer: str) -> float:
    """The arith verifier written out: the text before the first EOS '$' equals the answer."""
    head, eos, _ = completion.partition("$")
    return float(bool(eos) and head == answer)


@pytest.mark.parametrize("method", [None, "sft-teacher"])
def test_write_samples_keeps_heldout_and_training_samples_with_their_marks(method, tmp_path):
    """The call the loop makes at an evaluation: held-out greedy samples (scored by the evaluation's
    verifier) and the training batch (scored here), each saying where it comes from."""
    import json

    from opd.evaluate import evaluate

    parts = _parts(tmp_path, "rollout.prompts_per_step=8", "monitor.samples=3", "rollout.temperature=0.7",
                   *([f"method={method}"] if method else []))
    try:
        train_step(parts, 0)
        examples = parts.task.eval_examples(24)
        result = evaluate(parts.student, parts.tokenizer, parts.task, examples, max_new_tokens=5, batch_size=10,
                          teacher=parts.teacher, samples=24)
        assert len(result.samples) == 24 and "samples" not in result.as_metrics()
        scores = [s["score"] for s in result.samples]
        assert scores == [_arith_verdict(s["completion"], s["answer"]) for s in result.samples]
        assert sum(scores) / 24 == pytest.approx(result.accuracy) and 0 < result.accuracy < 1
        assert [s["prompt"] for s in result.samples] == [e.prompt for e in examples]
        assert all(len(s["log_ratio"]) == len(s["tokens"]) for s in result.samples)
        n = parts.monitor.write_samples(1, parts.tokenizer, task=parts.task, heldout=result.samples)
    finally:
        parts.close()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert n == len(rows) == 6
    held, train = rows[:3], rows[3:]
    assert all(r["source"] == "heldout" and r["decoding"] == "greedy" and r["step"] == 1 for r in held)
    assert [r["score"] for r in held] == scores[:3]
    assert all(r["source"] == "train" and r["temperature"] == 0.7 and r["step"] == 1 for r in train)
    assert {r["policy"] for r in train} == {"teacher" if method == "sft-teacher" else "student"}
    assert [r["score"] for r in train] == [_arith_verdict(r["completion"], r["answer"]) for r in train]


# ------------------------------------------------------------------------------------ config
def test_monitor_section_sits_between_eval_and_logging():
    assert SECTIONS.index("monitor") == SECTIONS.index("eval") + 1 == SECTIONS.index("logging") - 1
    cfg = load_config(None, [])
    assert cfg.monitor.diagnostics and cfg.monitor.length_action == "warn" and cfg.logging.report


def test_monitor_options_are_validated():
    with pytest.raises(ConfigError, match="nonfinite_action=off is not allowed"):
        load_config(None, ["monitor.nonfinite_action=off"])
    with pytest.raises(ConfigError, match="monitor.length_action='maybe' is not one of"):
        load_config(None, ["monitor.length_action=maybe"])
    with pytest.raises(ConfigError, match=r"monitor.reward_neg_frac_max=0.2 is out of range"):
        load_config(None, ["monitor.reward_neg_frac_max=0.2"])
    warnings = config_warnings(load_config(None, ["monitor.diagnostics=false", "monitor.support_action=stop",
                                                  "monitor.grad_spike_action=off", "monitor.grad_spike_factor=4"]))
    assert any("never acts with monitor.diagnostics=false" in w for w in warnings)
    assert any("monitor.grad_spike_factor=4.0 has no effect" in w for w in warnings)
    assert config_warnings(load_config(None, [])) == []


# ------------------------------------------------------------------------------------ loop integration
def _parts(run_dir, *overrides, diagnostics=True):
    cfg = load_config(None, [*SMOKE, "train.lr=1e-3", *overrides, f"monitor.diagnostics={str(diagnostics).lower()}"])
    parts = build_components(cfg, run_dir, Accelerator(cpu=True))
    parts.monitor.echo = None
    return parts


@pytest.mark.parametrize("overrides", [[], ["method=thinking-machines"], ["method=cr-opd"]])
def test_diagnostics_use_the_losses_forward_pass_only(overrides, tmp_path):
    """Counting the student's training forwards and the teacher's scoring calls: the same with the
    diagnostics on and off (one each per step)."""
    counts = {}
    for diagnostics in (True, False):
        parts = _parts(tmp_path / str(diagnostics), *overrides, diagnostics=diagnostics)
        assert parts.access == ("full" if not overrides else ("sampled" if "thinking" in overrides[0] else "topk"))
        n = {"student": 0, "teacher": 0}
        parts.student.lm_head.register_forward_hook(
            lambda m, i, o: n.__setitem__("student", n["student"] + m.training))
        score = parts.teacher.score

        def counted(*a, **k):
            n["teacher"] += 1
            return score(*a, **k)

        parts.teacher.score = counted
        metrics = train_step(parts, 0)
        counts[diagnostics] = dict(n)
        diag = {k for k in metrics if k.startswith("diag/")}
        if diagnostics:
            assert {"diag/student_entropy", "diag/teacher_kl_early", "diag/reward_neg_frac",
                    "diag/teacher_offsupport_frac", "diag/repetition_rate", "diag/gate_keep_frac"} <= diag
            if overrides:  # route 2: advantages and importance ratios; CR-OPD: routed mass
                assert {"diag/advantage_mean", "diag/is_ratio_mean"} <= diag or "diag/cr_opd_routed_frac" in diag
            if overrides == ["method=cr-opd"]:
                assert "diag/cr_opd_routed_frac" in diag
        else:  # only the per-sequence numbers the detectors need
            assert diag == {"diag/length_mean", "diag/length_min", "diag/length_max", "diag/truncation_rate",
                            "diag/eos_rate", "diag/repetition_rate"}
    assert counts[True] == counts[False] == {"student": 1, "teacher": 1}


@pytest.mark.parametrize("method", [None, *PRESETS, "chunked"])
def test_diagnostics_of_every_preset_are_finite(method, tmp_path):
    """One monitored step of every method (and the chunked large-vocabulary path) gives finite
    diag/* metrics and no skipped update."""
    overrides = ["route1.chunk_size=8"] if method == "chunked" else [] if method is None else [f"method={method}"]
    parts = _parts(tmp_path, "rollout.prompts_per_step=8", *overrides)
    assert parts.chunked == (method == "chunked")
    metrics = train_step(parts, 0)
    diag = {k: v for k, v in metrics.items() if k.startswith("diag/")}
    assert "skipped" not in metrics and len(diag) >= 20
    assert [k for k, v in diag.items() if not math.isfinite(v)] == []
    if method == "chunked":
        assert "diag/rkl_early" in diag and "diag/overlap_mass" in diag  # from the fused pass's chunks
