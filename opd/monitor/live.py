"""Live diagnostics of one optimizer step, from tensors the step already computed.

Nothing here runs a model. The per-token inputs are the objective's ``token_stats`` (detached
``[B, T]`` tensors from the same student forward that produced the loss, and the teacher's single
scoring pass; :class:`opd.objective.ObjectiveOutput`), concatenated over micro-batches by
:func:`opd.step.accumulate_gradients`; the per-sequence inputs are the step's rollouts. The
reductions are those of :mod:`opd.math.diagnostics` (docs/methods.md §3.7, **[INFER]** metric set):

* :func:`token_metrics` — masked means of every ``diag/*`` token statistic (teacher_kl
  ``ℓ_t = log π_S(y_t) − log π_T(y_t)``, full or top-k RKL/FKL, top-k overlap ratio and mass,
  ``1[y_t ∈ TopK_T]``, ``π_T(y_t)``, student and teacher entropy, ...), the sign balance and tail of
  ``r_t = −ℓ_t`` (Fu et al. 2603.25562), early / middle / late thirds of each completion
  (position bias, 2606.22600), advantage statistics, importance-ratio clip / cap / mask fractions
  (prime-rl mismatch metrics), CR-OPD routing mass, gate keep fraction, reference KL;
* :func:`sequence_metrics` — length, truncation, EOS and n-gram repetition rates of the student's
  own rollouts (Demystifying OPD 2604.08527);
* :func:`nonfinite_evidence` — NaN/Inf counts in the loss, the token statistics (the student's
  logits reach them through ``log π_S``), the teacher feedback and the gradient norm;
* :func:`batch_samples` — a few completions with their per-token ``ℓ_t`` for the report.

Every key returned by the metric functions starts with ``diag/``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from opd.math.diagnostics import sequence_diagnostics, summarize_by_position, summarize_cr_opd, summarize_diagnostics
from opd.types import Feedback, Rollouts

__all__ = [
    "POSITION_KEYS",
    "batch_samples",
    "nonfinite_evidence",
    "sequence_metrics",
    "token_metrics",
]

#: Token statistics also reported per position third (``diag/<key>_early|middle|late``).
POSITION_KEYS: tuple[str, ...] = (
    "teacher_kl", "rkl", "fkl", "overlap_ratio", "overlap_mass", "sampled_in_teacher_topk",
    "student_entropy", "teacher_entropy", "reward",
)
_PREFIX = "diag/"


def _masked_moments(x: Tensor, keep: Tensor) -> tuple[float, float, float, float] | None:
    """(mean, population std, min, max) of ``x`` over ``keep`` (None when nothing is kept)."""
    v = x.detach().double()[keep]
    if v.numel() == 0:
        return None
    return float(v.mean()), float(v.std(unbiased=False)), float(v.min()), float(v.max())


def _frac(flags: Tensor, keep: Tensor) -> float:
    return float((flags.bool() & keep).sum()) / max(int(keep.sum()), 1)


@torch.no_grad()
def token_metrics(stats: Mapping[str, Tensor], *, n_buckets: int = 3,
                  support_prob_floor: float = 0.01) -> dict[str, float]:
    """``diag/*`` floats from one step's token statistics (keys absent from ``stats`` are skipped).

    Args:
        stats: ``[B, T]`` detached tensors keyed as in :class:`opd.objective.ObjectiveOutput`;
            ``mask`` (the tokens that exist) is required. ``diag/<name>`` entries are the per-token
            diagnostics of :func:`opd.math.diagnostics.token_diagnostics`.
        n_buckets: position buckets (3: early / middle / late thirds of each row).
        support_prob_floor: with sampled-only teacher access, a token counts as off the teacher's
            support when ``π_T(y_t) <`` this.

    Keys (all prefixed ``diag/``):

    * every ``diag/<name>`` statistic's masked mean, ``num_tokens`` and, from ``reward``
      (``r_t = −ℓ_t``), ``reward_neg_frac``, ``reward_std``, ``reward_p05/p50/p95``,
      ``reward_skew``, ``reward_kurtosis`` (:func:`opd.math.diagnostics.summarize_diagnostics`);
    * ``<key>_early|middle|late`` for the :data:`POSITION_KEYS` present (``teacher_kl`` from the
      objective's own ``teacher_kl`` when the ``diag/`` one is absent);
    * ``teacher_offsupport_frac``: ``1 − mean 1[y_t ∈ TopK_T]`` with top-k or full teacher
      access, else the fraction of tokens with ``π_T(y_t) < support_prob_floor``;
    * ``advantage_mean|std|min|max`` and ``advantage_pos_frac`` (route 2);
      ``is_ratio_mean|max``, ``is_clip_frac``, ``is_cap_frac``, ``is_mask_frac`` (importance
      correction); ``cr_opd_*`` (:func:`opd.math.diagnostics.summarize_cr_opd`);
      ``gate_keep_frac`` (tokens the gates keep / tokens that exist); ``ref_kl`` and
      ``route1_divergence`` (masked means).
    """
    if "mask" not in stats:
        raise ValueError("token statistics need a 'mask' entry (the [B, T] tokens that exist); "
                         "pass ObjectiveOutput.token_stats or the stats of opd.step.accumulate_gradients")
    keep = stats["mask"].bool()
    diags = {k[len(_PREFIX):]: v for k, v in stats.items() if k.startswith(_PREFIX)}
    out: dict[str, float] = {}
    if diags:
        out.update(summarize_diagnostics(diags, keep))
    positional = {k: diags[k] for k in POSITION_KEYS if k in diags}
    if "teacher_kl" not in positional and "teacher_kl" in stats:
        positional["teacher_kl"] = stats["teacher_kl"]
    if positional and keep.dim() == 2:
        out.update(summarize_by_position(positional, keep, n_buckets))
    if "sampled_in_teacher_topk" in diags:
        out["teacher_offsupport_frac"] = 1.0 - out["sampled_in_teacher_topk"]
    elif "teacher_prob_sampled" in diags:
        out["teacher_offsupport_frac"] = _frac(diags["teacher_prob_sampled"] < support_prob_floor, keep)
    if "advantage" in stats and (m := _masked_moments(stats["advantage"], keep)) is not None:
        out.update(zip(("advantage_mean", "advantage_std", "advantage_min", "advantage_max"), m, strict=True))
        out["advantage_pos_frac"] = _frac(stats["advantage"] > 0, keep)
    if "is_ratio" in stats and (m := _masked_moments(stats["is_ratio"], keep)) is not None:
        out["is_ratio_mean"], out["is_ratio_max"] = m[0], m[3]
    for src, dst in (("is_clipped", "is_clip_frac"), ("is_capped", "is_cap_frac"), ("is_masked", "is_mask_frac")):
        if src in stats:
            out[dst] = _frac(stats[src], keep)
    if "routing_routed" in stats:
        routing = {k[len("routing_"):]: v for k, v in stats.items() if k.startswith("routing_")}
        out.update(summarize_cr_opd(routing, keep))
    if "gate_keep" in stats:
        out["gate_keep_frac"] = _frac(stats["gate_keep"], keep)
    for key in ("ref_kl", "route1_divergence"):
        if key in stats and (m := _masked_moments(stats[key], keep)) is not None:
            out[key] = m[0]
    return {_PREFIX + k: v for k, v in out.items()}


@torch.no_grad()
def sequence_metrics(rollouts: Rollouts, *, eos_ids: int | Sequence[int] | None, ngram: int = 3) -> dict[str, float]:
    """Length / truncation / EOS / repetition of the student's own rollouts (``on_policy_B`` rows).

    Keys ``diag/length_mean|min|max``, ``diag/truncation_rate`` (the rollouts' ``truncated_B``),
    ``diag/eos_rate`` (rows ending with an EOS id, when ``eos_ids`` is given) and
    ``diag/repetition_rate`` (mean n-gram repetition rate, :func:`opd.math.diagnostics.
    ngram_repetition_rate`, over rows with at least one n-gram). Off-policy rows (teacher samples,
    dataset answers) are left out: length inflation and repetition are properties of the student's
    sampler. Empty when no row is on-policy.
    """
    rows = rollouts.on_policy_B.bool()
    if not bool(rows.any()):
        return {}
    ids, mask = rollouts.completion_ids_BT[rows], rollouts.completion_mask_BT[rows].bool()
    seq = sequence_diagnostics(ids, mask, n=ngram, eos_ids=eos_ids, truncated_B=rollouts.truncated_B[rows])
    return {_PREFIX + k: v for k, v in seq.items()}


def _count_bad(x: Tensor, keep: Tensor | None, *, allow_neg_inf: bool = False) -> int:
    bad = torch.isnan(x) | (torch.isposinf(x) if allow_neg_inf else torch.isinf(x))
    if keep is not None:
        bad = bad & keep.reshape(keep.shape + (1,) * (bad.dim() - keep.dim()))
    return int(bad.sum())


@torch.no_grad()
def nonfinite_evidence(*, loss_terms: Mapping[str, float], stats: Mapping[str, Tensor],
                       feedback: Feedback | None = None, grad_norm: float | None = None) -> dict[str, float]:
    """Where a step holds NaN/Inf; ``{}`` when it is clean (the step may then update the weights).

    Checked, on the tokens that exist (``stats["mask"]``): every floating-point token statistic
    (NaN or ±Inf; the student's logits reach ``teacher_kl`` and ``student_entropy`` through
    ``log π_S``, the rewards are ``reward``), the teacher's sampled-token log-probs (NaN or ±Inf:
    ``log π_T(y_t) = −∞`` makes ``r_t`` infinite) and its top-k log-probs / full logits (NaN or
    +Inf; ``−∞`` there is a legitimate zero probability); the loss terms and the gradient norm
    (NaN or ±Inf). Keys: ``loss`` (non-finite terms), ``tokens/<stat>``, ``teacher/<tensor>``
    (counts) and ``grad_norm`` (the value).
    """
    out: dict[str, float] = {}
    bad_terms = [k for k, v in loss_terms.items() if not math.isfinite(v)]
    if bad_terms:
        out["loss"] = float(len(bad_terms))
    keep = stats["mask"].bool() if "mask" in stats else None
    for key, value in stats.items():
        if key == "mask" or not value.is_floating_point():
            continue
        n = _count_bad(value, keep if keep is not None and value.shape == keep.shape else None)
        if n:
            out[f"tokens/{key}"] = float(n)
    if feedback is not None:
        n = _count_bad(feedback.sampled_logprobs_BT, keep if keep is not None
                       and feedback.sampled_logprobs_BT.shape == keep.shape else None)
        if n:
            out["teacher/sampled_logprobs"] = float(n)
        for name in ("topk_logprobs_BTK", "logits_BTV"):
            t = getattr(feedback, name)
            if t is not None:
                n = _count_bad(t, keep if keep is not None and t.shape[:2] == keep.shape else None,
                               allow_neg_inf=True)
                if n:
                    out[f"teacher/{name.rsplit('_', 1)[0]}"] = float(n)
    if grad_norm is not None and not math.isfinite(grad_norm):
        out["grad_norm"] = grad_norm
    return out


def batch_samples(rollouts: Rollouts, stats: Mapping[str, Tensor], tokenizer: Any, n: int,
                  task: Any = None) -> list[dict[str, Any]]:
    """Up to ``n`` completions of the batch with per-token ``ℓ_t = log π_S(y_t) − log π_T(y_t)``.

    ``ℓ_t`` is the objective's ``teacher_kl`` statistic (the loss's own forward and the teacher's
    scoring pass, no extra model call). Rows are taken in batch order, on-policy rows with at least
    one counted token first. Each record: ``prompt`` (text), ``completion`` (the text a verifier
    reads: special tokens kept), ``tokens`` (completion tokens as strings), ``token_ids``,
    ``log_ratio`` (``ℓ_t`` per token), ``student_entropy`` (when known), ``truncated``,
    ``on_policy``, ``answer`` (the example's reference answer, or None) and ``score``: the
    verifier's score of the completion (``task.verify``; None without a ``task`` or when the task
    has no verifier).
    """
    if n <= 0 or "teacher_kl" not in stats:
        return []
    keep = stats["mask"].bool()
    order = sorted(range(rollouts.batch_size), key=lambda b: (not bool(rollouts.on_policy_B[b]), b))
    out = []
    for b in order:
        if len(out) >= n:
            break
        row = keep[b]
        if not bool(row.any()):
            continue
        ids = rollouts.completion_ids_BT[b][row].tolist()
        # the verifier reads the whole completion (a masked tail, e.g. under rollout.truncated=mask,
        # is still what the model wrote)
        all_ids = rollouts.completion_ids_BT[b][rollouts.completion_mask_BT[b].bool()].tolist()
        completion = tokenizer.decode(all_ids, skip_special_tokens=False)
        prompt_ids = rollouts.prompt_ids_BP[b][rollouts.prompt_mask_BP[b].bool()].tolist()
        ex = rollouts.examples[b] if rollouts.examples else None
        score = None
        if task is not None and ex is not None:
            value = float(task.verify(ex, completion))
            score = None if math.isnan(value) else value
        record: dict[str, Any] = {
            "prompt": ex.prompt if ex is not None else tokenizer.decode(prompt_ids, skip_special_tokens=False),
            "completion": completion,
            "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
            "token_ids": ids,
            "log_ratio": [round(float(v), 5) for v in stats["teacher_kl"][b][row]],
            "truncated": bool(rollouts.truncated_B[b]),
            "on_policy": bool(rollouts.on_policy_B[b]),
            "answer": None if ex is None else ex.answer,
            "score": score,
        }
        if "student_entropy" in stats:
            record["student_entropy"] = [round(float(v), 5) for v in stats["student_entropy"][b][row]]
        out.append(record)
    return out
