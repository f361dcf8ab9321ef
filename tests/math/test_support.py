import math

import pytest
import torch

from opd.math.divergences import divergence, forward_kl, reverse_kl
from opd.math.support import SupportSpec, build_support, support_from_logprobs, tempered_log_softmax
from tests.math.test_divergences import naive_token

KINDS_NORMS = [
    ("full", "renorm"), ("full", "tail"),
    ("teacher_topk", "renorm"), ("teacher_topk", "tail"), ("teacher_topk", "none"),
    ("student_topk", "renorm"), ("student_topk", "tail"), ("student_topk", "none"),
    ("union", "renorm"), ("union", "tail"), ("union", "none"),
    ("sampled", "tail"), ("sampled", "none"),
    ("teacher_topk_sampled", "renorm"), ("teacher_topk_sampled", "tail"), ("teacher_topk_sampled", "none"),
]


# ---------------------------------------------------------------- naive reference (float64, python sets)


def naive_softmax(z, tau):
    e = torch.exp(z / tau - (z / tau).max())
    return e / e.sum()


def naive_support(zs, zt, y, kind, k, norm, tau_s, tau_t):
    """One token: ``{id: (q_S, q_T)}`` and the tail pair (or None), by explicit set algebra."""
    ps, pt = naive_softmax(zs, tau_s), naive_softmax(zt, tau_t)
    V = len(zs)
    k = min(k, V)
    top_t = set(sorted(range(V), key=lambda v: -float(pt[v]))[:k])
    top_s = set(sorted(range(V), key=lambda v: -float(ps[v].detach()))[:k])
    support = {
        "full": set(range(V)), "teacher_topk": top_t, "student_topk": top_s, "union": top_t | top_s,
        "sampled": {y}, "teacher_topk_sampled": top_t | {y},
    }[kind]
    ids = sorted(support)
    mass_s, mass_t = sum(ps[v] for v in ids), sum(pt[v] for v in ids)
    if norm == "renorm" or kind == "full":
        return {v: (ps[v] / mass_s, pt[v] / mass_t) for v in ids}, None
    entries = {v: (ps[v], pt[v]) for v in ids}
    return entries, ((1 - mass_s, 1 - mass_t) if norm == "tail" else None)


def as_dicts(sup, n):
    """Our support at flat token ``n`` as ``{id: (q_S, q_T)}`` plus the tail pair."""
    s, t = sup.student_logp.reshape(-1, sup.ids.shape[-1]), sup.teacher_logp.reshape(-1, sup.ids.shape[-1])
    ids, valid = sup.ids.reshape(-1, sup.ids.shape[-1]), sup.valid.reshape(-1, sup.ids.shape[-1])
    entries, tail = {}, None
    for j in range(ids.shape[1]):
        if not valid[n, j]:
            assert s[n, j] == -math.inf and t[n, j] == -math.inf
            continue
        pair = (s[n, j].exp(), t[n, j].exp())
        if ids[n, j] < 0:
            assert tail is None
            tail = pair
        else:
            assert int(ids[n, j]) not in entries  # no duplicate among valid entries
            entries[int(ids[n, j])] = pair
    return entries, tail


