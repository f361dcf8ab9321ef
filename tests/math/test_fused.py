import pytest
import torch

from opd.math.divergences import DIVERGENCE_NAMES
from opd.math.fused import (
    auto_chunk_size,
    dense_linear_divergence,
    fused_linear_divergence,
    fused_linear_token_logprobs,
)
from opd.math.support import SupportSpec
from tests.math.fused_call import call

N, V, H, HT, CHUNK = 37, 23, 5, 7, 8  # N is not a multiple of the chunk size
TOL = dict(rtol=1e-5, atol=1e-5)

SPECS = [
    SupportSpec(kind="full", student_temperature=0.7, teacher_temperature=1.5),
    SupportSpec(kind="teacher_topk", k=4, norm="renorm", teacher_temperature=2.0),
    SupportSpec(kind="teacher_topk", k=4, norm="tail"),
    SupportSpec(kind="student_topk", k=3, norm="renorm", student_temperature=1.3),
    SupportSpec(kind="union", k=4, norm="tail"),
    SupportSpec(kind="union", k=4, norm="none"),
    SupportSpec(kind="sampled", norm="tail", student_temperature=0.8),
    SupportSpec(kind="teacher_topk_sampled", k=4, norm="renorm"),
    SupportSpec(kind="teacher_topk_sampled", k=4, norm="tail"),
]


def make(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    W = torch.randn(V, H, generator=g).requires_grad_(True)
    b = torch.randn(V, generator=g).requires_grad_(True) if bias else None
    th, tW, tb = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g), torch.randn(V, generator=g)
    w = torch.rand(N, generator=g)
    w[torch.rand(N, generator=g) < 0.3] = 0.0  # weights containing zeros
    w[CHUNK:2 * CHUNK] = 0.0  # one chunk with no weight at all
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, b, th, tW, tb, w, y


def run(fn, h, W, b, w, **kw):
    for x in (h, W, b):
        if x is not None:
            x.grad = None
    loss, per_token, extras = call(fn, h, W, w, student_bias_V=b, chunk_size=CHUNK, **kw)
    loss.backward()
    grads = [None if x is None else x.grad.clone() for x in (h, W, b)]
    return loss.detach(), per_token, extras, grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)
    for ga, gb in zip(a[3], b[3]):
        if ga is None:
            assert gb is None
        else:
            torch.testing.assert_close(ga, gb, **TOL)


def teacher_kwargs(form, spec, th, tW, tb, y):
    """The teacher as hidden+weight, as logits, or as top-k log-probs (+ the sampled column)."""
    logits = th @ tW.T + tb
    if form == "hidden":
        return dict(teacher_hidden_NH=th, teacher_weight_VH=tW, teacher_bias_V=tb)
    if form == "logits":
        return dict(teacher_logits_NV=logits)
    lp = torch.log_softmax(logits / spec.teacher_temperature, -1)
    if spec.kind == "sampled":  # the route-2 teacher signal: the sampled token's log-prob only
        return dict(teacher_topk_ids_NK=y[:, None], teacher_topk_logprobs_NK=lp.gather(-1, y[:, None]))
    top = lp.topk(spec.k, -1)
    ids, vals = top.indices, top.values
    if spec.kind == "teacher_topk_sampled":  # vLLM-style: top-k plus the sampled token's column
        ids, vals = torch.cat([ids, y[:, None]], -1), torch.cat([vals, lp.gather(-1, y[:, None])], -1)
    return dict(teacher_topk_ids_NK=ids, teacher_topk_logprobs_NK=vals)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.norm}")
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_chunked_equals_dense(spec, name):
    h, W, b, th, tW, tb, w, y = make()
    kw = dict(spec=spec, divergence=name, beta=0.3, alpha=0.2, mu=0.6, sampled_ids_N=y,
              **teacher_kwargs("hidden", spec, th, tW, tb, y))
    chunked = run(fused_linear_divergence, h, W, b, w, **kw)
    dense = run(dense_linear_divergence, h, W, b, w, **kw)
    assert_same(chunked, dense)
    assert chunked[0] != 0 and chunked[3][1].abs().sum() > 0  # the comparison is not vacuous
    assert torch.all(chunked[3][0][w == 0] == 0)  # zero-weight rows get exactly zero gradient


