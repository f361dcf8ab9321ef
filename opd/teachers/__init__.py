"""Teachers: score the student's completions in the teacher's own context and return :class:`Feedback`.

A teacher reads ``teacher prompt ++ student completion`` and returns, for every completion token
``y_t``, at the teacher temperature ``τ``::

    sampled_logprobs_BT[b, t] = log softmax(z_T(s_t^T) / τ)[y_t]                   (always)
    topk_ids_BTK, topk_logprobs_BTK = topk(log softmax(z_T / τ), K)                (access topk/full)
    logits_BTV = z_T / τ        or   hidden_BTH, head_weight_VH = W/τ, head_bias_V = b/τ   (full)

Padding positions (``completion_mask_BT`` False) hold 0 in every tensor. The teacher prompt is the
example's prompt, optionally preceded by its teacher-only context
(``context_template.replace("{context}", example.teacher_context)``); the student's tokens are
appended unchanged, so the teacher scores exactly the tokens the student sampled.

Implementations: :class:`ModelTeacher` (an in-process causal LM), :class:`SelfTeacher` (the
student's own weights under a privileged context, frozen copy or live), :class:`RoutedTeacher`
(one teacher per value of an example field) and :class:`CrossTokenizerTeacher` (a model with its own
tokenizer: it scores the student's *text* and answers in the student's positions and vocabulary).
"""

from opd.teachers.base import LocalModel, Teacher, teacher_prompt_texts
from opd.teachers.cross_tokenizer import CrossTokenizerTeacher
from opd.teachers.model import ModelTeacher, SelfTeacher
from opd.teachers.routed import RoutedTeacher

__all__ = [
    "CrossTokenizerTeacher",
    "LocalModel",
    "ModelTeacher",
    "RoutedTeacher",
    "SelfTeacher",
    "Teacher",
    "teacher_prompt_texts",
]
