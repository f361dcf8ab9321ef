"""The Monte-Carlo value of the student (opd/value_mc.py) against the exact value by enumeration."""

from __future__ import annotations

import torch

from opd.models import build_model, tiny_llama_config
from opd.value_mc import mc_state_values

PAD, BOS, EOS = 0, 1, 2
VOCAB = 5  # tokens 3 and 4 besides pad / bos / eos


def _model(seed: int) -> torch.nn.Module:
    cfg = tiny_llama_config(VOCAB, layers=1, hidden=8, heads=2)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS, EOS, PAD
    model = build_model(cfg, seed)
    with torch.no_grad():  # sharper distributions than the 0.02-std initialisation
        model.model.embed_tokens.weight.mul_(40.0)
    return model


def _dist(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Next-token log-probs after ``tokens`` (no padding, no cache: an independent reference)."""
    out = model(input_ids=torch.tensor([tokens]))
    return torch.log_softmax(out.logits[0, -1].double(), -1)


def _exact_value(student, teacher, tokens: list[int], t: int, max_new: int, gamma: float) -> float:
    """``V(s) = −KL(π_S‖π_T)(s) + γ Σ_y π_S(y|s) V(s y)`` (0 after EOS or at the length limit)."""
    ls, lt = _dist(student, tokens), _dist(teacher, tokens)
    v = -float((ls.exp() * (ls - lt)).sum())
    if t + 1 >= max_new:
        return v
    for y in range(VOCAB):
        if y == EOS or ls[y].exp() < 1e-12:
            continue
        v += gamma * float(ls[y].exp()) * _exact_value(student, teacher, tokens + [y], t + 1, max_new, gamma)
    return v


@torch.no_grad()
def test_mc_value_converges_to_the_enumerated_value():
    student, teacher = _model(0), _model(1)
    # two rows, the second left-padded; row 0 has 3 valid completion tokens, row 1 has 2 (EOS at t = 1)
    prompt = torch.tensor([[BOS, 3, 4], [PAD, BOS, 4]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completion = torch.tensor([[3, 4, 3], [4, EOS, PAD]])
    completion_mask = torch.tensor([[True, True, True], [True, True, False]])
    max_new = 3
    for gamma in (1.0, 0.5):
        torch.manual_seed(0)
        value, stderr = mc_state_values(student, teacher, prompt, prompt_mask, completion, completion_mask,
                                        samples=4000, gamma=gamma, max_new_tokens=max_new, stop_ids=[EOS])
        assert value[1, 2] == 0 and stderr[1, 2] == 0  # masked position
        for b, t in completion_mask.nonzero().tolist():
            real_prompt = prompt[b][prompt_mask[b].bool()].tolist()
            exact = _exact_value(student, teacher, real_prompt + completion[b, :t].tolist(), t, max_new, gamma)
            assert abs(exact) > 1e-3  # a test that can fail
            assert abs(float(value[b, t]) - exact) < 5 * float(stderr[b, t]) + 1e-9, (b, t, gamma)
            assert float(stderr[b, t]) < 0.05 * abs(exact) + 1e-3


@torch.no_grad()
def test_mc_value_at_the_last_position_is_minus_the_kl():
    """With one step left there is nothing to sample: V̂ = −KL(s) exactly, stderr 0."""
    student, teacher = _model(2), _model(3)
    prompt, prompt_mask = torch.tensor([[BOS, 3]]), torch.tensor([[1, 1]])
    completion, completion_mask = torch.tensor([[4, 3]]), torch.tensor([[True, True]])
    value, stderr = mc_state_values(student, teacher, prompt, prompt_mask, completion, completion_mask,
                                    samples=3, gamma=1.0, max_new_tokens=2, stop_ids=[EOS])
    ls, lt = _dist(student, [BOS, 3, 4]), _dist(teacher, [BOS, 3, 4])
    assert torch.isclose(value[0, 1], -(ls.exp() * (ls - lt)).sum(), atol=1e-5)
    assert stderr[0, 1] == 0


def test_mc_value_rejects_bad_sizes():
    student = _model(0)
    ids, m = torch.tensor([[BOS]]), torch.tensor([[1]])
    for kw in ({"samples": 0, "max_new_tokens": 2}, {"samples": 1, "max_new_tokens": 0}):
        try:
            mc_state_values(student, student, ids, m, ids, m.bool(), gamma=1.0, stop_ids=[EOS], **kw)
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {kw}")
