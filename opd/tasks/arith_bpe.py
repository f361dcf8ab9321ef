"""The arith teacher with a tokenizer of its own: the cross-tokenizer demo pair.

``builtin:arith_bpe/teacher`` solves the built-in ``arith`` task (3-digit addition written least
significant digit first, :mod:`opd.tasks.arith`) like ``builtin:arith/teacher``, but reads and writes
through a byte-pair-encoding tokenizer trained on the task's text (:func:`arith_bpe_tokenizer`):
32 tokens — its own special tokens ``<pad> <s> </s> <unk>``, the 13 characters and 15 merges of
digit pairs such as ``"41"``, ``"09"``, ``"86"`` (``+``, ``=`` and ``|`` stay tokens of their own) —
where the shipped student uses one token per character with ``_ ^ $ ?``. The two vocabularies share
the single characters; on the 500 held-out answers, 60 % of the student's tokens start and end on
teacher token boundaries (``opd.xtok.boundary_alignment``), so both the exact and the split parts
of the alignment are exercised. Distil it into the character-level student with
``teacher.tokenizer=own`` (docs/data_formats.md).

``python scripts/make_xtok_checkpoints.py`` (:func:`main`) trains it deterministically on the ground
truth (prompt and answer tokenized separately, as the cross-tokenizer teacher scores a completion)
until 99 % greedy held-out accuracy and writes ``opd/assets/arith_bpe/teacher`` with an
``opd_card.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from opd.tasks.arith import ARITH_ALPHABET, ArithTask
from opd.tasks.base import Example
from opd.tasks.shipped import save_shipped_checkpoint
from opd.tasks.tiny_sft import SFTPhase, train_sft

__all__ = ["ARITH_BPE_CHECKPOINTS", "TEACHER_PHASE", "arith_bpe_checkpoint", "arith_bpe_tokenizer", "main"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "arith_bpe"
ARITH_BPE_CHECKPOINTS = ("teacher",)
#: Vocabulary size of the teacher's BPE tokenizer (4 special tokens + 13 characters + 15 merges).
BPE_VOCAB = 32
#: Training corpus of the BPE merges: prompts and answers of this many ``arith`` training batches.
_BPE_CORPUS_STEPS = 40

TEACHER_PHASE = SFTPhase("teacher", layers=3, hidden=128, lr=1e-3, batch_size=128, warmup=100, max_steps=2500,
                         target=0.99, min_accuracy=0.97, eval_every=50, eval_every_rising=25)


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
        ValueError: unknown name. FileNotFoundError: not generated; run ``python scripts/make_xtok_checkpoints.py``.
    """
    if name not in ARITH_BPE_CHECKPOINTS:
        raise ValueError(f"unknown arith_bpe checkpoint {name!r}; choose one of {list(ARITH_BPE_CHECKPOINTS)}")
    path = _ASSETS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the checkpoint arith_bpe/{name} is missing at {path}; regenerate it with "
                                "`python scripts/make_xtok_checkpoints.py`")
    return path


def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example],
                    max_new_tokens: int) -> float:
    """Exact match of the greedy completion (decoded up to the EOS, which must be there)."""
    from opd.rollout import generate_rollouts

    rollouts = generate_rollouts(model, tokenizer, list(examples), max_new_tokens=max_new_tokens, greedy=True)
    eos = int(tokenizer.eos_token_id)
    correct = 0
    for ids, mask, e in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, examples, strict=True):
        row = ids[mask.bool()].tolist()
        if row and row[-1] == eos:
            correct += tokenizer.decode(row[:-1], skip_special_tokens=True) == e.answer
    return correct / len(examples)


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save ``opd/assets/arith_bpe/teacher``; 0 on success, 1 when it missed its range."""
    import transformers

    parser = argparse.ArgumentParser(prog="make_xtok_checkpoints",
                                     description="Train the arith teacher with its own BPE tokenizer (cross-tokenizer "
                                                 "demo; deterministic, a few minutes on 2 CPU cores).")
    parser.add_argument("--out", type=Path, default=_ASSETS, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2; changes the numerics)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    transformers.utils.logging.disable_progress_bar()
    tokenizer = arith_bpe_tokenizer()
    task = ArithTask(digits=3, eval_size=500, seed=0)
    eos = int(tokenizer.eos_token_id)
    phase = SFTPhase(**{**TEACHER_PHASE.__dict__, "seed": args.seed})

    def batch(step: int):
        examples = task.train_examples(step, phase.batch_size, seed=phase.seed)
        prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
        answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
        return prompts, answers

    held_out = task.eval_examples()
    started = time.perf_counter()
    print(f"training arith_bpe/teacher: {phase.layers}x{phase.hidden}, BPE vocabulary {len(tokenizer)}", flush=True)
    try:
        model, card = train_sft(phase, tokenizer, batch,
                                lambda m: greedy_accuracy(m, tokenizer, held_out, task.max_new_tokens),
                                log=lambda s: print(s, flush=True))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    card.update(task=repr(task), heldout_size=len(held_out), tokenizer=f"BPE, {len(tokenizer)} tokens",
                command="python scripts/make_xtok_checkpoints.py " + " ".join(sys.argv[1:] if argv is None else argv))
    size = save_shipped_checkpoint(model, tokenizer, card, args.out / "teacher")
    print(f"arith_bpe/teacher: {card['parameters']:,} parameters, {size / 1e6:.2f} MB, held-out accuracy "
          f"{card['heldout_accuracy']:.1%} after {card['steps']} steps ({card['train_seconds']:.0f} s training); "
          f"total {time.perf_counter() - started:.0f} s; written to {args.out / 'teacher'}")
    return 0
