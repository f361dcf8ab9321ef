"""CR-OPD options (opd/math/routing_options.py): nucleus reachability, routing temperature and the
mass rules, value and logit gradient against the formulas written out per token here."""

import math

import pytest
import torch

from opd.math.routing import cr_opd_loss, cr_opd_target, softmax_routing_loss
from opd.math.routing_options import nucleus_reachable

F64 = torch.float64
B, T, V, K = 3, 6, 9, 5


def make_problem(k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, dtype=F64, generator=g).mul(1.5).requires_grad_(True)
    teacher = torch.randn(B, T, V, dtype=F64, generator=g).mul(1.5).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, dtype=F64, generator=g) - 0.5
    return logits, ids, adv, top.indices, top.values


def naive_nucleus(pi, p):
    """Tokens in the smallest most-probable prefix with mass >= p (ties with its last member count)."""
    order = sorted(range(len(pi)), key=lambda v: -pi[v])
    total, floor = 0.0, None
    for v in order:
        floor = pi[v]
        total += pi[v]
        if total >= p:
            break
    return {v for v in range(len(pi)) if pi[v] >= floor}


def naive_grad_and_value(logits, ids, adv, t_ids, t_logp, *, student_k=None, tau_s=0.0, reach_p=None, kappa=1.0,
                         eta=1.0, temperature=1.0, mass="unit"):
    """Per token: candidates C, ρ ∝ (π_T^κ π_S^{1−κ})^{1/T}, ρ̃ = (1−η)π + ηρ and the logit gradient
    c (e_y − ρ̃) with c = −A (unit), −A(1−π_y)/(1−(1−η)π_y) (matched), π_y(1 − e^A) (excess) on routed
    tokens (A < 0, C ≠ ∅), else the plain PG gradient −A(e_y − π); value −A log π(y) everywhere."""
    logp = logits.detach().log_softmax(-1)
    grad = torch.zeros_like(logp)
    value = torch.zeros(ids.shape, dtype=F64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in ids.shape]).tolist():
        idx = tuple(idx)
        pi = logp[idx].exp().tolist()
        y, a = int(ids[idx]), float(adv[idx])
        teacher = {int(i): math.exp(float(lp)) for i, lp in zip(t_ids[idx], t_logp[idx])}
        top_s = set(sorted(range(V), key=lambda v: -pi[v])[:student_k]) if student_k else set()
        nuc = naive_nucleus(pi, reach_p) if reach_p is not None else set()
        every = student_k is None and tau_s == 0 and reach_p is None
        cands = [v for v in teacher if v != y and (every or v in top_s or (tau_s > 0 and pi[v] >= tau_s) or v in nuc)]
        value[idx] = -a * math.log(pi[y])
        e_y = [1.0 if v == y else 0.0 for v in range(V)]
        if a < 0 and cands:
            w = {v: (teacher[v] ** kappa * pi[v] ** (1 - kappa)) ** (1 / temperature) for v in cands}
            z = sum(w.values())
            rt = [(1 - eta) * pi[v] + eta * w.get(v, 0.0) / z for v in range(V)]
            c = {"unit": -a, "matched": -a * (1 - pi[y]) / (1 - (1 - eta) * pi[y]),
                 "excess": pi[y] * (1 - math.exp(a))}[mass]
            grad[idx] = torch.tensor([c * (e - r) for e, r in zip(e_y, rt)], dtype=F64)
        else:
            grad[idx] = torch.tensor([-a * (e - p) for e, p in zip(e_y, pi)], dtype=F64)
    return grad, value


@pytest.mark.parametrize("knobs", [
    dict(student_k=3),
    dict(reach_p=0.6),
    dict(reach_p=0.3, tau_s=0.2),
    dict(student_k=4, temperature=0.5, kappa=0.5),
    dict(student_k=4, temperature=2.0, eta=0.7),
    dict(student_k=3, mass="matched"),
    dict(reach_p=0.8, mass="matched", eta=0.6, kappa=0.3),
    dict(student_k=5, mass="excess"),
    dict(tau_s=0.05, mass="excess", eta=0.5, temperature=0.7),
])
def test_options_match_the_formula(knobs):
    logits, ids, adv, t_ids, t_logp = make_problem()
    loss, _ = cr_opd_loss(logits.log_softmax(-1), ids, adv, t_ids, t_logp, **knobs)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    ref_g, ref_v = naive_grad_and_value(logits, ids, adv, t_ids, t_logp, **knobs)
    torch.testing.assert_close(loss.detach(), ref_v)
    torch.testing.assert_close(g, ref_g)


def test_nucleus_reachable_against_loop():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(40, V, dtype=F64, generator=g).mul(2).log_softmax(-1)
    logp[0] = torch.tensor([0.25, 0.25, 0.25, 0.25] + [0.0] * (V - 4), dtype=F64).clamp(min=1e-30).log()  # ties
    for p in (0.1, 0.5, 0.75, 0.9, 1.0):
        got = nucleus_reachable(logp, logp, p)
        for row in range(logp.shape[0]):
            want = naive_nucleus(logp[row].exp().tolist(), p)
            assert {v for v in range(V) if got[row, v]} == want, (p, row)
    assert nucleus_reachable(logp, logp, 0.5)[0, :4].all()  # ties at the boundary all count


