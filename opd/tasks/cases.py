"""Case-study tasks: small digit tasks built so that one prediction of the survey can show.

All the cases share one format and one character tokenizer (:func:`case_tokenizer`)::

    prompt      "305172="       n input digits x_1 … x_n, then "="  (the tokenizer prepends BOS "^")
    completion  "271503$"       the answer, then EOS "$"

and two transforms of the input, chosen for how hard they are for a tiny Llama with RoPE:

* ``rev(x)``  — the digits reversed: ``x_n … x_1``. Easy: the source of output ``i`` sits a fixed
  ``2i − 1`` positions behind it whatever ``n`` is;
* ``rsum(x)`` — running sums from the end, mod 10: ``y_i = (x_n + x_{n−1} + … + x_{n+1−i}) mod 10``.
  Hard: each output adds a digit to the previous output (a small teacher learns it after a loss
  plateau of several hundred steps; a smaller student stays on that plateau far longer).

=========  ======================================================================================
task       what a correct completion is (``n`` = ``length``, default 6)
=========  ======================================================================================
``fork``   ``"a" + rev(x)`` **or** ``"b" + rsum(x)``; the first token chooses the path. The shipped
           teacher takes path ``b`` 70 % of the time and completes both; the student completes only
           path ``a`` (temporal credit, case a).
``route``  any permutation of the input digits (several correct next tokens at every step: the
           digits not used yet); the teacher samples a uniformly random order (routing, case b).
``modes``  ``rev(x)`` **or** ``rsum(x)``, no marker: both start with ``x_n``; the second token
           (``x_{n−1}`` vs ``(x_n + x_{n−1}) mod 10``) decides. The teacher takes each half of the
           time; the student can produce ``x_{n−1}`` but not the sum (mode seeking, case c).
``long``   as ``route`` at any ``length`` (2–12; the input left-padded with ``a`` to 12 characters):
           the longer the answer, the more steps at which the student must track which digits are
           left (exposure bias, case d).
``reach``  as ``route`` (the same teacher, ``builtin:route/teacher``), but the student is built so that
           what it can reach and what the teacher supports differ on purpose: it writes the digits
           in ascending order only (the other remaining digits are correct but out of its reach) and
           slips to the wrong letters ``a`` / ``b``, which the teacher never writes (routing, case f).
=========  ======================================================================================

Held-out set: ``eval_size`` distinct inputs drawn once from ``seed``; training inputs that fall
in it are redrawn, so the two never overlap. Verifier: 1.0 when the completion before its first
EOS is a correct answer (any of the accepted ones), 0.0 otherwise (no EOS: truncated, 0.0).
:meth:`CaseTask.strategy` names which accepted answer a completion is (for the sampled
evaluation of a sweep: how often each mode is produced). The checkpoints are made by
:mod:`opd.tasks.case_checkpoints`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from opd.tasks.base import Example
from opd.tokenization import char_tokenizer

__all__ = [
    "CASE_ALPHABET",
    "CASE_CHECKPOINTS",
    "CASE_EOS",
    "CASE_TASKS",
    "CASE_TEACHER_OF",
    "CaseTask",
    "ForkTask",
    "LongTask",
    "ModesTask",
    "ReachTask",
    "RouteTask",
    "case_checkpoint",
    "case_tokenizer",
    "make_case_task",
    "rev",
    "rsum",
]

#: The ordinary characters of every case task (the tokenizer adds pad, bos, eos, unk in front).
CASE_ALPHABET = "0123456789=ab"
#: The EOS string of :func:`case_tokenizer`.
CASE_EOS = "$"
#: Names of the checkpoints shipped per case in ``opd/assets/<case>/``.
CASE_CHECKPOINTS = ("teacher", "student")

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def case_tokenizer() -> PreTrainedTokenizerFast:
    """The case tasks' character tokenizer: ``_``=pad 0, ``^``=bos 1, ``$``=eos 2, ``?``=unk 3,
    then ``0``-``9`` = 4-13, ``=`` = 14, ``a`` = 15, ``b`` = 16 (vocabulary size 17)."""
    return char_tokenizer(CASE_ALPHABET, bos="^", eos=CASE_EOS, pad="_", unk="?")


def rev(x: str) -> str:
    """``x`` reversed."""
    return x[::-1]


def rsum(x: str) -> str:
    """Running sums mod 10 from the end: ``y_i = (x_n + … + x_{n+1−i}) mod 10``; ``rsum("305")`` is
    ``"558"`` (5, 5+0, 5+0+3)."""
    total, out = 0, []
    for c in reversed(x):
        total = (total + int(c)) % 10
        out.append(str(total))
    return "".join(out)


class CaseTask(ABC):
    """Common machinery: inputs of ``length`` digits, a held-out set, the verifier.

    Subclasses define :meth:`answers` (the accepted completions of an input, each with a strategy
    name), :meth:`sample_answer` (the ground-truth distribution the teacher is trained on) and
    the class attributes ``name`` and ``default_length``.
    """

    name = "case"
    default_length = 6
    min_length, max_length = 2, 12  # the shipped checkpoints were trained at length 6 (long: 2-12)

    def __init__(self, length: int | None = None, eval_size: int = 500, seed: int = 0, eos_token: str = CASE_EOS):
        if not isinstance(eos_token, str) or not eos_token:
            raise ValueError(f"{self.name}: eos_token must be a non-empty string (the tokenizer's EOS), "
                             f"got {eos_token!r}")
        #: the EOS string that ends a completion (the scored model's tokenizer's; default ``"$"``)
        self.eos_token = eos_token
        length = self.default_length if length is None else length
        if not isinstance(length, int) or not self.min_length <= length <= self.max_length:
            raise ValueError(f"{self.name}: length must be an integer in [{self.min_length}, {self.max_length}], "
                             f"got {length!r}")
        cap = 10**length // 2
        if not isinstance(eval_size, int) or not 1 <= eval_size <= cap:
            raise ValueError(f"{self.name}: eval_size must be an integer in [1, {cap}] for length={length} "
                             f"(at most half of the {10**length} inputs), got {eval_size!r}")
        self.length, self.eval_size, self.seed = length, eval_size, seed
        rng = random.Random(f"{self.name}-eval:{length}:{seed}")
        inputs: dict[str, None] = {}  # insertion-ordered set
        while len(inputs) < eval_size:
            inputs[self._draw(rng)] = None
        self._eval_inputs = list(inputs)
        self._eval_set = frozenset(inputs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length}, eval_size={self.eval_size}, seed={self.seed})"

    @property
    def max_new_tokens(self) -> int:
        """The longest correct completion, EOS included."""
        return max(len(a) for a, _ in self.answers("0" * self.length)) + 1

    def _draw(self, rng: random.Random) -> str:
        return "".join(str(rng.randrange(10)) for _ in range(self.length))

    @abstractmethod
    def answers(self, x: str) -> list[tuple[str, str]]:
        """``(completion text without EOS, strategy name)`` for every accepted answer of input ``x``."""

    @abstractmethod
    def sample_answer(self, x: str, rng: random.Random) -> str:
        """One answer drawn from the distribution the shipped teacher is trained on."""

    def example(self, x: str) -> Example:
        """The :class:`Example` for input ``x`` (``answer``: the first accepted answer, for SFT
        baselines that use ``rollout.off_policy_source=answer``)."""
        return Example(prompt=x + "=", answer=self.answers(x)[0][0], fields={"x": x, "length": self.length})

    def train_examples(self, step: int, batch_size: int, seed: int) -> list[Example]:
        """``batch_size`` random inputs for ``step``, never from the held-out set; a pure function of
        ``(name, length, self.seed, seed, step, batch_size)``."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"step must be >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
        rng = random.Random(f"{self.name}-train:{self.length}:{self.seed}:{seed}:{step}")
        out: list[Example] = []
        while len(out) < batch_size:
            x = self._draw(rng)
            if x not in self._eval_set:
                out.append(self.example(x))
        return out

    def eval_examples(self, n: int | None = None) -> list[Example]:
        """The first ``n`` (default: all ``eval_size``) held-out examples, always the same ones."""
        n = self.eval_size if n is None else n
        if not 1 <= n <= self.eval_size:
            raise ValueError(f"n must be in [1, eval_size={self.eval_size}], got {n}; raise eval.size for more")
        return [self.example(x) for x in self._eval_inputs[:n]]

    def strategy(self, example: Example, completion: str) -> str:
        """The strategy of an accepted completion (e.g. ``"a"``), ``"wrong…"`` (``fork``: ``"wrong_a"`` /
        ``"wrong_b"`` when the path was chosen but not completed), or ``"truncated"`` (no EOS).
        ``completion`` is decoded with special tokens kept."""
        head, sep, _ = completion.partition(self.eos_token)
        if not sep:
            return "truncated"
        x = example.fields["x"]
        return next((name for text, name in self.answers(x) if text == head), self._other(x, head))

    def _other(self, x: str, head: str) -> str:
        return "wrong"

    def verify(self, example: Example, completion: str) -> float:
        """1.0 when the completion up to its first EOS is an accepted answer; else 0.0."""
        name = self.strategy(example, completion)
        return 0.0 if name == "truncated" or name.startswith("wrong") else 1.0


