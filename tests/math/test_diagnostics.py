import math

import pytest
import torch

from opd.math.diagnostics import (
    diagnostics_extra_fn,
    ends_with_eos,
    eos_rate,
    ngram_repetition_rate,
    position_bucket_index,
    position_buckets,
    repetition_rate,
    sequence_diagnostics,
    summarize_by_position,
    summarize_cr_opd,
    summarize_diagnostics,
    token_diagnostics,
    truncation_flags,
    truncation_rate,
)
from opd.math.routing import CrOpdKnobs, cr_opd_loss
from tests.math.fused_call import call

F64 = torch.float64
B, T, V, K = 3, 7, 11, 4

FULL_KEYS = {"student_entropy", "student_top1_prob", "teacher_kl", "reward", "teacher_prob_sampled",
             "rkl", "fkl", "teacher_entropy", "teachability", "teacher_top1_prob", "overlap_ratio",
             "overlap_mass", "sampled_in_teacher_topk"}
TOPK_EXACT = {"student_entropy", "student_top1_prob", "teacher_top1_prob", "overlap_ratio",
              "overlap_mass", "sampled_in_teacher_topk"}
SAMPLED_KEYS = {"teacher_kl", "reward", "teacher_prob_sampled"}


def make_problem(shape=(B, T), v=V, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = (1.5 * torch.randn(*shape, v, dtype=dtype, generator=g)).log_softmax(-1)
    t = (1.5 * torch.randn(*shape, v, dtype=dtype, generator=g)).log_softmax(-1)
    y = torch.randint(0, v, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    y = torch.where(mask, y, torch.full_like(y, -1))  # padding ids are -1: never read
    return s, t, y, mask


# ---------------------------------------------------------------- naive references (python floats)


def topk_list(p, k):
    return sorted(range(len(p)), key=lambda v: -p[v])[:k]


def ref_token_full(s, t, y, k):
    """All full-mode keys of one token from python lists of log-probs."""
    ps, pt = [math.exp(x) for x in s], [math.exp(x) for x in t]
    ts, tt = topk_list(ps, k), topk_list(pt, k)
    both = [v for v in ts if v in tt]
    return {
        "student_entropy": -sum(p * math.log(p) for p in ps if p > 0),
        "student_top1_prob": max(ps),
        "teacher_kl": s[y] - t[y],
        "reward": t[y] - s[y],
        "teacher_prob_sampled": pt[y],
        "rkl": sum(ps[v] * (s[v] - t[v]) for v in range(len(s))),
        "fkl": sum(pt[v] * (t[v] - s[v]) for v in range(len(s))),
        "teacher_entropy": -sum(p * math.log(p) for p in pt if p > 0),
        "teachability": sum(pt[v] for v in ts),
        "teacher_top1_prob": max(pt),
        "overlap_ratio": len(both) / k,
        "overlap_mass": sum(ps[v] for v in both),
        "sampled_in_teacher_topk": float(y in tt),
    }


def ref_token_topk(s, ids, lps, y, k):
    """Top-k-mode keys of one token: the teacher is known only at the given (ids, lps)."""
    known = {}
    for i, lp in zip(ids, lps):
        if i >= 0 and i not in known:
            known[i] = lp
    kk = min(k, len(s), len(ids))
    ps = [math.exp(x) for x in s]
    ts = topk_list(ps, kk)
    tt = sorted(known, key=lambda v: -known[v])[:kk]
    both = [v for v in ts if v in tt]
    # renormalised on the given teacher ids
    zs = sum(ps[v] for v in known)
    zt = sum(math.exp(known[v]) for v in known)
    qs = {v: ps[v] / zs for v in known}
    qt = {v: math.exp(known[v]) / zt for v in known}
    tail = 1.0 - zt
    h_t = -sum(math.exp(known[v]) * known[v] for v in known) - (tail * math.log(tail) if tail > 0 else 0.0)
    out = {
        "student_entropy": -sum(p * math.log(p) for p in ps if p > 0),
        "student_top1_prob": max(ps),
        "rkl": sum(qs[v] * math.log(qs[v] / qt[v]) for v in known),
        "fkl": sum(qt[v] * math.log(qt[v] / qs[v]) for v in known),
        "teacher_entropy": h_t,
        "teacher_top1_prob": math.exp(max(known.values())),
        "overlap_ratio": len(both) / kk,
        "overlap_mass": sum(ps[v] for v in both),
        "sampled_in_teacher_topk": float(y in tt),
    }
    if y in known:
        out.update(teacher_kl=s[y] - known[y], reward=known[y] - s[y], teacher_prob_sampled=math.exp(known[y]))
    return out


def loop_tokens(fn, mask, keys, *per_token):
    """Apply a per-token reference over leading dims; 0 at masked tokens."""
    shape = mask.shape
    flat = [x.reshape(-1, *x.shape[len(shape):]).tolist() for x in per_token]
    out = {key: [] for key in keys}
    for i, keep in enumerate(mask.reshape(-1).tolist()):
        vals = fn(*[f[i] for f in flat]) if keep else {}
        for key in keys:
            out[key].append(vals[key] if keep else 0.0)
    return {key: torch.tensor(v, dtype=F64).reshape(shape) for key, v in out.items()}


def assert_dicts_close(got, want, atol=1e-10):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].to(F64), want[key], atol=atol, rtol=1e-9, msg=key)


