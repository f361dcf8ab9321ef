import math

import pytest
import torch

from opd.math.gates import (
    bottom_fraction_mask,
    entropy_gate,
    position_weights,
    special_token_mask,
    teacher_coverage_gate,
    top_fraction_mask,
)
from opd.math.reduce import reduce_tokens

B, T, K = 3, 7, 4


def test_special_token_mask_matches_loop():
    ids = torch.randint(0, 20, (B, T))
    special = [0, 3, 17]
    got = special_token_mask(ids, special)
    for b in range(B):
        for t in range(T):
            assert got[b, t].item() is (int(ids[b, t]) not in special)
    assert special_token_mask(ids, []).all()


def test_top_fraction_matches_sort():
    vals = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    for frac in (0.0, 0.1, 0.5, 0.73, 1.0):
        got = top_fraction_mask(vals, mask, frac)
        valid = sorted(vals[mask].tolist(), reverse=True)
        k = math.ceil(frac * len(valid))
        keep = set(valid[:k])
        for b in range(B):
            for t in range(T):
                assert got[b, t].item() is bool(mask[b, t] and vals[b, t].item() in keep)
        assert int(got.sum()) == k


def test_tip_quadrants_hand_case():
    # 8 valid tokens (+ 2 padded). keep_fraction = 0.5 -> Q1 = the 4 highest entropies.
    #            t:   0    1    2    3    4    5    6    7   pad  pad
    h = torch.tensor([[2.0, 0.1, 1.5, 0.2, 0.3, 3.0, 0.05, 1.0, 9.0, 9.0]])
    d = torch.tensor([[0.1, 2.0, 0.3, 0.1, 1.5, 0.2, 0.9, 3.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    # entropies sorted: 3.0(5) 2.0(0) 1.5(2) 1.0(7) | 0.3(4) 0.2(3) 0.1(1) 0.05(6)
    q1 = [0, 2, 5, 7]
    # low entropy (default) = complement of Q1 = {1, 3, 4, 6}
    # divergence top half: 3.0(7) 2.0(1) 1.5(4) 0.9(6) -> {1, 4, 6, 7}; Q3 = {1, 4, 6}
    q3 = [1, 4, 6]

    def idx(x):
        return torch.nonzero(x[0]).flatten().tolist()

    assert idx(entropy_gate(h, d, m, mode="q1")) == q1
    assert idx(entropy_gate(h, d, m, mode="q3")) == q3
    assert idx(entropy_gate(h, d, m, mode="q1_or_q3")) == sorted(q1 + q3)
    # explicit thresholds: H ≤ 0.15 and D ≥ 1.0 -> t=1 (0.1, 2.0) only; t=6 has D = 0.9
    assert idx(entropy_gate(h, d, m, mode="q3", entropy_low=0.15, divergence_high=1.0)) == [1]
    # keep_fraction = 0.25 -> Q1 = top 2 = {0, 5}
    assert idx(entropy_gate(h, d, m, mode="q1", keep_fraction=0.25)) == [0, 5]


def test_entropy_gate_random_matches_loop_and_masked():
    h = torch.rand(B, T)
    d = torch.randn(B, T)
    mask = torch.rand(B, T) > 0.3
    got = entropy_gate(h, d, mask, mode="q1_or_q3", keep_fraction=0.4, entropy_low=0.5,
                       divergence_high=0.2)
    k = math.ceil(0.4 * int(mask.sum()))
    thr = sorted(h[mask].tolist(), reverse=True)[k - 1]
    for b in range(B):
        for t in range(T):
            q1 = h[b, t] >= thr
            q3 = h[b, t] <= 0.5 and d[b, t] >= 0.2
            assert got[b, t].item() is bool(mask[b, t] and (q1 or q3))
    none = torch.zeros(B, T, dtype=torch.bool)
    for mode in ("q1", "q3", "q1_or_q3"):
        assert not entropy_gate(h, d, none, mode=mode).any()


def test_teacher_coverage_gate_matches_loop():
    ids = torch.randint(0, 9, (B, T))
    topk = torch.randint(0, 9, (B, T, K))
    topk[0, 0, :] = -1                                       # fully padded teacher entry
    ids[0, 0] = -1                                           # ... never matches padding
    got = teacher_coverage_gate(ids, topk)
    for b in range(B):
        for t in range(T):
            ref = any(int(i) == int(ids[b, t]) and int(i) >= 0 for i in topk[b, t])
            assert got[b, t].item() is ref
    assert got.any() and not got.all()


def naive_positions(mask, kind, prefix_fraction=0.3, decay_to=0.0, drift=None, beta=1.0):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        cols = [t for t in range(mask.shape[1]) if mask[b, t]]
        n = len(cols)
        acc = 0.0
        for p, t in enumerate(cols):
            if kind == "uniform":
                w = 1.0
            elif kind == "linear_decay":
                w = 1.0 if n == 1 else 1.0 - (1.0 - decay_to) * p / (n - 1)
            elif kind == "prefix":
                w = 1.0 if p < math.ceil(prefix_fraction * n) else 0.0
            else:
                w = math.exp(-beta * acc)
                acc += max(float(drift[b, t]), 0.0)
            out[b, t] = w
    return out


@pytest.mark.parametrize("kind,kw", [
    ("uniform", {}), ("linear_decay", {}), ("linear_decay", {"decay_to": 0.25}),
    ("prefix", {}), ("prefix", {"prefix_fraction": 0.5}), ("prefix", {"prefix_fraction": 1.0}),
    ("drift", {"beta": 0.7})])
def test_position_weights_match_loop(kind, kw):
    mask = torch.rand(B, T) > 0.3
    mask[1] = False
    mask[1, 2] = True                                        # a length-1 row
    drift = torch.randn(B, T, dtype=torch.float64).abs() * 0.5 - 0.1   # some negatives
    if kind == "drift":
        kw = dict(kw, drift_BT=drift)
    got = position_weights(mask, kind=kind, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "drift_BT"}
    ref = naive_positions(mask, kind, drift=drift, **ref_kw)
    torch.testing.assert_close(got.to(torch.float64), ref, atol=1e-6, rtol=1e-6)
    # left padding of 2 columns and right padding of 3 do not change the weights of real tokens
    pad_mask = torch.cat([torch.zeros(B, 2, dtype=torch.bool), mask,
                          torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    if kind == "drift":
        kw["drift_BT"] = torch.cat([torch.full((B, 2), 5.0, dtype=torch.float64), drift,
                                    torch.full((B, 3), 5.0, dtype=torch.float64)], dim=1)
    padded = position_weights(pad_mask, kind=kind, **kw)
    torch.testing.assert_close(padded[:, 2:2 + T], got)
    assert torch.equal(padded[:, :2], torch.zeros_like(padded[:, :2]))
    # as a reducer factor: weighted token mean is padding invariant
    vals = torch.randn(B, T)
    pad_vals = torch.cat([torch.randn(B, 2), vals, torch.randn(B, 3)], dim=1)
    torch.testing.assert_close(reduce_tokens(vals * got.float(), mask),
                               reduce_tokens(pad_vals * padded.float(), pad_mask))


def test_position_weights_all_masked_and_errors():
    none = torch.zeros(B, T, dtype=torch.bool)
    for kind in ("uniform", "linear_decay", "prefix"):
        assert torch.equal(position_weights(none, kind=kind), torch.zeros(B, T))
    out = position_weights(none, kind="drift", drift_BT=torch.full((B, T), float("nan")))
    assert torch.equal(out, torch.zeros(B, T))
    with pytest.raises(ValueError, match="needs drift_BT"):
        position_weights(none, kind="drift")
    with pytest.raises(ValueError, match="prefix_fraction must be > 0"):
        position_weights(none, kind="prefix", prefix_fraction=0.0)
    with pytest.raises(ValueError, match="decay_to must be <= 1"):
        position_weights(none, kind="linear_decay", decay_to=2.0)
    with pytest.raises(ValueError, match="unknown position weight kind"):
        position_weights(none, kind="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_fraction must be <= 1"):
        entropy_gate(torch.zeros(2), torch.zeros(2), torch.ones(2), mode="q1", keep_fraction=1.5)
    with pytest.raises(ValueError, match=r"\(3, 7, 4\).*\(3, 6\)"):
        teacher_coverage_gate(torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 7, 4))


# ----------------------------------------------------------------------------- OPSA / IW-OPD


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0, 1e-3])
def test_bottom_fraction_mask_matches_a_stable_sort_loop(fraction):
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 6, (B, T), generator=g).float()  # many ties: the stable order decides
    mask = torch.rand(B, T, generator=g) > 0.3
    got = bottom_fraction_mask(values, mask, fraction)
    valid = [(float(values[i, j]), i * T + j, i, j) for i in range(B) for j in range(T) if mask[i, j]]
    n = min(len(valid), max(1, math.floor(fraction * len(valid) + 1e-9)))
    ref = torch.zeros(B, T, dtype=torch.bool)
    for _, _, i, j in sorted(valid)[:n]:
        ref[i, j] = True
    assert torch.equal(got, ref)
    assert int(got.sum()) == n and not (got & ~mask).any()


def test_bottom_fraction_mask_of_nothing_is_empty():
    assert not bottom_fraction_mask(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.5).any()


def test_drift_share_weights_match_the_iw_opd_loop():
    """w_t = 1 + γ (1 − Σ_{t'<t} |d| / max(Σ |d|, ε)) over each row's valid tokens (TRL IWOPDTrainer)."""
    g = torch.Generator().manual_seed(2)
    d = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # an empty row
    got = position_weights(mask, kind="drift_share", drift_BT=d, gamma=0.7)
    ref = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        tot = sum(abs(float(d[i, j])) for j in range(T) if mask[i, j])
        before = 0.0
        for j in range(T):
            if mask[i, j]:
                ref[i, j] = 1 + 0.7 * (1 - before / max(tot, 1e-8))
                before += abs(float(d[i, j]))
    torch.testing.assert_close(got, ref)
    assert got[0][mask[0]].max() <= 1.7 + 1e-12 and got[mask].min() >= 1.0
