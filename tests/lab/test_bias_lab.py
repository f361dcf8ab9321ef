"""The bias boundaries of the temporal-credit estimators, checked exactly (no sampling).

Every assertion below is a theorem (docs/methods.md §3.2–3.3): unbiasedness of return-to-go and of
every state-only baseline, GAE(γ=1, λ=1) for any V, GAE with the exact value for every λ,
leave-one-out; the (1 − 1/G) shrinkage of a baseline that includes the sample; what k-estimators
used as losses follow; and variance *identities* (estimators with identical per-sample gradients,
the 1/G variance of an average of G i.i.d. samples). No variance ordering is asserted: none holds
in general (e.g. subtracting the exact value can increase the variance).
"""

import itertools
import json
import math

import pytest
import torch

from opd.lab.bias_lab import format_table, main, run_bias_lab, to_json

TOL = 1e-6
GAMMAS = (0.5, 0.9)
LAMS = (0.0, 0.5, 0.95)
PROBLEMS = [dict(vocab=3, horizon=4, seed=0, group_size=2),
            dict(vocab=2, horizon=3, seed=1, group_size=3),
            dict(vocab=4, horizon=3, seed=2, group_size=2)]


@pytest.fixture(scope="module", params=PROBLEMS, ids=lambda p: "V{vocab}H{horizon}G{group_size}".format(**p))
def lab(request):
    return run_bias_lab(gammas=GAMMAS, lams=LAMS, **request.param)


def unbiased(res, name):
    return res.get(name).rel_err_grad_j


# ---------------------------------------------------------------- ground truth is self-consistent