# ---------------------------------------------------------------- token_diagnostics: full teacher


@pytest.mark.parametrize("shape,k", [((B, T), K), ((13,), K), ((2, 3, 2), K), ((B, T), V + 5)])
def test_full_teacher_matches_loops(shape, k):
    s, t, y, mask = make_problem(shape)
    got = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=k)
    want = loop_tokens(lambda a, b, c: ref_token_full(a, b, c, min(k, V)), mask, FULL_KEYS, s, t, y)
    assert_dicts_close(got, want)


def test_outputs_are_detached_and_inputs_untouched():
    s, t, y, mask = make_problem()
    s_leaf, t_leaf = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    before = (s_leaf.detach().clone(), y.clone(), mask.clone())
    with torch.enable_grad():
        got = token_diagnostics(s_leaf, y, teacher_logp_NV=t_leaf, mask_N=mask, k=K)
        top = t.topk(5, -1)
        got_k = token_diagnostics(s_leaf, y, teacher_topk_ids_NK=top.indices,
                                  teacher_topk_logprobs_NK=top.values.requires_grad_(True), mask_N=mask)
    assert all(not v.requires_grad and v.grad_fn is None for v in [*got.values(), *got_k.values()])
    assert torch.equal(s_leaf.detach(), before[0]) and torch.equal(y, before[1]) and torch.equal(mask, before[2])


def test_teacher_equals_student():
    s, _, y, mask = make_problem(seed=1)
    got = token_diagnostics(s, y, teacher_logp_NV=s.clone(), mask_N=mask, k=K)
    zero = torch.zeros(mask.shape, dtype=F64)
    for key in ("teacher_kl", "reward", "rkl", "fkl"):
        torch.testing.assert_close(got[key], zero, atol=1e-12, rtol=0)
    torch.testing.assert_close(got["overlap_ratio"], mask.to(F64))
    top_mass = s.topk(K, -1).values.exp().sum(-1) * mask
    torch.testing.assert_close(got["overlap_mass"], top_mass)
    torch.testing.assert_close(got["teachability"], top_mass)
    torch.testing.assert_close(got["teacher_entropy"], got["student_entropy"])
    in_top = (s.topk(K, -1).indices == y.clamp(min=0)[..., None]).any(-1) & mask
    torch.testing.assert_close(got["sampled_in_teacher_topk"], in_top.to(F64))


