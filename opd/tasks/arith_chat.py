"""The built-in ``arith_chat`` conversations: short multi-turn conversations with tool turns, their
tokenizer and shipped checkpoints. The task over them, :class:`opd.data.ArithChatTask`, reads them
through the same ``data.format=chat`` path as a user's JSONL file (:mod:`opd.chat`, :mod:`opd.data`).

Every conversation has two assistant turns; numbers are 2-digit operands written least
significant digit first, as in :mod:`opd.tasks.arith`::

    user       "21+43="            12 + 34
    assistant  "64"                46, reversed
    user       "+50="              add 5 to the running total
    assistant  "15"                51, reversed

Half of the conversations take the second operand from a tool turn instead (the user writes ``x``,
the tool answers ``"x:43"``); the assistant must read it from there::

    user "21+x="   tool "x:43"   assistant "64"   user "+50="   assistant "15"

Rendered with the task tokenizer's chat template (one token per character; ``^`` BOS, ``$`` end of
turn = EOS, role tokens ``<system> <user> <assistant> <tool>``)::

    ^<user>21+x=$<tool>x:43$<assistant>64$<user>+50=$<assistant>

The student writes ``"15$"``; the role tokens, the tool turn, the user turns and the first assistant
turn are prompt tokens and never enter the loss. With ``train_turns=all`` each conversation gives
two examples (the first turn with the conversation before it). The held-out conversations are drawn
from their own seed and never appear in training. Verifier: exact match of the turn's text.

``opd make-checkpoints chat`` trains the shipped pair (:mod:`opd.shipped.chat`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from opd.tasks.assets import shipped_checkpoint
from opd.tokenization import char_tokenizer

__all__ = ["ARITH_CHAT_CHECKPOINTS", "arith_chat_checkpoint", "arith_chat_records", "arith_chat_tokenizer",
           "conversation", "conversations", "write_jsonl"]

ARITH_CHAT_CHECKPOINTS = ("teacher", "student")
#: Characters of the task (roles are special tokens; ``\n`` and space let system prompts be merged).
CHAT_ALPHABET = "0123456789+=x: \n"
ROLE_TOKENS = ("<system>", "<user>", "<assistant>", "<tool>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
#: Conversations generated for training and held out.
TRAIN_CONVERSATIONS = 8000
EVAL_CONVERSATIONS = 500


def arith_chat_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (``_`` pad 0, ``^`` bos 1, ``$`` eos 2, ``?`` unk 3, then
    :data:`CHAT_ALPHABET`), the role tokens as special tokens, and :data:`CHAT_TEMPLATE`."""
    tok = char_tokenizer(CHAT_ALPHABET, bos="^", eos="$", pad="_", unk="?")
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def arith_chat_checkpoint(name: str) -> Path:
    """Folder of a shipped checkpoint (``teacher`` or ``student``).

    Raises:
        ValueError: unknown name. FileNotFoundError: not generated; run ``opd make-checkpoints chat``.
    """
    return shipped_checkpoint("arith_chat", name, ARITH_CHAT_CHECKPOINTS, make="opd make-checkpoints chat")


def _rev(n: int, width: int = 2) -> str:
    return str(n).zfill(width)[::-1]


def conversation(rng: random.Random) -> dict[str, Any]:
    """One conversation record ``{"messages": [...], "kind": "plain" | "tool"}`` (module docstring)."""
    a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
    tool = rng.random() < 0.5
    if tool:
        first = [{"role": "user", "content": f"{_rev(a)}+x="}, {"role": "tool", "content": f"x:{_rev(b)}"}]
    else:
        first = [{"role": "user", "content": f"{_rev(a)}+{_rev(b)}="}]
    messages = first + [
        {"role": "assistant", "content": str(a + b)[::-1]},
        {"role": "user", "content": f"+{_rev(c)}="},
        {"role": "assistant", "content": str(a + b + c)[::-1]},
    ]
    return {"messages": messages, "kind": "tool" if tool else "plain"}


def conversations(n: int, seed: str) -> list[dict[str, Any]]:
    """``n`` records drawn from ``seed`` (the held-out ones are redrawn if they also occur in training)."""
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]


def write_jsonl(path: str | Path, n: int = TRAIN_CONVERSATIONS, seed: str = "arith-chat-train:0") -> Path:
    """Write ``n`` conversations as a ``data.format=chat`` JSONL file (one ``{"messages": [...]}`` per line),
    e.g. to try the user path: ``data.task=jsonl data.format=chat data.path=FILE``."""
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(n, seed)), encoding="utf-8")
    return path


def arith_chat_records(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training, held-out)`` conversation records of task seed ``seed``: :data:`TRAIN_CONVERSATIONS`
    drawn from ``"arith-chat-train:<seed>"`` less those that also occur among the
    :data:`EVAL_CONVERSATIONS` held-out ones (drawn from ``"arith-chat-eval:<seed>"``)."""
    train = conversations(TRAIN_CONVERSATIONS, f"arith-chat-train:{seed}")
    held = conversations(EVAL_CONVERSATIONS, f"arith-chat-eval:{seed}")
    seen = {str(r["messages"]) for r in held}
    return [r for r in train if str(r["messages"]) not in seen], held
