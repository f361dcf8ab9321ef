"""Conversations (``data.format=chat``): rendering, trained turns, masking, teacher-only system prompts
(checked on the token ids), bad rows, and runs through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd.chat import ChatDataError, ChatFormat, with_system_prompt
from opd.cli import main as opd_main
from opd.data import ArithChatTask, JsonlTask, RecordLayout
from opd.metrics_log import read_metrics
from opd.models import build_model, tiny_llama_config
from opd.rollout import Sampling, encode_prompts, generate_rollouts, rollouts_from_texts
from opd.tasks.arith_chat import arith_chat_tokenizer, conversation
from opd.tasks.base import RenderedPrompt
from opd.teachers import CrossTokenizerTeacher, ModelTeacher, SelfTeacher, teacher_prompt_texts

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"},
                  {"role": "user", "content": "+50="}, {"role": "assistant", "content": "96"}]},
    {"messages": [{"role": "system", "content": "x:"}, {"role": "user", "content": "21+x="},
                  {"role": "tool", "content": "x:43"}, {"role": "assistant", "content": "64"}]},
    {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                  {"role": "user", "content": "+1="}]},  # ends with a user turn: the last assistant turn is trained
]


@pytest.fixture(scope="module")
def tok():
    return arith_chat_tokenizer()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(tmp_path: Path, tok, rows=CONVERSATIONS, **fmt) -> JsonlTask:
    return JsonlTask(_write(tmp_path / "chat.jsonl", rows * 4), eval_size=1,
                     layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=tok, **fmt)))


def _model(tok, seed=0):
    return build_model(tiny_llama_config(len(tok), layers=1, hidden=32, tokenizer=tok), seed=seed)


def test_prompt_is_the_rendered_conversation_with_one_bos(tmp_path, tok):
    task = _task(tmp_path, tok, train_turns="all")
    examples = task.all_examples()
    assert examples
    for e in examples:
        before = list(e.messages)
        assert isinstance(e.prompt, RenderedPrompt)
        assert e.prompt == tok.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
        ids, mask = encode_prompts(tok, [e.prompt])
        expected = tok.apply_chat_template(before, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids[0][mask[0].bool()].tolist() == expected
        assert expected.count(tok.bos_token_id) == 1  # the template writes BOS; the tokenizer adds none
    # a plain prompt next to a rendered one still gets its BOS
    ids, mask = encode_prompts(tok, ["12+34=", examples[0].prompt])
    assert ids[0][mask[0].bool()].tolist() == tok("12+34=")["input_ids"]


def test_trained_turns_last_or_all(tmp_path, tok):
    rows = CONVERSATIONS
    last = JsonlTask(_write(tmp_path / "a.jsonl", rows), eval_size=1,
                     layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=tok, train_turns="last")))
    every = JsonlTask(_write(tmp_path / "b.jsonl", rows), eval_size=1,
                      layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=tok, train_turns="all")))
    assert sorted(e.answer for e in last.all_examples()) == ["2", "64", "96"]
    assert sorted(e.answer for e in every.all_examples()) == ["2", "46", "64", "96"]
    second = next(e for e in every.all_examples() if e.answer == "96")
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.fields["turn"] == 3


def test_held_out_conversations_never_reach_training(tmp_path, tok):
    rows = [conversation(__import__("random").Random(i)) for i in range(40)]
    task = JsonlTask(_write(tmp_path / "c.jsonl", rows), eval_size=5,
                     layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=tok, train_turns="all")))
    held = {e.origin for e in task.eval_examples()}
    assert len(task.eval_examples()) == 10  # 5 conversations, 2 turns each
    trained = {e.origin for s in range(20) for e in task.train_examples(s, 8, seed=0)}
    assert not held & trained


def test_only_generated_tokens_are_completion_tokens(tmp_path, tok):
    """Tool turns, earlier turns and the template's tokens are prompt ids; the completion is exactly what
    the student generates (the objective's mask is the completion mask)."""
    task = _task(tmp_path, tok, train_turns="all")
    tool_example = next(e for e in task.all_examples() if any(m["role"] == "tool" for m in e.messages))
    torch.manual_seed(0)
    rollouts = generate_rollouts(_model(tok, 3), tok, [tool_example], Sampling(max_new_tokens=5))
    prompt = rollouts.prompt_ids_BP[0][rollouts.prompt_mask_BP[0].bool()].tolist()
    tool_ids = tok("<tool>x:43$", add_special_tokens=False)["input_ids"]
    assert any(prompt[i:i + len(tool_ids)] == tool_ids for i in range(len(prompt)))
    assert prompt[-1] == tok.convert_tokens_to_ids("<assistant>")  # the generation prompt ends the prompt
    assert prompt == tok.apply_chat_template(list(tool_example.messages), add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    completion = rollouts.completion_ids_BT[0][rollouts.completion_mask_BT[0]].tolist()
    assert 1 <= len(completion) <= 5  # what the student sampled after the prompt, nothing else
    answers = rollouts_from_texts(tok, [tool_example], [tool_example.answer], max_new_tokens=5)
    assert answers.completion_ids_BT[0][answers.completion_mask_BT[0]].tolist() == \
        tok(tool_example.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("source", ["system_prompt", "context_field"])
def test_teacher_only_system_prompt_reaches_only_the_teacher(tmp_path, tok, source):
    rows = [{**r, "secret": "x:99"} for r in CONVERSATIONS]
    if source == "system_prompt":
        fmt = ChatFormat(tokenizer=tok, train_turns="all", system_prompt="x:99")
        task = JsonlTask(_write(tmp_path / "s.jsonl", rows * 3), eval_size=1,
                         layout=RecordLayout(answer_field=None, chat=fmt))
    else:
        task = JsonlTask(_write(tmp_path / "s.jsonl", rows * 3), eval_size=1,
                         layout=RecordLayout(answer_field=None, context_field="secret",
                                             chat=ChatFormat(tokenizer=tok, train_turns="all")))
    examples = task.all_examples()
    rollouts = rollouts_from_texts(tok, examples, [e.answer for e in examples], max_new_tokens=5)
    secret = tok("<system>x:99", add_special_tokens=False)["input_ids"]
    for teacher in (ModelTeacher(_model(tok, 1), tok, use_context=True), SelfTeacher(_model(tok, 2), tok)):
        t_ids, t_mask = teacher.prompt_batch(rollouts)
        for b, e in enumerate(rollouts.examples):
            teacher_row = t_ids[b][t_mask[b].bool()].tolist()
            student_row = rollouts.prompt_ids_BP[b][rollouts.prompt_mask_BP[b].bool()].tolist()
            assert _contains(teacher_row, secret)
            assert not _contains(student_row, secret) and not _contains(student_row, secret[1:])
            expected = tok.apply_chat_template(with_system_prompt(e.messages, "x:99"), add_generation_prompt=True,
                                               tokenize=True)["input_ids"]
            assert teacher_row == expected
            assert student_row == tok.apply_chat_template(list(e.messages), add_generation_prompt=True,
                                                          tokenize=True)["input_ids"]
    # the conversation's own system message keeps its place after the teacher-only one
    merged = with_system_prompt(CONVERSATIONS[1]["messages"], "x:99")
    assert merged[0] == {"role": "system", "content": "x:99\n\nx:"} and len(merged) == 4
    # without use_context the teacher reads exactly the student's ids
    plain = ModelTeacher(_model(tok, 1), tok)
    ids, mask = plain.prompt_batch(rollouts)
    assert torch.equal(ids[mask.bool()], rollouts.prompt_ids_BP[rollouts.prompt_mask_BP.bool()])


def test_a_teacher_with_its_own_tokenizer_renders_with_its_own_template(tmp_path, tok):
    teacher_tok = arith_chat_tokenizer()
    teacher_tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}"
                                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>:{% endif %}")
    task = _task(tmp_path, tok, train_turns="last", system_prompt="x:7")
    examples = task.all_examples()
    rollouts = rollouts_from_texts(tok, examples, [e.answer for e in examples], max_new_tokens=5)
    teacher = CrossTokenizerTeacher(_model(teacher_tok, 4), teacher_tok, tok, use_context=True)
    texts = teacher_prompt_texts(rollouts.examples, True, tokenizer=teacher_tok)
    for e, text in zip(rollouts.examples, texts, strict=True):
        assert text == teacher_tok.apply_chat_template(with_system_prompt(e.messages, "x:7"),
                                                       add_generation_prompt=True, tokenize=False)
        assert text.endswith("<assistant>:") and "<system>x:7" in text
    fb = teacher.score(rollouts)
    assert bool(torch.isfinite(fb.sampled_logprobs_BT).all())


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "1"}]}, r"chat.jsonl:2: message 1 has no 'role'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"chat.jsonl:2: message 1 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"chat.jsonl:2: message 2 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"chat.jsonl:2: the conversation has no assistant turn"),
    ({"messages": "hi"}, r"chat.jsonl:2: field 'messages' must be a non-empty list"),
    ({"conversation": []}, r"chat.jsonl:2: missing field 'messages'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "1"}]},
     r"chat.jsonl:2: message 1 \(user\) has no string 'content'"),
    ({"messages": [{"role": "user", "content": "1" * 40}, {"role": "assistant", "content": "1"}]},
     r"chat.jsonl:2: the conversation before assistant turn \(message 2\) is 44 tokens; .* student's context of 48 "
     r"tokens \(at most 40 prompt tokens\)"),
])
def test_bad_rows_give_one_line_errors_naming_file_and_line(tmp_path, tok, row, message):
    path = _write(tmp_path / "chat.jsonl", [CONVERSATIONS[0], row, CONVERSATIONS[0]])
    with pytest.raises(ChatDataError, match=message) as info:
        JsonlTask(path, eval_size=1,
                  layout=RecordLayout(answer_field=None,
                                      chat=ChatFormat(tokenizer=tok, max_prompt_tokens=40, context_window=48)))
    assert "\n" not in str(info.value)


