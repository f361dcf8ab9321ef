"""User prompt sources: a JSONL file or a Hugging Face dataset, as a :class:`~opd.tasks.base.Task`.

Each record (a JSON object / a dataset row) becomes an :class:`~opd.tasks.base.Example`, as its
:class:`RecordLayout` says:

=====================  ==========================================================
``prompt``             ``record[prompt_field]`` (required, a string)
``answer``             ``record[answer_field]`` (numbers are written with ``str``)
``teacher_context``    ``record[context_field]`` (teacher-only privileged text)
``fields``             the whole record (``route_field`` values written as strings)
=====================  ==========================================================

Conversations (``layout.chat``, a :class:`opd.chat.ChatFormat`; ``data.format=chat``): a record holds a
list of messages and gives one example per trained assistant turn (:mod:`opd.chat`): ``prompt`` is
the conversation before the turn rendered with the student's chat template, ``answer`` the turn's
text in the data, ``teacher_context`` the teacher-only system prompt (``record[context_field]``, or
the format's ``system_prompt``). ``prompt_field`` / ``answer_field`` are not read.

Held-out set: the records of ``eval_path`` / ``eval_split`` when given, otherwise a fixed slice
of ``eval_size`` records chosen by a ``seed``-ed shuffle. Training never returns a record whose
prompt text is in the held-out set (duplicates in the file included).

Training order: epoch ``e`` visits the training records in a permutation drawn from
``(seed, task seed, e)``; step ``s`` with batch size ``n`` takes positions ``s·n … s·n + n − 1`` of
the concatenated epochs. The batch is a pure function of ``(seed, step, batch_size)``: an exact
resume needs only the step.

Verifiers (``verify(example, completion)``, the completion decoded with special tokens kept and
cut at the first ``eos_token`` when one is given; a completion without it scores 0):

* ``exact_match`` — 1.0 when ``completion.strip() == answer.strip()``;
* ``contains`` — 1.0 when ``answer.strip()`` occurs in the completion;
* ``none`` — no verifier: ``verify`` returns NaN and ``has_verifier`` is False;
* ``python:module:function`` — ``function(example, completion) -> float`` (the raw completion);
* ``auto`` — ``exact_match`` when the records carry answers, else ``none``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from opd.chat import ChatFormat, conversation_examples
from opd.tasks.arith_chat import arith_chat_records, arith_chat_tokenizer
from opd.tasks.base import Example

__all__ = ["ArithChatTask", "DataError", "HFDatasetTask", "JsonlTask", "RecordLayout", "RecordTask", "Records",
           "make_verifier", "read_jsonl"]

Verifier = Callable[[Example, str], float]

#: Default held-out size when ``eval_size`` is None: 10 % of the records, at most this many.
_DEFAULT_EVAL_CAP = 500


class DataError(ValueError):
    """A prompt file or dataset that cannot be read as examples (the message says where and why)."""


@dataclass(frozen=True)
class RecordLayout:
    """Where a record keeps each part of an example (see the module docstring).

    ``answer_field``, ``context_field`` and ``route_field`` are optional (a set ``context_field``
    must be present on every record). ``chat``: read each record as a conversation; None: prompts.
    ``system_prompt``: every record's teacher-only context when ``context_field`` is unset
    (``teacher.system_prompt``; conversations take it from ``chat.system_prompt``).
    """

    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    context_field: str | None = None
    route_field: str | None = None
    chat: ChatFormat | None = None
    system_prompt: str | None = None


class Records(NamedTuple):
    """Rows read from one place, and how messages name that place (``file`` or ``dataset[split]``)."""

    rows: list[Mapping[str, Any]]
    source: str


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a line that is not valid JSON (``file:line`` and the parser's message) or not a
            JSON object; a file with no records.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"prompt file {str(p)!r} is a folder, not a JSONL file (data.path / data.eval_path); name the "
                        "file inside it, or use data.task=hf for a dataset folder written by datasets' save_to_disk")
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist (data.path / data.eval_path); pass a JSONL file "
                                "with one JSON object per line")
    records: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); each line must be "
                                "one JSON object") from err
            if not isinstance(record, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
            record["__line__"] = lineno
            records.append(record)
    if not records:
        raise DataError(f"{p} holds no records; write one JSON object per line")
    return records


def make_verifier(spec: str, *, has_answers: bool, eos_token: str | None = None) -> Verifier | None:
    """The verifier named by ``spec`` (see the module docstring), or None for ``none``.

    Raises:
        ValueError: an unknown spec, ``exact_match``/``contains`` without answers, or a
            ``python:`` spec whose module or function cannot be loaded (the message says which).
    """
    if spec == "auto":
        spec = "exact_match" if has_answers else "none"
    if spec == "none":
        return None
    if spec in ("exact_match", "contains"):
        if not has_answers:
            raise ValueError(f"verifier {spec!r} needs reference answers but the records have none; set "
                             "data.answer_field to the field that holds them, or use verifier none / python:...")
        contains = spec == "contains"

        def builtin(example: Example, completion: str) -> float:
            if eos_token is not None:
                head, sep, _ = completion.partition(eos_token)
                if not sep:
                    return 0.0  # truncated: the model never stopped
                completion = head
            if example.answer is None:
                return 0.0
            answer = example.answer.strip()
            return float(answer in completion) if contains else float(completion.strip() == answer)

        return builtin
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ValueError(f"verifier {spec!r} must look like python:module:function, e.g. python:my_pkg.rewards:score")
        _, module_name, fn_name = parts
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r} ({err}); put it on PYTHONPATH") from err
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"verifier {spec!r}: module {module_name!r} has no callable {fn_name!r}")
        return lambda example, completion: float(fn(example, completion))
    raise ValueError(f"unknown verifier {spec!r}; choose auto, exact_match, contains, none or python:module:function")


class RecordTask:
    """A :class:`~opd.tasks.base.Task` over in-memory records (see the module docstring).

    ``train``: the records to train on (and to hold ``eval_size`` out of when ``held_out`` is None);
    ``held_out``: a separate held-out set; with ``eval_only`` every record of ``train`` is held out.
    Other arguments as :class:`JsonlTask`.
    """

    name = "records"

    def __init__(
        self,
        train: Records,
        held_out: Records | None = None,
        *,
        layout: RecordLayout = RecordLayout(),
        verifier: str = "auto",
        eval_size: int | None = None,
        seed: int = 0,
        eos_token: str | None = None,
        eval_only: bool = False,
    ):
        source = train.source
        self.source = source
        self.layout = layout
        self.eval_only = eval_only
        self.seed = seed
        # one list of examples per record: a conversation gives one per trained turn, and the
        # held-out split is made over records, so no turn of a held-out conversation is trained on
        groups = self._examples(train.rows, source)
        if eval_only:  # every record is held out (opd eval --prompts FILE): nothing is trained on
            eval_examples = [e for g in groups for e in g][:eval_size]
            pool = []
        elif held_out is not None:
            eval_examples = [e for g in self._examples(held_out.rows, held_out.source) for e in g]
            if eval_size is not None:
                eval_examples = eval_examples[:eval_size]
            pool = [e for g in groups for e in g]
        else:
            n = len(groups)
            size = min(_DEFAULT_EVAL_CAP, max(1, n // 10)) if eval_size is None else eval_size
            if not 1 <= size < n:
                raise DataError(f"eval_size={size} leaves no training prompts among the {n} records of {source}; "
                                "lower eval.size or give a separate eval file (data.eval_path / data.eval_split)")
            order = list(range(n))
            random.Random(f"opd-heldout:{seed}").shuffle(order)
            held = set(order[:size])
            eval_examples = [e for i in sorted(held) for e in groups[i]]
            pool = [e for i in range(n) if i not in held for e in groups[i]]
        eval_prompts = {e.prompt for e in eval_examples}
        self._train = [e for e in pool if e.prompt not in eval_prompts]
        self._eval = eval_examples
        if not self._train and not eval_only:
            raise DataError(f"every training prompt of {source} also appears in the held-out set; nothing is left to train on")
        has_answers = all(e.answer is not None for e in self._train + self._eval)
        self._verifier = make_verifier(verifier, has_answers=has_answers, eos_token=eos_token)
        self.eos_token = eos_token  # the stop string the verifier expects (opd.evaluate.verifier_texts)
        self._perm_cache: dict[tuple[int, int], list[int]] = {}

    def _examples(self, records: Iterable[Mapping[str, Any]], source: str) -> list[list[Example]]:
        out: list[list[Example]] = []
        answers_seen: bool | None = None
        for i, record in enumerate(records):
            where = f"{source}:{record['__line__']}" if "__line__" in record else f"{source} row {i}"
            fields = {k: v for k, v in record.items() if k != "__line__"}
            lay = self.layout
            if lay.route_field is not None and fields.get(lay.route_field) is not None:
                fields[lay.route_field] = str(fields[lay.route_field])
            # teacher.system_prompt: every prompt record's teacher-only context (a conversation's is in its chat format)
            context = lay.system_prompt if lay.chat is None else None
            if lay.context_field is not None:
                context = str(self._field(fields, lay.context_field, where, required=True))
            if lay.chat is not None:  # data.format=chat: one example per trained assistant turn
                out.append(conversation_examples(fields, where, lay.chat, context=context))
                continue
            prompt = self._field(fields, lay.prompt_field, where, required=True)
            if not isinstance(prompt, str):
                raise DataError(f"{where}: field {lay.prompt_field!r} must be a string, got {type(prompt).__name__}")
            answer = None
            if lay.answer_field is not None:
                has = lay.answer_field in fields and fields[lay.answer_field] is not None
                if answers_seen is None:
                    answers_seen = has
                elif has != answers_seen:  # answers on some records only: a data bug, not a choice
                    self._field(fields, lay.answer_field, where, required=True)
                    raise DataError(f"{where}: field {lay.answer_field!r} is present here but missing on earlier "
                                    "records; give every record an answer or none")
                answer = None if not has else str(fields[lay.answer_field])
            out.append([Example(prompt=prompt, answer=answer, teacher_context=context, fields=fields, origin=where)])
        if not out:
            raise DataError(f"{source} holds no records")
        return out

    @staticmethod
    def _field(fields: Mapping[str, Any], name: str, where: str, *, required: bool) -> Any:
        if name in fields and fields[name] is None:
            if required:
                raise DataError(f"{where}: field {name!r} is null; give it a value, or remove the record")
            return None
        if name not in fields:
            if required:
                raise DataError(f"{where}: missing field {name!r}; the record has fields {sorted(fields)}. Set "
                                "data.prompt_field / answer_field / context_field to the right names "
                                "(opd eval: --prompt-field / --answer-field)")
            return None
        return fields[name]

    @property
    def num_train(self) -> int:
        """Training records (after removing held-out prompts)."""
        return len(self._train)

    @property
    def has_verifier(self) -> bool:
        """False when the verifier is ``none`` (``verify`` returns NaN)."""
        return self._verifier is not None

    def _permutation(self, seed: int, epoch: int) -> list[int]:
        key = (seed, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            order = list(range(len(self._train)))
            random.Random(f"opd-train:{self.seed}:{seed}:{epoch}").shuffle(order)
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def train_examples(self, step: int, batch_size: int, seed: int) -> list[Example]:
        """``batch_size`` training examples for ``step``: positions ``step·batch_size …`` of the
        seeded per-epoch permutations (a pure function of ``seed``, ``step`` and ``batch_size``)."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"step must be >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
        if not self._train:
            raise ValueError(f"{self.source} was read as an evaluation-only set (eval_only=True): it has no "
                             "training prompts")
        n = len(self._train)
        start = step * batch_size
        return [self._train[self._permutation(seed, pos // n)[pos % n]] for pos in range(start, start + batch_size)]

    def eval_examples(self, n: int | None = None) -> list[Example]:
        """The first ``n`` (default: all) held-out examples, always the same ones."""
        n = len(self._eval) if n is None else n
        if not 1 <= n <= len(self._eval):
            raise ValueError(f"n must be in [1, {len(self._eval)}] (the held-out set of {self.source}), got {n}; "
                             "raise eval_size or provide a larger eval file")
        return list(self._eval[:n])

    def all_examples(self) -> list[Example]:
        """Every example the run can read (training and held-out), for checks made before training."""
        return list(self._train) + list(self._eval)

    def verify(self, example: Example, completion: str) -> float:
        """The configured verifier's score, NaN when there is none."""
        if self._verifier is None:
            return math.nan
        return self._verifier(example, completion)


class JsonlTask(RecordTask):
    """Prompts from a JSONL file (one JSON object per line), with a held-out set and a verifier.

    Args:
        path: the training file.
        layout: where each record keeps prompt, answer, context and route, and whether it is a
            conversation (:class:`RecordLayout`).
        verifier: see the module docstring.
        eval_path: a separate held-out file; default: hold out ``eval_size`` records of ``path``.
        eval_size: held-out size (default: 10 % of the records, at most 500); with ``eval_path``,
            the first ``eval_size`` records of that file.
        seed: seed of the held-out slice and of the training order.
        eos_token: the tokenizer's EOS string; built-in verifiers cut the completion there.
        eval_only: every record of ``path`` is the held-out set (the first ``eval_size`` when
            given; ``eval_path`` is then not read) and there are no training prompts: a whole file
            scored by ``opd eval --prompts``.

    Raises:
        FileNotFoundError / DataError: see :func:`read_jsonl`; a missing field (which field, which
            line, which fields the record has); a held-out set that leaves nothing to train on.
        opd.chat.ChatDataError: a bad conversation (the message names ``file:line``).
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layout: RecordLayout = RecordLayout(),
        verifier: str = "auto",
        eval_path: str | os.PathLike[str] | None = None,
        eval_size: int | None = None,
        seed: int = 0,
        eos_token: str | None = None,
        eval_only: bool = False,
    ):
        self.path = Path(path).expanduser()
        held_out = None if eval_path is None or eval_only else Records(read_jsonl(eval_path),
                                                                        str(Path(eval_path).expanduser()))
        super().__init__(Records(read_jsonl(self.path), str(self.path)), held_out, layout=layout, verifier=verifier,
                         eval_size=eval_size, seed=seed, eos_token=eos_token, eval_only=eval_only)


def _import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError as err:
        raise ImportError("data.task=hf needs the `datasets` package: pip install 'opd[hub]'") from err


def _load_split(datasets: Any, name_or_path: str, split: str) -> list[Mapping[str, Any]]:
    """Rows of ``split`` from a ``save_to_disk`` folder or ``load_dataset(name_or_path)``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if (path / "dataset_dict.json").is_file():
            if split not in ds:
                raise DataError(f"{path} has no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split)
    return [dict(row) for row in ds]


class HFDatasetTask(RecordTask):
    """Prompts from a Hugging Face dataset: a hub id / local dataset script or data folder
    (``datasets.load_dataset``), or a folder written by ``save_to_disk``.

    ``split`` gives the training rows. Held-out rows: ``eval_path`` (a JSONL file, or another
    dataset read at ``eval_split``, default ``split``) when given; else ``eval_split`` of
    ``name_or_path``; else ``eval_size`` rows of ``split``. Other arguments as :class:`JsonlTask`.
    ``datasets`` is imported only here (``pip install 'opd[hub]'``).
    """

    name = "hf"

    def __init__(
        self,
        name_or_path: str,
        split: str = "train",
        *,
        eval_split: str | None = None,
        eval_path: str | os.PathLike[str] | None = None,
        layout: RecordLayout = RecordLayout(),
        verifier: str = "auto",
        eval_size: int | None = None,
        seed: int = 0,
        eos_token: str | None = None,
    ):
        datasets = _import_datasets()
        self.name_or_path = name_or_path
        train = Records(_load_split(datasets, name_or_path, split), f"{name_or_path}[{split}]")
        held_out: Records | None = None
        if eval_path is not None:
            if Path(eval_path).expanduser().is_file():
                held_out = Records(list(read_jsonl(eval_path)), str(Path(eval_path).expanduser()))
            else:
                held_out = Records(_load_split(datasets, os.fspath(eval_path), eval_split or split),
                                   f"{os.fspath(eval_path)}[{eval_split or split}]")
        elif eval_split is not None:
            held_out = Records(_load_split(datasets, name_or_path, eval_split), f"{name_or_path}[{eval_split}]")
        super().__init__(train, held_out, layout=layout, verifier=verifier, eval_size=eval_size, seed=seed,
                         eos_token=eos_token)


class ArithChatTask(RecordTask):
    """The built-in ``arith_chat`` conversations (:mod:`opd.tasks.arith_chat`) as a task, read as a
    user's ``data.format=chat`` file is. ``tokenizer``: the student's (its chat template renders the
    prompts); other arguments as :class:`JsonlTask` / :class:`opd.chat.ChatFormat`."""

    name = "arith_chat"

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, *, train_turns: str = "all", eval_size: int | None = 500,
                 seed: int = 0, system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                 context_window: int | None = None, eos_token: str | None = "$"):
        tokenizer = arith_chat_tokenizer() if tokenizer is None else tokenizer
        train, held = arith_chat_records(seed)
        fmt = ChatFormat(tokenizer=tokenizer, train_turns=train_turns, system_prompt=system_prompt,
                         max_prompt_tokens=max_prompt_tokens, context_window=context_window)
        super().__init__(Records(train, "arith_chat"), Records(held, "arith_chat (held out)"),
                         layout=RecordLayout(answer_field=None, chat=fmt), verifier="exact_match",
                         eval_size=eval_size, seed=seed, eos_token=eos_token)

    def __repr__(self) -> str:
        return f"ArithChatTask(train_turns={self.layout.chat.train_turns!r}, seed={self.seed})"