def make_inputs(shape=(3, 5), V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(*shape, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    zt = 2 * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, shape, generator=g)
    return zs, zt, y


# ---------------------------------------------------------------- against the naive reference


@pytest.mark.parametrize("kind,norm", KINDS_NORMS)
@pytest.mark.parametrize("tau_s,tau_t", [(1.0, 1.0), (0.7, 2.0)])
def test_matches_naive_values_and_gradient(kind, norm, tau_s, tau_t):
    zs, zt, y = make_inputs()
    spec = SupportSpec(kind=kind, k=4, norm=norm, student_temperature=tau_s, teacher_temperature=tau_t)
    sup = build_support(zs, spec, sampled_ids=y, teacher_logits=zt)
    assert sup.student_logp.shape == sup.teacher_logp.shape == sup.valid.shape == sup.ids.shape
    assert not sup.teacher_logp.requires_grad
    V = zs.shape[-1]
    coef = torch.rand(15, V + 1, dtype=torch.float64)  # a random linear functional of q_S (last = tail)
    ours = torch.zeros((), dtype=torch.float64)
    ref = torch.zeros((), dtype=torch.float64)
    for n in range(15):
        b, t = divmod(n, 5)
        got_e, got_tail = as_dicts(sup, n)
        ref_e, ref_tail = naive_support(zs[b, t], zt[b, t], int(y[b, t]), kind, 4, norm, tau_s, tau_t)
        assert set(got_e) == set(ref_e)
        for v, (qs, qt) in ref_e.items():
            torch.testing.assert_close(got_e[v][0], qs, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(got_e[v][1], qt, rtol=1e-10, atol=1e-13)
            ours = ours + coef[n, v] * got_e[v][0]
            ref = ref + coef[n, v] * qs
        assert (got_tail is None) == (ref_tail is None)
        if ref_tail is not None:
            torch.testing.assert_close(got_tail[0], ref_tail[0], rtol=1e-9, atol=1e-13)
            torch.testing.assert_close(got_tail[1], ref_tail[1], rtol=1e-9, atol=1e-13)
            ours = ours + coef[n, V] * got_tail[0]
            ref = ref + coef[n, V] * ref_tail[0]
    (g_ours,) = torch.autograd.grad(ours, zs, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,norm", KINDS_NORMS)
@pytest.mark.parametrize("name", ["fkl", "jsd", "akl"])
def test_divergence_on_support_matches_naive_end_to_end(kind, norm, name):
    """build_support + divergence == the naive formula on the naive support; teacher == student → 0."""
    zs, zt, y = make_inputs(shape=(2, 3), V=9, seed=1)
    spec = SupportSpec(kind=kind, k=3, norm=norm, student_temperature=0.8, teacher_temperature=1.2)
    knobs = dict(beta=0.3, alpha=0.1, mu=0.5)
    sup = build_support(zs, spec, sampled_ids=y, teacher_logits=zt)
    got = divergence(name, sup.student_logp, sup.teacher_logp, sup.valid, **knobs)
    ref = []
    for b in range(2):
        for t in range(3):
            entries, tail = naive_support(zs[b, t], zt[b, t], int(y[b, t]), kind, 3, norm, 0.8, 1.2)
            pairs = list(entries.values()) + ([tail] if tail is not None else [])
            ref.append(naive_token(name, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), **knobs))
    ref = torch.stack(ref).reshape(2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    same_spec = SupportSpec(kind=kind, k=3, norm=norm)
    same = build_support(zs, same_spec, sampled_ids=y, teacher_logits=zs.detach())
    zero = divergence(name, same.student_logp, same.teacher_logp, same.valid, **knobs)
    (g_zero,) = torch.autograd.grad(zero.sum(), zs)
    assert zero.abs().max() < 1e-12
    if norm != "none" or kind == "full" or name == "jsd":
        assert g_zero.abs().max() < 1e-12
    elif name == "fkl":  # sub-probability vectors: FKL is 0 at equality, but its gradient pulls mass into S
        assert g_zero.abs().max() > 1e-3


@pytest.mark.parametrize("kind,norm", [kn for kn in KINDS_NORMS if kn[1] != "none"])
def test_distributions_sum_to_one(kind, norm):
    zs, zt, y = make_inputs(shape=(4,), V=9)
    sup = build_support(zs, SupportSpec(kind=kind, k=3, norm=norm), sampled_ids=y, teacher_logits=zt)
    for logp in (sup.student_logp, sup.teacher_logp):
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_tempered_log_softmax():
    z = torch.randn(3, 7)
    got = tempered_log_softmax(z, 0.5)
    ref = torch.stack([torch.log(naive_softmax(z[i].double(), 0.5)) for i in range(3)]).float()
    torch.testing.assert_close(got, ref)
    assert got.dtype == torch.float32
    assert tempered_log_softmax(z.to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tempered_log_softmax(z, 0.0)


# ---------------------------------------------------------------- teacher given as top-k only


def teacher_topk(zt, k, tau=1.0):
    lp = torch.log_softmax(zt / tau, -1)
    top = lp.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("norm", ["renorm", "tail", "none"])
def test_teacher_topk_given_equals_from_logits(norm):
    zs, zt, _ = make_inputs()
    spec = SupportSpec(kind="teacher_topk", k=4, norm=norm, teacher_temperature=1.5)
    ids, lp = teacher_topk(zt, 4, tau=1.5)  # the producer applied the temperature
    a = build_support(zs, spec, teacher_logits=zt)
    b = build_support(zs, spec, teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.student_logp, b.student_logp, rtol=0, atol=0)
    # the teacher tail from top-k is log(1 − Σ_topk p_T) instead of the exact complement logsumexp
    torch.testing.assert_close(a.teacher_logp, b.teacher_logp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["tail", "none"])
def test_sampled_with_teacher_sampled_logprob_only(norm):
    zs, zt, y = make_inputs()
    spec = SupportSpec(kind="sampled", norm=norm)
    lp_y = torch.log_softmax(zt, -1).gather(-1, y[..., None])  # the R2 teacher signal, one column
    a = build_support(zs, spec, sampled_ids=y, teacher_logits=zt)
    b = build_support(zs, spec, sampled_ids=y, teacher_topk_ids=y[..., None], teacher_topk_logprobs=lp_y)
    torch.testing.assert_close(a.teacher_logp, b.teacher_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.student_logp, b.student_logp, rtol=0, atol=0)
    if norm == "tail":  # Bernoulli: log p(y), log(1 − p(y))
        p = torch.softmax(zs, -1).gather(-1, y[..., None])[..., 0]
        torch.testing.assert_close(b.student_logp.exp(), torch.stack([p, 1 - p], -1))


@pytest.mark.parametrize("norm", ["renorm", "tail"])
def test_teacher_topk_sampled_with_appended_sampled_column(norm):
    zs, zt, y = make_inputs()
    y[0, 0] = torch.log_softmax(zt[0, 0], -1).argmax()  # one sampled token inside the top-k
    spec = SupportSpec(kind="teacher_topk_sampled", k=4, norm=norm)
    ids, lp = teacher_topk(zt, 4)
    lp_y = torch.log_softmax(zt, -1).gather(-1, y[..., None])
    a = build_support(zs, spec, sampled_ids=y, teacher_logits=zt)
    b = build_support(zs, spec, sampled_ids=y, teacher_topk_ids=torch.cat([ids, y[..., None]], -1),
                      teacher_topk_logprobs=torch.cat([lp, lp_y], -1))
    for n in range(15):  # same support as sets (the column order differs)
        ea, ta = as_dicts(a, n)
        eb, tb = as_dicts(b, n)
        assert set(ea) == set(eb)
        for v in ea:
            torch.testing.assert_close(torch.stack(ea[v]), torch.stack(eb[v]), rtol=1e-12, atol=1e-12)
        if ta is not None:
            torch.testing.assert_close(torch.stack(ta), torch.stack(tb), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sampled token is not among teacher_topk_ids"):
        y2 = y.clone()
        y2[1, 1] = [v for v in range(11) if v not in ids[1, 1].tolist()][0]
        build_support(zs, spec, sampled_ids=y2, teacher_topk_ids=ids, teacher_topk_logprobs=lp)


# ---------------------------------------------------------------- edge cases


def test_padding_ids_give_an_empty_nan_free_support():
    zs, zt, y = make_inputs()
    y[1] = -1  # no sampled token in row 1 (padding)
    ids, lp = teacher_topk(zt, 3)
    ids[2, 0, 0] = -1  # a padded teacher column
    lp[2, 0, 0] = float("nan")
    for spec, kw in [
        (SupportSpec(kind="sampled", norm="tail"), dict(teacher_logits=zt)),
        (SupportSpec(kind="sampled", norm="none"), dict(teacher_topk_ids=y[..., None],
                                                        teacher_topk_logprobs=torch.zeros(3, 5, 1))),
        (SupportSpec(kind="teacher_topk", k=3, norm="renorm"), dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)),
        (SupportSpec(kind="teacher_topk", k=3, norm="tail"), dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)),
    ]:
        for d in (forward_kl, reverse_kl):
            sup = build_support(zs, spec, sampled_ids=y, **kw)
            val = d(sup.student_logp, sup.teacher_logp, sup.valid)
            assert torch.isfinite(val).all()
            (g,) = torch.autograd.grad(val.sum(), zs)
            assert torch.isfinite(g).all()
            if spec.kind == "sampled":
                assert (val[1] == 0).all() and (g[1] == 0).all()
    sup = build_support(zs, SupportSpec(kind="teacher_topk", k=3), teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    assert sup.valid[2, 0].tolist() == [False, True, True]


def test_union_deduplicates():
    zs, zt, _ = make_inputs()
    sup = build_support(zs, SupportSpec(kind="union", k=4), teacher_logits=zt)
    assert sup.ids.shape[-1] == 8
    top_t, top_s = zt.topk(4).indices, zs.detach().topk(4).indices
    for b in range(3):
        for t in range(5):
            expected = set(top_t[b, t].tolist()) | set(top_s[b, t].tolist())
            assert int(sup.valid[b, t].sum()) == len(expected)
            assert set(sup.ids[b, t][sup.valid[b, t]].tolist()) == expected


def test_tail_is_empty_when_support_covers_the_vocabulary():
    zs, zt, _ = make_inputs(V=5)
    for kw in (dict(teacher_logits=zt), dict(teacher_topk_ids=teacher_topk(zt, 5)[0],
                                             teacher_topk_logprobs=teacher_topk(zt, 5)[1])):
        sup = build_support(zs, SupportSpec(kind="teacher_topk", k=50, norm="tail"), **kw)  # k clamped to V
        assert (sup.student_logp[..., -1] == -math.inf).all() and (sup.teacher_logp[..., -1] == -math.inf).all()
        val = forward_kl(sup.student_logp, sup.teacher_logp, sup.valid)
        full = forward_kl(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1))
        torch.testing.assert_close(val, full)
        (g,) = torch.autograd.grad(val.sum(), zs)
        assert torch.isfinite(g).all()


def test_full_support_is_the_vocabulary_and_support_from_logprobs_agrees():
    zs, zt, _ = make_inputs()
    spec = SupportSpec(kind="full", student_temperature=0.5, teacher_temperature=2.0)
    sup = build_support(zs, spec, teacher_logits=zt)
    torch.testing.assert_close(sup.student_logp, torch.log_softmax(zs / 0.5, -1))
    torch.testing.assert_close(sup.teacher_logp, torch.log_softmax(zt / 2.0, -1))
    assert sup.valid.all() and torch.equal(sup.ids[1, 2], torch.arange(11))
    again = support_from_logprobs(torch.log_softmax(zs / 0.5, -1), spec, teacher_logp=torch.log_softmax(zt / 2.0, -1))
    torch.testing.assert_close(again.student_logp, sup.student_logp)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kind,kwargs,message", [
    ("full", dict(), "pass teacher_logits"),
    ("student_topk", dict(teacher_topk_ids=True), "pass teacher_logits"),
    ("union", dict(teacher_topk_ids=True), "pass teacher_logits"),
    ("teacher_topk", dict(), "pass teacher_logits, or teacher_topk_ids"),
    ("sampled", dict(teacher_logits=True), "pass sampled_ids"),
    ("teacher_topk_sampled", dict(teacher_logits=True), "pass sampled_ids"),
])
def test_missing_arguments_say_what_to_pass(kind, kwargs, message):
    zs, zt, _ = make_inputs()
    ids, lp = teacher_topk(zt, 3)
    kw = {}
    if kwargs.get("teacher_logits"):
        kw["teacher_logits"] = zt
    if kwargs.get("teacher_topk_ids"):
        kw.update(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    norm = "tail" if kind == "sampled" else "renorm"
    with pytest.raises(ValueError, match=message):
        build_support(zs, SupportSpec(kind=kind, norm=norm), **kw)


def test_spec_and_shape_errors():
    with pytest.raises(ValueError, match="use norm='tail'"):
        SupportSpec(kind="sampled")
    with pytest.raises(ValueError, match="unknown support kind"):
        SupportSpec(kind="topk")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        SupportSpec(kind="teacher_topk", k=0)
    with pytest.raises(ValueError, match="student_temperature must be > 0"):
        SupportSpec(student_temperature=0.0)
    assert SupportSpec(kind="union").needs_teacher_logits and not SupportSpec(kind="teacher_topk").needs_teacher_logits
    zs, zt, y = make_inputs()
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(3, 5, 10\)"):
        build_support(zs, SupportSpec(), teacher_logits=zt[..., :10])
    with pytest.raises(ValueError, match=r"sampled_ids has shape \(3, 4\)"):
        build_support(zs, SupportSpec(kind="sampled", norm="tail"), sampled_ids=y[:, :4], teacher_logits=zt)
    with pytest.raises(ValueError, match=r"teacher_topk_ids has shape \(3, 4, 2\)"):
        build_support(zs, SupportSpec(kind="teacher_topk"), teacher_topk_ids=torch.zeros(3, 4, 2, dtype=torch.long),
                      teacher_topk_logprobs=torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="ids >= V = 11"):
        build_support(zs, SupportSpec(kind="sampled", norm="tail"), sampled_ids=y + 11, teacher_logits=zt)
    with pytest.raises(ValueError, match="pass teacher_topk_ids"):
        build_support(zs, SupportSpec(), teacher_logits=zt, teacher_topk_logprobs=torch.zeros(3, 5, 2))


def test_topk_teacher_tail_is_floored_at_the_resolution_of_the_data():
    """A top-k teacher whose mass rounds to 1: the tail is floored at K·eps, not 0, so RKL stays finite."""
    zt = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -200.0]])  # the last token's mass underflows in fp32
    ids, lp = teacher_topk(zt, 5)
    zs = torch.zeros(1, 6, requires_grad=True)  # the student puts 1/6 off the teacher's top-5
    sup = build_support(zs, SupportSpec(kind="teacher_topk", k=5, norm="tail"), teacher_topk_ids=ids,
                        teacher_topk_logprobs=lp)
    floor = math.log(torch.finfo(torch.float32).eps * 5)  # K·eps = 5 · 2^-23
    assert sup.teacher_logp[0, -1].item() == pytest.approx(floor, rel=1e-6)
    rkl = reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid)
    (g,) = torch.autograd.grad(rkl.sum(), zs)
    assert torch.isfinite(rkl).all() and torch.isfinite(g).all()
    # above the floor the exact value is kept: log(1 − Σ top-k)
    zt2 = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, 1.0]])
    ids2, lp2 = teacher_topk(zt2, 5)
    sup2 = build_support(zs, SupportSpec(kind="teacher_topk", k=5, norm="tail"), teacher_topk_ids=ids2,
                         teacher_topk_logprobs=lp2)
    torch.testing.assert_close(sup2.teacher_logp[0, -1], torch.log_softmax(zt2, -1)[0, 4])
