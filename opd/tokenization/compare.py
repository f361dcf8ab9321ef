"""The teacher/student tokenizer agreement check.

Distillation compares two models token by token. With ``teacher.tokenizer=same`` the teacher scores
the student's token ids in the student's contexts, which is only meaningful when both tokenizers map
the same strings to the same ids and agree on the special tokens; with ``teacher.tokenizer=own`` the
teacher re-tokenizes the student's text and the two tokenizations are aligned
(:mod:`opd.token_alignment`). :func:`compare_tokenizers` lists every difference and, for the chosen mode and
data format, whether opd aligns it or refuses it; :func:`check_tokenizers_agree` turns the refusals
into one :class:`TokenizerMismatchError` (naming the options that fix it) before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd.tokenization.tokens import vocab_map

__all__ = ["TokenizerComparison", "TokenizerMismatchError", "check_tokenizers_agree", "compare_tokenizers"]

#: How many differing ``token -> id`` entries a vocabulary error message shows.
_MAX_VOCAB_DIFFS_SHOWN = 5


@dataclass
class TokenizerComparison:
    """Differences between a student and a teacher tokenizer, sorted by what opd does about them.

    Attributes:
        errors: differences opd cannot work with in the chosen mode (with ``teacher.tokenizer=same``
            the teacher would score other tokens than the student sampled). Training must not start.
        warnings: legal but risky setups, e.g. ``pad == eos``: harmless in opd (masks end at the
            first stop token, EOS kept), but a collator elsewhere that masks padding by id also masks the EOS.
        aligned: differences opd handles (``teacher.tokenizer=own``: re-tokenized and aligned by
            character offsets, EOS mapped to EOS, each model's own chat template), each saying how.
        mode: ``same`` or ``own`` (``teacher.tokenizer``); ``chat``: conversations are rendered.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aligned: list[str] = field(default_factory=list)
    mode: str = "same"
    chat: bool = False

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings may remain)."""
        return not self.errors

    def report(self) -> list[str]:
        """The preflight report, one line per finding: ``refused: …``, ``aligned: …``, ``warning: …``."""
        return ([f"refused: {e}" for e in self.errors] + [f"aligned: {a}" for a in self.aligned]
                + [f"warning: {w}" for w in self.warnings])


class TokenizerMismatchError(ValueError):
    """The student and teacher tokenizers disagree in a way that breaks distillation."""

    def __init__(self, comparison: TokenizerComparison, teacher_name: str | None = None):
        self.comparison = comparison
        lines = "\n".join(f"  - {e}" for e in comparison.errors)
        where = teacher_name or "<the teacher's folder>"
        if comparison.mode == "same":
            fix = (f"fix: student.tokenizer={where} (one tokenizer for both models, when the student uses the "
                   "teacher's vocabulary) or teacher.tokenizer=own (the teacher keeps its own tokenizer: the "
                   "student's text is re-tokenized for it and aligned by character offsets)")
        else:
            fix = "fix: the tokenizer settings named above (teacher.tokenizer=own still needs an EOS on both sides)"
        super().__init__(
            f"student and teacher tokenizers disagree ({len(comparison.errors)} difference(s) that "
            f"teacher.tokenizer={comparison.mode} cannot handle; {fix}):\n{lines}"
        )


def _special(tok: PreTrainedTokenizerBase, role: str) -> tuple[int | None, str | None]:
    return getattr(tok, f"{role}_token_id", None), getattr(tok, f"{role}_token", None)


def _describe(token_id: int | None, token: str | None) -> str:
    if token_id is None and token is None:
        return "unset"
    return f"{token_id} ({token!r})"


def _probe_text(tok: PreTrainedTokenizerBase, n: int = 32) -> str:
    """A short text made of the first ``n`` ordinary tokens of the vocabulary."""
    special_ids = set(tok.all_special_ids)
    ids = [i for i in sorted(tok.get_vocab().values()) if i not in special_ids][:n]
    return tok.decode(ids)


def _chat_template(tok: PreTrainedTokenizerBase) -> Any:
    return getattr(tok, "chat_template", None) or None


def _vocab_diffs(s_vocab: dict[str, int], t_vocab: dict[str, int]) -> str:
    diffs: list[str] = []
    for token in sorted(set(s_vocab) | set(t_vocab), key=lambda t: (s_vocab.get(t, t_vocab.get(t)), t)):
        s_id, t_id = s_vocab.get(token), t_vocab.get(token)
        if s_id != t_id:
            diffs.append(f"{token!r}: student {s_id if s_id is not None else 'missing'} vs "
                         f"teacher {t_id if t_id is not None else 'missing'}")
        if len(diffs) == _MAX_VOCAB_DIFFS_SHOWN:
            break
    return "; ".join(diffs)


def compare_tokenizers(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    *,
    teacher_tokenizer: str = "same",
    chat: bool = False,
) -> TokenizerComparison:
    """List the differences between two tokenizers that matter for distillation, and what opd does
    about each in the chosen mode (``teacher_tokenizer``: ``same`` or ``own``; ``chat``: prompts are
    conversations rendered with a chat template, ``data.format=chat``).

    ``same`` — the teacher scores the student's token ids; errors, each with both values:

    * **vocabulary** — size, and the first few ``token -> id`` entries that differ or exist on
      one side only;
    * **special tokens** — the ids and strings of bos, eos, pad and unk;
    * **encoding** — with equal vocabularies, one probe text must encode to the same ids (catches
      different merges, pre-tokenizers or BOS insertion);
    * **chat template** (``chat``) — the teacher reads the conversation rendered with the student's
      template, so a teacher template that differs (or a missing one) is an error; without ``chat``
      the templates are not used and a difference is only a warning.

    ``own`` — the teacher re-tokenizes the student's text (:class:`opd.teachers.CrossTokenizerTeacher`):
    vocabulary, special-token and encoding differences are *aligned* (reported with the share of the
    student's vocabulary that has a teacher token of the same text, and the EOS mapping); the
    templates may differ (each model renders the conversation with its own); errors are a missing
    EOS or pad token on the teacher side or, with ``chat``, a missing template. A probe text the
    teacher's tokenizer does not spell back exactly (an unknown character) is a warning.

    Both modes: ``pad == eos`` on either side is a warning saying it is harmless in opd (completion
    masks end at the first stop token, EOS kept) but not for tools that mask padding by id;
    no EOS at all is an error (rollouts cannot end). The padding side is not compared.
    """
    if teacher_tokenizer not in ("same", "own"):
        raise ValueError(f"teacher_tokenizer must be 'same' or 'own', got {teacher_tokenizer!r}")
    result = TokenizerComparison(mode=teacher_tokenizer, chat=chat)
    own = teacher_tokenizer == "own"
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        if own:
            mapped = vocab_map(student_tok, teacher_tok)
            share = sum(i >= 0 for i in mapped) / max(len(mapped), 1)
            result.aligned.append(
                f"vocabulary: student has {len(s_vocab)} tokens vs teacher {len(t_vocab)}; {share:.0%} of the student's "
                "tokens have a teacher token with the same text (route 1 is exact on those); completions are "
                "re-tokenized for the teacher and aligned by character offsets")
        else:
            result.errors.append(f"vocabulary: student has {len(s_vocab)} tokens vs teacher {len(t_vocab)}; first "
                                 f"differing entries: {_vocab_diffs(s_vocab, t_vocab)}")
    for role in ("bos", "eos", "pad", "unk"):
        s, t = _special(student_tok, role), _special(teacher_tok, role)
        if s != t:
            what = f"{role}_token_id: student {_describe(*s)} vs teacher {_describe(*t)}"
            if not own:
                result.errors.append(what)
            elif role == "eos" and s[0] is not None and t[0] is not None:
                result.aligned.append(f"{what}: the student's EOS is scored as the teacher's EOS")
            elif role != "eos":
                result.aligned.append(f"{what}: each model uses its own")
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
        if eos_id is None:
            result.errors.append(
                f"{side} tokenizer has no eos_token: rollouts can never end; set tokenizer.eos_token"
            )
        elif pad_id is not None and pad_id == eos_id:
            # opd itself never masks by pad id: completion masks run up to and including the first stop
            # token (opd.rollout.generate, the hf and vllm engines alike), text-given completions are masked
            # by length, and padding is sent to no server; so the only risk is outside opd
            result.warnings.append(
                f"{side} pad_token_id == eos_token_id == {eos_id} ({tok.eos_token!r}): harmless in opd (with the "
                "hf and vllm engines alike, a completion's mask ends at its first stop token and keeps that EOS in "
                "the loss; padding is found by position, never by id); a tool that masks padding by token id (e.g. "
                "another trainer's collator) would also mask the EOS, and its student would never learn to stop"
            )
    if own and teacher_tok.pad_token_id is None:
        result.errors.append("teacher tokenizer has no pad token: its re-tokenized prompts cannot be batched; set "
                             "tokenizer.pad_token (any token; padding is masked)")
    probe = _probe_text(student_tok)
    if s_vocab == t_vocab and not own:
        # Same vocabulary but different pre-tokenization, merges or BOS handling still changes
        # the token ids of a text; encode one probe text with both.
        s_ids, t_ids = student_tok(probe).input_ids, teacher_tok(probe).input_ids
        if s_ids != t_ids:
            result.errors.append(
                f"encoding of the probe text {probe!r}: student {s_ids[:16]} vs teacher {t_ids[:16]} "
                "(same vocabulary, but different pre-tokenization, merges or BOS/EOS insertion)"
            )
    if own:
        back = teacher_tok.decode(teacher_tok(probe, add_special_tokens=False).input_ids, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
        if back != probe:
            result.warnings.append(
                f"the teacher's tokenizer does not spell the student's probe text {probe!r} back exactly (got "
                f"{back!r}): completions holding such characters cannot be aligned token by token and are "
                "scored as a whole")
    _compare_templates(result, student_tok, teacher_tok, own=own, chat=chat)
    return result


def _compare_templates(result: TokenizerComparison, student_tok: PreTrainedTokenizerBase,
                       teacher_tok: PreTrainedTokenizerBase, *, own: bool, chat: bool) -> None:
    s_tpl, t_tpl = _chat_template(student_tok), _chat_template(teacher_tok)
    if chat:
        for side, tpl in [("student", s_tpl)] + ([("teacher", t_tpl)] if own else []):
            if tpl is None:
                result.errors.append(f"chat_template: data.format=chat renders conversations with the {side}'s chat "
                                     "template, but its tokenizer has none; set tokenizer.chat_template")
    if s_tpl == t_tpl:
        return
    if (s_tpl is None) != (t_tpl is None):
        has, lacks = ("student", "teacher") if s_tpl is not None else ("teacher", "student")
        what = f"chat_template: the {has} tokenizer has one and the {lacks} has none"
    else:
        what = "chat_template: student and teacher templates differ"
    if not chat:
        result.warnings.append(f"{what} (not used: prompts are plain text, data.format=prompt)")
    elif own:
        if s_tpl is not None and t_tpl is not None:
            result.aligned.append(f"{what}: each model renders the conversation with its own template")
    elif t_tpl is None:
        result.errors.append(f"{what}; the teacher would read the student's rendering of each conversation")
    else:
        result.errors.append(f"{what}; the teacher would read conversations in the student's format, not its own "
                             "(teacher.tokenizer=own renders them with the teacher's template)")


def check_tokenizers_agree(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    *,
    teacher_tokenizer: str = "same",
    chat: bool = False,
    teacher_name: str | None = None,
) -> TokenizerComparison:
    """Return :func:`compare_tokenizers`'s result, raising if it holds any error.

    Raises:
        TokenizerMismatchError: every error on one message, one line each, saying exactly what
            differs (e.g. ``eos_token_id: student 2 ('$') vs teacher 3 ('</s>')``), and the options
            that fix it (``student.tokenizer=<teacher_name>``, ``teacher.tokenizer=own``).
    """
    comparison = compare_tokenizers(student_tok, teacher_tok, teacher_tokenizer=teacher_tokenizer, chat=chat)
    if comparison.errors:
        raise TokenizerMismatchError(comparison, teacher_name)
    return comparison
