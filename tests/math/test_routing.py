import math

import pytest
import torch

from opd.math.reduce import reduce_tokens
from opd.math.routing import (
    CrOpdKnobs,
    aopd_loss,
    cr_opd_loss,
    cr_opd_target,
    softmax_routing_loss,
)

B, T, V, K = 3, 7, 11, 4
F64 = torch.float64


def make_problem(b=B, t=T, v=V, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, dtype=F64, generator=g).mul(1.5).requires_grad_(True)
    teacher = torch.randn(b, t, v, dtype=F64, generator=g).mul(1.5).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, t, dtype=F64, generator=g)
    return logits, ids, adv, top.indices, top.values


def naive_target(logp, y, t_ids, t_logp, student_k=None, tau_s=0.0, tau_t=0.0, kappa=1.0,
                 eta=1.0):
    """Loop reference for one token: returns (rho_tilde list, candidate set)."""
    pi = [math.exp(x) for x in logp.tolist()]
    n_vocab = len(pi)
    teacher = {}
    for i, lp in zip(t_ids.tolist(), t_logp.tolist()):
        if i >= 0:
            teacher[i] = math.exp(lp)
    top_s = set(sorted(range(n_vocab), key=lambda v: -pi[v])[:student_k]) if student_k else set()

    def reachable(v):
        if student_k is None and tau_s == 0:
            return True
        return (student_k is not None and v in top_s) or (tau_s > 0 and pi[v] >= tau_s)

    cands = [v for v in range(n_vocab)
             if v != y and v in teacher and teacher[v] >= tau_t and reachable(v)]
    if not cands:
        return pi, set()
    w = {v: teacher[v] ** kappa * pi[v] ** (1 - kappa) for v in cands}
    z = sum(w.values())
    rho = [w.get(v, 0.0) / z for v in range(n_vocab)]
    return [(1 - eta) * p + eta * r for p, r in zip(pi, rho)], set(cands)


def naive_loss(logits, ids, adv, t_ids, t_logp, tau_a=0.0, mask=None, **knobs):
    """Literal §3.4 formula per token (python loop); returns the summed loss's logit gradient
    and the per-token plain-PG values −A log π(y)."""
    logp = logits.log_softmax(-1)
    total = 0.0
    values = torch.zeros(ids.shape, dtype=F64)
    routed = torch.zeros(ids.shape, dtype=torch.bool)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in ids.shape]):
        i = tuple(idx.tolist())
        if mask is not None and not mask[i]:
            continue
        y, a = int(ids[i]), float(adv[i])
        rho_t, cands = naive_target(logp[i].detach(), y, t_ids[i], t_logp[i], **knobs)
        term = logp[i][y]
        if a < -tau_a and cands:
            routed[i] = True
            term = term - sum(rho_t[v] * logp[i][v] for v in range(len(rho_t)) if rho_t[v] > 0)
        total = total - a * term
        values[i] = -a * logp[i][y].item()
    (grad,) = torch.autograd.grad(total, logits, retain_graph=True)
    return grad, values, routed


@pytest.mark.parametrize("knobs", [
    {}, {"eta": 0.5}, {"kappa": 0.0}, {"kappa": 0.3, "eta": 0.7}, {"student_k": 3},
    {"tau_s": 0.08}, {"student_k": 2, "tau_s": 0.2}, {"tau_t": 0.15}, {"tau_a": 0.5}])
