"""Conversations (``data.format=chat``): rows of ``messages`` become one example per trained turn.

A row holds a conversation in the format of Hugging Face chat datasets::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "12+34="},
                  {"role": "tool", "content": "..."}, {"role": "assistant", "content": "46"}, ...]}

Each assistant turn marked for training (``train_turns``: the ``last`` one, or ``all``) becomes an
:class:`~opd.tasks.base.Example` whose student prompt is the conversation *before* that turn,
rendered with the student tokenizer's chat template and the generation prompt
(``apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)``, kept as a
:class:`~opd.tasks.base.RenderedPrompt` so no second BOS is added). The student writes the turn
itself; only the tokens it generates are completion tokens, so system, user and tool/environment
turns, earlier assistant turns and the template's own tokens (role headers, separators) are prompt
tokens and never enter the loss. The dataset's text of the turn is the example's ``answer`` (the
reference for verifiers and SFT baselines).

A chat template's own default system prompt (e.g. SmolLM2's "You are a helpful AI assistant named
SmolLM, trained by Hugging Face", written when the conversation has no system message) is part of the
rendering, so the student reads it, as the model does in any chat front end.

Teacher-only system prompt: ``teacher_context`` (``teacher.system_prompt`` for every row, or the
row's ``data.context_field``) becomes a system message that only the teacher sees
(:func:`teacher_messages`: merged in front of the conversation's own system message; without one,
in front of the template's default system prompt, so the teacher's prompt is the student's plus the
teacher-only text; prepended as a new system message when the template has no default);
``Example.teacher_prompt`` holds that rendering. A teacher with its own tokenizer renders the same
messages with its own template (and its own default).

Every error names the row (``file:line``) and says what to fix, on one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from opd.tasks.base import Example, RenderedPrompt

__all__ = [
    "CONTEXT_ROLES",
    "ChatFormat",
    "check_messages",
    "conversation_examples",
    "default_system_prompt",
    "render_prompt",
    "require_chat_template",
    "teacher_messages",
    "trained_turns",
    "with_system_prompt",
]

#: Roles a conversation may hold besides ``assistant``; they are context (never trained on).
#: ``tool`` / ``ipython`` / ``environment`` / ``function`` are tool or environment turns.
CONTEXT_ROLES: tuple[str, ...] = ("system", "user", "tool", "ipython", "environment", "function")
#: Separator between a teacher-only system prompt and the conversation's own system message.
SYSTEM_SEPARATOR = "\n\n"
_MARK = "§OPD-USER-TURN§"
_SYS = "§OPD-SYSTEM§"


class ChatDataError(ValueError):
    """A conversation row that cannot be used (the message names the row and the fix)."""


@dataclass(frozen=True)
class ChatFormat:
    """How conversation rows become examples.

    Attributes:
        tokenizer: the student's tokenizer; its chat template renders every prompt.
        messages_field: the row field holding the list of messages.
        train_turns: ``last`` — the last assistant turn of each row; ``all`` — every assistant
            turn, each given the conversation before it.
        system_prompt: teacher-only system prompt for every row (``teacher.system_prompt``); a
            row's own ``context_field`` value takes precedence.
        max_prompt_tokens: the longest rendered prompt the student can take (its context minus
            ``rollout.max_new_tokens``); a longer one is an error naming the row. None: unchecked.
    """

    tokenizer: PreTrainedTokenizerBase
    messages_field: str = "messages"
    train_turns: Literal["last", "all"] = "last"
    system_prompt: str | None = None
    max_prompt_tokens: int | None = None
    context_window: int | None = None  # only for the message of the length error


def require_chat_template(tokenizer: PreTrainedTokenizerBase, who: str = "student") -> None:
    """Raise a one-line error when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError(f"data.format=chat renders conversations with the {who} tokenizer's chat template, but it "
                            "has none; set tokenizer.chat_template (and save it with the model) or use data.format=prompt")


def check_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    """The messages of one row as ``{"role", "content"}`` dicts, or a one-line error naming the row.

    Rules: a non-empty list of objects; every message has a ``role`` among ``assistant`` and
    :data:`CONTEXT_ROLES` and a string ``content``; no assistant turn is empty (only whitespace);
    at least one assistant turn exists.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: field {field!r} must be a non-empty list of {{\"role\", \"content\"}} objects, "
                            f"got {type(messages).__name__}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, Mapping):
            raise ChatDataError(f"{where}: message {i} is a {type(m).__name__}, not an object with role and content")
        role = m.get("role")
        if role is None:
            raise ChatDataError(f"{where}: message {i} has no 'role'; every message needs a role (system, user, "
                                "assistant or tool) and a content")
        if role != "assistant" and role not in CONTEXT_ROLES:
            raise ChatDataError(f"{where}: message {i} has role {role!r}; use assistant or one of "
                                f"{', '.join(CONTEXT_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: message {i} ({role}) has no string 'content' (got "
                                f"{type(content).__name__}); write the turn's text as a string")
        if role == "assistant" and not content.strip():
            raise ChatDataError(f"{where}: message {i} is an empty assistant turn; give it its text or drop it")
        out.append({"role": str(role), "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatDataError(f"{where}: the conversation has no assistant turn to train on; add one or drop the row")
    return out


def trained_turns(messages: Sequence[Mapping[str, str]], train_turns: str) -> list[int]:
    """Indices of the assistant turns the student writes: the last one, or all of them."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_turns == "last":
        return idx[-1:]
    if train_turns == "all":
        return idx
    raise ValueError(f"train_turns must be 'last' or 'all', got {train_turns!r}")


