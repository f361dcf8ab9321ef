"""Actionability diagnostics: per-token and per-sequence metrics (docs/methods.md §3.7, §3.8).

Everything here is pure and detached: inputs are detached, every function runs under
``torch.no_grad()`` and nothing returned carries a gradient. Per-token functions accept any
leading dimensions (``[..., V]`` → ``[...]``; ``[B, T, V]`` or ``[N, V]`` in practice). Sequence
functions take right-padded ``[B, T]`` ids and masks whose rows may have different lengths.

The question these metrics answer is "is the teacher signal at this state something the student
can act on?" (the survey's metric set is assembled from several papers, **[INFER]**):

* teacher_kl ``ℓ_t = log π_S(y_t) − log π_T(y_t)`` (tinker / prime-rl ``teacher_kl``), its sign
  balance and heavy negative tail (Fu et al. 2603.25562; AOPD 2605.06387);
* full or top-K reverse / forward KL (vOPD 2605.07865, Rethinking OPD 2604.13016);
* top-K overlap ratio and mass (Rethinking OPD 2604.13016: 97–99 % of the student's mass on the
  shared set in successful OPD);
* teacher coverage of the sample ``1[y_t ∈ TopK_T]`` (prime-rl ``sampled_token_in_teacher_topk``);
* teachability ``Σ_{v∈TopK_S} π_T(v)`` (TA-OPD 2605.26844, exact form unverified, **[INFER]**);
* entropies and top-1 confidences (TIP 2604.14084, EOPD 2603.07079, SFD 2605.30833), by position
  (late tokens teach little, 2606.22600);
* length, truncation, EOS and n-gram repetition (Demystifying OPD 2604.08527: length inflation →
  truncation collapse + repetition saturation);
* CR-OPD routing summaries from :func:`opd.math.routing.cr_opd_loss` metrics.
"""

from opd.math.diagnostics.sequence import (
    ends_with_eos,
    eos_rate,
    ngram_repetition_rate,
    repetition_rate,
    sequence_diagnostics,
    truncation_flags,
    truncation_rate,
)
from opd.math.diagnostics.summary import (
    position_bucket_index,
    position_buckets,
    summarize_by_position,
    summarize_cr_opd,
    summarize_diagnostics,
)
from opd.math.diagnostics.token import diagnostics_extra_fn, token_diagnostics

__all__ = [
    "token_diagnostics",
    "diagnostics_extra_fn",
    "summarize_diagnostics",
    "position_bucket_index",
    "position_buckets",
    "summarize_by_position",
    "ngram_repetition_rate",
    "repetition_rate",
    "ends_with_eos",
    "eos_rate",
    "truncation_flags",
    "truncation_rate",
    "sequence_diagnostics",
    "summarize_cr_opd",
]