def test_cr_opd_matches_loop_value_and_gradient(knobs):
    logits, ids, adv, t_ids, t_logp = make_problem()
    t_ids, t_logp = t_ids.clone(), t_logp.clone()
    t_ids[0, 1, -1] = -1                                 # a padded teacher entry
    t_ids[1, 2, 3], t_logp[1, 2, 3] = t_ids[1, 2, 0], t_logp[1, 2, 0]   # a repeated id counts once
    mask = torch.rand(B, T) > 0.25
    tau_a = knobs.pop("tau_a", 0.0)
    loss, metrics = cr_opd_loss(logits.log_softmax(-1), ids, adv, t_ids, t_logp, mask_N=mask,
                                knobs=CrOpdKnobs(**knobs), tau_a=tau_a)
    (g,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    g_ref, v_ref, routed_ref = naive_loss(logits, ids, adv, t_ids, t_logp, tau_a=tau_a,
                                          mask=mask, **knobs)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(loss, v_ref)     # value = plain PG value −A log π(y)
    assert torch.equal(metrics["routed"], routed_ref)
    assert routed_ref.any() and (mask & ~routed_ref).any()   # both kinds of token occur


def test_cr_opd_target_matches_loop():
    logits, ids, _, t_ids, t_logp = make_problem(seed=1)
    logp = logits.detach().log_softmax(-1)
    for knobs in [{}, {"kappa": 0.5, "eta": 0.3}, {"student_k": 4}, {"tau_s": 0.1, "tau_t": 0.1}]:
        rho_tilde, cands = cr_opd_target(logp, ids, t_ids, t_logp, knobs=CrOpdKnobs(**knobs))
        for b in range(B):
            for t in range(T):
                ref, ref_c = naive_target(logp[b, t], int(ids[b, t]), t_ids[b, t], t_logp[b, t],
                                          **knobs)
                torch.testing.assert_close(rho_tilde[b, t], torch.tensor(ref, dtype=F64))
                assert set(torch.nonzero(cands[b, t]).flatten().tolist()) == ref_c
        torch.testing.assert_close(rho_tilde.sum(-1), torch.ones(B, T, dtype=F64))


def test_logit_gradient_is_closed_form():
    """∂L_t/∂z = −A_t (e_{y_t} − ρ̃_t) on routed tokens, −A_t (e_{y_t} − π_t) elsewhere."""
    logits, ids, adv, t_ids, t_logp = make_problem(seed=2)
    logp = logits.log_softmax(-1)
    for eta in (1.0, 0.6):
        loss, metrics = cr_opd_loss(logp, ids, adv, t_ids, t_logp, knobs=CrOpdKnobs(eta=eta, kappa=0.5))
        (g,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
        rho_tilde, _ = cr_opd_target(logp, ids, t_ids, t_logp, knobs=CrOpdKnobs(eta=eta, kappa=0.5))
        probs = logp.detach().exp()
        target = torch.where(metrics["routed"].unsqueeze(-1), rho_tilde, probs)
        onehot = torch.nn.functional.one_hot(ids, V).to(F64)
        torch.testing.assert_close(g, -adv.unsqueeze(-1) * (onehot - target))


def test_eta_zero_is_exactly_plain_pg():
    logits, ids, adv, t_ids, t_logp = make_problem(seed=3)
    logp = logits.log_softmax(-1)
    mask = torch.rand(B, T) > 0.3
    cr, metrics = cr_opd_loss(logp, ids, adv, t_ids, t_logp, knobs=CrOpdKnobs(eta=0.0), mask_N=mask)
    pg = softmax_routing_loss(logp, ids, adv, mask_N=mask)
    assert metrics["routed"].any()
    assert torch.equal(cr, pg)                            # value: bit-identical
    g_cr, = torch.autograd.grad(reduce_tokens(cr, mask), logits, retain_graph=True)
    g_pg, = torch.autograd.grad(reduce_tokens(pg, mask), logits, retain_graph=True)
    assert torch.equal(g_cr, g_pg)                        # gradient: bit-identical too


def test_descent_raises_only_candidates_for_negative_advantage():
    logits, ids, _, t_ids, t_logp = make_problem(seed=4)
    adv = -torch.rand(B, T, dtype=F64) - 0.1                # all negative
    logp = logits.log_softmax(-1)
    loss, metrics = cr_opd_loss(logp, ids, adv, t_ids, t_logp, knobs=CrOpdKnobs(eta=1.0))
    (g,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    _, cands = cr_opd_target(logp, ids, t_ids, t_logp)
    step = -g                                               # the descent direction on logits
    for b in range(B):
        for t in range(T):
            if not metrics["routed"][b, t]:
                assert not cands[b, t].any()
                continue
            for v in range(V):
                if v == ids[b, t]:
                    assert step[b, t, v] < -1e-9            # the sampled logit falls
                elif cands[b, t, v]:
                    assert step[b, t, v] > 1e-9             # candidates rise
                else:
                    assert abs(step[b, t, v]) < 1e-15       # nothing else moves (round-off)
    # plain PG raises every non-sampled token (student-prior routing)
    (g_pg,) = torch.autograd.grad(softmax_routing_loss(logp, ids, adv).sum(), logits, retain_graph=True)
    off = torch.ones(B, T, V, dtype=torch.bool).scatter_(-1, ids.unsqueeze(-1), False)
    assert (-g_pg[off] > 0).all()


def test_positive_advantage_and_empty_candidates_use_plain_pg():
    logits, ids, _, t_ids, t_logp = make_problem(seed=5)
    logp = logits.log_softmax(-1)
    adv = torch.rand(B, T, dtype=F64) + 0.1                 # positive: never routed
    loss, metrics = cr_opd_loss(logp, ids, adv, t_ids, t_logp)
    assert not metrics["routed"].any()
    g, = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    g_pg, = torch.autograd.grad(softmax_routing_loss(logp, ids, adv).sum(), logits, retain_graph=True)
    torch.testing.assert_close(g, g_pg)
    # empty C_t: the teacher's only supported token is the sampled one (K = 1, y = teacher top-1)
    adv = -torch.rand(B, T, dtype=F64) - 0.1
    top1 = t_ids[..., :1]
    loss, metrics = cr_opd_loss(logp, top1[..., 0], adv, top1, t_logp[..., :1])
    assert not metrics["routed"].any() and (metrics["n_candidates"] == 0).all()
    g, = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    pg = softmax_routing_loss(logp, top1[..., 0], adv)
    g_pg, = torch.autograd.grad(pg.sum(), logits, retain_graph=True)
    torch.testing.assert_close(g, g_pg)


def test_candidate_knobs():
    # one token, V = 6; student π ∝ exp(z); teacher top-K given explicitly
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -6.0]], dtype=F64)
    logp = z.log_softmax(-1)                                # π ≈ .665 .245 .090 .033 .012 .0001
    y = torch.tensor([0])
    t_ids = torch.tensor([[0, 2, 4, 5]])
    t_logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64).log()

    def cset(**kw):
        return set(torch.nonzero(cr_opd_target(logp, y, t_ids, t_logp, knobs=CrOpdKnobs(**kw))[1][0]).flatten()
                   .tolist())

    assert cset() == {2, 4, 5}                              # teacher-supported, v ≠ y
    assert cset(tau_t=0.1) == {2, 4}                        # π_T(5) = 0.05 < 0.1
    assert cset(student_k=3) == {2}                         # student top-3 = {0, 1, 2}
    assert cset(tau_s=0.01) == {2, 4}                       # π(5) ≈ 1e-4 unreachable
    assert cset(student_k=3, tau_s=0.01) == {2, 4}          # either criterion suffices
    # K through the teacher top-k size: K = 2 keeps only {0, 2}
    assert set(torch.nonzero(cr_opd_target(logp, y, t_ids[:, :2], t_logp[:, :2])[1][0])
               .flatten().tolist()) == {2}
    # kappa = 1: ρ ∝ π_T on C = {2,4,5} -> (.3,.15,.05)/.5 ; kappa = 0: ρ ∝ π_θ on C
    rho1, _ = cr_opd_target(logp, y, t_ids, t_logp, knobs=CrOpdKnobs(kappa=1.0))
    torch.testing.assert_close(rho1[0, [2, 4, 5]], torch.tensor([0.6, 0.3, 0.1], dtype=F64))
    rho0, _ = cr_opd_target(logp, y, t_ids, t_logp, knobs=CrOpdKnobs(kappa=0.0))
    p = logp.exp()[0, [2, 4, 5]]
    torch.testing.assert_close(rho0[0, [2, 4, 5]], p / p.sum())
    assert rho1[0, [0, 1, 3]].abs().sum() == 0 and rho0[0, [0, 1, 3]].abs().sum() == 0
    # a repeated teacher id counts once: TopK_T = [2, 2, 4] -> ρ = (.3, .15)/.45 on {2, 4}
    dup_ids, dup_lp = torch.tensor([[2, 2, 4]]), torch.tensor([[0.3, 0.3, 0.15]], dtype=F64).log()
    rho_d, _ = cr_opd_target(logp, y, dup_ids, dup_lp)
    torch.testing.assert_close(rho_d[0, [2, 4]], torch.tensor([2 / 3, 1 / 3], dtype=F64))
    _, m = cr_opd_loss(logp, y, torch.tensor([1.0], dtype=F64), dup_ids, dup_lp)
    pi = logp.exp()[0]
    torch.testing.assert_close(m["mass_to_teacher_supported"][0], (pi[2] + pi[4]) / (1 - pi[0]))
    assert m["n_candidates"].item() == 2
    # tau_a gate: A = −0.3 is routed at tau_a = 0.2 but not at tau_a = 0.5
    # (the gate is strict: A = −τ_A exactly, or A = 0 at τ_A = 0, is not routed)
    for tau_a, expect in ((0.2, True), (0.5, False), (0.3, False)):
        _, m = cr_opd_loss(logp, y, torch.tensor([-0.3], dtype=F64), t_ids, t_logp, tau_a=tau_a)
        assert m["routed"].item() is expect
    _, m = cr_opd_loss(logp, y, torch.tensor([0.0], dtype=F64), t_ids, t_logp)
    assert not m["routed"].item()


