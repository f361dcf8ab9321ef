"""The methods published since mid-2026 (opd/config/presets/recent.py) against their formulas written here
by hand, and the new math they use (opd/math/f_rewards.py, window_credit.py, trust.py) against naive
references: value and gradient, odd shapes, random masks, the all-masked case.

Preset tests reuse the fixed batch of tests/test_presets_common.py: each preset's objective, built from
its config exactly as ``opd distill`` builds it, must equal the hand formula in value and in gradient
w.r.t. the student's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.config.presets import PRESETS
from opd.math import contrast, credit, f_rewards, trust, window_credit
from opd.tasks.base import Example
from opd.teachers.wrong_hint import WrongHintTeacher
from opd.types import Rollouts
from tests.test_presets_common import (
    Batch,
    assert_matches,
    at,
    lsm,
    make_batch,
    preset_config,
    run_objective,
    total,
)

RECENT = ("opd-plus", "tropd", "tropd-clip", "mopd", "async-opd", "bridging", "topd", "rlcsd")


def _n(b: Batch) -> torch.Tensor:
    return b.mask.sum()


def _lp(b: Batch) -> torch.Tensor:
    return at(lsm(b.s_logits), b.ids)


def _t(b: Batch) -> torch.Tensor:
    return at(lsm(b.t_logits), b.ids)


# ---------------------------------------------------------------------------------------------------
# hand formulas of the presets


def hand_opd_plus(b: Batch):
    """OPD+ (arXiv 2606.01039) with f = JS: f(u) = ½[u log u − (u+1) log((u+1)/2)], f'(u) = ½ log(2u/(u+1)),
    A = −(f(u) − u f'(u)) = ½ log((u+1)/2), u = π_T(y)/π_S(y);  L = −mean ρ·A."""
    lp = _lp(b)
    u = (_t(b) - lp.detach()).exp()
    f = 0.5 * (u * u.log() - (u + 1) * ((u + 1) / 2).log())
    f_prime = 0.5 * (2 * u / (u + 1)).log()
    adv = -(f - u * f_prime)
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


def hand_tropd(b: Batch):
    """TrOPD (arXiv 2606.01249), masking variant: K1 policy gradient only where min(π_T/π_S, 1) ≥ 0.1;
    the reducer still counts every token (a gate removes tokens without rescaling the others)."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    p_trust = torch.minimum(r.exp(), torch.ones(()))
    keep = b.mask & (p_trust >= 0.1)
    loss = -total((lp - b.mu).exp() * r, keep) / _n(b)
    return loss, loss


def hand_tropd_clip(b: Batch):
    """TrOPD (arXiv 2606.01249), clipping variant ([INFER] reading): A = max(log π_T − log π_S, log 0.1);
    L = −mean ρ·A over every token."""
    lp = _lp(b)
    adv = torch.clamp((_t(b) - lp).detach(), min=math.log(0.1))
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


def hand_mopd(b: Batch):
    """MOPD (arXiv 2606.30406): A = sg[log π_T − log π_S] + (R − mean_g R)/(std_g R + 1e-6) (Bessel std,
    0 for a constant group); w = 1[0.2 ≤ π_S/μ ≤ 5]; L = −(1/S) Σ_seq (1/|y|) Σ_t w ρ A."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    a_out = []
    for i in range(len(b.outcome)):
        grp = b.outcome[b.group == b.group[i]]
        a_out.append((b.outcome[i] - grp.mean()) / (grp.std() + 1e-6) if grp.std() > 0 else torch.zeros(()))
    adv = r + torch.stack(a_out)[:, None]
    ratio = (lp - b.mu).exp()
    band = (ratio.detach() >= 0.2) & (ratio.detach() <= 5.0)
    per_seq = [total(ratio[i] * adv[i], (b.mask & band)[i]) / b.mask[i].sum() for i in range(b.mask.shape[0])]
    loss = -torch.stack(per_seq).sum() / b.mask.shape[0]
    return loss, loss


def hand_async_opd(b: Batch):
    """AsyncOPD (arXiv 2606.24143): on stale rollouts (μ ≠ π_S), the reward recomputed under the *current*
    student, A = log π_T − sg[log π_S], not log π_T − log μ;  L = −mean (π_S/μ)·A."""
    lp = _lp(b)
    loss = -total((lp - b.mu).exp() * (_t(b) - lp.detach()), b.mask) / _n(b)
    return loss, loss


def hand_bridging(b: Batch):
    """Bridging / near-future guidance (arXiv 2606.00305, [INFER] window form): A_t = Σ_{k<4} r_{t+k} within
    the completion;  L = −mean ρ·A."""
    lp = _lp(b)
    r = (_t(b) - lp).detach()
    adv = torch.zeros_like(r)
    for i in range(b.mask.shape[0]):
        n = int(b.mask[i].sum())
        for t in range(n):
            adv[i, t] = sum(r[i, t + k] for k in range(4) if t + k < n)
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


def hand_topd(b: Batch):
    """TOPD (arXiv 2605.31490): sampled-token OPD on the truncated rollout (the horizon is the sampler's:
    the batch stands for a prefix rollout);  L = −mean ρ·(log π_T − log π_S)."""
    lp = _lp(b)
    loss = -total((lp - b.mu).exp() * (_t(b) - lp.detach()), b.mask) / _n(b)
    return loss, loss


def _grpo(b: Batch) -> torch.Tensor:
    """(R − mean_g R)/(std_g R + 1e-6) per row (Bessel std; 0 for a constant group), as ``[B, 1]``."""
    a_out = []
    for i in range(len(b.outcome)):
        grp = b.outcome[b.group == b.group[i]]
        a_out.append((b.outcome[i] - grp.mean()) / (grp.std() + 1e-6) if grp.std() > 0 else torch.zeros(()))
    return torch.stack(a_out)[:, None]


def hand_rlcsd(b: Batch):
    """RLCSD (arXiv 2606.11709, [INFER] advantage): the batch's teacher logits stand for the correct-hint self-teacher
    and its reference logits for the wrong-hint copy; A = log π(y|c⁺) − log π(y|c⁻) + GRPO advantage;
    L = −mean ρ·A."""
    lp = _lp(b)
    adv = _t(b) - at(lsm(b.ref_logits), b.ids) + _grpo(b)
    loss = -total((lp - b.mu).exp() * adv, b.mask) / _n(b)
    return loss, loss


HAND = {"opd-plus": hand_opd_plus, "tropd": hand_tropd, "tropd-clip": hand_tropd_clip, "mopd": hand_mopd,
        "async-opd": hand_async_opd,
        "bridging": hand_bridging, "topd": hand_topd, "rlcsd": hand_rlcsd}
# a sampler μ ≠ π_S where the method is about it: MOPD's truncated IS band, AsyncOPD's stale rollouts
MU = {"mopd": "noise", "async-opd": "noise"}


def test_recent_presets_are_listed_and_have_a_formula_test():
    assert set(RECENT) <= set(PRESETS) and set(HAND) == set(RECENT)
    assert len(PRESETS) >= 36


@pytest.mark.parametrize("name", sorted(HAND))
def test_recent_preset_equals_its_formula(name):
    assert_matches(name, HAND[name], mu=MU.get(name, "on"))


def test_tropd_gate_binds_on_the_batch():
    """The trust region drops some tokens of the fixed batch and keeps others (the gate is exercised)."""
    b = make_batch("tropd", preset_config("tropd"))
    p = trust.trust_probability(_lp(b).detach(), _t(b))[b.mask]
    assert (p < 0.1).any() and (p >= 0.1).any()


def test_opd_plus_differs_from_the_stop_gradient_reward():
    """The de-biased JS advantage is not the biased −f(u) reward: the two losses' gradients differ."""
    b = make_batch("opd-plus", preset_config("opd-plus"))
    _, g_plus, _ = run_objective("opd-plus", b)
    lp = _lp(b)
    u = (_t(b) - lp.detach()).exp()
    biased = -0.5 * (u * u.log() - (u + 1) * ((u + 1) / 2).log())
    g_biased = torch.autograd.grad(-total((lp - b.mu).exp() * biased, b.mask) / _n(b), b.s_logits)[0]
    assert not torch.allclose(g_plus, g_biased, rtol=1e-3, atol=1e-6)


def test_async_opd_recomputes_the_reward_and_mopd_truncates_ratios():
    """On a stale batch, AsyncOPD's recomputed reward differs from the sampler's log π_T − log μ; MOPD's IS band
    binds (the loss changes when the sampler does)."""
    cfg = preset_config("async-opd")
    assert cfg.rollout.overlap and cfg.teacher.cache == "memory" and cfg.route2.reward_logprobs == "current"
    stale = make_batch("async-opd", cfg, mu="noise")
    assert not torch.allclose(run_objective("async-opd", stale)[0],
                              run_objective("async-opd", stale, "route2.reward_logprobs=behaviour")[0])
    cfg = preset_config("mopd")
    on, stale = make_batch("mopd", cfg, mu="on"), make_batch("mopd", cfg, mu="noise")
    assert not torch.allclose(run_objective("mopd", on)[0], run_objective("mopd", stale)[0])


def test_topd_truncates_the_rollout_horizon():
    cfg = preset_config("topd")
    assert cfg.rollout.prefix_tokens == 4 < cfg.rollout.max_new_tokens


# ---------------------------------------------------------------------------------------------------
# opd.math.f_rewards


def _naive_f(u: float, f: str) -> float:
    return {"rkl": -math.log(u), "fkl": u * math.log(u), "hellinger": (math.sqrt(u) - 1) ** 2,
            "jsd": 0.5 * (u * math.log(u) - (u + 1) * math.log((u + 1) / 2))}[f]


@pytest.mark.parametrize("f", f_rewards.F_DIVERGENCE_NAMES)
def test_corrected_f_reward_equals_the_formula_with_a_numerical_derivative(f):
    """r = −(f(u) − u f'(u)), f' by central differences of the naive f, on an odd shape with a random mask."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64) - 1
    t = torch.randn(3, 7, generator=g, dtype=torch.float64) - 1
    mask = torch.rand(3, 7, generator=g) < 0.7
    s_pad = torch.where(mask, s, torch.full_like(s, -math.inf))  # padding holds -inf: no nan may leak
    r = f_rewards.corrected_f_reward(s_pad, t, f=f, mask_BT=mask)
    for (i, j), m in zip(torch.cartesian_prod(torch.arange(3), torch.arange(7)).tolist(), mask.flatten().tolist()):
        if not m:
            assert r[i, j] == 0
            continue
        u, h = math.exp(float(t[i, j] - s[i, j])), 1e-6
        fp = (_naive_f(u + h, f) - _naive_f(u - h, f)) / (2 * h)
        assert float(r[i, j]) == pytest.approx(-(_naive_f(u, f) - u * fp), rel=1e-6, abs=1e-7)
    assert not r.requires_grad


@pytest.mark.parametrize("f", f_rewards.F_DIVERGENCE_NAMES)
def test_corrected_reward_is_the_exact_gradient_by_enumeration(f):
    """On a 5-token vocabulary, E_{v~π_S}[−r(v) ∇log π_S(v)] (enumerated) equals ∇_θ Σ_v π_S(v) f(u(v)) from
    autograd; the stop-gradient reward −f(u) matches only for the reverse KL."""
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    s_lp = torch.log_softmax(theta, -1)
    d_f = (s_lp.exp() * f_rewards.f_value(t_lp - s_lp, f)).sum()
    exact = torch.autograd.grad(d_f, theta)[0]
    r = f_rewards.corrected_f_reward(s_lp.detach(), t_lp, f=f)
    p = s_lp.detach().exp()
    score = torch.eye(5, dtype=torch.float64) - p  # ∇_θ log softmax(θ)_v = e_v − p
    estimate = (p[:, None] * (-r)[:, None] * score).sum(0)
    torch.testing.assert_close(estimate, exact)
    biased = (p[:, None] * f_rewards.f_value(t_lp - s_lp.detach(), f)[:, None] * score).sum(0)
    assert torch.allclose(biased, exact) == (f == "rkl")


def test_f_rewards_reject_bad_input_in_one_line():
    with pytest.raises(ValueError, match="unknown f-divergence 'kl'; choose one of rkl, fkl, hellinger, jsd"):
        f_rewards.corrected_f_reward(torch.zeros(2, 3), torch.zeros(2, 3), f="kl")
    with pytest.raises(ValueError, match=r"teacher_logprobs_BT has shape \(2, 4\) but student_logprobs_BT has shape"):
        f_rewards.corrected_f_reward(torch.zeros(2, 3), torch.zeros(2, 4), f="jsd")
    r = f_rewards.corrected_f_reward(torch.zeros(2, 3), torch.zeros(2, 3), f="hellinger",
                                     mask_BT=torch.zeros(2, 3, dtype=torch.bool))
    assert (r == 0).all()  # all masked


# ---------------------------------------------------------------------------------------------------
# opd.math.window_credit


def _naive_window(r, m, w, gamma):
    out = torch.zeros_like(r, dtype=torch.float64)
    for i in range(r.shape[0]):
        for t in range(r.shape[1]):
            if m[i, t]:
                out[i, t] = sum(gamma ** k * float(r[i, t + k]) for k in range(w)
                                if t + k < r.shape[1] and m[i, t + k])
    return out


@pytest.mark.parametrize("window,gamma", [(1, 1.0), (3, 0.9), (4, 1.0), (20, 1.0), (2, 0.0)])
def test_windowed_returns_equal_a_loop(window, gamma):
    g = torch.Generator().manual_seed(window)
    r = torch.randn(3, 9, generator=g)
    m = torch.rand(3, 9, generator=g) < 0.75
    m[2] = False  # an all-masked row
    out = window_credit.windowed_returns(torch.where(m, r, torch.full_like(r, math.nan)), m, window, gamma)
    torch.testing.assert_close(out.double(), _naive_window(r, m, window, gamma), rtol=1e-5, atol=1e-6)


def test_window_credit_limits_and_registry():
    """W = 1 is immediate credit, W ≥ T with γ = 1 the return-to-go; ``window`` is a credit kind of the registry
    that the schema's choices read."""
    g = torch.Generator().manual_seed(0)
    r, m = torch.randn(2, 6, generator=g), torch.ones(2, 6, dtype=torch.bool)
    m[1, 4:] = False
    imm = credit.temporal_credit(r, m, kind="immediate")
    rtg = credit.temporal_credit(r, m, kind="return_to_go")
    torch.testing.assert_close(credit.temporal_credit(r, m, kind="window", window=1), imm)
    torch.testing.assert_close(credit.temporal_credit(r, m, kind="window", window=6, gamma=1.0), rtg)
    from opd.config.fields import field_specs
    assert "window" in credit.CREDIT_KINDS
    assert field_specs()["route2.credit"].choices == credit.CREDIT_KINDS
    assert field_specs()["route2.f_divergence"].choices == f_rewards.F_DIVERGENCE_NAMES
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        window_credit.windowed_returns(r, m, 0)


# ---------------------------------------------------------------------------------------------------
# opd.math.trust


def test_trust_region_mask_equals_the_formula():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 5, generator=g) - 2, torch.randn(4, 5, generator=g) - 2
    m = torch.rand(4, 5, generator=g) < 0.8
    for delta in (0.0, 0.3, 1.0):
        got = trust.trust_region_mask(torch.where(m, s, torch.full_like(s, -math.inf)), t, m, delta)
        want = [[bool(m[i, j]) and min(math.exp(float(t[i, j] - s[i, j])), 1.0) >= delta for j in range(5)]
                for i in range(4)]
        assert got.tolist() == want
    with pytest.raises(ValueError, match="threshold must be <= 1.0, got 1.5"):
        trust.trust_region_mask(s, t, m, 1.5)
    assert not trust.trust_region_mask(s, t, torch.zeros_like(m), 0.0).any()  # all masked