def test_nothing_reachable_is_plain_pg_for_every_mass_rule():
    logits, ids, adv, t_ids, t_logp = make_problem()
    logp = logits.log_softmax(-1)
    plain = softmax_routing_loss(logp, ids, adv)
    (g_plain,) = torch.autograd.grad(plain.sum(), logits)
    for mass in ("unit", "matched", "excess"):
        # the sampled token is the only reachable one (top-1 nucleus with the sampled token forced on top)
        forced = logits.detach().clone()
        forced.scatter_(-1, ids.unsqueeze(-1), 50.0)
        forced.requires_grad_(True)
        lp = forced.log_softmax(-1)
        loss, m = cr_opd_loss(lp, ids, adv, t_ids, t_logp, reach_p=0.5, mass=mass)
        assert not m["routed"].any()
        (g,) = torch.autograd.grad(loss.sum(), forced)
        ref = softmax_routing_loss(forced.log_softmax(-1), ids, adv)
        (g_ref,) = torch.autograd.grad(ref.sum(), forced)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(g, g_ref)
    assert g_plain.shape == logits.shape


def test_everything_reachable_matched_is_the_softmax_routing_limit():
    """Every token a candidate (teacher top-K = V, no reachability rule), κ = 0, T_r = 1, η = 1, mass
    matched: ρ = π restricted off y, c = −A(1−π_y), so the gradient is plain PG's −A(e_y − π)."""
    logits, ids, adv, t_ids, t_logp = make_problem(k=V)
    logp = logits.log_softmax(-1)
    loss, m = cr_opd_loss(logp, ids, adv, t_ids, t_logp, student_k=None, kappa=0.0, mass="matched")
    assert m["routed"].any()
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (g_ref,) = torch.autograd.grad(softmax_routing_loss(logits.log_softmax(-1), ids, adv).sum(), logits)
    torch.testing.assert_close(g, g_ref)
    # unit mass on the same target is the same direction, scaled by 1/(1 − π_y) on routed tokens
    loss_u, _ = cr_opd_loss(logits.log_softmax(-1), ids, adv, t_ids, t_logp, student_k=None, kappa=0.0)
    (g_u,) = torch.autograd.grad(loss_u.sum(), logits)
    pi_y = logp.detach().exp().gather(-1, ids.unsqueeze(-1))
    scale = torch.where(m["routed"].unsqueeze(-1), 1.0 / (1.0 - pi_y), torch.ones_like(pi_y))
    torch.testing.assert_close(g_u, g_ref * scale)


def test_excess_target_is_the_teacher_probability_without_baseline():
    """With A = log π_T(y) − log π_S(y) < 0 and η = 1 the excess target leaves q(y) = π_T(y)."""
    logits, ids, _, t_ids, t_logp = make_problem(k=V)
    logp = logits.log_softmax(-1)
    teacher_full = torch.full_like(logp, -float("inf")).scatter(-1, t_ids, t_logp)
    adv = (teacher_full.gather(-1, ids.unsqueeze(-1)) - logp.detach().gather(-1, ids.unsqueeze(-1))).squeeze(-1)
    loss, m = cr_opd_loss(logp, ids, adv, t_ids, t_logp, student_k=None, mass="excess")
    (g,) = torch.autograd.grad(loss.sum(), logits)
    q = logp.detach().exp() - g                          # π − q = ∂KL(q‖π)/∂z per token
    routed = m["routed"]
    assert routed.any()
    torch.testing.assert_close(q.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[routed],
                               teacher_full.exp().gather(-1, ids.unsqueeze(-1)).squeeze(-1)[routed])
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)))


def test_temperature_sharpens_and_flattens_the_target():
    logits, ids, adv, t_ids, t_logp = make_problem(k=V)
    logp = logits.log_softmax(-1).detach()
    sharp, cand = cr_opd_target(logp, ids, t_ids, t_logp, student_k=None, temperature=0.25)
    base, _ = cr_opd_target(logp, ids, t_ids, t_logp, student_k=None)
    flat, _ = cr_opd_target(logp, ids, t_ids, t_logp, student_k=None, temperature=4.0)
    assert (sharp.amax(-1) >= base.amax(-1) - 1e-12).all() and (flat.amax(-1) <= base.amax(-1) + 1e-12).all()
    torch.testing.assert_close(sharp.sum(-1), torch.ones_like(sharp.sum(-1)))


def test_bad_options_raise():
    logits, ids, adv, t_ids, t_logp = make_problem()
    logp = logits.log_softmax(-1)
    with pytest.raises(ValueError, match="temperature"):
        cr_opd_loss(logp, ids, adv, t_ids, t_logp, temperature=0.0)
    with pytest.raises(ValueError, match="reach_p"):
        cr_opd_loss(logp, ids, adv, t_ids, t_logp, reach_p=1.5)
    with pytest.raises(ValueError, match="mass rule"):
        cr_opd_loss(logp, ids, adv, t_ids, t_logp, mass="half")