def test_mass_to_teacher_supported_metric():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=F64).repeat(2, 1)
    logp = z.log_softmax(-1)
    y = torch.tensor([0, 0])
    t_ids = torch.tensor([[0, 2], [0, 2]])
    t_logp = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=F64).log()
    adv = torch.tensor([-1.0, 1.0], dtype=F64)
    _, m = cr_opd_loss(logp, y, adv, t_ids, t_logp, knobs=CrOpdKnobs(eta=0.5))
    pi = logp.exp()[0]
    # routed row: ρ = e_2, ρ̃ = ½π + ½e_2 -> (½π_2 + ½) / (1 − ½π_0)
    # unrouted row: π_2 / (1 − π_0)
    expect = torch.tensor([(0.5 * pi[2] + 0.5) / (1 - 0.5 * pi[0]), pi[2] / (1 - pi[0])],
                          dtype=F64)
    torch.testing.assert_close(m["mass_to_teacher_supported"], expect)
    assert m["routed"].tolist() == [True, False] and m["n_candidates"].tolist() == [1, 1]


def test_all_masked_and_padding_invariance():
    logits, ids, adv, t_ids, t_logp = make_problem(seed=6)
    mask = torch.zeros(B, T, dtype=torch.bool)
    bad_ids = ids.clone()
    bad_ids[:, -1] = -1                                     # padding ids
    logp = logits.log_softmax(-1)
    loss, m = cr_opd_loss(logp, bad_ids, adv, t_ids, t_logp, mask_N=mask)
    total = reduce_tokens(loss, mask)
    assert total.item() == 0.0 and not m["routed"].any()
    (g,) = torch.autograd.grad(total, logits, retain_graph=True)
    assert torch.equal(g, torch.zeros_like(g))
    # appending padded columns (student log-probs -inf/NaN, ids −1) leaves the reduced loss unchanged
    mask = torch.rand(B, T) > 0.3
    pad_logp = torch.cat([logp, torch.full((B, 2, V), float("nan"), dtype=F64)], dim=1)
    pad_ids = torch.cat([ids, torch.full((B, 2), -1)], dim=1)
    pad_adv = torch.cat([adv, torch.full((B, 2), -5.0, dtype=F64)], dim=1)
    pad_tids = torch.cat([t_ids, torch.full((B, 2, K), -1)], dim=1)
    pad_tlp = torch.cat([t_logp, torch.zeros(B, 2, K, dtype=F64)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(B, 2, dtype=torch.bool)], dim=1)
    a = reduce_tokens(cr_opd_loss(logp, ids, adv, t_ids, t_logp, mask_N=mask)[0], mask)
    bb = reduce_tokens(cr_opd_loss(pad_logp, pad_ids, pad_adv, pad_tids, pad_tlp,
                                   mask_N=pad_mask)[0], pad_mask)
    torch.testing.assert_close(a, bb)
    (ga,) = torch.autograd.grad(a, logits, retain_graph=True)
    (gb,) = torch.autograd.grad(bb, logits, retain_graph=True)
    torch.testing.assert_close(ga, gb)


