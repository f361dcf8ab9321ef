"""Cross-tokenizer distillation: align two tokenizations of one text by character offsets, merge a
teacher's log-probs onto the student's tokens, map vocabularies by token text, and the ULD distance
for the mass the vocabularies do not share.

* :mod:`opd.xtok.tokens` — character offsets of a token sequence (incremental decoding in context),
  the text of every token, the student → teacher vocabulary map, a prefix index of token texts;
* :mod:`opd.xtok.align` — the teacher's log-prob of every student token (exact sums over spans);
* :mod:`opd.xtok.uld` — ULD (arXiv 2402.12030) and the GOLD-style hybrid route-1 loss;
* :mod:`opd.xtok.diagnostics` — alignment shares for the logs and the preflight report.

The teacher built on these is :class:`opd.teachers.CrossTokenizerTeacher`.
"""

from opd.xtok.align import Alignment, align_tokens, common_boundaries, teacher_units
from opd.xtok.diagnostics import BoundaryAlignment, alignment_metrics, boundary_alignment
from opd.xtok.tokens import PrefixIndex, decode_offsets, special_role_ids, token_strings, vocab_map

__all__ = [
    "Alignment",
    "BoundaryAlignment",
    "alignment_metrics",
    "boundary_alignment",
    "PrefixIndex",
    "align_tokens",
    "common_boundaries",
    "decode_offsets",
    "special_role_ids",
    "teacher_units",
    "token_strings",
    "vocab_map",
]
