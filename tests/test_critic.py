"""The separate GAE-OPD critic (opd/critic.py) and the values computed outside the objective
(opd/value_source.py, route2.value=exact_mc / critic) in a real run."""

from __future__ import annotations

import json
import math

import torch

from opd.critic import Critic, SmallCritic
from opd.math.value_targets import lambda_returns


def _batch(gen: torch.Generator):
    prompt = torch.randint(3, 9, (8, 4), generator=gen)
    prompt_mask = torch.ones(8, 4, dtype=torch.long)
    prompt_mask[:2, 0] = 0
    completion = torch.randint(3, 9, (8, 5), generator=gen)
    lengths = torch.tensor([5, 4, 3, 5, 2, 1, 5, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    rewards = torch.where(mask, -torch.rand(8, 5, generator=gen) * 3, torch.zeros(8, 5))
    return prompt, prompt_mask, completion, mask, rewards


def test_small_critic_reads_only_the_prefix():
    net = SmallCritic(vocab=10, hidden=8)
    torch.nn.init.normal_(net.out.weight)
    prompt, pm = torch.tensor([[1, 3, 4]]), torch.ones(1, 3, dtype=torch.long)
    a = net(prompt, pm, torch.tensor([[5, 6, 7]]))
    b = net(prompt, pm, torch.tensor([[5, 6, 8]]))  # differs only at the last token
    assert torch.allclose(a[:, :3], b[:, :3])  # V(s_t) depends on y_<t, not on y_t
    c = net(prompt, pm, torch.tensor([[5, 9, 7]]))
    assert not torch.allclose(a[:, 2], c[:, 2])


def test_critic_running_statistics_and_fit():
    gen = torch.Generator().manual_seed(0)
    prompt, pm, comp, mask, rewards = _batch(gen)
    rng_before = torch.random.get_rng_state()
    critic = Critic(vocab=10, hidden=16, lr=3e-3, updates=1, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # building it leaves the run's RNG alone
    seen = []
    first = None
    for i in range(150):
        v_old = critic.values(prompt, pm, comp, mask)
        seen.append(lambda_returns(rewards, v_old, mask, gamma=1.0, lam=0.95)[mask])
        out = critic.update(prompt, pm, comp, mask, rewards, gamma=1.0, lam=0.95)
        first = out["critic/target_rmse"] if first is None else first
    allt = torch.cat(seen).double()
    assert math.isclose(critic.mean, float(allt.mean()), rel_tol=1e-6)
    assert math.isclose(critic.scale, float(allt.std(unbiased=False)), rel_tol=1e-5)
    v = critic.values(prompt, pm, comp, mask)
    assert torch.all(v[~mask] == 0)
    mc_return = lambda_returns(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    err = float((v - mc_return)[mask].pow(2).mean().sqrt())
    assert err < 0.3 * first  # it fits the (deterministic) returns of this batch


def test_external_values_in_a_run(tmp_path):
    """route2.value=exact_mc and =critic train, log the value metrics, and the probe measures the shipped head."""
    from opd.cli import main

    base = ["distill", "data.task=fork", "student.model=builtin:fork/student", "teacher.model=builtin:fork/teacher",
            "method=gae-opd", "rollout.prompts_per_step=8", "eval.size=8", "eval.every=0", "train.steps=2",
            "train.threads=1", "logging.progress=false", "logging.report=false", "route2.value_probe_every=1"]
    keys = {"exact_mc": {"value/mc_stderr"}, "critic": {"value/rmse_vs_mc", "critic/loss"},
            "decomposed": {"value/rmse_vs_mc", "value/bias_vs_mc"}}
    for value, want in keys.items():
        run = tmp_path / value
        assert main([*base, f"route2.value={value}", "route2.critic_warmup=2", f"logging.run_dir={run}"]) == 0
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        assert len(train) == 2 and want <= set(train[-1]), (value, sorted(train[-1]))
        assert all(math.isfinite(r["loss"]) for r in train)
