"""Character-level tokenizers built in-process: one token per character, ids ``pad=0, bos=1, eos=2,
unk=3`` followed by the alphabet in order, BOS prepended by the post-processor, left padding for
batched generation. Used by the built-in tasks and the tests; a regular ``transformers`` fast
tokenizer, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it with no custom
code and no download.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["char_tokenizer"]


def char_tokenizer(
    alphabet: str,
    *,
    bos: str = "^",
    eos: str = "$",
    pad: str = "_",
    unk: str = "?",
) -> PreTrainedTokenizerFast:
    """Build a one-token-per-character fast tokenizer for ``alphabet``.

    Ids: ``pad=0, bos=1, eos=2, unk=3``, then the characters of ``alphabet`` in order, so the
    vocabulary size is ``len(alphabet) + 4``. Encoding ``"12+"`` gives ``[bos, '1', '2', '+']``
    (the BOS comes from a ``TemplateProcessing`` post-processor; pass
    ``add_special_tokens=False`` to leave it out). The special strings written inside a text are
    parsed as their special tokens, so ``"861$"`` encodes the answer followed by EOS. Characters
    outside the alphabet become ``unk``. Decoding concatenates characters without spaces;
    ``skip_special_tokens=True`` drops bos/eos/pad/unk. Padding is on the left, as batched
    generation with a decoder-only model needs.

    Args:
        alphabet: the ordinary characters, each a single character, no repeats.
        bos, eos, pad, unk: the special-token strings; distinct and not in ``alphabet``.

    Returns:
        A ``transformers`` fast tokenizer whose ``save_pretrained`` folder loads back with
        ``AutoTokenizer.from_pretrained`` (offline) with the same ids and special tokens.

    Raises:
        ValueError: empty alphabet, a multi-character or repeated alphabet entry, or special
            tokens that collide with each other or with the alphabet.
    """
    if not alphabet:
        raise ValueError("alphabet is empty; pass the characters the tokenizer must know, e.g. '0123456789+='")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats the characters {repeated}; list each character once")
    specials = {"pad": pad, "bos": bos, "eos": eos, "unk": unk}
    for role, tok in specials.items():
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"{role} must be a non-empty string, got {tok!r}")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"special tokens must be distinct, got {specials}")
    clashes = {role: tok for role, tok in specials.items() if tok in alphabet}
    if clashes:
        raise ValueError(
            f"special tokens {clashes} also appear in the alphabet {alphabet!r}; "
            "choose special strings outside the alphabet"
        )

    vocab = {tok: i for i, tok in enumerate([pad, bos, eos, unk, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # "." matches exactly one character: every character becomes its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, vocab[bos])]
    )
    backend.decoder = decoders.Fuse()  # join characters with no separator
    backend.add_special_tokens([pad, bos, eos, unk])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        padding_side="left",
    )
