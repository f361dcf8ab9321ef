"""Rollout–update overlap (``rollout.overlap``): the rollouts of step k+1 are sampled while step k
trains.

Timeline (θ_k = the student's weights before step k's update)::

    main thread        [train step k: θ_k → θ_{k+1}]        [train step k+1: θ_{k+1} → θ_{k+2}]
    background   [sample + score step k+1 from θ_k]    [sample + score step k+2 from θ_{k+1}]

Before launching the background work for step k+1 the engine takes a snapshot of θ_k (an engine
that samples from its own copy of the weights: :class:`opd.rollout.engine.HFEngine` with
``own_copy=True``, or a vLLM engine), so training never races the sampler. Step k+1 then updates
θ_{k+1} with samples from μ = π_{θ_k}: one step of policy lag, which the importance ratios
``π_θ(y_t) / μ(y_t)`` of route 2 already correct (``route2.is_correction``; the ratio statistics
are in the diagnostics, and the lag in the ``policy_lag`` metric). The first step of a run (and of
a resumed run) is sampled synchronously, without lag — so a resumed run with overlap is not
bit-identical to an uninterrupted one.

The background thread runs the engine, the teacher and the reference; everything that
communicates across processes (token counts, the fault flag) stays in the main thread. Random
numbers: the background seeds torch's global generator per step as the synchronous path does;
training then must not draw random numbers itself (no dropout) for runs to be reproducible.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from opd.sharding import gathered

if TYPE_CHECKING:
    from opd.components import Components
    from opd.step import StepBatch

__all__ = ["Prefetcher"]


class Prefetcher:
    """Prepares the next step's batch in one background thread (see the module docstring)."""

    def __init__(self, parts: Components):
        self.parts = parts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rollouts")
        self._pending: tuple[int, Future[StepBatch]] | None = None

    def batch(self, step: int) -> tuple[StepBatch, int]:
        """The batch of ``step`` and its policy lag in steps (0: sampled from the current weights).

        Then starts preparing step ``step + 1`` from a snapshot of the current weights.
        """
        from opd.step import prepare_batch

        parts = self.parts
        if self._pending is not None and self._pending[0] == step:
            batch, lag = self._pending[1].result(), 1
        else:  # first step, or the pipeline was restarted
            self.cancel()
            batch, lag = prepare_batch(parts, step), 0
        self._pending = None
        if step + 1 < parts.cfg.train.steps:
            with gathered(parts.accelerator, parts.model):  # snapshot θ_step before this step trains
                parts.engine.sync_weights(parts.student)
            self._pending = (step + 1, self._pool.submit(prepare_batch, parts, step + 1, sync=False))
        return batch, lag

    def cancel(self) -> None:
        """Drop the batch being prepared (waits for it: the thread cannot be stopped mid-rollout)."""
        if self._pending is not None:
            future = self._pending[1]
            self._pending = None
            if not future.cancel():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 — a dropped batch's failure does not matter
                    pass

    def close(self) -> None:
        self.cancel()
        self._pool.shutdown(wait=True)
