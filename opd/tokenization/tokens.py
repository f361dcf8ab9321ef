"""What a tokenizer's tokens spell: character offsets of a token sequence, the string of every
vocabulary entry, and the map between two vocabularies (no models, no torch math).

Offsets come from *incremental* decoding in context (``tokenizers``' ``DecodeStream``, primed with
the tokens that precede the completion): token ``i`` ends at the length of the text decoded so far,
or at ``None`` when it ends inside a character (a byte-level token holding part of a multi-byte
character: the stream yields nothing until the character is complete). Decoding in context keeps
the leading space of a SentencePiece ``▁word`` token that ``decode([id])`` alone would drop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

__all__ = ["PrefixIndex", "anchor_id", "decode_offsets", "special_role_ids", "token_strings", "vocab_map"]

#: Tokens of context used to decode a completion "in place" (enough for any decoder's look-behind).
_CONTEXT_TOKENS = 8
_REPLACEMENT = "\ufffd"


def _backend(tokenizer: PreTrainedTokenizerBase):
    return getattr(tokenizer, "backend_tokenizer", None)


def decode_offsets(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int],
                   context_ids: Sequence[int] = ()) -> tuple[str, list[int | None]]:
    """The text ``ids`` spell after ``context_ids``, and the character offset after each token
    (``None`` for a token that ends inside a character). Special tokens are decoded as their text."""
    ids = [int(i) for i in ids]
    context = [int(i) for i in context_ids][-_CONTEXT_TOKENS:]
    backend = _backend(tokenizer)
    text, ends = "", []
    if backend is not None:
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(ids=context, skip_special_tokens=False) if context else DecodeStream(
            skip_special_tokens=False)
        for i in ids:
            chunk = stream.step(backend, i)
            if chunk is None:
                ends.append(None)
            else:
                text += chunk
                ends.append(len(text))
        return text, ends
    # slow tokenizers: decode growing prefixes; a prefix that does not extend the text so far
    # (a replacement character for an unfinished byte sequence) is not a boundary
    base = tokenizer.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for n in range(1, len(ids) + 1):
        full = tokenizer.decode(context + ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = full[len(base):] if full.startswith(base) else full
        if piece.startswith(text) and not piece.endswith(_REPLACEMENT):
            text = piece
            ends.append(len(text))
        else:
            ends.append(None)
    return text, ends


def special_role_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """``{role: id}`` for the bos / eos / pad / unk tokens the tokenizer has."""
    out = {}
    for role in ("bos", "eos", "pad", "unk"):
        value = getattr(tokenizer, f"{role}_token_id", None)
        if value is not None:
            out[role] = int(value)
    return out


def anchor_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """An ordinary token whose text is one visible character: the context in which every other
    token is decoded by :func:`token_strings` (so a SentencePiece ``▁`` reads as a space)."""
    special = set(tokenizer.all_special_ids)
    for candidate in ("a", "0", "x", "="):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in special:
            text, ends = decode_offsets(tokenizer, ids)
            if text.strip() == candidate:
                return int(ids[0])
    for i in sorted(tokenizer.get_vocab().values()):
        if i in special:
            continue
        text, ends = decode_offsets(tokenizer, [i])
        if len(text) == 1 and text.strip() and ends[-1] is not None:
            return int(i)
    raise ValueError("the tokenizer has no ordinary single-character token to decode other tokens after")


def token_strings(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """The text of every ordinary (non-special) token decoded after :func:`anchor_id`; tokens that
    hold part of a character (no complete text on their own) and empty tokens are left out."""
    anchor = anchor_id(tokenizer)
    special = set(tokenizer.all_special_ids)
    out = {}
    for i in sorted(set(tokenizer.get_vocab().values())):
        if i in special:
            continue
        text, ends = decode_offsets(tokenizer, [i], context_ids=[anchor])
        if ends[-1] is not None and text and _REPLACEMENT not in text:
            out[int(i)] = text
    return out


def vocab_map(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
              student_vocab_size: int | None = None,
              student_strings: dict[int, str] | None = None,
              teacher_strings: dict[int, str] | None = None) -> list[int]:
    """For every student id, the teacher id of the token with the same text (``-1``: none).

    Ordinary tokens map when their in-context texts (:func:`token_strings`) are equal (the lowest
    teacher id wins a tie); special tokens map by role (student EOS → teacher EOS, BOS → BOS, ...).
    The list has ``student_vocab_size`` entries (default ``len(student_tok)``; a padded LM head
    has extra ids, which map to nothing).
    """
    s_strings = token_strings(student_tok) if student_strings is None else student_strings
    t_strings = token_strings(teacher_tok) if teacher_strings is None else teacher_strings
    by_text: dict[str, int] = {}
    for i, text in sorted(t_strings.items()):
        by_text.setdefault(text, i)
    size = len(student_tok) if student_vocab_size is None else student_vocab_size
    out = [-1] * size
    for i, text in s_strings.items():
        if i < size and text in by_text:
            out[i] = by_text[text]
    t_roles = special_role_ids(teacher_tok)
    for role, i in special_role_ids(student_tok).items():
        if i < size and role in t_roles:
            out[i] = t_roles[role]
    return out


class PrefixIndex:
    """The teacher tokens whose text begins with a given string, found by binary search over the
    sorted token texts (:func:`token_strings`)."""

    def __init__(self, strings: dict[int, str]):
        items = sorted((text, i) for i, text in strings.items() if text)
        self.keys = [text for text, _ in items]
        self.ids = [i for _, i in items]

    def ids_with_prefix(self, prefix: str) -> list[int]:
        """Ids of the tokens whose text starts with ``prefix`` (non-empty)."""
        if not prefix:
            return list(self.ids)
        lo = bisect_left(self.keys, prefix)
        last = ord(prefix[-1])
        if last >= 0x10FFFF:
            hi = len(self.keys)
            while hi > lo and not self.keys[hi - 1].startswith(prefix):
                hi -= 1
        else:
            hi = bisect_left(self.keys, prefix[:-1] + chr(last + 1))
        return self.ids[lo:hi]
