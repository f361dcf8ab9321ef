import pytest
import torch

from opd.math.credit import (
    batch_mean_baseline,
    closed_form_value,
    decomposed_value,
    discounted_returns,
    gae_advantages,
    group_mean_baseline,
    length_normalized_returns,
    temporal_credit,
    value_loss,
)

B, T = 5, 7

# ---------------------------------------------------------------- naive references
# Each row is reduced to the list of its valid columns; every reference works on that list with
# explicit sums (not the recursions used by the implementation) and writes back to those columns.


def valid_cols(mask, b):
    return [t for t in range(mask.shape[1]) if mask[b, t]]


def ref_discounted(r, mask, gamma):
    out = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        cols = valid_cols(mask, b)
        for j, c in enumerate(cols):
            out[b, c] = sum(gamma ** (k - j) * float(r[b, cols[k]]) for k in range(j, len(cols)))
    return out


def ref_length_normalized(r, mask):
    out = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        cols = valid_cols(mask, b)
        for j, c in enumerate(cols):
            rest = [float(r[b, cols[k]]) for k in range(j, len(cols))]
            out[b, c] = sum(rest) / len(rest)
    return out


def ref_gae(r, v, mask, gamma, lam):
    adv = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        cols = valid_cols(mask, b)
        n = len(cols)
        vals = [float(v[b, c]) for c in cols] + [0.0]  # V(s_{T+1}) = 0
        deltas = [float(r[b, cols[k]]) + gamma * vals[k + 1] - vals[k] for k in range(n)]
        for j, c in enumerate(cols):
            adv[b, c] = sum((gamma * lam) ** (k - j) * deltas[k] for k in range(j, n))
    return adv


def ref_batch_mean(x, mask):
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[1]):
        rows = [b for b in range(x.shape[0]) if mask[b, t]]
        for b in rows:
            out[b, t] = sum(float(x[j, t]) for j in rows) / len(rows)
    return out


def ref_group_mean(x, mask, groups, loo):
    out = torch.zeros_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if not mask[b, t]:
                continue
            others = [j for j in range(x.shape[0])
                      if groups[j] == groups[b] and mask[j, t] and not (loo and j == b)]
            out[b, t] = sum(float(x[j, t]) for j in others) / len(others) if others else 0.0
    return out


def random_mask(b=B, t=T):
    """Rows of different lengths, interior holes, one all-masked row, one full row."""
    mask = torch.rand(b, t) > 0.3
    mask[0] = True
    mask[1] = False
    mask[2, 4:] = False  # a short row (right padding)
    return mask


def data(b=B, t=T):
    r = torch.randn(b, t, dtype=torch.float64)
    v = torch.randn(b, t, dtype=torch.float64)
    return r, v, random_mask(b, t)


def garbage_at(x, mask):
    """Masked entries replaced by nan/inf: results must not change and must not be nan."""
    junk = torch.full_like(x, float("nan"))
    junk[..., ::2] = float("inf")
    return torch.where(mask, x, junk)


GAMMAS = [0.0, 0.37, 0.9, 1.0]

# ---------------------------------------------------------------- returns


@pytest.mark.parametrize("gamma", GAMMAS)
def test_discounted_returns_match_loop(gamma):
    r, _, mask = data()
    got = discounted_returns(garbage_at(r, mask), mask, gamma)
    torch.testing.assert_close(got, ref_discounted(r, mask, gamma))
    assert got.dtype == torch.float64


def test_discounted_hand_case():
    # r = (1, 2, 4), γ = 0.5: G_3 = 4, G_2 = 2 + 0.5·4 = 4, G_1 = 1 + 0.5·4 = 3.
    # A masked column between the 1 and the 2 changes nothing (γ counts valid tokens only).
    r = torch.tensor([[1.0, 9.0, 2.0, 4.0]])
    mask = torch.tensor([[True, False, True, True]])
    assert discounted_returns(r, mask, 0.5).tolist() == [[3.0, 0.0, 4.0, 4.0]]


