"""Objective assembly: the config's sections become one per-batch loss, built from ``opd.math``.

This is the only place where the design variables meet. It is built once from the resolved
config — into typed, frozen per-term settings (:mod:`opd.objective.settings`) — and then called on
each micro-batch; each term takes that micro-batch's :class:`TermInputs` and its own settings, and
none reads the config::

    objective = Objective.from_config(cfg, eos_id=..., special_ids=...)
    out = objective(student, feedback, rollouts, reference=..., outcome_rewards_B=..., counts=...)
    out.loss.backward()

The loss is a sum of named terms, each a masked, gated, reduced sum of per-token values:

    L = c₁ Σ_t w_t D(π_T ‖ π_S)(s_t)                      route 1 (support + divergence)  route1.py
      + c₂ Σ_t w_t ℓ^PG_t(A_t)                             route 2 (reward → credit → routing)  route2.py
      + c_V Σ_t w_t ½(V_φ(s_t) − sg[target_t])²            GAE-OPD value head (decomposed value)
      + c_KL Σ_t w_t KL̂(π_S ‖ π_ref)(s_t)                  regularization  regularization.py
      − c_H Σ_t w_t H(π_S)(s_t) + c_SFT Σ_t w^off_t (−log π_S(y_t)) + c_M Σ_t w_t (log π_S − log μ)²

with ``w_t`` = reducer weight (``opd.math.reduce``) × gates × position weights (weights.py). The
normaliser of the reducer counts the tokens of the batch (global counts under data parallelism
are passed in ``counts``); gates remove tokens from the sum without rescaling the others, so a gate
changes *which* tokens teach, not the per-token scale.

Route 2 applies to on-policy rows (rows the student or a student/teacher mixture sampled, whose
behaviour log-probs are known), and to the off-policy rows with ``route2.off_policy_rows``; route 1
and the SFT term also see off-policy rows (GKD λ mixing, SFT on teacher samples). The formulas and
their sources are in docs/methods.md; the loop passes the verifier's rewards whenever
:attr:`Objective.needs_outcome_rewards`.
"""

from opd.objective.core import AUTO_CHUNK_VOCAB, Objective
from opd.objective.outputs import ObjectiveOutput, StudentOutputs, TermInputs, TokenCounts
from opd.objective.settings import ObjectiveSettings

__all__ = ["AUTO_CHUNK_VOCAB", "Objective", "ObjectiveOutput", "ObjectiveSettings", "StudentOutputs", "TermInputs",
           "TokenCounts"]