def test_trust_gate_of_the_objective_drops_exactly_the_outliers():
    """With gates.trust_min the objective's gate keeps exactly the trust region (and the invariance: teacher ==
    student gives zero loss and gradient)."""
    b = make_batch("tropd", preset_config("tropd"))
    loss_on, _, _ = run_objective("tropd", b)
    loss_off, _, _ = run_objective("tropd", b, "gates.trust_min=null")
    assert not torch.allclose(loss_on, loss_off)
    same = Batch(**{**b.__dict__, "t_logits": b.s_logits.detach().clone()})
    loss, grad, _ = run_objective("tropd", same)
    assert float(loss.abs()) < 1e-6 and float(grad.abs().max()) < 1e-6


# ---------------------------------------------------------------------------------------------------
# RLCSD: opd.math.contrast and the wrong-hint teacher


def test_contrastive_reward_equals_the_formula_and_cancels_the_student():
    """e_ctr = (log π(c⁺) − log π_S) − (log π(c⁻) − log π_S), written with the student term; 0 on padding."""
    g = torch.Generator().manual_seed(7)
    pos, neg, stu = (torch.randn(3, 5, generator=g) for _ in range(3))
    m = torch.rand(3, 5, generator=g) < 0.7
    got = contrast.contrastive_reward(torch.where(m, pos, torch.full_like(pos, -math.inf)), neg, m)
    want = torch.where(m, (pos - stu) - (neg - stu), torch.zeros(()))
    torch.testing.assert_close(got, want)
    assert not contrast.contrastive_reward(pos, neg, torch.zeros_like(m)).any()
    with pytest.raises(ValueError, match="wrong_hint_logprobs_BT has shape"):
        contrast.contrastive_reward(pos, neg[:, :4])


