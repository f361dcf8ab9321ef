"""Errors a user can cause or meet, each with a message that says what happened and what to do.

Every class here is a ``ValueError`` or ``OSError`` subclass, so the command line prints its
message as one line (no traceback) and exits with status 2.

* :class:`RunFault` — a fault *during* a run that is not the user's input (a teacher or rollout
  server that is down or answers garbage, a full disk, weights gone non-finite): the loop saves
  what it has — a checkpoint of the last completed step, the summary, the report — and tells the
  user how to resume.
"""

from __future__ import annotations

__all__ = ["FeedbackUnavailable", "RunFault", "ServiceError"]


class RunFault(RuntimeError):
    """A fault during a run after which the run stops cleanly and can be resumed.

    The loop catches it between steps' work: the current step's partial work is dropped (nothing of
    it reached the weights unless the fault happened after ``optimizer.step()``), a checkpoint of
    the last completed step is written, and the message plus the exact ``--resume`` command are
    printed.

    ``state_intact=False`` says the student's weights are no longer those of the last completed step
    (e.g. they went non-finite in ``optimizer.step()``): then no checkpoint is written.
    """

    def __init__(self, message: str, *, state_intact: bool = True):
        super().__init__(message)
        self.state_intact = state_intact


class ServiceError(RunFault):
    """A server opd depends on (a teacher or rollout server) is unreachable, too slow, or answered
    something unusable, after the client's bounded retries. The message names the server (URL) and
    what it returned."""


class FeedbackUnavailable(ValueError):
    """A teacher cannot give the feedback asked of it (e.g. a vLLM server started with a
    ``--max-logprobs`` below the log-probs per token a request needs). The message names the setting
    that would allow it. Raised before any request that would fail: training refuses to start, and a
    held-out evaluation falls back to the sampled-token log-ratio (:func:`opd.evaluate.evaluate`)."""