def with_system_prompt(messages: Sequence[Mapping[str, str]], system: str | None, *,
                       default: str | None = None) -> list[dict[str, str]]:
    """``messages`` with a (teacher-only) system prompt: merged in front of an existing first system
    message (``system + "\\n\\n" + its content``); without one, prepended as a new system message
    holding ``system + "\\n\\n" + default`` (``default``: the template's own default system prompt,
    which an explicit system message would otherwise replace) or ``system`` alone."""
    msgs = [dict(m) for m in messages]
    if system is None:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = system + SYSTEM_SEPARATOR + msgs[0]["content"]
        return msgs
    return [{"role": "system", "content": system + SYSTEM_SEPARATOR + default if default else system}, *msgs]


def default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message ``tokenizer``'s chat template inserts when the conversation has none
    (None: the template adds nothing, or there is no template).

    Found by rendering ``[user]`` and ``[system=_SYS, user]``: the text around ``_SYS`` in the second
    is the template's system block; if the first rendering holds that block's opening, the template
    wrote a system message by itself, and the text between the opening and the closing is returned.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": _MARK}]
    try:
        plain = tokenizer.apply_chat_template(user, tokenize=False)
        with_sys = tokenizer.apply_chat_template([{"role": "system", "content": _SYS}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 — a template that refuses a system turn inserts none of its own
        return None
    head, _, tail = with_sys.partition(_SYS)
    opening = head[-min(len(head), 24):]
    closing = tail[:tail.find(_MARK)] if _MARK in tail else tail
    before_user = plain[:plain.find(_MARK)]
    if not opening or opening not in before_user:
        return None
    start = before_user.find(opening) + len(opening)
    end_marker = closing.split(_MARK)[0][:12] if closing else ""
    end = before_user.find(end_marker, start) if end_marker else -1
    return before_user[start:end if end >= 0 else len(before_user)]


def teacher_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                     system: str | None) -> list[dict[str, str]]:
    """The conversation the teacher reads: ``messages`` with the teacher-only ``system`` prompt
    (:func:`with_system_prompt`), kept in front of ``tokenizer``'s default system prompt when the
    conversation has no system message of its own."""
    has_own = bool(messages) and messages[0]["role"] == "system"
    default = None if system is None or has_own else default_system_prompt(tokenizer)
    return with_system_prompt(messages, system, default=default)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> RenderedPrompt:
    """``messages`` rendered with ``tokenizer``'s chat template and its generation prompt (the text
    just before the next assistant turn's content)."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected the rendered text")
    return RenderedPrompt(text)


def conversation_examples(fields: Mapping[str, Any], where: str, fmt: ChatFormat,
                          context: str | None = None) -> list[Example]:
    """One :class:`Example` per trained assistant turn of a row (see the module docstring).

    ``context``: the row's own teacher-only system prompt (``data.context_field``), else
    ``fmt.system_prompt``. ``fields`` is kept on every example with ``turn`` (the message index).

    Raises:
        ChatDataError: a bad row (:func:`check_messages`) or a prompt longer than
            ``fmt.max_prompt_tokens``; the message names the row.
    """
    if fmt.messages_field not in fields:
        raise ChatDataError(f"{where}: missing field {fmt.messages_field!r}; the record has fields {sorted(fields)}. "
                            "Set data.messages_field to the field holding the conversation")
    messages = check_messages(fields[fmt.messages_field], where, fmt.messages_field)
    system = context if context is not None else fmt.system_prompt
    out = []
    for i in trained_turns(messages, fmt.train_turns):
        before = messages[:i]
        prompt = render_prompt(fmt.tokenizer, before)
        if fmt.max_prompt_tokens is not None:
            n = len(fmt.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > fmt.max_prompt_tokens:
                window = f"the student's context of {fmt.context_window} tokens" if fmt.context_window else "the context"
                raise ChatDataError(f"{where}: the conversation before assistant turn (message {i + 1}) is {n} tokens; "
                                    f"with room for rollout.max_new_tokens it exceeds {window} (at most "
                                    f"{fmt.max_prompt_tokens} prompt tokens); shorten the conversation or drop the row")
        teacher_prompt = (None if system is None
                          else render_prompt(fmt.tokenizer, teacher_messages(fmt.tokenizer, before, system)))
        out.append(Example(prompt=prompt, answer=messages[i]["content"], teacher_context=system,
                           fields={**fields, "turn": i}, messages=tuple(before), teacher_prompt=teacher_prompt,
                           origin=where))
    return out
