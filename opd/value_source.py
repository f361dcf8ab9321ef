"""Values for GAE-OPD computed outside the objective: the Monte-Carlo oracle, the separate critic, a probe.

``route2.value=exact_mc``: ``V(s_t)`` is the Monte-Carlo value of the current student
(:mod:`opd.value_mc`, ``route2.value_samples`` continuations per state). ``route2.value=critic``: it is a
separate small network (:mod:`opd.critic`). Either is computed when the step's batch is prepared and
travels to the objective in ``Feedback.values_BT``; the critic is then trained on the same batch after
the student's update. ``route2.value_probe_every = n > 0`` also computes the Monte-Carlo value every
``n`` steps (and at the first step) into ``Feedback.value_probe_BT`` and logs how far the value the
objective used is from it: ``value/rmse_vs_mc``, ``value/bias_vs_mc`` (mean of ``V_used − V̂``) and
``value/mc_stderr`` (mean standard error of ``V̂``). The probe draws its continuations after the
step's rollouts, so it does not change the run's trajectory (each step reseeds the RNG).
All of this is [INFER] tooling for the oracle ablation of issue 20 (docs/evidence.md §(e)).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from opd.collect import collect_rollouts, step_seed
from opd.config.schema import Config
from opd.critic import Critic
from opd.math.value_targets import masked_rmse
from opd.rollout.generate import stop_token_ids
from opd.types import Feedback, Rollouts
from opd.value_mc import mc_state_values

if TYPE_CHECKING:
    from opd.components import Components

__all__ = ["EXTERNAL_VALUES", "ValueSource", "build_value_source"]

EXTERNAL_VALUES: tuple[str, ...] = ("exact_mc", "critic")
#: the critic's warm-up batches use prompts of steps WARMUP_STEP_OFFSET + i, which no run reaches
WARMUP_STEP_OFFSET = 10_000_000


def _uses_value(cfg: Config) -> bool:
    r2 = cfg.route2
    return r2.coef > 0 and (r2.credit == "gae" or r2.baseline == "value")


def build_value_source(cfg: Config, vocab: int, device: torch.device) -> "ValueSource | None":
    """The run's value source, or None when neither an external value nor the probe is asked for."""
    r2 = cfg.route2
    external = _uses_value(cfg) and r2.value in EXTERNAL_VALUES
    if not external and r2.value_probe_every == 0:
        return None
    if external or r2.value_probe_every:
        r = cfg.rollout
        if r.temperature != 1.0 or r.top_p != 1.0 or r.top_k != 0 or r.on_policy_fraction != 1.0 or r.teacher_mix:
            raise ValueError("route2.value=exact_mc/critic and route2.value_probe_every need plain on-policy sampling "
                             "(rollout.temperature=1, top_p=1, top_k=0, on_policy_fraction=1, teacher_mix=0)")
        if cfg.teacher.use_context or cfg.rollout.overlap:
            raise ValueError("route2.value=exact_mc/critic and the value probe need teacher.use_context=false and "
                             "rollout.overlap=false")
    return ValueSource(cfg, vocab, device, r2.value if external else None)


class ValueSource:
    """See the module docstring."""

    def __init__(self, cfg: Config, vocab: int, device: torch.device, kind: str | None):
        r2 = cfg.route2
        self.kind = kind
        self.samples = r2.value_samples
        self.probe_every = r2.value_probe_every
        self.gamma, self.lam = r2.gamma, r2.lam
        self.warmup = r2.critic_warmup
        self.warmed = kind != "critic"
        self.critic = (Critic(vocab, hidden=r2.critic_hidden, lr=r2.critic_lr, updates=r2.critic_updates,
                              device=device, seed=cfg.seed) if kind == "critic" else None)

    def _mc(self, parts: "Components", rollouts: Rollouts) -> tuple[Tensor, Tensor]:
        teacher = parts.teacher_model
        if teacher is None:
            raise ValueError("route2.value=exact_mc and the value probe need an in-process teacher model")
        return mc_state_values(
            parts.student, teacher, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
            rollouts.completion_mask_BT, samples=self.samples, gamma=self.gamma,
            max_new_tokens=parts.cfg.rollout.max_new_tokens, stop_ids=stop_token_ids(parts.tokenizer),
            teacher_temperature=parts.cfg.teacher.temperature)

    def attach(self, parts: "Components", rollouts: Rollouts, feedback: Feedback, step: int) -> Feedback:
        """``feedback`` with ``values_BT`` (exact_mc / critic) and, on probe steps, ``value_probe_BT``."""
        values = probe = stderr = None
        if self.kind == "exact_mc":
            values, stderr = self._mc(parts, rollouts)
        elif self.kind == "critic":
            if not self.warmed:
                self._warm_up(parts)
            values = self.critic.values(rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
                                        rollouts.completion_mask_BT)
        if self.probe_every and self.kind != "exact_mc" and (step == 0 or (step + 1) % self.probe_every == 0):
            probe, stderr = self._mc(parts, rollouts)
        self._stderr = None if stderr is None else float(stderr[rollouts.completion_mask_BT.bool()].mean())
        return replace(feedback, values_BT=None if values is None else values.float(),
                       value_probe_BT=None if probe is None else probe.float())

    def _rewards(self, rollouts: Rollouts, feedback: Feedback) -> Tensor:
        mask = rollouts.completion_mask_BT.bool()
        r = feedback.sampled_logprobs_BT.float() - rollouts.behaviour_logprobs_BT.float()
        return torch.where(mask, r, torch.zeros_like(r))

    def _warm_up(self, parts: "Components") -> None:
        """``warmup`` critic-only updates on batches sampled from the (initial) student."""
        cfg = parts.cfg
        with torch.random.fork_rng(devices=[]):
            for i in range(self.warmup):
                examples = parts.task.train_examples(WARMUP_STEP_OFFSET + i, cfg.rollout.prompts_per_step, cfg.seed)
                torch.manual_seed(step_seed(cfg.seed, WARMUP_STEP_OFFSET + i))
                with torch.no_grad():
                    rollouts = collect_rollouts(cfg, examples, parts.engine, parts.tokenizer, student=parts.student)
                    feedback = parts.teacher.score(rollouts, access="sampled", topk=1)
                self._update(rollouts, feedback)
        self.warmed = True

    def _update(self, rollouts: Rollouts, feedback: Feedback) -> dict[str, float]:
        with torch.enable_grad():
            return self.critic.update(rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
                                      rollouts.completion_mask_BT, self._rewards(rollouts, feedback),
                                      gamma=self.gamma, lam=self.lam)

    def after_step(self, rollouts: Rollouts, feedback: Feedback, stats: dict[str, Tensor]) -> dict[str, float]:
        """Train the critic on the step's batch; the probe's and the oracle's metrics."""
        out: dict[str, float] = {}
        if self._stderr is not None:
            out["value/mc_stderr"] = self._stderr
        probe, used = feedback.value_probe_BT, stats.get("value")
        if probe is not None and used is not None:
            mask = rollouts.completion_mask_BT.bool().to(used.device)
            rmse, bias = masked_rmse(used.float(), probe.to(used.device), mask)
            out.update({"value/rmse_vs_mc": rmse, "value/bias_vs_mc": bias})
        if self.critic is not None:
            out.update(self._update(rollouts, feedback))
        return out