def test_all_masked_and_zero_probability_entries_give_no_nan():
    s, t, y, _ = make_problem()
    s = s.clone()
    s[..., :3] = -float("inf")  # student puts zero mass on some ids
    t = t.clone()
    t[..., 5] = -float("inf")
    s, t = s.log_softmax(-1), t.log_softmax(-1)
    none = torch.zeros(y.shape, dtype=torch.bool)
    top = t.topk(K, -1)
    for kwargs in (dict(teacher_logp_NV=t),
                   dict(teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values)):
        got = token_diagnostics(s, y.clamp(min=0), mask_N=none, **kwargs)
        assert got and all(torch.equal(v, torch.zeros_like(v)) for v in got.values())
        summary = summarize_diagnostics(got, none)
        assert summary["num_tokens"] == 0.0
        assert all(v == 0.0 for v in summary.values())  # means are 0; reward stats are omitted
        assert "reward_p50" not in summary
        live = token_diagnostics(s, y.clamp(min=0), **kwargs)  # every token kept
        # zero probabilities give true infinities (e.g. RKL with π_T(5) = 0 < π_S(5)), never NaN
        assert not any(torch.isnan(v).any() for v in live.values())
        assert torch.isfinite(live["student_entropy"]).all() and torch.isfinite(live["teacher_entropy"]).all()


def test_negative_sampled_ids_count_as_masked():
    s, t, y, mask = make_problem()
    a = token_diagnostics(s, y, teacher_logp_NV=t, k=K)  # y = -1 exactly where mask is False
    b = token_diagnostics(s, y.clamp(min=0), teacher_logp_NV=t, mask_N=mask, k=K)
    assert_dicts_close(a, {k: v.to(F64) for k, v in b.items()}, atol=0)


def test_float32_and_bfloat16_inputs():
    s, t, y, mask = make_problem()
    ref = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=K)
    for dt in (torch.float32, torch.bfloat16):
        got = token_diagnostics(s.to(dt), y, teacher_logp_NV=t.to(dt), mask_N=mask, k=K)
        assert all(v.dtype == torch.float32 for v in got.values())
        tol = 1e-5 if dt == torch.float32 else 0.1
        # bf16 can reorder near-ties of the top-k sets: compare the continuous keys only there
        keys = got if dt == torch.float32 else ["student_entropy", "teacher_kl", "rkl", "fkl", "teacher_entropy"]
        for key in keys:
            torch.testing.assert_close(got[key].double(), ref[key], atol=tol, rtol=tol, msg=key)


# ---------------------------------------------------------------- token_diagnostics: top-k teacher


@pytest.mark.parametrize("shape,k", [((B, T), K), ((9,), K), ((B, T), 10)])  # k = 10 > K' = 6
def test_topk_teacher_matches_loops_with_appended_sampled_column(shape, k):
    s, t, y, mask = make_problem(shape, seed=2)
    top = t.topk(5, -1)
    # the convention of support.py: append y_t's teacher log-prob as a column (may duplicate a top-k id)
    y0 = y.clamp(min=0)
    ids = torch.cat([top.indices, y0[..., None]], -1)
    lps = torch.cat([top.values, t.gather(-1, y0[..., None])], -1)
    ids[..., 2] = torch.where(mask, ids[..., 2], -1)  # -1 padding on masked tokens' columns
    got = token_diagnostics(s, y, teacher_topk_ids_NK=ids, teacher_topk_logprobs_NK=lps, mask_N=mask, k=k)
    keys = set(got)
    assert keys == (FULL_KEYS - {"teachability"})
    want = loop_tokens(lambda a, b, c, d: ref_token_topk(a, b, c, d, k), mask, keys, s, ids, lps, y)
    assert_dicts_close(got, want)


def test_topk_teacher_omits_sampled_keys_unless_known():
    s, t, y, mask = make_problem(seed=3)
    top = t.topk(3, -1)
    assert not bool(((top.indices == y[..., None]).any(-1) | ~mask).all())  # some y_t outside the top-3
    got = token_diagnostics(s, y, teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values,
                            mask_N=mask)
    assert not SAMPLED_KEYS & set(got) and "teachability" not in got
    t_y = t.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    with_y = token_diagnostics(s, y, teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values,
                               teacher_sampled_logprobs_N=t_y, mask_N=mask)
    full = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask)
    for key in SAMPLED_KEYS:
        torch.testing.assert_close(with_y[key], full[key])
    only_sampled = token_diagnostics(s, y, teacher_sampled_logprobs_N=t_y, mask_N=mask)
    assert set(only_sampled) == SAMPLED_KEYS | {"student_entropy", "student_top1_prob"}
    student_only = token_diagnostics(s, y, mask_N=mask)
    assert set(student_only) == {"student_entropy", "student_top1_prob"}


