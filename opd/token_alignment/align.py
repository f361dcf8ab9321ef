"""Character-offset alignment of two tokenizations of one text, and the teacher's log-prob of each
student token (pure functions on lists; no models).

Two tokenizers cut the same completion text ``x`` at different places. Write the student's token
ends as ``e^S_1 < … < e^S_n = |x|`` and the teacher's as ``e^T_1 < … < e^T_m = |x|`` (character
offsets). Both tokenizations agree exactly on the spans between *common* boundaries
``C = {0} ∪ ({e^S} ∩ {e^T})`` — the smallest spans on which they agree. The teacher's log-prob of a
span is the sum of the log-probs of its teacher tokens (log-prob merging, as GOLD does: Hugging Face
H4, https://huggingfaceh4-on-policy-distillation.hf.space).

Inside a span the student may cut where the teacher does not. The teacher's log-prob of the text up
to an offset ``k`` is written as a curve over character offsets::

    F(k) = Σ_{teacher tokens u ending at or before k} log π_T(u | ·)  +  log P_j(x[a_j:k])

where ``j`` is the teacher token that covers ``k`` (``a_j < k < e_j``) and ``P_j(p)`` is the teacher's
probability, at the state before token ``j``, that its next token *begins with* the text ``p``::

    P_j(p) = Σ_{u ∈ V_T : str(u) starts with p} π_T(u | s_j)

(the token the teacher actually wrote is always counted, so ``P_j(p) ≥ π_T(u_j)`` and ``F`` never
increases). This is the one-token case of the exact character-level marginal of a tokenized LM
(Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models", arXiv 2410.09303); it
leaves out the non-canonical paths where the teacher would spell ``p`` with several tokens
**[INFER]**. When ``P_j`` is not available (a teacher "unit" of several tokens that only together end
on a character boundary, e.g. the bytes of one CJK character, or a text that does not survive the
teacher's tokenizer), ``F`` is interpolated linearly in characters inside the unit **[INFER]**.

A student token spanning ``[k₀, k₁)`` then gets the teacher log-prob ``F(k₁) − F(k₀)``: the teacher's
log-prob of the same text given the same prefix. The values telescope, so their sum over a
completion is exactly ``F(|x|)``, the teacher's own log-prob of that text; on a token whose both ends
are teacher boundaries the value is exactly the merged log-prob of the teacher tokens it covers.
Student tokens that do not end on a character boundary (a byte-level token holding part of a
multi-byte character) share the value of the smallest run of tokens that does, equally **[INFER]**.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Alignment", "TeacherUnit", "align_tokens", "common_boundaries", "teacher_units"]


@dataclass(frozen=True)
class TeacherUnit:
    """Consecutive teacher tokens ``first … last`` that together cover ``[start, end)`` and end on a
    character boundary (one token, except for tokens that end inside a character)."""

    start: int
    end: int
    first: int
    last: int
    logprob: float


def teacher_units(ends: Sequence[int | None], logprobs: Sequence[float]) -> list[TeacherUnit]:
    """Group teacher tokens into units: ``ends[j]`` is the character offset after token ``j``, or
    ``None`` when the token ends inside a character (it joins the next token's unit). Tokens after
    the last clean end (an unfinished character) form no unit; their log-probs are dropped from
    ``F`` (the curve ends at the last character the teacher finished)."""
    units, start, first, acc = [], 0, 0, 0.0
    for j, (end, lp) in enumerate(zip(ends, logprobs, strict=True)):
        acc += float(lp)
        if end is not None:
            units.append(TeacherUnit(start, int(end), first, j, acc))
            start, first, acc = int(end), j + 1, 0.0
    return units


def common_boundaries(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None]) -> list[int]:
    """``{0} ∪`` the character offsets where both tokenizations end a token (sorted)."""
    s = {e for e in student_ends if e is not None}
    t = {e for e in teacher_ends if e is not None}
    return sorted({0} | (s & t))


@dataclass(frozen=True)
class Alignment:
    """The result of :func:`align_tokens`, one entry per student token.

    Attributes:
        logprobs: teacher log-prob of each student token (``F(k₁) − F(k₀)``; see the module docstring).
        token_aligned: both ends of the token are teacher token boundaries (its value is an exact
            merge of whole teacher tokens, no within-token split).
        state_aligned: the token starts at a teacher token boundary, so the state it is sampled in
            is a teacher state: ``state_teacher_index`` is the teacher position whose next-token
            distribution is the teacher's distribution at that state.
        state_teacher_index: that teacher token index (``-1`` where ``state_aligned`` is False).
    """

    logprobs: list[float]
    token_aligned: list[bool]
    state_aligned: list[bool]
    state_teacher_index: list[int]


def align_tokens(
    student_ends: Sequence[int | None],
    teacher_ends: Sequence[int | None],
    teacher_logprobs: Sequence[float],
    *,
    prefix_logprob: Callable[[int, int], float] | None = None,
    text_matches: bool = True,
) -> Alignment:
    """The teacher's log-prob of every student token of one completion text.

    Args:
        student_ends: character offset after each student token, ``None`` for a token that ends
            inside a character (see the module docstring).
        teacher_ends: the same for the teacher's tokenization of the same text.
        teacher_logprobs: ``log π_T(u_j | ·)`` of each teacher token.
        prefix_logprob: ``(j, c) -> log P_j(x[a_j : a_j + c])`` for teacher token ``j`` and
            ``0 < c < |u_j|`` characters into it; None: interpolate linearly inside every token.
        text_matches: False when the teacher's tokens do not spell the student's text (a
            normaliser, an unknown character): the whole text is one unit, split by characters.

    Returns:
        :class:`Alignment`; ``sum(logprobs) == sum(teacher_logprobs)`` (up to float rounding) when
        the texts match and every token ends cleanly.
    """
    n = len(student_ends)
    if not text_matches:
        total = float(sum(teacher_logprobs))
        length = max((e for e in student_ends if e is not None), default=0)
        units = [TeacherUnit(0, length, 0, len(teacher_logprobs) - 1, total)] if length > 0 else []
        use_prefix = False
    else:
        units = teacher_units(teacher_ends, teacher_logprobs)
        use_prefix = prefix_logprob is not None
    starts = [u.start for u in units]
    cum = [0.0]
    for u in units:
        cum.append(cum[-1] + u.logprob)
    boundary_index = {u.start: i for i, u in enumerate(units)}
    boundary_index.update({units[-1].end: len(units)} if units else {0: 0})

    def curve(k: int) -> float:
        if k in boundary_index:
            return cum[boundary_index[k]]
        i = bisect_right(starts, k) - 1
        if i < 0 or i >= len(units) or k > units[i].end:
            return cum[-1]  # past the last finished character (dangling bytes): nothing more is known
        u = units[i]
        if use_prefix and u.first == u.last:
            inner = min(0.0, float(prefix_logprob(u.first, k - u.start)))
            return cum[i] + max(inner, u.logprob)  # P_j(prefix) ≥ π_T(u_j): F stays monotone
        return cum[i] + (k - u.start) / (u.end - u.start) * u.logprob

    logprobs = [0.0] * n
    token_aligned = [False] * n
    state_aligned = [False] * n
    state_index = [-1] * n
    exact = set(boundary_index) if text_matches else set()
    prev, run = 0, []
    for t, end in enumerate(student_ends):
        run.append(t)
        if end is None:
            continue
        share = (curve(int(end)) - curve(prev)) / len(run)
        for r in run:
            logprobs[r] = share
        if prev in exact and boundary_index[prev] < len(units):
            state_aligned[run[0]] = True
            state_index[run[0]] = units[boundary_index[prev]].first
        token_aligned[run[-1]] = len(run) == 1 and prev in exact and int(end) in exact
        prev, run = int(end), []
    return Alignment(logprobs, token_aligned, state_aligned, state_index)