def test_length_normalized_matches_loop():
    r, _, mask = data()
    got = length_normalized_returns(garbage_at(r, mask), mask)
    torch.testing.assert_close(got, ref_length_normalized(r, mask))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_returns_do_not_leak_across_rows_or_from_padding(gamma):
    r, _, mask = data()
    base = discounted_returns(r, mask, gamma)
    r2 = r.clone()
    r2[3] += 100.0  # another row changes
    r2[~mask] = 1e6  # padding changes
    got = discounted_returns(r2, mask, gamma)
    keep = torch.ones(B, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(got[keep], base[keep])
    assert (got[~mask] == 0).all()


def test_padding_and_inserted_masked_columns_are_invariant():
    r, v, mask = data()
    groups = torch.tensor([0, 1, 0, 1, 0])
    # append 3 masked columns and insert 2 masked columns at position 3
    def widen(x, fill):
        cols = [x[:, :3], torch.full((B, 2), fill, dtype=x.dtype), x[:, 3:],
                torch.full((B, 3), fill, dtype=x.dtype)]
        return torch.cat(cols, 1)
    wide_mask = widen(mask, False)
    keep = widen(torch.ones_like(mask), False)
    r_w, v_w = widen(r, float("nan")), widen(v, float("inf"))
    for kw in [dict(kind="immediate"), dict(kind="return_to_go"), dict(kind="discounted", gamma=0.7),
               dict(kind="return_to_go", length_normalize=True),
               dict(kind="gae", gamma=0.9, lam=0.6), dict(kind="return_to_go", baseline="value"),
               dict(kind="discounted", gamma=0.5, baseline="leave_one_out"),
               dict(kind="return_to_go", baseline="group_mean")]:
        a = temporal_credit(r, mask, values_BT=v, group_index_B=groups, **kw)
        w = temporal_credit(r_w, wide_mask, values_BT=v_w, group_index_B=groups, **kw)
        assert not torch.isnan(w).any(), kw
        torch.testing.assert_close(w[keep].reshape(B, T), a, msg=str(kw))
        assert (w[~keep] == 0).all()


def test_all_masked_is_zero_and_nan_free():
    r = torch.full((3, 4), float("nan"))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for gamma in GAMMAS:
        assert torch.equal(discounted_returns(r, mask, gamma), torch.zeros(3, 4))
    assert torch.equal(length_normalized_returns(r, mask), torch.zeros(3, 4))
    adv, tgt = gae_advantages(r, r, mask, gamma=0.9, lam=0.5)
    assert torch.equal(adv, torch.zeros(3, 4)) and torch.equal(tgt, torch.zeros(3, 4))
    assert torch.equal(batch_mean_baseline(r, mask), torch.zeros(3, 4))
    for loo in (False, True):
        assert torch.equal(group_mean_baseline(r, mask, torch.tensor([0, 0, 1]), leave_one_out=loo),
                           torch.zeros(3, 4))


# ---------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5), (1.0, 0.95), (0.6, 1.0),
                                       (1.0, 1.0)])
def test_gae_matches_double_sum(gamma, lam):
    r, v, mask = data()
    adv, tgt = gae_advantages(garbage_at(r, mask), garbage_at(v, mask), mask, gamma=gamma, lam=lam)
    ref = ref_gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(tgt, torch.where(mask, ref + v, torch.zeros_like(v)))


def test_gae_corners():
    r, v, mask = data()
    zero = torch.zeros_like(r)
    # γ = 0, V ≡ 0: immediate reward (for any λ)
    for lam in (0.0, 0.5, 1.0):
        adv, _ = gae_advantages(r, zero, mask, gamma=0.0, lam=lam)
        torch.testing.assert_close(adv, torch.where(mask, r, zero))
    # λ = 1: discounted return minus V
    for gamma in (0.5, 1.0):
        adv, _ = gae_advantages(r, v, mask, gamma=gamma, lam=1.0)
        torch.testing.assert_close(adv, torch.where(mask, ref_discounted(r, mask, gamma) - v, zero))
    # γ = 0, V = −RKL_t: the vOPD advantage r_t + RKL_t
    rkl = torch.rand(B, T, dtype=torch.float64)
    adv, _ = gae_advantages(r, closed_form_value(rkl), mask, gamma=0.0, lam=0.7)
    torch.testing.assert_close(adv, torch.where(mask, r + rkl, zero))
    # λ = 0: the one-step TD error δ_t (last valid token bootstraps from 0)
    adv, _ = gae_advantages(r, v, mask, gamma=0.8, lam=0.0)
    torch.testing.assert_close(adv, ref_gae(r, v, mask, 0.8, 0.0))


def test_gae_exact_value_gives_zero_mean_td_on_deterministic_rewards():
    # With deterministic rewards, V = discounted return is the exact value: A ≡ 0 for every λ.
    r, _, mask = data()
    v = ref_discounted(r, mask, 0.9)
    for lam in (0.0, 0.5, 1.0):
        adv, tgt = gae_advantages(r, v, mask, gamma=0.9, lam=lam)
        torch.testing.assert_close(adv, torch.zeros_like(adv))
        torch.testing.assert_close(tgt, v)


# ---------------------------------------------------------------- baselines


def test_batch_mean_matches_loop():
    r, _, mask = data()
    got = batch_mean_baseline(garbage_at(r, mask), mask)
    torch.testing.assert_close(got, ref_batch_mean(r, mask))


@pytest.mark.parametrize("loo", [False, True])
def test_group_mean_matches_loop(loo):
    b = 7
    x = torch.randn(b, T, dtype=torch.float64)
    mask = random_mask(b, T)
    groups = torch.tensor([7, -2, 7, 5, -2, 7, 3])  # arbitrary ids; group 3 and 5 are singletons
    got = group_mean_baseline(garbage_at(x, mask), mask, groups, leave_one_out=loo)
    torch.testing.assert_close(got, ref_group_mean(x, mask, groups.tolist(), loo))
    if loo:  # a singleton group has no other sample: baseline 0
        assert (got[3] == 0).all() and (got[6] == 0).all()


def test_one_group_mean_equals_batch_mean():
    r, _, mask = data()
    torch.testing.assert_close(group_mean_baseline(r, mask, torch.zeros(B, dtype=torch.long),
                                                   leave_one_out=False),
                               batch_mean_baseline(r, mask))


