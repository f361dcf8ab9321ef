"""A separate small critic for GAE-OPD (``route2.value=critic``, [INFER]).

Unlike the shipped value head (a linear map on the student's detached hidden states, trained by the
student's optimizer), this critic is its own network — token embedding → one-layer GRU → linear —
reading the prompt and the completion prefix, with its own Adam optimizer and learning rate. It
predicts the full value ``V_φ(s_t)`` (no closed-form part) and regresses on the λ-return
``G^λ_t = A^{GAE(γ,λ)}_t + V_φ(s_t)`` (:func:`opd.math.value_targets.lambda_returns`, with the γ and λ
of the run), ``½ (V_φ(s_t) − sg[G^λ_t])²`` in units of a running target scale (value normalisation:
``V_φ = μ + σ·f_φ``, ``μ``, ``σ`` the running mean and std of the targets seen so far — the log-ratio
returns are tens of nats, which an output layer initialised at 0 would need thousands of Adam steps
to reach). Before the student's first update the critic trains alone for ``warmup`` batches sampled
from the initial student (prompts drawn from a step range the run never uses), so that the first
advantages already come from a fitted value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from opd.math.value_targets import lambda_returns

__all__ = ["Critic", "SmallCritic"]


class SmallCritic(nn.Module):
    """``f_φ``: embedding ``[V, E]`` → GRU(``E → H``) → linear ``H → 1``, over prompt + completion tokens.

    ``forward`` returns ``[B, T]``: the output at completion position ``t`` reads the prompt and ``y_<t``
    (the GRU state after the token just before ``y_t``).
    """

    def __init__(self, vocab: int, hidden: int = 64, embed: int = 32):
        super().__init__()
        if vocab < 1 or hidden < 1 or embed < 1:
            raise ValueError(f"vocab, hidden and embed must be >= 1, got {vocab}, {hidden}, {embed}")
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor) -> Tensor:
        P, T = prompt_ids_BP.shape[1], completion_ids_BT.shape[1]
        ids = torch.cat([prompt_ids_BP, completion_ids_BT], 1)
        x = self.embed(ids)
        x = x * torch.cat([prompt_mask_BP.to(x.dtype), torch.ones_like(completion_ids_BT, dtype=x.dtype)], 1)[..., None]
        h, _ = self.rnn(x)
        return self.out(h[:, P - 1:P - 1 + T]).squeeze(-1)


class Critic:
    """The critic, its optimizer and its target statistics (see the module docstring)."""

    def __init__(self, vocab: int, *, hidden: int, lr: float, updates: int, device: torch.device | str = "cpu",
                 seed: int = 0):
        if lr <= 0 or updates < 1:
            raise ValueError(f"critic lr must be > 0 and updates >= 1, got lr={lr}, updates={updates}")
        with torch.random.fork_rng(devices=[]):  # its initialisation leaves the run's RNG stream alone
            torch.manual_seed(seed)
            self.net = SmallCritic(vocab, hidden).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.updates = updates
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def scale(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 and self.m2 > 0 else 1.0

    def _values(self, prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor) -> Tensor:
        return self.mean + self.scale * self.net(prompt_ids_BP, prompt_mask_BP, completion_ids_BT)

    @torch.no_grad()
    def values(self, prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor,
               completion_mask_BT: Tensor) -> Tensor:
        """``[B, T]`` detached ``V_φ(s_t)``, 0 on masked positions."""
        v = self._values(prompt_ids_BP, prompt_mask_BP, completion_ids_BT)
        return torch.where(completion_mask_BT.bool(), v, torch.zeros_like(v))

    def _observe(self, targets: Tensor) -> None:
        """Chan et al.'s parallel update of the running mean and sum of squares of the targets."""
        n = float(targets.numel())
        if n == 0:
            return
        mean_b = float(targets.mean())
        m2_b = float(((targets - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total

    def update(self, prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor, mask_BT: Tensor,
               rewards_BT: Tensor, *, gamma: float, lam: float) -> dict[str, float]:
        """Regress on the λ-returns of this batch (computed once, from the values before the update)."""
        m = mask_BT.bool()
        v_old = self.values(prompt_ids_BP, prompt_mask_BP, completion_ids_BT, m)
        targets = lambda_returns(rewards_BT, v_old, m, gamma=gamma, lam=lam).float()
        self._observe(targets[m])
        norm_targets = (targets - self.mean) / self.scale
        loss = torch.zeros(())
        for _ in range(self.updates):
            self.optimizer.zero_grad(set_to_none=True)
            pred = self.net(prompt_ids_BP, prompt_mask_BP, completion_ids_BT)
            loss = 0.5 * ((pred - norm_targets) ** 2)[m].mean()
            loss.backward()
            self.optimizer.step()
        err = (v_old - targets)[m]
        return {"critic/loss": float(loss.detach()), "critic/target_rmse": float(err.pow(2).mean().sqrt()),
                "critic/target_mean": float(targets[m].mean()), "critic/scale": self.scale}
