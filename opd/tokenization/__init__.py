"""Tokenizer utilities: build the tiny character tokenizers, read a tokenizer's token texts and
character offsets, map one vocabulary onto another, and check that a teacher's tokenizer agrees with
the student's.

* :mod:`opd.tokenization.char` — :func:`char_tokenizer` (the built-in tasks' tokenizers);
* :mod:`opd.tokenization.tokens` — :func:`token_strings`, :func:`decode_offsets` (character offsets
  of a token sequence), :func:`vocab_map` (student → teacher ids by token text), :class:`PrefixIndex`;
* :mod:`opd.tokenization.compare` — :func:`compare_tokenizers`, :func:`check_tokenizers_agree`.

Aligning two tokenizations of one text (the cross-tokenizer teacher) is :mod:`opd.token_alignment`,
built on these.
"""

from opd.tokenization.char import char_tokenizer
from opd.tokenization.compare import (
    TokenizerComparison,
    TokenizerMismatchError,
    check_tokenizers_agree,
    compare_tokenizers,
)
from opd.tokenization.tokens import PrefixIndex, decode_offsets, special_role_ids, token_strings, vocab_map

__all__ = [
    "PrefixIndex",
    "TokenizerComparison",
    "TokenizerMismatchError",
    "char_tokenizer",
    "check_tokenizers_agree",
    "compare_tokenizers",
    "decode_offsets",
    "special_role_ids",
    "token_strings",
    "vocab_map",
]
