"""The arith teacher with a tokenizer of its own: the cross-tokenizer demo pair.

``builtin:arith_bpe/teacher`` solves the built-in ``arith`` task (3-digit addition written least
significant digit first, :mod:`opd.tasks.arith`) like ``builtin:arith/teacher``, but reads and writes
through a byte-pair-encoding tokenizer trained on the task's text (:func:`arith_bpe_tokenizer`):
32 tokens — its own special tokens ``<pad> <s> </s> <unk>``, the 13 characters and 15 merges of
digit pairs such as ``"41"``, ``"09"``, ``"86"`` (``+``, ``=`` and ``|`` stay tokens of their own) —
where the shipped student uses one token per character with ``_ ^ $ ?``. The two vocabularies share
the single characters; on the 500 held-out answers, 60 % of the student's tokens start and end on
teacher token boundaries (``opd.token_alignment.boundary_alignment``), so both the exact and the split parts
of the alignment are exercised. Distil it into the character-level student with
``teacher.tokenizer=own`` (docs/data_formats.md).

``opd make-checkpoints arith_bpe`` (:mod:`opd.shipped.arith_bpe`) trains it deterministically on the
ground truth (prompt and answer tokenized separately, as the cross-tokenizer teacher scores a
completion) until 99 % greedy held-out accuracy and writes ``opd/assets/arith_bpe/teacher`` with an
``opd_card.json``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from opd.tasks.arith import ARITH_ALPHABET, ArithTask
from opd.tasks.assets import shipped_checkpoint

__all__ = ["ARITH_BPE_CHECKPOINTS", "BPE_VOCAB", "arith_bpe_checkpoint", "arith_bpe_tokenizer"]

ARITH_BPE_CHECKPOINTS = ("teacher",)
#: Vocabulary size of the teacher's BPE tokenizer (4 special tokens + 13 characters + 15 merges).
BPE_VOCAB = 32
#: Training corpus of the BPE merges: prompts and answers of this many ``arith`` training batches.
_BPE_CORPUS_STEPS = 40


def arith_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """The teacher's BPE tokenizer, trained deterministically on prompts and answers of the ``arith``
    task (3 digits): ids ``<pad>=0, <s>=1, </s>=2, <unk>=3``, then characters and merges; BOS
    ``<s>`` prepended by the post-processor; left padding."""
    task = ArithTask(digits=3, eval_size=500, seed=0)
    texts = []
    for step in range(_BPE_CORPUS_STEPS):
        for e in task.train_examples(step, 128, seed=12345):
            texts += [e.prompt, e.answer]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # merges stay inside runs of digits: "+", "=" and "|" are tokens of their own
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[+=|]"), behavior="isolated")
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=specials, initial_alphabet=list(ARITH_ALPHABET), show_progress=False))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def arith_bpe_checkpoint(name: str) -> Path:
    """Folder of a shipped checkpoint (``teacher``).

    Raises:
        ValueError: unknown name. FileNotFoundError: not generated; run ``opd make-checkpoints arith_bpe``.
    """
    return shipped_checkpoint("arith_bpe", name, ARITH_BPE_CHECKPOINTS, make="opd make-checkpoints arith_bpe")