def test_topk_teacher_consistent_with_full_teacher():
    s, t, y, mask = make_problem(seed=4)
    full = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=K)
    top = t.topk(K + 2, -1)  # K' >= k: the exact keys agree exactly
    part = token_diagnostics(s, y, teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values,
                             mask_N=mask, k=K)
    for key in TOPK_EXACT:
        torch.testing.assert_close(part[key], full[key], atol=1e-12, rtol=0, msg=key)
    # the tail-bucket entropy merges the unseen tokens into one outcome: a lower bound
    assert bool((part["teacher_entropy"] <= full["teacher_entropy"] + 1e-12).all())
    # with every token given (K' = V) the approximations become exact
    allv = t.topk(V, -1)
    whole = token_diagnostics(s, y, teacher_topk_ids_NK=allv.indices, teacher_topk_logprobs_NK=allv.values,
                              mask_N=mask, k=K)
    for key in set(whole):
        torch.testing.assert_close(whole[key], full[key], atol=1e-10, rtol=1e-9, msg=key)


def test_topk_teacher_equals_student():
    s, _, y, mask = make_problem(seed=5)
    top = s.topk(6, -1)
    got = token_diagnostics(s, y, teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values,
                            mask_N=mask, k=K)
    for key in ("rkl", "fkl"):
        torch.testing.assert_close(got[key], torch.zeros_like(got[key]), atol=1e-12, rtol=0)
    torch.testing.assert_close(got["overlap_ratio"], mask.to(F64))
    torch.testing.assert_close(got["overlap_mass"], s.topk(K, -1).values.exp().sum(-1) * mask)


@pytest.mark.parametrize("teacher", ["full", "topk_with_y", "topk_without_y"])
def test_extra_fn_in_fused_pass_matches_dense(teacher):
    from opd.math.fused import fused_linear_divergence
    from opd.math.support import SupportSpec

    g = torch.Generator().manual_seed(10)
    N, H = 13, 5
    h, W = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    t_logits = 2 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    s_logp, t_logp = (h @ W.T).log_softmax(-1), t_logits.log_softmax(-1)
    top = t_logp.topk(3, -1)
    ids, lps = top.indices, top.values
    if teacher == "topk_with_y":
        ids = torch.cat([ids, y[:, None]], -1)
        lps = torch.cat([lps, t_logp.gather(-1, y[:, None])], -1)
    topk = {} if teacher == "full" else dict(teacher_topk_ids_NK=ids, teacher_topk_logprobs_NK=lps)
    extra = diagnostics_extra_fn(y, mask_N=mask, k=K, **topk)
    spec = SupportSpec(kind="full" if teacher == "full" else "teacher_topk", k=3)
    teacher_kw = dict(teacher_logits_NV=t_logits) if teacher == "full" else topk
    _, _, got = call(fused_linear_divergence, h, W, mask.float(), spec=spec, divergence="rkl", chunk_size=4,
                                        extra_fn=extra, **teacher_kw)
    dense = token_diagnostics(s_logp, y, mask_N=mask, k=K,
                              **(dict(teacher_logp_NV=t_logp) if teacher == "full" else topk))
    assert set(got) == set(dense)
    assert ("reward" in got) == (teacher != "topk_without_y")
    for key in dense:
        torch.testing.assert_close(got[key], dense[key], atol=1e-5, rtol=1e-5, msg=key)


