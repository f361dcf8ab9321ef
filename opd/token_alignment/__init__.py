"""Cross-tokenizer alignment: align two tokenizations of one text by character offsets, merge a
teacher's log-probs onto the student's tokens, and the ULD distance for the mass the vocabularies
do not share. What one tokenizer's tokens spell (offsets, token texts, the vocabulary map) is
:mod:`opd.tokenization`, which this builds on.

* :mod:`opd.token_alignment.align` — the teacher's log-prob of every student token (exact sums over spans);
* :mod:`opd.token_alignment.uld` — ULD (arXiv 2402.12030) and the GOLD-style hybrid route-1 loss;
* :mod:`opd.token_alignment.diagnostics` — alignment shares for the logs (``xtok/*`` metrics) and
  the preflight report.

The teacher built on these is :class:`opd.teachers.CrossTokenizerTeacher`.
"""

from opd.token_alignment.align import Alignment, align_tokens, common_boundaries, teacher_units
from opd.token_alignment.diagnostics import BoundaryAlignment, alignment_metrics, boundary_alignment

__all__ = [
    "Alignment",
    "BoundaryAlignment",
    "align_tokens",
    "alignment_metrics",
    "boundary_alignment",
    "common_boundaries",
    "teacher_units",
]