def test_softmax_routing_and_aopd_match_formulas():
    logits, ids, adv, _, _ = make_problem(b=2, t=5, v=7, seed=7)
    logp = logits.log_softmax(-1)
    loss = softmax_routing_loss(logp, ids, adv)
    for b in range(2):
        for t in range(5):
            assert abs(loss[b, t].item() + adv[b, t].item() * logp[b, t, ids[b, t]].item()) < 1e-12
    logp_y = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    div = (logp.exp() * logp).sum(-1) + 2.0                 # any differentiable per-token value
    got = aopd_loss(logp_y, adv, div)
    ref = torch.where(adv > 0, -adv * logp_y, div)
    torch.testing.assert_close(got, ref)
    (g,) = torch.autograd.grad(got.sum(), logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits, retain_graph=True)
    torch.testing.assert_close(g, g_ref)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(aopd_loss(logp_y, adv, div, mask_N=mask), torch.zeros(2, 5, dtype=F64))


def test_routing_errors():
    logits, ids, adv, t_ids, t_logp = make_problem(b=2, t=3, seed=8)
    logp = logits.detach().log_softmax(-1)
    with pytest.raises(ValueError, match="eta must be <= 1.0"):
        cr_opd_target(logp, ids, t_ids, t_logp, knobs=CrOpdKnobs(eta=1.5))
    with pytest.raises(ValueError, match=r"student_k must be in \[1, 11\]"):
        cr_opd_target(logp, ids, t_ids, t_logp, knobs=CrOpdKnobs(student_k=0))
    with pytest.raises(ValueError, match="tau_a must be >= 0"):
        cr_opd_loss(logp, ids, adv, t_ids, t_logp, tau_a=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 3\)|\(2, 3, 3\).*\(2, 3, 4\)"):
        cr_opd_loss(logp, ids, adv, t_ids, t_logp[..., :3])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        softmax_routing_loss(logp, ids[:, :2], adv[:, :2])