class _Recorder:
    def __init__(self):
        self.seen = None

    def score(self, rollouts, *, access="sampled", topk=32):
        self.seen = rollouts.examples
        return "scored"


def _rollouts(contexts):
    n = len(contexts)
    return Rollouts(
        prompt_ids_BP=torch.ones(n, 2, dtype=torch.long), prompt_mask_BP=torch.ones(n, 2, dtype=torch.long),
        completion_ids_BT=torch.ones(n, 3, dtype=torch.long), completion_mask_BT=torch.ones(n, 3, dtype=torch.bool),
        behaviour_logprobs_BT=torch.zeros(n, 3), truncated_B=torch.zeros(n, dtype=torch.bool),
        on_policy_B=torch.ones(n, dtype=torch.bool), group_index_B=torch.arange(n),
        examples=tuple(Example(prompt=f"p{i}", teacher_context=c) for i, c in enumerate(contexts)),
    )


def test_wrong_hint_teacher_gives_each_row_another_prompts_hint():
    """Row i reads the next row's context that differs from its own (groups of one prompt share a context)."""
    inner = _Recorder()
    assert WrongHintTeacher(inner).score(_rollouts(["a", "a", "b", "b", "c"])) == "scored"
    assert [e.teacher_context for e in inner.seen] == ["b", "b", "c", "c", "a"]
    assert [e.prompt for e in inner.seen] == ["p0", "p1", "p2", "p3", "p4"]  # the prompts stay
    with pytest.raises(ValueError, match="at least two different teacher contexts"):
        WrongHintTeacher(inner).score(_rollouts(["a", "a"]))


def test_rlcsd_preset_needs_its_reference_and_context():
    from opd.config.fields import ConfigError
    with pytest.raises(ConfigError, match="route2.reward=contrastive"):
        preset_config("rlcsd", "regularization.reference=null")
    with pytest.raises(ConfigError, match="teacher.use_context"):
        preset_config("rlcsd", "teacher.use_context=false")


def test_new_knobs_warn_when_they_have_no_effect():
    from opd.config.advice import config_warnings
    from opd.config.load import load_config
    assert config_warnings(load_config(None, ["method=thinking-machines", "route2.window=3"])) == [
        "route2.window=3 has no effect: it is used only with route2.credit=window"]
    assert config_warnings(load_config(None, ["method=thinking-machines", "route2.f_divergence=jsd"])) == [
        "route2.f_divergence='jsd' has no effect: it is used only with route2.reward=f_corrected"]
