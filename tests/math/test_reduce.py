import pytest
import torch

from opd.math.reduce import masked_mean, masked_sum, reduce_tokens, reduction_weights


def naive_reduce(values, mask, reduction, constant=None):
    """Loop reference: token mean, mean of per-sequence means, or sum / (C · #sequences)."""
    rows = []
    total, count = 0.0, 0
    for b in range(values.shape[0]):
        vals = [values[b, t] for t in range(values.shape[1]) if mask[b, t]]
        if vals:
            rows.append(vals)
            total += sum(vals)
            count += len(vals)
    if not rows:
        return torch.tensor(0.0, dtype=values.dtype)
    if reduction == "token_mean":
        return total / count
    if reduction == "sequence_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if reduction == "sum":
        return total
    return total / (constant * len(rows))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "constant", "sum"])
def test_reduce_matches_loop_and_gradient(reduction):
    values = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.4
    mask[1] = False  # an all-masked row must not count as a sequence
    got = reduce_tokens(values, mask, reduction, constant_normalizer=7.0)
    ref = naive_reduce(values, mask, reduction, constant=7.0)
    torch.testing.assert_close(got, ref)
    (g_got,) = torch.autograd.grad(got, values)
    (g_ref,) = torch.autograd.grad(ref, values)
    torch.testing.assert_close(g_got, g_ref)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "constant", "sum"])
def test_all_masked_is_zero_and_nan_safe(reduction):
    values = torch.full((2, 5), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    loss = reduce_tokens(values, mask, reduction, constant_normalizer=5.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(values.grad, torch.zeros(2, 5))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "constant", "sum"])
def test_padding_invariance(reduction):
    values = torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.3
    mask[:, 0] = True
    padded_values = torch.cat([values, torch.full((3, 5), -float("inf"))], dim=1)
    padded_values = torch.cat([padded_values, torch.randn(2, 9)], dim=0)  # extra empty rows
    padded_mask = torch.zeros(5, 9, dtype=torch.bool)
    padded_mask[:3, :4] = mask
    a = reduce_tokens(values, mask, reduction, constant_normalizer=4.0)
    b = reduce_tokens(padded_values, padded_mask, reduction, constant_normalizer=4.0)
    torch.testing.assert_close(a, b)


def test_hand_computed_sequence_mean():
    # rows: [1, 2, (pad)] and [4, (pad), (pad)] -> per-row means 1.5 and 4 -> 2.75;
    # token mean (1 + 2 + 4) / 3 = 7/3; constant C=3: 7 / (3 · 2) = 7/6
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert reduce_tokens(values, mask, "sequence_mean").item() == pytest.approx(2.75)
    assert reduce_tokens(values, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert reduce_tokens(values, mask, "constant", constant_normalizer=3).item() == pytest.approx(7 / 6)


def test_global_counts_override():
    mask = torch.ones(2, 3)
    w = reduction_weights(mask, "token_mean", num_tokens=12)
    assert torch.allclose(w, torch.full((2, 3), 1 / 12))
    w = reduction_weights(mask, "sequence_mean", num_sequences=4)
    assert torch.allclose(w, torch.full((2, 3), 1 / 12))


def test_errors_are_clear():
    with pytest.raises(ValueError, match="constant_normalizer"):
        reduction_weights(torch.ones(2, 3), "constant")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduction_weights(torch.ones(2, 3), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"weights has shape \(2, 3\) but values has shape \(2, 4\)"):
        masked_sum(torch.ones(2, 4), torch.ones(2, 3))


def test_masked_mean():
    v = torch.tensor([1.0, 2.0, float("inf")])
    m = torch.tensor([True, True, False])
    assert masked_mean(v, m).item() == pytest.approx(1.5)
    assert masked_mean(v, torch.zeros(3, dtype=torch.bool)).item() == 0.0
