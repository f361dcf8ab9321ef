"""The rollout engine: samplers and rollout batches, with the shared completion forward pass.

* :mod:`opd.forward` (one floor down, re-exported here) — :func:`completion_forward` (logits / hidden
  states that predict each completion token, used by student training, teacher scoring and the
  teacher server, which imports it from there) and :func:`lm_head_of`.
* :mod:`opd.rollout.generate` — :func:`encode_prompts`, :func:`generate_rollouts` (HF
  ``generate``), :func:`generate_mixed_rollouts` (MiniLLM teacher-mixed sampling).
* :mod:`opd.rollout.batches` — :func:`rollouts_from_texts` (dataset answers as off-policy
  completions) and :func:`concat_rollouts`.
"""

from opd.forward import (
    HeadNotLinearError,
    completion_forward,
    lm_head_of,
    lm_head_vocab_size,
    model_device,
    position_ids_from_mask,
)
from opd.rollout.batches import concat_rollouts, rollouts_from_texts
from opd.rollout.generate import (
    Sampling,
    encode_prompts,
    finish_rollouts,
    generate_mixed_rollouts,
    generate_rollouts,
    stop_token_ids,
)

__all__ = [
    "HeadNotLinearError",
    "Sampling",
    "completion_forward",
    "concat_rollouts",
    "encode_prompts",
    "finish_rollouts",
    "generate_mixed_rollouts",
    "generate_rollouts",
    "lm_head_of",
    "lm_head_vocab_size",
    "model_device",
    "position_ids_from_mask",
    "rollouts_from_texts",
    "stop_token_ids",
]