def test_builtin_chat_task(tok):
    task = ArithChatTask(tok, train_turns="all", eval_size=20)
    examples = task.eval_examples()
    assert len(examples) == 20 and {e.fields["turn"] for e in examples} == {1, 2, 3, 4}
    for e in examples:  # the answer is the running total, read from the user and tool turns before it
        users = [m["content"] for m in e.messages if m["role"] == "user"]
        a, b = users[0].rstrip("=").split("+")
        if b == "x":
            b = next(m["content"] for m in e.messages if m["role"] == "tool").split(":")[1]
        total = int(a[::-1]) + int(b[::-1]) + (int(users[1].strip("+=")[::-1]) if len(users) == 2 else 0)
        assert e.answer == str(total)[::-1]
        assert task.verify(e, e.answer + "$") == 1.0 and task.verify(e, e.answer) == 0.0


# ----------------------------------------------------------------------------- through the CLI


def _save_pair(tmp_path: Path, tok) -> tuple[str, str]:
    paths = []
    for name, seed in (("teacher", 1), ("student", 2)):
        folder = tmp_path / name
        model = build_model(tiny_llama_config(len(tok), layers=1, hidden=32, tokenizer=tok, max_positions=64),
                            seed=seed)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        paths.append(str(folder))
    return paths[0], paths[1]


