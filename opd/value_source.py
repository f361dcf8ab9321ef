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
All of this is [INFER] tooling for the oracle ablation of GAE-OPD (docs/methods.md §3.3).

The loop sees a :class:`ValueSource` through the :class:`opd.components.ExternalValues` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from opd.collect import collect_rollouts, step_seed
from opd.config.schema import Config
from opd.critic import Critic
from opd.math.credit import EXTERNAL_VALUES, uses_values
from opd.math.value_targets import masked_rmse
from opd.objective.settings import section_values
from opd.rollout.generate import stop_token_ids
from opd.types import Feedback, Rollouts
from opd.value_mc import ContinuationOptions, mc_state_values

if TYPE_CHECKING:
    from opd.components import Components

__all__ = ["ValueSettings", "ValueSource", "build_value_source"]

#: the critic's warm-up batches use prompts of steps WARMUP_STEP_OFFSET + i, which no run reaches
WARMUP_STEP_OFFSET = 10_000_000


@dataclass(frozen=True)
class ValueSettings:
    """The ``route2`` options of the external values and the probe (field names are the options')."""

    gamma: float
    lam: float
    value_samples: int
    value_probe_every: int
    critic_hidden: int
    critic_lr: float
    critic_updates: int
    critic_warmup: int


def build_value_source(cfg: Config, vocab: int, device: torch.device) -> ValueSource | None:
    """The run's value source, or None when neither an external value nor the probe is asked for.

    Raises:
        ValueError: sampling that is not plain on-policy sampling from the student (the Monte-Carlo
            continuations and the critic's warm-up sample from the student at temperature 1).
    """
    r2 = cfg.route2
    external = r2.coef > 0 and uses_values(r2.credit, r2.baseline) and r2.value in EXTERNAL_VALUES
    if not external and r2.value_probe_every == 0:
        return None
    r = cfg.rollout
    if r.temperature != 1.0 or r.top_p != 1.0 or r.top_k != 0 or r.on_policy_fraction != 1.0 or r.teacher_mix:
        raise ValueError("route2.value=exact_mc/critic and route2.value_probe_every need plain on-policy sampling "
                         "(rollout.temperature=1, top_p=1, top_k=0, on_policy_fraction=1, teacher_mix=0)")
    if cfg.teacher.use_context or r.overlap:
        raise ValueError("route2.value=exact_mc/critic and the value probe need teacher.use_context=false and "
                         "rollout.overlap=false")
    return ValueSource(section_values(ValueSettings, r2), vocab, device, kind=r2.value if external else None,
                       seed=cfg.seed)


class ValueSource:
    """See the module docstring; ``kind`` is ``exact_mc``, ``critic`` or None (the probe only)."""

    def __init__(self, settings: ValueSettings, vocab: int, device: torch.device, *, kind: str | None, seed: int):
        if kind is not None and kind not in EXTERNAL_VALUES:
            raise ValueError(f"unknown external value {kind!r}; choose one of {', '.join(EXTERNAL_VALUES)}")
        self.settings = settings
        self.kind = kind
        self.warmed = kind != "critic"
        self.critic = (Critic(vocab, hidden=settings.critic_hidden, lr=settings.critic_lr,
                              updates=settings.critic_updates, device=device, seed=seed)
                       if kind == "critic" else None)
        self._stderr: float | None = None

    def _mc(self, parts: Components, rollouts: Rollouts) -> tuple[Tensor, Tensor]:
        teacher = parts.teacher_model
        if teacher is None:
            raise ValueError("route2.value=exact_mc and the value probe need an in-process teacher model")
        return mc_state_values(
            parts.student, teacher, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
            rollouts.completion_mask_BT,
            ContinuationOptions(samples=self.settings.value_samples, gamma=self.settings.gamma,
                                max_new_tokens=parts.cfg.rollout.max_new_tokens,
                                stop_ids=stop_token_ids(parts.tokenizer),
                                teacher_temperature=parts.cfg.teacher.temperature))

    def attach(self, parts: Components, rollouts: Rollouts, feedback: Feedback, step: int) -> Feedback:
        """``feedback`` with ``values_BT`` (exact_mc / critic) and, on probe steps, ``value_probe_BT``."""
        values = probe = stderr = None
        if self.kind == "exact_mc":
            values, stderr = self._mc(parts, rollouts)
        elif self.critic is not None:
            if not self.warmed:
                self._warm_up(parts)
            values = self.critic.values(rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
                                        rollouts.completion_mask_BT)
        every = self.settings.value_probe_every
        if every and self.kind != "exact_mc" and (step == 0 or (step + 1) % every == 0):
            probe, stderr = self._mc(parts, rollouts)
        self._stderr = None if stderr is None else float(stderr[rollouts.completion_mask_BT.bool()].mean())
        return replace(feedback, values_BT=None if values is None else values.float(),
                       value_probe_BT=None if probe is None else probe.float())

    def _rewards(self, rollouts: Rollouts, feedback: Feedback) -> Tensor:
        mask = rollouts.completion_mask_BT.bool()
        r = feedback.sampled_logprobs_BT.float() - rollouts.behaviour_logprobs_BT.float()
        return torch.where(mask, r, torch.zeros_like(r))

    def _warm_up(self, parts: Components) -> None:
        """``critic_warmup`` critic-only updates on batches sampled from the (initial) student."""
        cfg = parts.cfg
        with torch.random.fork_rng(devices=[]):
            for i in range(self.settings.critic_warmup):
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
                                      gamma=self.settings.gamma, lam=self.settings.lam)

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