class ForkTask(CaseTask):
    """Case (a), temporal credit: ``"a" + rev(x)`` (easy) or ``"b" + rsum(x)`` (hard).

    ``p_hard`` is the teacher's share of path ``b`` in its training data (0.7): the teacher prefers
    the path the student cannot complete, so a student that copies the teacher's first-token
    distribution mostly fails, and only credit that carries the later disagreement back to the
    first token can move it to path ``a``.
    """

    name = "fork"
    p_hard = 0.7

    def answers(self, x: str) -> list[tuple[str, str]]:
        return [("a" + rev(x), "a"), ("b" + rsum(x), "b")]

    def sample_answer(self, x: str, rng: random.Random) -> str:
        return "b" + rsum(x) if rng.random() < self.p_hard else "a" + rev(x)

    def _other(self, x: str, head: str) -> str:
        return f"wrong_{head[0]}" if head[:1] in ("a", "b") else "wrong"


class RouteTask(CaseTask):
    """Case (b), routing: any permutation of the input digits. At every step the correct next
    tokens are the digits not used yet; the teacher is trained on uniformly random orders."""

    name = "route"

    def answers(self, x: str) -> list[tuple[str, str]]:
        return [("".join(sorted(x)), "sorted")]  # one representative; verify() accepts any order

    def sample_answer(self, x: str, rng: random.Random) -> str:
        digits = list(x)
        rng.shuffle(digits)
        return "".join(digits)

    def strategy(self, example: Example, completion: str) -> str:
        head, sep, _ = completion.partition(self.eos_token)
        if not sep:
            return "truncated"
        x = example.fields["x"]
        if Counter(head) != Counter(x):
            return "wrong"
        return "sorted" if head == "".join(sorted(x)) else "reversed" if head == rev(x) else "other_order"


