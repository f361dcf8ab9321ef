"""The teacher self-test's checks: each one scores or tokenizes the same thing two ways and compares.

A check returns a :class:`Check`: its name, the measured difference, the tolerance it is held to,
and a one-line detail. The numeric checks all reduce to one comparison,

    Δ = max_{b,t: mask_bt} |a_bt − b_bt|   over the sampled log-probs (and the top-k log-probs of
                                            the same top-k ids, when both sides return them),

and pass when ``Δ ≤ tol``. What is compared with what:

* determinism — the same rollouts scored twice;
* batch invariance — every row scored alone vs inside the batch (the batch left-pads the teacher's
  prompts and right-pads the completions to the longest row);
* padding invariance — the batch with extra right padding on the completions and, when the teacher
  reads the student's prompt ids, extra left padding on the prompts;
* served vs in-process — a teacher server against the same model loaded here;
* temperature — ``log π_T^τ(v) = log_softmax(log π_T^1 / τ)(v)`` against the teacher's τ = 1 scores
  (a teacher that ignores or doubles ``teacher.temperature`` fails).

Batch and padding invariance are the invariances the design asks of every loss (padding must not
change the result); served vs in-process is how vLLM's and opd's servers are validated against
``transformers`` (the OPD framework survey's "teacher mismatch", arXiv 2606.22793).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from opd.teachers.base import Teacher
from opd.types import Access, Feedback, Rollouts

__all__ = ["Check", "agreement", "batch_invariance", "determinism", "feedback_difference", "pad_rollouts",
           "padding_invariance", "tempered_reference", "temperature_check"]


@dataclass(frozen=True)
class Check:
    """One self-test result: ``passed`` iff ``measured ≤ tolerance`` (``measured`` None: not run)."""

    name: str
    passed: bool | None
    measured: float | None
    tolerance: float | None
    detail: str

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else ("pass" if self.passed else "FAIL")

    def line(self) -> str:
        if self.measured is None:
            return f"{self.status:<4} {self.name}: {self.detail}"
        return f"{self.status:<4} {self.name}: {self.measured:.3g} (tolerance {self.tolerance:.3g}); {self.detail}"


def skipped(name: str, why: str) -> Check:
    return Check(name=name, passed=None, measured=None, tolerance=None, detail=why)


def judged(name: str, measured: float, tolerance: float, detail: str) -> Check:
    """A check that passes when ``measured ≤ tolerance`` (NaN fails)."""
    ok = math.isfinite(measured) and measured <= tolerance
    return Check(name=name, passed=ok, measured=float(measured), tolerance=float(tolerance), detail=detail)


def feedback_difference(a: Feedback, b: Feedback, mask_BT: Tensor) -> float:
    """``max |a − b|`` over the real tokens: sampled log-probs, plus the top-k log-probs at the
    positions where both sides chose the same top-k ids (a reordering of near-ties is not a change).

    Returns ``inf`` when a side holds NaN/Inf at a real token, 0.0 for an empty mask.
    """
    mask = mask_BT.bool()
    if a.sampled_logprobs_BT.shape != b.sampled_logprobs_BT.shape:
        raise ValueError(f"feedbacks of shapes {tuple(a.sampled_logprobs_BT.shape)} and "
                         f"{tuple(b.sampled_logprobs_BT.shape)} cannot be compared")
    if not bool(mask.any()):
        return 0.0
    sa, sb = a.sampled_logprobs_BT.float().cpu(), b.sampled_logprobs_BT.float().cpu()
    mask = mask.cpu()
    if not (bool(torch.isfinite(sa[mask]).all()) and bool(torch.isfinite(sb[mask]).all())):
        return math.inf
    diff = float((sa - sb).abs()[mask].max())
    if a.topk_ids_BTK is not None and b.topk_ids_BTK is not None and a.topk_ids_BTK.shape == b.topk_ids_BTK.shape:
        same = (a.topk_ids_BTK.cpu() == b.topk_ids_BTK.cpu()) & mask[..., None]
        if bool(same.any()):
            ta, tb = a.topk_logprobs_BTK.float().cpu(), b.topk_logprobs_BTK.float().cpu()  # type: ignore[union-attr]
            diff = max(diff, float((ta - tb).abs()[same].max()))
    return diff


def _score(teacher: Teacher, rollouts: Rollouts, access: Access, topk: int) -> Feedback:
    return teacher.score(rollouts, access=access, topk=topk)


def agreement(name: str, a: Feedback, b: Feedback, mask_BT: Tensor, tolerance: float, what: str) -> Check:
    """Two scorings of the same rollouts agree within ``tolerance`` (``what`` says what was compared)."""
    return judged(name, feedback_difference(a, b, mask_BT), tolerance, what)


def determinism(teacher: Teacher, rollouts: Rollouts, *, tolerance: float, access: Access = "sampled",
                topk: int = 8, name: str = "determinism") -> Check:
    """The same rollouts scored twice give the same log-probs."""
    first = _score(teacher, rollouts, access, topk)
    second = _score(teacher, rollouts, access, topk)
    return agreement(name, first, second, rollouts.completion_mask_BT, tolerance,
                     f"max |Δ log π_T| between two scorings of the same {rollouts.batch_size} rollouts")


def _first_columns(fb: Feedback, t: int) -> Feedback:
    """The sampled and top-k scores of the first ``t`` completion positions (nothing else kept)."""
    topk = fb.topk_ids_BTK is not None and fb.topk_logprobs_BTK is not None
    return Feedback("topk" if topk else "sampled", fb.sampled_logprobs_BT[:, :t],
                    topk_ids_BTK=fb.topk_ids_BTK[:, :t] if topk else None,  # type: ignore[index]
                    topk_logprobs_BTK=fb.topk_logprobs_BTK[:, :t] if topk else None)  # type: ignore[index]


def _trim(rollouts: Rollouts) -> Rollouts:
    """A one-row batch without the columns that are padding in every row (prompt left, completion right)."""
    p_keep = rollouts.prompt_mask_BP.bool().any(0)
    first = int(p_keep.nonzero()[0]) if bool(p_keep.any()) else 0
    t_len = max(int(rollouts.completion_mask_BT.sum(1).max()), 1)
    return replace(rollouts, prompt_ids_BP=rollouts.prompt_ids_BP[:, first:],
                   prompt_mask_BP=rollouts.prompt_mask_BP[:, first:],
                   completion_ids_BT=rollouts.completion_ids_BT[:, :t_len],
                   completion_mask_BT=rollouts.completion_mask_BT[:, :t_len],
                   behaviour_logprobs_BT=rollouts.behaviour_logprobs_BT[:, :t_len])


def batch_invariance(teacher: Teacher, rollouts: Rollouts, *, tolerance: float, access: Access = "sampled",
                     topk: int = 8, rows: int = 8) -> Check:
    """Each of the first ``rows`` rows scored alone (no padding at all) vs inside the whole batch."""
    together = _score(teacher, rollouts, access, topk)
    worst = 0.0
    n = min(rows, rollouts.batch_size)
    for i in range(n):
        alone_rollouts = _trim(rollouts.select([i]))
        alone = _score(teacher, alone_rollouts, access, topk)
        t_len = alone_rollouts.completion_ids_BT.shape[1]
        inside = _first_columns(together.select([i]), t_len)
        worst = max(worst, feedback_difference(alone, inside, alone_rollouts.completion_mask_BT))
    return judged("batch invariance", worst, tolerance,
                  f"max |Δ log π_T| of {n} rows scored alone vs inside the batch of {rollouts.batch_size}")


def pad_rollouts(rollouts: Rollouts, pad_id: int, *, left: int = 0, right: int = 0) -> Rollouts:
    """``rollouts`` with ``left`` extra padding columns before the prompts and ``right`` after the
    completions (masks 0 there; the real tokens are unchanged)."""
    b = rollouts.batch_size
    p_ids, p_mask = rollouts.prompt_ids_BP, rollouts.prompt_mask_BP
    c_ids, c_mask, beh = rollouts.completion_ids_BT, rollouts.completion_mask_BT, rollouts.behaviour_logprobs_BT
    if left:
        p_ids = torch.cat([p_ids.new_full((b, left), pad_id), p_ids], 1)
        p_mask = torch.cat([p_mask.new_zeros((b, left)), p_mask], 1)
    if right:
        c_ids = torch.cat([c_ids, c_ids.new_full((b, right), pad_id)], 1)
        c_mask = torch.cat([c_mask, c_mask.new_zeros((b, right))], 1)
        beh = torch.cat([beh, beh.new_zeros((b, right))], 1)
    return replace(rollouts, prompt_ids_BP=p_ids, prompt_mask_BP=p_mask, completion_ids_BT=c_ids,
                   completion_mask_BT=c_mask, behaviour_logprobs_BT=beh)


def padding_invariance(teacher: Teacher, rollouts: Rollouts, pad_id: int, *, tolerance: float,
                       reads_prompt_ids: bool, access: Access = "sampled", topk: int = 8, extra: int = 5) -> Check:
    """Extra right padding on the completions (and, when the teacher reads the student's prompt ids,
    ``reads_prompt_ids``, extra left padding on the prompts) must not change any real token's score."""
    base = _score(teacher, rollouts, access, topk)
    t = rollouts.completion_ids_BT.shape[1]
    padded = pad_rollouts(rollouts, pad_id, left=extra if reads_prompt_ids else 0, right=extra)
    other = _score(teacher, padded, access, topk)
    other = _first_columns(other, t)
    where = f"{extra} pad columns right of the completions" + (f" and {extra} left of the prompts"
                                                                 if reads_prompt_ids else "")
    return judged("padding invariance", feedback_difference(base, other, rollouts.completion_mask_BT), tolerance,
                  f"max |Δ log π_T| with {where}")