def test_bad_inputs_raise():
    s, t, y, mask = make_problem()
    with pytest.raises(ValueError, match="sampled_ids_N"):
        token_diagnostics(s, y[:, :3], teacher_logp_NV=t)
    with pytest.raises(ValueError, match="teacher_logp_NV"):
        token_diagnostics(s, y, teacher_logp_NV=t[..., :5])
    with pytest.raises(ValueError, match=">= V"):
        token_diagnostics(s, torch.full_like(y, V))
    with pytest.raises(ValueError, match="together"):
        token_diagnostics(s, y, teacher_topk_ids_NK=t.topk(2, -1).indices)
    with pytest.raises(ValueError, match="k must be"):
        token_diagnostics(s, y, k=0)
    with pytest.raises(ValueError, match="mask_N"):
        token_diagnostics(s, y, mask_N=mask[:2])


# ---------------------------------------------------------------- summaries


def ref_quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def test_summarize_matches_loops_and_ignores_padding():
    s, t, y, mask = make_problem(shape=(4, 9), seed=6)
    d = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=K)
    got = summarize_diagnostics(d, mask)
    kept = mask.reshape(-1).tolist()
    r = [x for x, m in zip(d["reward"].reshape(-1).tolist(), kept) if m]
    n = len(r)
    mu = sum(r) / n
    m2 = sum((x - mu) ** 2 for x in r) / n
    m3 = sum((x - mu) ** 3 for x in r) / n
    m4 = sum((x - mu) ** 4 for x in r) / n
    want = {key: sum(x for x, m in zip(v.reshape(-1).tolist(), kept) if m) / n for key, v in d.items()}
    want.update(num_tokens=float(n), reward_neg_frac=sum(x < 0 for x in r) / n, reward_std=math.sqrt(m2),
                reward_p05=ref_quantile(r, 0.05), reward_p50=ref_quantile(r, 0.5),
                reward_p95=ref_quantile(r, 0.95), reward_skew=m3 / m2 ** 1.5, reward_kurtosis=m4 / m2 ** 2 - 3)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    # padding invariance: masked garbage appended along T changes nothing
    pad = {key: torch.cat([v, torch.full((4, 3), 7.0, dtype=v.dtype)], 1) for key, v in d.items()}
    pad_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    assert summarize_diagnostics(pad, pad_mask) == pytest.approx(got, rel=1e-12)


def test_summarize_constant_reward_has_zero_moments():
    d = {"reward": torch.full((2, 3), -0.5)}
    got = summarize_diagnostics(d)  # no mask: every token counts
    assert got == {"num_tokens": 6.0, "reward": -0.5, "reward_neg_frac": 1.0, "reward_std": 0.0,
                   "reward_p05": -0.5, "reward_p50": -0.5, "reward_p95": -0.5, "reward_skew": 0.0,
                   "reward_kurtosis": 0.0}


# ---------------------------------------------------------------- position buckets


def test_position_buckets_hand_case():
    # rows of valid length 6, 3, 1 and 0 in T = 6 (right padding); bucket = floor(3 t / L)
    lengths = [6, 3, 1, 0]
    mask = torch.tensor([[t < L for t in range(6)] for L in lengths])
    values = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    values[~mask] = float("nan")  # padding may hold anything
    want_idx = torch.tensor([[0, 0, 1, 1, 2, 2],   # L = 6: t = 0,1 | 2,3 | 4,5
                             [0, 1, 2, -1, -1, -1],  # L = 3: one token per bucket
                             [0, -1, -1, -1, -1, -1],  # L = 1: early only
                             [-1] * 6])
    assert torch.equal(position_bucket_index(mask), want_idx)
    # early: 0, 1 (row 0), 6 (row 1), 12 (row 2) -> 19/4; middle: 2, 3, 7 -> 4; late: 4, 5, 8 -> 17/3
    torch.testing.assert_close(position_buckets(values, mask), torch.tensor([19 / 4, 4.0, 17 / 3]))
    got = summarize_by_position({"x": values}, mask)
    assert got == pytest.approx({"x_early": 19 / 4, "x_middle": 4.0, "x_late": 17 / 3})
    # two buckets: floor(2 t / L); a single short row leaves the second bucket empty -> 0 / omitted
    short = torch.tensor([[True, False, False]])
    torch.testing.assert_close(position_buckets(torch.ones(1, 3), short, 2), torch.tensor([1.0, 0.0]))
    assert summarize_by_position({"x": torch.ones(1, 3)}, short, 2) == {"x_pos0of2": 1.0}