@pytest.mark.parametrize("form", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind in ("teacher_topk", "sampled", "teacher_topk_sampled")],
                         ids=lambda s: f"{s.kind}-{s.norm}")
def test_teacher_forms_agree(form, spec):
    h, W, b, th, tW, tb, w, y = make(seed=1)
    reference = run(dense_linear_divergence, h, W, b, w, spec=spec, divergence="jsd", sampled_ids_N=y,
                    **teacher_kwargs("hidden", spec, th, tW, tb, y))
    got = run(fused_linear_divergence, h, W, b, w, spec=spec, divergence="jsd", sampled_ids_N=y,
              **teacher_kwargs(form, spec, th, tW, tb, y))
    assert_same(got, reference)


def test_dense_matches_naive_formula():
    """FKL on the full vocabulary with temperatures, written out in float64."""
    h, W, b, th, tW, tb, w, _ = make(seed=2)
    spec = SupportSpec(kind="full", student_temperature=0.7, teacher_temperature=1.5)
    loss, per_token, _, grads = run(fused_linear_divergence, h, W, b, w, spec=spec, divergence="fkl",
                                    teacher_hidden_NH=th, teacher_weight_VH=tW, teacher_bias_V=tb)
    h64, W64, b64 = (x.detach().double().requires_grad_(True) for x in (h, W, b))
    zs = (h64 @ W64.T + b64) / 0.7
    zt = (th.double() @ tW.double().T + tb.double()) / 1.5
    ps = torch.exp(zs) / torch.exp(zs).sum(-1, keepdim=True)
    pt = torch.exp(zt) / torch.exp(zt).sum(-1, keepdim=True)
    ref_tok = (pt * (torch.log(pt) - torch.log(ps))).sum(-1)
    ref = (w.double() * ref_tok).sum()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(per_token.double(), ref_tok.detach(), **TOL)
    for g, x in zip(grads, (h64, W64, b64)):
        torch.testing.assert_close(g.double(), x.grad, **TOL)


def test_all_zero_weights_give_zero_loss_and_gradient():
    h, W, b, th, tW, tb, w, _ = make()
    loss, per_token, _, grads = run(fused_linear_divergence, h, W, b, torch.zeros(N), spec=SupportSpec(),
                                    divergence="rkl", teacher_logits_NV=th @ tW.T)
    assert loss.item() == 0.0 and torch.isfinite(per_token).all() and (per_token > 0).all()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_teacher_equal_student_gives_zero_loss_and_gradient():
    h, W, b, _, _, _, w, _ = make()
    for fn in (fused_linear_divergence, dense_linear_divergence):
        loss, per_token, _, grads = run(fn, h, W, b, w, spec=SupportSpec(kind="teacher_topk", k=5, norm="tail"),
                                        divergence="jsd", teacher_hidden_NH=h.detach(), teacher_weight_VH=W.detach(),
                                        teacher_bias_V=b.detach())
        assert abs(loss.item()) < 1e-6
        for g in grads:
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-6)