def test_ground_truth_consistency(lab):
    t = lab.targets
    assert lab.grad_norm > 1e-3
    # policy-gradient theorem on the tree: PG_1 (from exact Q) = ∇J (autograd on the sum)
    torch.testing.assert_close(t["PG_γ=1"], t["∇J"], rtol=0, atol=1e-12)
    # γ = 0: the discounted PG is the token-level reverse-KL gradient
    torch.testing.assert_close(t["PG_γ=0"], t["Σ_t E∇RKL_t"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- unbiased estimators


def test_return_to_go_and_state_only_baselines_unbiased(lab):
    for name in ["return-to-go", "sequence (E-seq: A_t = G_1)", "rtg − constant",
                 "rtg − V^π (exact)", "rtg − b(s) (random state fn)", "rtg − (−RKL_t)",
                 "E-RB (r_t − Σ_{t'>t} RKL_t')", "MiniLLM hybrid (R1 + future rtg)"]:
        assert unbiased(lab, name) <= TOL, name


def test_gae_gamma1_lambda1_unbiased_for_arbitrary_value(lab):
    assert unbiased(lab, "GAE γ=1 λ=1 V=random") <= TOL


def test_gae_with_exact_value_unbiased_for_every_lambda(lab):
    for lam in (*LAMS, 1.0):
        assert unbiased(lab, f"GAE γ=1 λ={lam:g} V=exact") <= TOL, lam
    # with γ < 1 the exact V^π_γ makes every λ estimate the discounted PG_γ
    for g in GAMMAS:
        for lam in (*LAMS, 1.0):
            e = lab.get(f"GAE γ={g:g} λ={lam:g} V=exact_γ")
            assert e.target == f"PG_γ={g:g}" and e.rel_err_target <= TOL, (g, lam)


def test_leave_one_out_unbiased_group_mean_shrunk(lab):
    G = lab.group_size
    assert unbiased(lab, f"rtg − leave-one-out (G={G})") <= TOL
    assert unbiased(lab, f"rtg, mean of G={G} (no baseline)") <= TOL
    for name in (f"rtg − group mean (incl. self, G={G})", f"rtg − batch mean (incl. self, G={G})"):
        e = lab.get(name)
        assert e.rel_err_target <= TOL, name             # E g = (1 − 1/G) ∇J exactly
        assert abs(e.rel_err_grad_j - 1.0 / G) <= TOL     # hence biased by 1/G


# ---------------------------------------------------------------- biased estimators


def test_immediate_biased_and_equals_token_level_gradient(lab):
    e = lab.get("immediate")
    assert e.rel_err_grad_j > 1e-2
    assert e.rel_err_target <= TOL  # Σ_t E_{s_t}[∇RKL_t]: the state distribution held fixed
    for name in ("route-1 full-vocab RKL", "k2 as loss", "vOPD (GAE γ=0, V=−RKL_t)"):
        assert lab.get(name).target == "Σ_t E∇RKL_t"
        assert lab.get(name).rel_err_target <= TOL, name
        assert lab.get(name).rel_err_grad_j > 1e-2, name


def test_discounted_biased_for_sequence_kl(lab):
    for g in GAMMAS:
        e = lab.get(f"discounted γ={g:g}")
        assert e.rel_err_grad_j > 1e-3 and e.rel_err_target <= TOL, g


def test_gae_inexact_value_lambda_below_one_biased(lab):
    for lam in LAMS:
        assert unbiased(lab, f"GAE γ=1 λ={lam:g} V≡0") > 1e-3, lam
        assert unbiased(lab, f"GAE γ=1 λ={lam:g} V=−RKL_t") > 1e-3, lam


def test_k3_as_loss_follows_forward_kl_not_reverse(lab):
    e = lab.get("k3 as loss")
    assert e.target == "Σ_t E∇FKL_t" and e.rel_err_target <= TOL
    assert e.rel_err_grad_j > 1e-2
    token_rkl = lab.targets["Σ_t E∇RKL_t"]
    assert (lab.expectations["k3 as loss"] - token_rkl).norm() > 1e-2 * token_rkl.norm()
    # k1 as a loss has zero expected gradient
    assert lab.expectations["k1 as loss"].abs().max() <= 1e-12


# ---------------------------------------------------------------- variance identities


def test_variance_identities(lab):
    var = {e.name: e.variance for e in lab.estimators}
    assert all(math.isfinite(v) and v >= 0 for v in var.values())
    # identical per-sample gradients: k2-as-loss = immediate = GAE(γ=1, λ=0, V≡0)
    assert var["k2 as loss"] == pytest.approx(var["immediate"], rel=1e-9)
    assert var["GAE γ=1 λ=0 V≡0"] == pytest.approx(var["immediate"], rel=1e-9)
    # GAE(γ=1, λ=1, V) = rtg − V per sample
    assert var["GAE γ=1 λ=1 V=exact"] == pytest.approx(var["rtg − V^π (exact)"], rel=1e-9)
    assert var["GAE γ=1 λ=1 V=random"] == pytest.approx(var["rtg − b(s) (random state fn)"],
                                                         rel=1e-9)
    # the mean of G i.i.d. copies has 1/G of the variance (checks the joint enumeration)
    G = lab.group_size
    assert var[f"rtg, mean of G={G} (no baseline)"] == pytest.approx(var["return-to-go"] / G,
                                                                      rel=1e-9)


# ---------------------------------------------------------------- constructed boundary case


def test_immediate_exact_when_future_kl_does_not_depend_on_action():
    res = run_bias_lab(vocab=3, horizon=4, seed=3, gammas=(0.5,), lams=(0.5,), group_size=2,
                       teacher_equal_after_first=True)
    assert res.grad_norm > 1e-3
    assert res.get("immediate").rel_err_grad_j <= TOL
    assert res.get("discounted γ=0.5").rel_err_grad_j <= TOL
    assert res.get("GAE γ=1 λ=0.5 V≡0").rel_err_grad_j <= TOL


# ---------------------------------------------------------------- independent brute force


def naive_problem(res):
    """Python-loop view of the lab's tables: row of a prefix, log-probs, all sequences."""
    V, H = res.vocab, res.horizon

    def row(prefix):
        return sum(V ** j for j in range(len(prefix))) + sum(
            y * V ** (len(prefix) - 1 - k) for k, y in enumerate(prefix))
    return V, H, row, list(itertools.product(range(V), repeat=H))


def test_grad_j_matches_naive_loop_and_finite_differences():
    res = run_bias_lab(vocab=2, horizon=3, seed=5, gammas=(0.5,), lams=(0.5,), group_size=2)
    V, H, row, seqs = naive_problem(res)
    tl = res.teacher_logp

    def J(theta):
        total = 0.0
        for y in seqs:
            lp = [torch.log_softmax(theta[row(y[:t])], -1)[y[t]] for t in range(H)]
            tp = [tl[row(y[:t]), y[t]] for t in range(H)]
            total = total + torch.exp(sum(lp)) * (sum(lp) - sum(tp))
        return total

    theta = res.student_logits.clone().requires_grad_(True)
    j = J(theta)
    assert float(j.detach()) == pytest.approx(res.objective, rel=1e-12)
    (g,) = torch.autograd.grad(j, theta)
    torch.testing.assert_close(g, res.targets["∇J"], rtol=1e-10, atol=1e-12)
    eps = 1e-6  # central differences on two entries
    for (i, k) in [(0, 1), (5, 0)]:
        d = torch.zeros_like(theta)
        d[i, k] = eps
        fd = (float(J(res.student_logits + d)) - float(J(res.student_logits - d))) / (2 * eps)
        assert fd == pytest.approx(float(g[i, k]), abs=1e-7)


def test_moments_match_per_sequence_brute_force():
    # rtg: g(y) = −Σ_t G_t ∇log π(y_t|s_t) built with loops; leave-one-out over all pairs
    res = run_bias_lab(vocab=2, horizon=3, seed=6, gammas=(0.5,), lams=(0.5,), group_size=2)
    V, H, row, seqs = naive_problem(res)
    th0, tl = res.student_logits, res.teacher_logp

    def parts(y, theta):
        lp = [torch.log_softmax(theta[row(y[:t])], -1)[y[t]] for t in range(H)]
        r = [float(tl[row(y[:t]), y[t]]) - float(lp[t].detach()) for t in range(H)]
        return lp, r

    def grad_of(fn):
        theta = th0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(theta), theta)
        return g

    prob = {y: math.exp(sum(float(x) for x in parts(y, th0)[0])) for y in seqs}

    def moments(draws):  # draws: list of (prob, grad)
        mean = sum(p * g for p, g in draws)
        second = sum(p * float((g * g).sum()) for p, g in draws)
        return mean, second - float((mean * mean).sum())

    def rtg_loss(y):
        def fn(theta):
            lp, r = parts(y, theta)
            return -sum(sum(r[t:]) * lp[t] for t in range(H))
        return fn

    mean, var = moments([(prob[y], grad_of(rtg_loss(y))) for y in seqs])
    torch.testing.assert_close(res.expectations["return-to-go"], mean, rtol=1e-10, atol=1e-12)
    assert res.get("return-to-go").variance == pytest.approx(var, rel=1e-9)

    def loo_loss(y1, y2):
        def fn(theta):
            (lp1, r1), (lp2, r2) = parts(y1, theta), parts(y2, theta)
            a1 = [sum(r1[t:]) - sum(r2[t:]) for t in range(H)]  # other sample's return-to-go
            return -0.5 * sum(a1[t] * lp1[t] - a1[t] * lp2[t] for t in range(H))
        return fn

    draws = [(prob[a] * prob[b], grad_of(loo_loss(a, b))) for a in seqs for b in seqs]
    mean, var = moments(draws)
    name = "rtg − leave-one-out (G=2)"
    torch.testing.assert_close(res.expectations[name], mean, rtol=1e-10, atol=1e-12)
    assert res.get(name).variance == pytest.approx(var, rel=1e-9)


# ---------------------------------------------------------------- output and CLI


def test_group_enumeration_skipped_when_too_large():
    res = run_bias_lab(vocab=2, horizon=3, seed=0, gammas=(0.5,), lams=(0.5,), group_size=3,
                       max_joint_samples=100)
    assert res.skipped and "512" in res.skipped[0]
    assert not any("leave-one-out" in e.name for e in res.estimators)
    assert "skipped" in format_table(res)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "lab.json"
    rc = main(["--vocab", "2", "--horizon", "2", "--seed", "1", "--gamma", "0.3", "--gamma", "0.7",
               "--lam", "0.4", "--group-size", "2", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| immediate | R2 |" in out and "discounted γ=0.7" in out
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["vocab"] == 2 and data["gammas"] == [0.3, 0.7] and data["lams"] == [0.4]
    names = {e["name"] for e in data["estimators"]}
    assert {"return-to-go", "GAE γ=1 λ=0.4 V=exact", "k3 as loss"} <= names
    assert to_json(run_bias_lab(vocab=2, horizon=1, group_size=2))["num_sequences"] == 2


def test_cli_rejects_out_of_range():
    with pytest.raises(SystemExit):
        main(["--vocab", "6"])
    with pytest.raises(SystemExit):
        main(["--gamma", "1.5"])