@pytest.mark.parametrize("n_buckets", [1, 3, 4])
def test_position_buckets_match_loop(n_buckets):
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 10, (6,), generator=g).tolist()
    mask = torch.tensor([[t < L for t in range(9)] for L in lengths])
    mask[0, 1] = False  # a hole keeps positions: row length stays 1 + last kept index
    values = torch.randn(6, 9, dtype=F64, generator=g)
    sums, counts = [0.0] * n_buckets, [0] * n_buckets
    for row in range(6):
        kept = [t for t in range(9) if mask[row, t]]
        if not kept:
            continue
        L = kept[-1] + 1
        for t in kept:
            b = (n_buckets * t) // L
            sums[b] += float(values[row, t])
            counts[b] += 1
    want = torch.tensor([s / c if c else 0.0 for s, c in zip(sums, counts)], dtype=F64)
    torch.testing.assert_close(position_buckets(values, mask, n_buckets), want)
    assert position_buckets(values, torch.zeros_like(mask), n_buckets).eq(0).all()


# ---------------------------------------------------------------- repetition, EOS, truncation


def ref_repetition(ids, mask, n):
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        seen, total, rep = set(), 0, 0
        for i in range(len(row) - n + 1):
            if all(m[i:i + n]):
                gram = tuple(row[i:i + n])
                total += 1
                rep += gram in seen
                seen.add(gram)
        out.append(rep / total if total else 0.0)
    return torch.tensor(out)


def test_repetition_hand_case():
    pad = 0
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1],      # 3-grams 123 231 312 123 231: 2 repeats of 5
                        [5, 5, 5, 5, pad, pad, pad],  # 555 555: 1 of 2 (padding zeros never count)
                        [4, 4, pad, pad, pad, pad, pad],  # shorter than n: 0
                        [pad] * 7])                   # empty row: 0
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7]).bool()
    torch.testing.assert_close(ngram_repetition_rate(ids, mask, 3), torch.tensor([2 / 5, 1 / 2, 0.0, 0.0]))
    # n = 1: fraction of tokens that repeat an earlier token: row 0 -> 4/7, row 1 -> 3/4, row 2 -> 1/2
    torch.testing.assert_close(repetition_rate(ids, mask, 1), torch.tensor([4 / 7, 3 / 4, 1 / 2, 0.0]))
    assert ngram_repetition_rate(ids, mask, 8).eq(0).all()  # n > T


@pytest.mark.parametrize("n", [1, 2, 3])
def test_repetition_matches_loop(n):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 3, (7, 12), generator=g)
    lengths = torch.randint(0, 13, (7,), generator=g)
    mask = torch.arange(12)[None] < lengths[:, None]
    mask[1, 4] = False  # an n-gram over a hole is not an n-gram
    torch.testing.assert_close(ngram_repetition_rate(ids, mask, n), ref_repetition(ids, mask, n))


