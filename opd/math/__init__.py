"""The math layer: pure functions on tensors, no models and no I/O.

Notation (used in every name, e.g. ``logprobs_BT``, ``topk_ids_BTK``):

=====  ==============================================================
``B``  batch (rollouts)            ``T``  completion tokens
``V``  vocabulary                  ``K``  support / top-k size
``G``  samples per prompt          ``H``  hidden size
``N``  flattened tokens (``B·T``)  ``P``  prompt tokens
=====  ==============================================================

Sign convention (one for the whole package): the per-token reward is

    r_t = log π_T(y_t | s_t^T) − log π_S(y_t | s_t),    higher is better,

and ``ℓ_t = −r_t`` is the student-minus-teacher log-ratio whose expectation under the student
is the per-token reverse KL. Losses are minimised. Teacher quantities are always detached.

Each function returns per-token values (or ``(loss, metrics)`` with detached scalar metrics);
reduction to a scalar is a separate, named step in :mod:`opd.math.reduce`.
"""