def test_extras_grad_output_no_grad_and_no_bias():
    h, W, _, th, tW, tb, w, y = make(bias=False)

    def entropy(s_logp, t_logp, rows):
        assert t_logp is not None and s_logp.shape == (rows.stop - rows.start, V)
        return {"entropy": -(s_logp.exp() * s_logp).sum(-1), "rows": torch.arange(rows.start, rows.stop).float()}

    kw = dict(spec=SupportSpec(student_temperature=0.5), divergence="tvd", teacher_hidden_NH=th,
              teacher_weight_VH=tW, extra_fn=entropy)
    chunked = run(fused_linear_divergence, h, W, None, w, **kw)
    dense = run(dense_linear_divergence, h, W, None, w, **kw)
    assert_same(chunked, dense)
    logp = torch.log_softmax((h @ W.T).detach() / 0.5, -1)
    torch.testing.assert_close(chunked[2]["entropy"], -(logp.exp() * logp).sum(-1), **TOL)
    assert torch.equal(chunked[2]["rows"], torch.arange(N).float())
    # the loss scales the stored gradients by the incoming gradient
    h.grad = W.grad = None
    loss, _, _ = call(fused_linear_divergence, h, W, w, chunk_size=CHUNK, **kw)
    (3.0 * loss).backward()
    torch.testing.assert_close(h.grad, 3.0 * chunked[3][0], **TOL)
    torch.testing.assert_close(W.grad, 3.0 * chunked[3][1], **TOL)
    with torch.no_grad():
        loss, per_token, extras = call(fused_linear_divergence, h, W, w, chunk_size=CHUNK, **kw)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, chunked[0], **TOL)
    torch.testing.assert_close(extras["entropy"], chunked[2]["entropy"], **TOL)


def test_errors_name_shapes_and_arguments():
    h, W, b, th, tW, tb, w, y = make()
    spec = SupportSpec()
    logits = th @ tW.T
    with pytest.raises(ValueError, match=r"student_hidden_NH has shape \(37, 5\) and student_weight_VH has shape \(23, 4\)"):
        call(fused_linear_divergence, h, W[:, :4], w, spec=spec, divergence="fkl", teacher_logits_NV=logits)
    with pytest.raises(ValueError, match=r"weights_N has shape \(36,\)"):
        call(fused_linear_divergence, h, W, w[:-1], spec=spec, divergence="fkl", teacher_logits_NV=logits)
    with pytest.raises(ValueError, match=r"teacher_logits_NV has shape \(37, 22\)"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_logits_NV=logits[:, :22])
    with pytest.raises(ValueError, match="not both"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_logits_NV=logits,
                                teacher_hidden_NH=th, teacher_weight_VH=tW)
    with pytest.raises(ValueError, match="go together"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_hidden_NH=th)
    with pytest.raises(ValueError, match="pass teacher_hidden_NH with teacher_weight_VH, or teacher_logits_NV"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_topk_ids_NK=y[:, None],
                                teacher_topk_logprobs_NK=torch.zeros(N, 1))
    with pytest.raises(ValueError, match="pass sampled_ids_N"):
        call(fused_linear_divergence, h, W, w, spec=SupportSpec(kind="sampled", norm="tail"), divergence="fkl",
                                teacher_logits_NV=logits)
    with pytest.raises(ValueError, match="unknown divergence"):
        call(dense_linear_divergence, h, W, w, spec=spec, divergence="kl", teacher_logits_NV=logits)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_logits_NV=logits, chunk_size=0)
    with pytest.raises(ValueError, match=r"student_bias_V has shape \(22,\)"):
        call(fused_linear_divergence, h, W, w, spec=spec, divergence="fkl", teacher_logits_NV=logits,
                                student_bias_V=torch.zeros(22))


def test_auto_chunk_size():
    assert auto_chunk_size(32000) == 131 and auto_chunk_size(128000) == 64 and auto_chunk_size(10**8) == 64
    assert auto_chunk_size(V, chunk_elements=5 * V, min_tokens=1) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        auto_chunk_size(0)
    h, W, b, th, tW, tb, w, _ = make()
    kw = dict(spec=SupportSpec(), divergence="jsd", teacher_logits_NV=th @ tW.T, student_bias_V=b)
    a = call(fused_linear_divergence, h, W, w, chunk_size=None, **kw)[0]  # auto: one chunk at this tiny V
    c = call(fused_linear_divergence, h, W, w, chunk_size=1, **kw)[0]  # one token per chunk
    torch.testing.assert_close(a, c, **TOL)


# ---------------------------------------------------------------- sampled-token log-probs