def test_chat_distill_runs_through_the_cli(tmp_path, tok):
    teacher, student = _save_pair(tmp_path, tok)
    data = _write(tmp_path / "conv.jsonl", [conversation(__import__("random").Random(i)) for i in range(64)])
    run = tmp_path / "run"
    args = ["distill", f"student.model={student}", f"teacher.model={teacher}", "data.task=jsonl", f"data.path={data}",
            "data.format=chat", "data.train_turns=all", "data.answer_field=null", "teacher.system_prompt=x:1",
            "teacher.use_context=true",
            "rollout.prompts_per_step=8", "rollout.max_new_tokens=5", "train.steps=2", "eval.size=8", "eval.every=0",
            "logging.progress=false", "logging.report=false", "train.threads=1", f"logging.run_dir={run}"]
    assert opd_main(args) == 0
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)


def test_the_shipped_chat_pair(tok):
    from opd.evaluate import verify_rollouts
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer

    task = ArithChatTask(tok, train_turns="all", eval_size=64)
    scores = {}
    for name in ("teacher", "student"):
        path = resolve_model_path(f"builtin:arith_chat/{name}")
        model_tok = load_tokenizer(path)
        assert model_tok.chat_template == tok.chat_template and model_tok.get_vocab() == tok.get_vocab()
        rollouts = generate_rollouts(load_model(path), model_tok, task.eval_examples(),
                                     Sampling(max_new_tokens=5, greedy=True))
        scores[name] = float(verify_rollouts(task, model_tok, rollouts).mean())
    assert scores["teacher"] >= 0.9 and scores["student"] < scores["teacher"]