def test_group_hand_case():
    # one position, group {a, b, c} with returns (1, 2, 6): mean 3; leave-one-out (4, 3.5, 1.5)
    x = torch.tensor([[1.0], [2.0], [6.0]])
    m = torch.ones(3, 1, dtype=torch.bool)
    g = torch.tensor([4, 4, 4])
    assert group_mean_baseline(x, m, g, leave_one_out=False).flatten().tolist() == [3.0, 3.0, 3.0]
    assert group_mean_baseline(x, m, g, leave_one_out=True).flatten().tolist() == [4.0, 3.5, 1.5]


def test_group_index_validation():
    x, m = torch.zeros(3, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match="group_index_B"):
        group_mean_baseline(x, m, torch.tensor([0, 1]), leave_one_out=True)
    with pytest.raises(ValueError, match="integers"):
        group_mean_baseline(x, m, torch.tensor([0.0, 1.0, 1.0]), leave_one_out=True)


# ---------------------------------------------------------------- temporal_credit


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "group_mean", "leave_one_out", "value"])
@pytest.mark.parametrize("kind", ["immediate", "return_to_go", "discounted"])
def test_temporal_credit_composes_references(kind, baseline):
    r, v, mask = data()
    groups = torch.tensor([1, 0, 1, 0, 1])
    gamma = {"immediate": 0.0, "return_to_go": 1.0, "discounted": 0.6}[kind]
    got = temporal_credit(garbage_at(r, mask), mask, kind=kind, gamma=0.6, values_BT=v,
                          baseline=baseline, group_index_B=groups)
    ret = ref_discounted(r, mask, gamma)
    base = {"none": torch.zeros_like(r), "batch_mean": ref_batch_mean(ret, mask),
            "group_mean": ref_group_mean(ret, mask, groups.tolist(), False),
            "leave_one_out": ref_group_mean(ret, mask, groups.tolist(), True),
            "value": torch.where(mask, v, torch.zeros_like(v))}[baseline]
    torch.testing.assert_close(got, ret - base)


def test_temporal_credit_gae_length_normalize_and_detached():
    r, v, mask = data()
    r.requires_grad_()
    v.requires_grad_()
    got = temporal_credit(r, mask, kind="gae", gamma=0.9, lam=0.5, values_BT=v)
    torch.testing.assert_close(got, ref_gae(r.detach(), v.detach(), mask, 0.9, 0.5))
    assert not got.requires_grad
    ln = temporal_credit(r, mask, kind="return_to_go", length_normalize=True, baseline="batch_mean")
    ref = ref_length_normalized(r.detach(), mask)
    torch.testing.assert_close(ln, ref - ref_batch_mean(ref, mask))


def test_temporal_credit_validation():
    r, v, mask = data()
    with pytest.raises(ValueError, match="unknown credit kind"):
        temporal_credit(r, mask, kind="nope")
    with pytest.raises(ValueError, match="unknown baseline"):
        temporal_credit(r, mask, kind="immediate", baseline="nope")
    with pytest.raises(ValueError, match="values_BT"):
        temporal_credit(r, mask, kind="gae")
    with pytest.raises(ValueError, match="values_BT"):
        temporal_credit(r, mask, kind="immediate", baseline="value")
    with pytest.raises(ValueError, match="already subtracts"):
        temporal_credit(r, mask, kind="gae", values_BT=v, baseline="value")
    with pytest.raises(ValueError, match="group_index_B"):
        temporal_credit(r, mask, kind="return_to_go", baseline="leave_one_out")
    with pytest.raises(ValueError, match="length_normalize"):
        temporal_credit(r, mask, kind="discounted", length_normalize=True)
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(r, mask, 1.5)
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(r, v, mask, gamma=0.5, lam=-0.1)
    with pytest.raises(ValueError, match="shape"):
        discounted_returns(r, mask[:, :3], 0.5)


# ---------------------------------------------------------------- values and critic loss


def test_value_loss_value_and_gradient():
    pred = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    loss = value_loss(pred, target)
    p, q = pred.detach(), target.detach()
    ref = [[0.5 * (float(p[i, j]) - float(q[i, j])) ** 2 for j in range(7)] for i in range(3)]
    torch.testing.assert_close(loss, torch.tensor(ref, dtype=torch.float64))
    gp, gt = torch.autograd.grad(loss.sum(), [pred, target], allow_unused=True)
    torch.testing.assert_close(gp, (pred - target).detach())
    assert gt is None  # the target is stop-gradient


def test_closed_form_and_decomposed_values():
    rkl = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    cf = closed_form_value(rkl)
    torch.testing.assert_close(cf, -rkl.detach())
    assert not cf.requires_grad
    dv = decomposed_value(rkl, u, 0.8)
    torch.testing.assert_close(dv, (-rkl + 0.8 * u).detach())
    g_rkl, g_u = torch.autograd.grad(dv.sum(), [rkl, u], allow_unused=True)
    assert g_rkl is None
    torch.testing.assert_close(g_u, torch.full_like(u, 0.8))