def tempered_reference(untempered_logprobs_BTV: Tensor, ids_BT: Tensor, tau: float) -> Tensor:
    """``log_softmax(log π_T^1 / τ)`` at ``ids_BT`` — the tempered teacher log-prob of each token
    computed from the τ = 1 distribution (``log π^1 = z − logsumexp z``, so dividing it by τ and
    renormalising equals ``log_softmax(z / τ)``)."""
    return torch.log_softmax(untempered_logprobs_BTV.float() / tau, dim=-1).gather(-1, ids_BT[..., None]).squeeze(-1)


def temperature_check(tempered: Feedback, untempered_logprobs_BTV: Tensor, rollouts: Rollouts, tau: float, *,
                      tolerance: float) -> Check:
    """The teacher's scores at ``teacher.temperature = τ`` equal ``log_softmax(log π_T^1 / τ)``."""
    mask = rollouts.completion_mask_BT.bool().cpu()
    ids = rollouts.completion_ids_BT.cpu()
    expected = tempered_reference(untempered_logprobs_BTV.cpu(), ids, tau)
    got = tempered.sampled_logprobs_BT.float().cpu()
    if not bool(mask.any()):
        return skipped("temperature", "no completion token to compare")
    diff = float((expected - got).abs()[mask].max()) if bool(torch.isfinite(got[mask]).all()) else math.inf
    untempered = float((torch.log_softmax(untempered_logprobs_BTV.float().cpu(), -1).gather(
        -1, ids[..., None]).squeeze(-1) - got).abs()[mask].max())
    hint = "" if tau == 1.0 or diff <= tolerance else (
        "; the scores equal the untempered ones: the temperature was not applied" if untempered <= tolerance
        else "; the scores match neither τ nor τ = 1")
    return judged("temperature", diff, tolerance,
                  f"max |log π_T^τ − log_softmax(log π_T^1 / τ)| at τ = {tau:g}{hint}")