def test_eos_truncation_and_sequence_summary():
    eos, pad = 9, 0
    ids = torch.tensor([[3, 4, 9, pad],   # ends with EOS at length 3
                        [3, 3, 3, 3],     # hits max length 4 without EOS -> truncated
                        [5, 9, 7, 9],     # length 4 ending in EOS: not truncated
                        [pad] * 4])       # empty row
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    assert ends_with_eos(ids, mask, eos).tolist() == [True, False, True, False]
    assert ends_with_eos(ids, mask, [7, 4]).tolist() == [False, False, False, False]
    assert eos_rate(ids, mask, eos) == pytest.approx(2 / 3)  # over non-empty rows
    assert truncation_flags(mask, 4).tolist() == [False, True, True, False]
    assert truncation_flags(mask, 4, ids_BT=ids, eos_ids=eos).tolist() == [False, True, False, False]
    assert truncation_rate(mask, 4, ids_BT=ids, eos_ids=eos) == pytest.approx(1 / 4)
    got = sequence_diagnostics(ids, mask, n=2, eos_ids=eos, max_new_tokens=4)
    # 2-gram repetition: row 0: 34 49 -> 0; row 1: 33 33 33 -> 2/3; row 2: 59 97 79 -> 0; row 3 has none
    assert got == pytest.approx({"length_mean": 11 / 4, "length_min": 0.0, "length_max": 4.0,
                                 "repetition_rate": 2 / 9, "eos_rate": 2 / 3, "truncation_rate": 1 / 4})
    given = sequence_diagnostics(ids, mask, truncated_B=torch.tensor([0, 1, 1, 1]).bool())
    assert given["truncation_rate"] == 0.75 and "eos_rate" not in given
    empty = sequence_diagnostics(ids, torch.zeros_like(mask), eos_ids=eos)
    assert empty == {"length_mean": 0.0, "length_min": 0.0, "length_max": 0.0, "eos_rate": 0.0}


# ---------------------------------------------------------------- CR-OPD summary


def test_summarize_cr_opd_matches_loop():
    g = torch.Generator().manual_seed(9)
    logp = torch.randn(5, 6, V, dtype=F64, generator=g).log_softmax(-1)
    teacher = torch.randn(5, 6, V, dtype=F64, generator=g).log_softmax(-1).topk(K, -1)
    ids = torch.randint(0, V, (5, 6), generator=g)
    adv = torch.randn(5, 6, dtype=F64, generator=g)
    mask = torch.rand(5, 6, generator=g) > 0.3
    _, metrics = cr_opd_loss(logp, ids, adv, teacher.indices, teacher.values, mask_N=mask,
                             knobs=CrOpdKnobs(student_k=3))
    routed = [bool(r) for r in metrics["routed"].reshape(-1)]
    kept = mask.reshape(-1).tolist()
    mass = metrics["mass_to_teacher_supported"].reshape(-1).tolist()
    cand = metrics["n_candidates"].reshape(-1).tolist()
    r_idx = [i for i in range(30) if kept[i] and routed[i]]
    u_idx = [i for i in range(30) if kept[i] and not routed[i]]
    assert r_idx and u_idx
    want = {"cr_opd_routed_frac": len(r_idx) / sum(kept),
            "cr_opd_candidates_routed": sum(cand[i] for i in r_idx) / len(r_idx),
            "cr_opd_mass_routed": sum(mass[i] for i in r_idx) / len(r_idx),
            "cr_opd_mass_unrouted": sum(mass[i] for i in u_idx) / len(u_idx)}
    assert summarize_cr_opd(metrics, mask) == pytest.approx(want, rel=1e-12)
    none = torch.zeros_like(mask)
    assert summarize_cr_opd(metrics, none) == {"cr_opd_routed_frac": 0.0}


def test_workspace_and_chunked_extra_fn_give_the_same_values():
    """The full-mode scratch buffers (a garbage-filled workspace, reused across chunks of unequal
    size by diagnostics_extra_fn) change no value: bitwise equal to fresh allocations."""
    from opd.math.diagnostics import diagnostics_extra_fn

    g = torch.Generator().manual_seed(5)
    n, v = 9, 13
    s = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    t = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    ref = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=4)
    garbage = (torch.full((n, v), float("nan")), torch.full((n, v), 7.0))
    got = token_diagnostics(s, y, teacher_logp_NV=t, mask_N=mask, k=4, workspace=garbage)
    assert got.keys() == ref.keys() and all(torch.equal(got[key], ref[key]) for key in ref)
    fn = diagnostics_extra_fn(y, mask_N=mask, k=4)
    parts = [fn(s[rows], t[rows], rows) for rows in (slice(0, 5), slice(5, 9))]
    for key in ref:
        assert torch.equal(torch.cat([p[key] for p in parts]), ref[key]), key