@pytest.mark.parametrize("tau,bias", [(1.0, True), (0.6, False)])
def test_token_logprobs_match_naive(tau, bias):
    h, W, b, _, _, _, w, y = make(seed=3, bias=bias)
    coef = torch.randn(N)
    got = fused_linear_token_logprobs(h, W, y, bias_V=b, temperature=tau, chunk_size=CHUNK)
    (got * coef).sum().backward()
    grads = [None if x is None else x.grad.clone() for x in (h, W, b)]
    h64, W64 = h.detach().double().requires_grad_(True), W.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if bias else None
    z = (h64 @ W64.T + (b64 if bias else 0.0)) / tau
    ref = z.gather(-1, y[:, None])[:, 0] - torch.log(torch.exp(z).sum(-1))  # log softmax at y, explicit
    (ref * coef.double()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), **TOL)
    for g, x in zip(grads, (h64, W64, b64)):
        if x is None:
            assert g is None
        else:
            torch.testing.assert_close(g.double(), x.grad, **TOL)


def test_token_logprobs_checks():
    h, W, b, _, _, _, _, y = make()
    with pytest.raises(ValueError, match=r"ids_N must lie in \[0, V = 23\)"):
        fused_linear_token_logprobs(h, W, y - 1 - y.min())
    with pytest.raises(ValueError, match=r"ids_N has shape \(36,\)"):
        fused_linear_token_logprobs(h, W, y[:-1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_linear_token_logprobs(h, W, y, temperature=0.0)


@pytest.mark.parametrize("name,beta", [("rkl", 1.0), ("fkl", 0.0), ("jsd", 1.0), ("jsd", 0.0)])
def test_closed_form_chunks_equal_autograd_chunks(name, beta, monkeypatch):
    """Full-support RKL / FKL take the closed-form logit gradient; it equals autograd's, and a
    ``-inf`` teacher entry (an infinite FKL) falls back to the general path with the same result."""
    import opd.math.fused as fused

    h, W, b, th, tW, tb, w, _ = make(3)
    spec = SupportSpec(kind="full", student_temperature=0.7)
    logits = th @ tW.T + tb
    for teacher in (logits, logits.index_fill(1, torch.tensor([2]), float("-inf"))):
        kw = dict(spec=spec, divergence=name, beta=beta, teacher_logits_NV=teacher)
        fast = run(fused_linear_divergence, h, W, b, w, **kw)
        used = []
        init = fused._Args.__init__

        def generic(self, *args, **kwargs):
            init(self, *args, **kwargs)
            used.append(self.closed_form)
            self.closed_form = None

        monkeypatch.setattr(fused._Args, "__init__", generic)
        slow = run(fused_linear_divergence, h, W, b, w, **kw)
        monkeypatch.undo()
        assert used == [("rkl" if beta == 1.0 else "fkl")]
        for a, b_ in [(fast[0], slow[0]), (fast[1], slow[1]), *zip(fast[3], slow[3])]:
            torch.testing.assert_close(a, b_, equal_nan=True, **TOL)
        if bool(torch.isfinite(fast[0])):
            assert_same(fast, run(dense_linear_divergence, h, W, b, w, **kw))


# ----------------------------------------------------------------------------- mixed dtypes


@pytest.mark.parametrize("name, beta", [*[(d, 0.5) for d in DIVERGENCE_NAMES], ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("teacher_dtype", [torch.float64, torch.bfloat16])
def test_teacher_logits_of_another_dtype_than_the_fp32_head(name, beta, teacher_dtype):
    """A float64 (or bfloat16) teacher next to a float32 LM head: the chunked path, including the
    closed-form RKL/FKL gradient (rkl, fkl, jsd at β ∈ {0, 1}), equals the dense path run on the same
    teacher values in float32, in loss and gradients."""
    h, W, b, th, tW, tb, w, y = make(3)
    t_logits = (th @ tW.T + tb).to(teacher_dtype)
    spec = SupportSpec(kind="full")
    kw = dict(spec=spec, divergence=name, beta=beta, sampled_ids_N=y)
    got = run(fused_linear_divergence, h, W, b, w, teacher_logits_NV=t_logits, **kw)
    ref = run(dense_linear_divergence, h, W, b, w, teacher_logits_NV=t_logits.float(), **kw)
    assert got[0].dtype == torch.float32 and h.grad.dtype == h.dtype
    assert_same(got, ref)
