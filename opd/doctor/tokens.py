"""The self-test's tokenizer and template checks: what the teacher reads is what the student wrote.

* round trip — student completion ids → text → teacher tokens → text gives the same text back
  (measured: the fraction of completions that do not come back, tolerance 0);
* special tokens — the differences :func:`opd.tokenization.compare_tokenizers` refuses for the
  configured ``teacher.tokenizer`` mode (EOS / pad / BOS ids, vocabulary, chat template);
* embedding rows — each model's output-embedding rows cover its tokenizer (``rows ≥ len(tok)``), and
  with one shared tokenizer both models have the same number of rows;
* pad / EOS — both set (without EOS the student cannot stop; without pad no batch can be built).
  ``pad == eos`` is noted, not failed: opd finds padding by position, never by id, so the EOS stays
  in the loss; a tool that masks padding by id would mask the EOS too;
* default system prompt — a chat template that inserts a system message the user did not write
  (found by rendering a conversation without one); the student and the teacher must insert the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from opd.chat import default_system_prompt
from opd.doctor.checks import Check, judged, skipped
from opd.tokenization import compare_tokenizers

__all__ = ["default_system_prompt", "embedding_rows", "pad_eos", "round_trip", "special_tokens", "system_prompts"]


def round_trip(texts: Sequence[str], teacher_tokenizer: PreTrainedTokenizerBase) -> Check:
    """Fraction of ``texts`` (decoded student completions) that change through the teacher tokenizer."""
    if not texts:
        return skipped("tokenizer round trip", "no completion text to check")
    bad = [t for t in texts
           if teacher_tokenizer.decode(teacher_tokenizer(t, add_special_tokens=False)["input_ids"]) != t]
    example = f"; first: {bad[0]!r}" if bad else ""
    return judged("tokenizer round trip", len(bad) / len(texts), 0.0,
                  f"share of {len(texts)} student completions whose text changes through the teacher's "
                  f"tokenizer{example}")


def special_tokens(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, mode: str,
                   chat: bool) -> Check:
    """Differences the configured ``teacher.tokenizer`` mode cannot work with (count, tolerance 0)."""
    cmp = compare_tokenizers(student, teacher, teacher_tokenizer=mode, chat=chat)
    what = "; ".join(cmp.errors) if cmp.errors else ("; ".join(cmp.warnings) or f"none with teacher.tokenizer={mode}")
    return judged("special tokens and vocabulary", float(len(cmp.errors)), 0.0, what[:400])


def embedding_rows(student_rows: int, teacher_rows: int | None, student_tok: PreTrainedTokenizerBase,
                   teacher_tok: PreTrainedTokenizerBase | None, *, shared: bool) -> Check:
    """Tokens without an embedding row (``len(tok) − rows`` when positive), plus the row difference of
    the two models when they share one tokenizer."""
    missing = max(0, len(student_tok) - student_rows)
    parts = [f"student {student_rows} rows for {len(student_tok)} tokens"]
    if teacher_rows is not None and teacher_tok is not None:
        missing += max(0, len(teacher_tok) - teacher_rows)
        parts.append(f"teacher {teacher_rows} rows for {len(teacher_tok)} tokens")
        if shared:
            missing += abs(student_rows - teacher_rows)
    return judged("embedding rows vs vocabulary", float(missing), 0.0, "; ".join(parts))


def pad_eos(tokenizers: Sequence[tuple[str, PreTrainedTokenizerBase]]) -> Check:
    """Unset pad / EOS tokens, counted over the named tokenizers (``pad == EOS`` is noted only)."""
    problems, notes = [], []
    for who, tok in tokenizers:
        if tok.eos_token_id is None:
            problems.append(f"{who}: no EOS token")
        if tok.pad_token_id is None:
            problems.append(f"{who}: no pad token")
        elif tok.pad_token_id == tok.eos_token_id:
            notes.append(f"{who}: pad == EOS ({tok.eos_token!r}; harmless in opd, which finds padding by position)")
    ok = ", ".join(f"{who} pad={tok.pad_token!r} eos={tok.eos_token!r}" for who, tok in tokenizers)
    return judged("pad / EOS", float(len(problems)), 0.0, "; ".join(problems + notes) or ok)


def system_prompts(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase | None, *,
                   chat: bool) -> Check:
    """Student and teacher templates insert the same default system prompt (1 if they differ)."""
    if not chat:
        return skipped("default system prompt", "prompts are plain text (no chat template is applied)")
    s = default_system_prompt(student)
    t = s if teacher is None else default_system_prompt(teacher)
    describe = (lambda x: "none" if x is None else repr(x[:80]))
    return judged("default system prompt", float(s != t), 0.0,
                  f"student template inserts {describe(s)}, teacher template inserts {describe(t)}")