class ModesTask(CaseTask):
    """Case (c), a multimodal teacher: ``rev(x)`` or ``rsum(x)`` with no marker, half of the time each."""

    name = "modes"

    def answers(self, x: str) -> list[tuple[str, str]]:
        return [(rev(x), "rev"), (rsum(x), "rsum")]

    def sample_answer(self, x: str, rng: random.Random) -> str:
        return rsum(x) if rng.random() < 0.5 else rev(x)


class LongTask(RouteTask):
    """Case (d), long outputs: any permutation of the input digits (as ``route``) at any ``length`` up
    to :attr:`WIDTH`; the teacher is trained on uniformly random orders.

    The input is left-padded with ``"a"`` to :attr:`WIDTH` characters (``"aaaaaa305172="`` for length
    6), so every length puts the digits at the same positions before ``"="`` and one teacher serves
    all lengths. (Running sums ``rsum`` at unpadded lengths 2-16 left a 2 x 64 teacher at 1-29 % after
    1000-1400 steps, padded lengths 2-12 at 3 % after 1450 steps.)
    """

    name = "long"
    WIDTH = 12

    def example(self, x: str) -> Example:
        return Example(prompt="a" * (self.WIDTH - len(x)) + x + "=", answer="".join(sorted(x)),
                       fields={"x": x, "length": self.length})


