"""The ``chat_basics`` task: short chat questions a small real instruct model mostly answers, each
family with a verifier.

Families (one user turn each; the reference answer is the assistant turn):

============  ==========================================================  ==========================
family        user turn                                                   verified by
============  ==========================================================  ==========================
``sums``      ``What is 3 + 4? Answer with the number only.``            the last integer == a + b
``capitals``  ``What is the capital of France? Answer with the city         the city as a word
              name only.``                                                (case-insensitive)
``casing``    ``Write the word "apple" in capital letters.``             ``APPLE`` as a word
                                                                          (case-sensitive)
``plurals``   ``What is the plural of "box"? Answer with one word.``     the plural as a word
                                                                          (case-insensitive)
``next``      ``What number comes after 41? Answer with the number        the last integer == n + 1
              only.``
============  ==========================================================  ==========================

Every verifier reads the completion up to the first end-of-turn token (a completion that never
stops is truncated and scores 0, as with every opd verifier). The families were chosen by measuring
the real teacher (``builtin:smollm2-135m-instruct``; docs/real_models.md has the figures and the
command): a family is kept where the teacher's greedy accuracy is at least 60 %.

Train and held-out sets are drawn from disjoint item pools (operand pairs, countries, words), so no
held-out question is ever a training question. :func:`write_jsonl` writes either as a
``data.format=chat`` JSONL file; ``verifier: python:opd.tasks.chat_basics:verify`` scores it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opd.tasks.base import Example, RenderedPrompt

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "ChatBasicsTask", "END_OF_TURN", "check_family", "records", "verify",
           "write_jsonl"]

#: End-of-turn strings of common chat templates (ChatML, Llama 3, Llama 2 / Mistral, GPT-2 style).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>", "<end_of_turn>")

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Turkey", "Ankara"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"),
    ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"), ("Switzerland", "Bern"),
]
WORDS = [
    "apple", "house", "river", "garden", "window", "pencil", "yellow", "mountain", "doctor", "planet",
    "summer", "orange", "bottle", "candle", "forest", "rocket", "silver", "winter", "dragon", "button",
    "castle", "flower", "jacket", "kitten", "ladder", "market", "needle", "pepper", "rabbit", "saddle",
    "ticket", "turtle", "violin", "wallet", "yogurt", "anchor", "basket", "camera", "desert", "engine",
]
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("car", "cars"), ("book", "books"), ("tree", "trees"),
    ("bus", "buses"), ("fox", "foxes"), ("dish", "dishes"), ("church", "churches"), ("city", "cities"),
    ("baby", "babies"), ("party", "parties"), ("story", "stories"), ("key", "keys"), ("boy", "boys"),
    ("toy", "toys"), ("day", "days"), ("pen", "pens"), ("cup", "cups"), ("bird", "birds"), ("chair", "chairs"),
    ("table", "tables"), ("glass", "glasses"), ("class", "classes"), ("watch", "watches"), ("horse", "horses"),
    ("house", "houses"), ("star", "stars"), ("girl", "girls"), ("bag", "bags"), ("lamp", "lamps"),
    ("ship", "ships"), ("song", "songs"), ("hat", "hats"), ("egg", "eggs"), ("lady", "ladies"),
    ("brush", "brushes"), ("bench", "benches"), ("coat", "coats"),
]


OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("light", "dark"), ("old", "new"), ("rich", "poor"), ("full", "empty"), ("early", "late"),
    ("wet", "dry"), ("strong", "weak"), ("high", "low"), ("hard", "soft"), ("left", "right"), ("win", "lose"),
    ("true", "false"), ("good", "bad"), ("in", "out"), ("start", "end"), ("black", "white"), ("yes", "no"),
    ("long", "short"), ("heavy", "light"), ("thick", "thin"), ("loud", "quiet"), ("first", "last"),
    ("love", "hate"), ("push", "pull"), ("buy", "sell"),
]


def _sum_items() -> list[tuple[int, int]]:
    return [(a, b) for a in range(1, 10) for b in range(1, 10)]


def _next_items() -> list[int]:
    return list(range(1, 99))


def _split(items: Sequence[Any], held_out: bool) -> list[Any]:
    """Every 3rd item (from a fixed shuffle) is held out: disjoint pools for training and evaluation."""
    order = list(items)
    random.Random("chat-basics-pools").shuffle(order)
    return [x for i, x in enumerate(order) if (i % 3 == 0) == held_out]


class _Pick:
    """Draws from a pool: at random for training, in turn through a shuffled pool for the held-out
    set (so it repeats an item only after the whole pool was used)."""

    def __init__(self, rng: random.Random, held_out: bool):
        self.rng, self.held_out, self.turn = rng, held_out, 0

    def __call__(self, pool: Sequence[Any]) -> Any:
        if not self.held_out:
            return self.rng.choice(pool)
        if self.turn % len(pool) == 0:
            self.order = list(pool)
            self.rng.shuffle(self.order)
        item = self.order[self.turn % len(pool)]
        self.turn += 1
        return item


def _sums(pick: _Pick, held_out: bool) -> tuple[str, str]:
    a, b = pick(_split(_sum_items(), held_out))
    return f"What is {a} + {b}?", str(a + b)


def _capitals(pick: _Pick, held_out: bool) -> tuple[str, str]:
    country, city = pick(_split(CAPITALS, held_out))
    return f"What is the capital of {country}? Answer with the city name only.", city


def _casing(pick: _Pick, held_out: bool) -> tuple[str, str]:
    word = pick(_split(WORDS, held_out))
    return f'Write the word "{word}" in capital letters.', word.upper()


def _plurals(pick: _Pick, held_out: bool) -> tuple[str, str]:
    word, plural = pick(_split(PLURALS, held_out))
    return f'What is the plural of "{word}"? Answer with one word.', plural


def _opposites(pick: _Pick, held_out: bool) -> tuple[str, str]:
    word, opposite = pick(_split(OPPOSITES, held_out))
    return f'What is the opposite of "{word}"? Answer with one word.', opposite


def _next(pick: _Pick, held_out: bool) -> tuple[str, str]:
    n = pick(_split(_next_items(), held_out))
    return f"Which number comes right after {n}?", str(n + 1)


_INT = re.compile(r"-?\d+")


def _last_int_equals(text: str, answer: str) -> bool:
    found = _INT.findall(text.replace(",", ""))
    return bool(found) and int(found[-1]) == int(answer)


def _has_word(text: str, word: str, *, case: bool) -> bool:
    flags = 0 if case else re.IGNORECASE
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags) is not None


#: family → (question generator ``(pick, held_out) -> (question, answer)``, checker ``(text, answer) -> bool``)
FAMILIES: dict[str, tuple[Callable[[_Pick, bool], tuple[str, str]], Callable[[str, str], bool]]] = {
    "sums": (_sums, _last_int_equals),
    "capitals": (_capitals, lambda text, answer: _has_word(text, answer, case=False)),
    "casing": (_casing, lambda text, answer: _has_word(text, answer, case=True)),
    "plurals": (_plurals, lambda text, answer: _has_word(text, answer, case=False)),
    "next": (_next, _last_int_equals),
    "opposites": (_opposites, lambda text, answer: _has_word(text, answer, case=False)),
}


#: The families the real teacher answers at >= 60 % (docs/real_models.md); the others are kept for
#: measuring other teachers.
DEFAULT_FAMILIES: tuple[str, ...] = ("capitals", "plurals", "opposites")


def check_family(family: str, text: str, answer: str) -> bool:
    """Whether ``text`` (a completion already cut at its end of turn) answers ``answer`` for ``family``.

    Raises:
        ValueError: an unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown chat_basics family {family!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[family][1](text, answer)


def records(n_per_family: int, *, held_out: bool, seed: int = 0,
            families: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``n_per_family`` chat records per family (default: :data:`DEFAULT_FAMILIES`), interleaved:
    ``{"messages": [user, assistant], "family", "answer"}``; deterministic in ``(held_out, seed)``.
    Training questions are drawn at random from the training pool; held-out questions go through the
    held-out pool in a shuffled order, repeating only after the whole pool was used.

    Raises:
        ValueError: an unknown family, or ``n_per_family < 1``.
    """
    families = list(DEFAULT_FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or n_per_family < 1:
        raise ValueError(f"unknown chat_basics families {unknown} (families: {', '.join(FAMILIES)})" if unknown
                         else f"n_per_family must be >= 1, got {n_per_family}")
    rng = random.Random(f"chat-basics:{'eval' if held_out else 'train'}:{seed}")
    picks = {family: _Pick(rng, held_out) for family in families}
    out = []
    for _ in range(n_per_family):
        for family in families:
            question, answer = FAMILIES[family][0](picks[family], held_out)
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        "family": family, "answer": answer})
    return out


def write_jsonl(path: str | Path, n_per_family: int, *, held_out: bool, seed: int = 0,
                families: Sequence[str] | None = None) -> Path:
    """Write :func:`records` as a ``data.format=chat`` JSONL file (one record per line)."""
    path = Path(path)
    rows = records(n_per_family, held_out=held_out, seed=seed, families=families)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cut(completion: str, eos_token: str | None) -> str | None:
    """The completion up to its first end-of-turn string, or None when it never ends."""
    stops = [eos_token] if eos_token else []
    stops += [s for s in END_OF_TURN if s not in stops]
    ends = [i for i in (completion.find(s) for s in stops) if i >= 0]
    return completion[:min(ends)] if ends else None


def verify(example: Example, completion: str) -> float:
    """1.0 when the completion (up to its first end of turn) answers ``example``'s family question,
    else 0.0; a completion with no end of turn (truncated) scores 0. For ``verifier:
    python:opd.tasks.chat_basics:verify``: the family and answer are read from ``example.fields``
    (the record's ``family`` and ``answer``)."""
    fields: Mapping[str, Any] = example.fields
    family, answer = fields.get("family"), fields.get("answer", example.answer)
    if family is None or answer is None:
        raise ValueError(f"{example.origin or 'a record'}: chat_basics records need 'family' and 'answer' fields; "
                         "write them with opd.tasks.chat_basics.write_jsonl")
    text = _cut(completion, None)
    return float(text is not None and check_family(str(family), text, str(answer)))


class ChatBasicsTask:
    """The families as a :class:`~opd.tasks.base.Task` for a chat model: prompts are rendered with
    ``tokenizer``'s chat template (generation prompt added).

    Args:
        tokenizer: the student's tokenizer (it must have a chat template).
        families: the families to draw from (default: :data:`DEFAULT_FAMILIES`).
        n_eval_per_family: size of the held-out set per family.
        seed: which training stream and held-out set.
    """

    name = "chat_basics"

    def __init__(self, tokenizer: Any, *, families: Sequence[str] | None = None, n_eval_per_family: int = 50,
                 seed: int = 0):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_basics renders chat prompts, but the tokenizer has no chat template; use an "
                             "instruct model's tokenizer (e.g. builtin:smollm2-135m-instruct)")
        self.tokenizer = tokenizer
        self.families = list(DEFAULT_FAMILIES) if families is None else list(families)
        self.seed = seed
        self.eos_token = tokenizer.eos_token
        self._eval = [self._example(r, f"chat_basics held-out {i}")
                      for i, r in enumerate(records(n_eval_per_family, held_out=True, seed=seed,
                                                    families=self.families))]

    def _example(self, record: Mapping[str, Any], origin: str) -> Example:
        user = [m for m in record["messages"] if m["role"] != "assistant"]
        prompt = RenderedPrompt(self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
        return Example(prompt=prompt, answer=record["answer"], fields=dict(record), messages=tuple(user),
                       origin=origin)

    def train_examples(self, step: int, batch_size: int, seed: int) -> list[Example]:
        rng = random.Random(f"chat-basics-train:{self.seed}:{seed}:{step}")
        pick = _Pick(rng, False)
        out = []
        for i in range(batch_size):
            family = self.families[rng.randrange(len(self.families))]
            question, answer = FAMILIES[family][0](pick, False)
            record = {"messages": [{"role": "user", "content": question}], "family": family, "answer": answer}
            out.append(self._example(record, f"chat_basics train step {step} row {i}"))
        return out

    def eval_examples(self, n: int | None = None) -> list[Example]:
        return list(self._eval if n is None else self._eval[:n])

    def verify(self, example: Example, completion: str) -> float:
        text = _cut(completion, self.eos_token)
        return float(text is not None and check_family(str(example.fields["family"]), text, str(example.answer)))
