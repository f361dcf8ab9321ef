"""The built-in ``arith`` task: multi-digit addition, written least-significant digit first.

Format (``digits=3``, ``reverse_operands=True``, the default)::

    a = 123, b = 45, a + b = 168
    prompt            "321+540="        operands zero-padded to ``digits`` and reversed
    tokenized prompt  ^ 3 2 1 + 5 4 0 =  (the tokenizer prepends BOS "^")
    completion        "861$"            the sum reversed (least-significant digit first),
                                        without the sum's leading zeros, then EOS "$"
    Example.answer    "861"
    teacher_context   "861|"            (``context="answer"``) the reversed answer and the
                                        separator "|"; a privileged teacher reads
                                        "^861|321+540="; ``context="none"`` gives ``None``

With ``reverse_operands=False`` the operands are zero-padded but written most-significant digit
first (``"123+045="``); the completion is reversed either way. Writing everything
least-significant first keeps the distance between an answer digit and the operand digits that
produce it constant, which a RoPE model learns much faster (feasibility notes, "Deviation 2").
Every prompt of a task has the same length, so batches need no padding. A completion has at
most ``digits + 2`` tokens (``digits + 1`` sum digits and EOS): :attr:`ArithTask.max_new_tokens`.

Held-out set: ``eval_size`` distinct operand pairs drawn once from ``seed``; training sampling
redraws any pair that is in it, so the two never overlap.

Verifier: exact match of the completion text before the first EOS with the answer; a completion
without EOS (truncated) scores 0. Decode completions with ``skip_special_tokens=False``. The EOS
string is the scored model's own (``eos_token``, default ``"$"`` of :func:`arith_tokenizer`): a model
with another tokenizer (``builtin:arith_bpe/teacher`` ends with ``"</s>"``) is scored through
:func:`opd.evaluate.verifier_texts`, which rewrites each completion's own stop token into this one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerFast

from opd.tasks.assets import shipped_checkpoint
from opd.tasks.base import Example, draw_training_examples
from opd.tokenization import char_tokenizer

__all__ = [
    "ARITH_ALPHABET",
    "ARITH_CHECKPOINTS",
    "ARITH_EOS",
    "ARITH_HINT_SEPARATOR",
    "ArithTask",
    "arith_checkpoint",
    "arith_tokenizer",
]

#: Separator between the teacher-only hint and the prompt.
ARITH_HINT_SEPARATOR = "|"
#: The ordinary characters of the task (the tokenizer adds pad, bos, eos, unk in front).
ARITH_ALPHABET = "0123456789+=" + ARITH_HINT_SEPARATOR
#: The EOS string of :func:`arith_tokenizer`.
ARITH_EOS = "$"
#: Names of the checkpoints shipped in ``opd/assets/arith/``.
ARITH_CHECKPOINTS = ("teacher", "student", "smoke_teacher", "smoke_student")

def arith_tokenizer() -> PreTrainedTokenizerFast:
    """The task's character tokenizer: ``_``=pad 0, ``^``=bos 1, ``$``=eos 2, ``?``=unk 3, then
    ``0``-``9`` = 4-13, ``+`` = 14, ``=`` = 15, ``|`` = 16 (vocabulary size 17)."""
    return char_tokenizer(ARITH_ALPHABET, bos="^", eos=ARITH_EOS, pad="_", unk="?")


def arith_checkpoint(name: str) -> Path:
    """Folder of a shipped checkpoint: ``teacher``, ``student`` (3-digit), ``smoke_teacher``,
    ``smoke_student`` (2-digit). Load it with :func:`opd.models.load_model`.

    Raises:
        ValueError: unknown name. FileNotFoundError: the checkpoint was not generated; run
            ``opd make-checkpoints arith``.
    """
    return shipped_checkpoint("arith", name, ARITH_CHECKPOINTS, make="opd make-checkpoints arith")


class ArithTask:
    """Addition of two ``digits``-digit numbers (see the module docstring for the exact format).

    Args:
        digits: operand width (1-12); operands are uniform in ``[0, 10**digits)``.
        reverse_operands: write the operands least-significant digit first (recommended).
        eval_size: size of the fixed held-out set (at most half of the ``10**(2*digits)`` pairs).
        seed: seed of the held-out set and of the training stream.
        context: ``"answer"`` gives every example a teacher-only hint (the reversed answer
            and ``"|"``); ``"none"`` gives no teacher context.
        eos_token: the EOS string that ends a completion for :meth:`verify` (the scored model's
            tokenizer's; default ``"$"``).
    """

    name = "arith"

    def __init__(
        self,
        digits: int = 3,
        reverse_operands: bool = True,
        eval_size: int = 500,
        seed: int = 0,
        context: Literal["answer", "none"] = "answer",
        eos_token: str = ARITH_EOS,
    ):
        if not isinstance(digits, int) or not 1 <= digits <= 12:
            raise ValueError(f"digits must be an integer in [1, 12], got {digits!r}")
        n_pairs = 10 ** (2 * digits)
        if not isinstance(eval_size, int) or not 1 <= eval_size <= n_pairs // 2:
            raise ValueError(
                f"eval_size must be an integer in [1, {n_pairs // 2}] for digits={digits} "
                f"(at most half of the {n_pairs} operand pairs), got {eval_size!r}"
            )
        if context not in ("answer", "none"):
            raise ValueError(f"context must be 'answer' or 'none', got {context!r}")
        self.digits = digits
        self.reverse_operands = reverse_operands
        self.eval_size = eval_size
        self.seed = seed
        self.context = context
        if not isinstance(eos_token, str) or not eos_token:
            raise ValueError(f"eos_token must be a non-empty string (the tokenizer's EOS), got {eos_token!r}")
        self.eos_token = eos_token
        self.max_new_tokens = digits + 2
        rng = random.Random(f"arith-eval:{digits}:{seed}")
        pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set
        while len(pairs) < eval_size:
            pairs[self._draw(rng)] = None
        self._eval_pairs = list(pairs)
        self._eval_set = frozenset(pairs)

    def __repr__(self) -> str:
        return (f"ArithTask(digits={self.digits}, reverse_operands={self.reverse_operands}, "
                f"eval_size={self.eval_size}, seed={self.seed}, context={self.context!r})")

    def _draw(self, rng: random.Random) -> tuple[int, int]:
        high = 10**self.digits - 1
        return rng.randint(0, high), rng.randint(0, high)

    def _operand(self, x: int) -> str:
        s = str(x).zfill(self.digits)
        return s[::-1] if self.reverse_operands else s

    def prompt(self, a: int, b: int) -> str:
        """The prompt text for ``a + b`` (without BOS), e.g. ``"321+540="``."""
        return f"{self._operand(a)}+{self._operand(b)}="

    @staticmethod
    def answer(a: int, b: int) -> str:
        """The reference answer for ``a + b``: the sum's decimal digits reversed, e.g. ``"861"``."""
        return str(a + b)[::-1]

    def example(self, a: int, b: int) -> Example:
        """The :class:`Example` for ``a + b``."""
        answer = self.answer(a, b)
        hint = answer + ARITH_HINT_SEPARATOR if self.context == "answer" else None
        return Example(prompt=self.prompt(a, b), answer=answer, teacher_context=hint,
                       fields={"a": a, "b": b, "digits": self.digits})

    def train_examples(self, step: int, batch_size: int, seed: int) -> list[Example]:
        """``batch_size`` uniformly drawn problems for ``step``, never from the held-out set.

        A pure function of ``(self.digits, self.seed, seed, step, batch_size)``.
        """
        rng = random.Random(f"arith-train:{self.digits}:{self.seed}:{seed}:{step}")
        return draw_training_examples(step, batch_size, rng, self._draw, self._eval_set, lambda ab: self.example(*ab))

    def eval_examples(self, n: int | None = None) -> list[Example]:
        """The first ``n`` (default: all ``eval_size``) held-out examples, always the same ones."""
        n = self.eval_size if n is None else n
        if not 1 <= n <= self.eval_size:
            raise ValueError(f"n must be in [1, eval_size={self.eval_size}], got {n}; raise eval_size for more")
        return [self.example(a, b) for a, b in self._eval_pairs[:n]]

    def verify(self, example: Example, completion: str) -> float:
        """1.0 when the completion up to its first EOS (:attr:`eos_token`) equals ``example.answer``.

        ``completion`` is the generated text after the prompt, decoded with special tokens kept;
        anything after the first EOS (e.g. padding) is ignored. No EOS means the rollout was
        truncated before the model stopped: 0.0.
        """
        if example.answer is None:
            raise ValueError("example.answer is None; arith examples always carry the reference answer")
        head, sep, _ = completion.partition(self.eos_token)
        return 1.0 if sep and head == example.answer else 0.0