class ReachTask(RouteTask):
    """Case (f), reachable set ≠ teacher support: any permutation of the input digits (as ``route``;
    the teacher is the route teacher, trained on uniformly random orders).

    The student is warm-started on a *designed* distribution (:meth:`student_answer`), not on the
    teacher's samples: at position ``i`` it writes ``sorted(x)[i]`` with probability
    :attr:`p_sorted` and otherwise one of :attr:`slips` (``a``/``b``, never correct). So at every
    step the teacher supports every remaining digit ``{y} ∪ X`` (``y`` the next digit in ascending
    order), the student reaches ``y`` (≈ 0.5) and the wrong ``a``/``b`` (≈ 0.25 each) but not ``X``;
    and because its ``i``-th digit is tied to the position, a prefix that leaves ascending order
    (an ``X`` digit) is one it cannot complete.
    """

    name = "reach"
    p_sorted = 0.5
    slips = ("a", "b")

    def student_answer(self, x: str, rng: random.Random) -> str:
        """One completion of the student's designed warm-start distribution (see the class docstring)."""
        return "".join(d if rng.random() < self.p_sorted else rng.choice(self.slips) for d in sorted(x))


#: The case tasks by name.
CASE_TASKS: dict[str, type[CaseTask]] = {t.name: t for t in (ForkTask, RouteTask, ModesTask, LongTask, ReachTask)}
#: Cases whose teacher is another case's shipped teacher (same ground-truth distribution).
CASE_TEACHER_OF: dict[str, str] = {"reach": "route"}


def make_case_task(name: str, length: int | None = None, eval_size: int = 500, seed: int = 0,
                   eos_token: str = CASE_EOS) -> CaseTask:
    """The case task ``name`` (``fork``, ``route``, ``modes``, ``long``, ``reach``); ``eos_token``: the EOS string
    of the scored model's tokenizer."""
    if name not in CASE_TASKS:
        raise ValueError(f"unknown case task {name!r}; choose one of {sorted(CASE_TASKS)}")
    return CASE_TASKS[name](length=length, eval_size=eval_size, seed=seed, eos_token=eos_token)


def case_checkpoint(case: str, name: str) -> Path:
    """Folder of a shipped case checkpoint (``builtin:<case>/<name>``, name ``teacher`` or ``student``;
    ``reach``'s teacher is ``route``'s, :data:`CASE_TEACHER_OF`).

    Raises:
        ValueError: unknown case or name. FileNotFoundError: not generated; run
            ``python scripts/make_case_checkpoints.py``.
    """
    if case not in CASE_TASKS or name not in CASE_CHECKPOINTS:
        raise ValueError(f"unknown case checkpoint {case}/{name}; the shipped ones are "
                         + ", ".join(f"builtin:{c}/{n}" for c in CASE_TASKS for n in CASE_CHECKPOINTS))
    path = _ASSETS / (CASE_TEACHER_OF.get(case, case) if name == "teacher" else case) / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the case checkpoint {case}/{name} is missing at {path}; generate it with "
                                f"`python scripts/make_case_checkpoints.py --only {case}`")
    return path
