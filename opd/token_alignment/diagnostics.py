"""How well two tokenizations line up: per-step shares from a teacher's feedback, and a model-free
measurement on sample texts for the preflight report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opd.tokenization.tokens import decode_offsets
from opd.types import Feedback

__all__ = ["BoundaryAlignment", "alignment_metrics", "boundary_alignment"]


def alignment_metrics(feedback: Feedback, mask_BT: Tensor) -> dict[str, float]:
    """``xtok/token_aligned_frac``: share of the counted student tokens whose both ends are teacher
    token boundaries (their teacher log-prob is an exact merge); ``xtok/state_aligned_frac``: share
    whose state is a teacher state (the teacher's distribution is defined there). Empty for a
    teacher that shares the student's tokenizer."""
    cv = feedback.cross_vocab
    if cv is None:
        return {}
    m = mask_BT.bool().to(cv.token_aligned_BT.device)
    n = float(m.sum().clamp(min=1))
    return {"xtok/token_aligned_frac": float((cv.token_aligned_BT & m).sum()) / n,
            "xtok/state_aligned_frac": float((cv.state_aligned_BT & m).sum()) / n}


@dataclass(frozen=True)
class BoundaryAlignment:
    """On sample texts: ``token_aligned`` — share of student tokens whose both ends are teacher token
    boundaries; ``text_match`` — share of texts the teacher's tokenizer spells back exactly (the
    rest can only be aligned as a whole); ``tokens`` / ``texts`` — how many were measured."""

    token_aligned: float
    text_match: float
    tokens: int
    texts: int


def boundary_alignment(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
                       texts: Iterable[str]) -> BoundaryAlignment:
    """Tokenize each text with both tokenizers (no special tokens) and measure the alignment."""
    aligned = total = matched = n_texts = 0
    for text in texts:
        s_text, s_ends = decode_offsets(student_tok, student_tok(text, add_special_tokens=False)["input_ids"])
        if not s_ends:
            continue
        n_texts += 1
        total += len(s_ends)
        t_text, t_ends = decode_offsets(teacher_tok, teacher_tok(s_text, add_special_tokens=False)["input_ids"])
        if t_text != s_text:
            continue
        matched += 1
        bounds = {0} | {e for e in t_ends if e is not None}
        prev, clean_start = 0, True
        for e in s_ends:
            if e is None:
                clean_start = False
                continue
            aligned += clean_start and prev in bounds and e in bounds
            prev, clean_start = e, True
    return BoundaryAlignment(token_aligned=aligned / max(total, 1), text_match=matched / max(n_texts, 1),
                             tokens=total, texts=n_texts)
