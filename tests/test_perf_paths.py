"""The fast paths of the performance work (bench/results.md) compute the same thing as the paths
they replace: inverse-CDF sampling draws from the categorical distribution, and the chunked
objective that reads ``log π_S(y_t)`` off the route-1 chunks equals the one with a separate pass."""

from __future__ import annotations

import pytest
import torch

from opd.config.load import load_config
from opd.models import build_model, tiny_llama_config
from opd.objective import Objective
from opd.rollout import Sampling, generate_rollouts
from opd.rollout.generate import sample_from_logprobs
from opd.step import student_forward
from opd.tasks.arith import ArithTask, arith_tokenizer
from opd.teachers import ModelTeacher


def test_inverse_cdf_sampling_matches_the_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 0.5], [0.0, 0.0, 0.0, 0.0, float("-inf")]])
    n = 100_000
    torch.manual_seed(0)
    draws = sample_from_logprobs(logits.repeat_interleave(n, dim=0) + 3.0)  # unnormalised rows are fine
    for row in range(2):
        counts = torch.bincount(draws[row * n:(row + 1) * n], minlength=5).double()
        p = torch.softmax(logits[row].double(), -1)
        assert counts[p == 0].sum() == 0  # zero-probability entries are never drawn
        sigma = (n * p * (1 - p)).sqrt()
        assert bool(((counts - n * p).abs() <= 5 * sigma + 1e-9).all()), (counts / n, p)
    torch.manual_seed(0)
    assert torch.equal(draws, sample_from_logprobs(logits.repeat_interleave(n, dim=0) + 3.0))  # seeded
    one_hot = torch.full((3, 7), float("-inf"))
    one_hot[torch.arange(3), torch.tensor([6, 0, 3])] = 0.0
    assert sample_from_logprobs(one_hot).tolist() == [6, 0, 3]


@pytest.fixture(scope="module")
def setup():
    tok = arith_tokenizer()
    student = build_model(tiny_llama_config(len(tok), layers=1, hidden=16, tokenizer=tok), seed=1)
    teacher = build_model(tiny_llama_config(len(tok), layers=2, hidden=32, tokenizer=tok), seed=2)
    examples = ArithTask(digits=2, eval_size=10, seed=0).train_examples(0, 6, seed=0)
    torch.manual_seed(0)
    return tok, student, teacher, generate_rollouts(student, tok, examples,
                                                    Sampling(max_new_tokens=6, samples_per_prompt=2))


@pytest.mark.parametrize("overrides", [[], ["route1.divergence=jsd"], ["monitor.diagnostics=false"],
                                       ["support.kind=teacher_topk", "support.k=4", "teacher.access=topk"]])
def test_sampled_logprobs_from_route1_chunks_equal_a_separate_pass(setup, overrides, monkeypatch):
    tok, student, teacher, rollouts = setup
    cfg = load_config(None, ["route1.chunk_size=5", *overrides])
    objective = Objective.from_config(cfg, eos_id=tok.eos_token_id, diagnostics=cfg.monitor.diagnostics)
    assert objective._sampled_from_route1()
    access = "topk" if "teacher.access=topk" in overrides else "full"
    feedback = ModelTeacher(teacher, tok).score(rollouts, access=access, topk=8)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(Objective, "_sampled_from_route1", lambda self, fast=fast: fast)
        student.zero_grad()
        out = objective(student_forward(student, rollouts, chunked=True), feedback, rollouts)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in student.parameters()]))
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(fast_out.loss, ref_out.loss, atol=1e-7, rtol=1e-6)
    assert fast_out.token_stats.keys() == ref_out.token_stats.keys()
    for key, value in ref_out.token_stats.items():
        torch.testing.assert_close(fast_out.token_stats[key], value, atol=1e-6, rtol=1e-6)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_route2_keeps_the_differentiable_pass():
    cfg = load_config(None, ["route1.chunk_size=5", "route2.coef=1.0"])
    assert not Objective.from_config(cfg, eos_id=2)._sampled_from_route1()
