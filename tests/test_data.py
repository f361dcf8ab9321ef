"""User prompt data: JSONL / HF dataset parsing, errors, deterministic batches, held-out set, verifiers."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from opd.data import DataError, HFDatasetTask, JsonlTask, RecordLayout, make_verifier, read_jsonl
from opd.tasks.base import Example, Task


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _records(n, **extra):
    return [{"prompt": f"q{i}", "answer": i, **extra} for i in range(n)]


def test_jsonl_records_become_examples(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "answer": 4, "hint": "four", "domain": 1},
        "",  # blank lines are skipped
        {"prompt": "3+3=", "answer": "6", "hint": "six", "domain": "b"},
    ] + [{"prompt": f"x{i}", "answer": "0", "hint": "h", "domain": "c"} for i in range(8)])
    task = JsonlTask(path, layout=RecordLayout(context_field="hint", route_field="domain"), eval_size=1, seed=3)
    assert isinstance(task, Task) and task.name == "jsonl"
    every = {e.prompt: e for e in task.eval_examples() + task.train_examples(0, 9, seed=0)}
    first = every["2+2="]
    assert first.answer == "4" and first.teacher_context == "four"
    assert first.fields["domain"] == "1" and first.fields["hint"] == "four"  # route values are strings
    assert every["3+3="].fields["domain"] == "b"


def test_jsonl_errors_say_where_and_what(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonlTask(tmp_path / "missing.jsonl")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c",'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(bad)
    not_obj = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(not_obj)
    no_prompt = _write(tmp_path / "np.jsonl", [{"prompt": "a"}, {"question": "b", "id": 2}])
    with pytest.raises(DataError, match=r"np\.jsonl:2: missing field 'prompt'; the record has fields \['id', 'question'\]"):
        JsonlTask(no_prompt, eval_size=1)
    ctx = _write(tmp_path / "ctx.jsonl", [{"prompt": "a", "c": "x"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"ctx\.jsonl:2: missing field 'c'"):
        JsonlTask(ctx, layout=RecordLayout(context_field="c"), eval_size=1)
    partial = _write(tmp_path / "partial.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"partial\.jsonl:2: missing field 'answer'"):
        JsonlTask(partial, eval_size=1)
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no records"):
        JsonlTask(empty)
    with pytest.raises(DataError, match="leaves no training prompts"):
        JsonlTask(_write(tmp_path / "two.jsonl", _records(2)), eval_size=2)
    with pytest.raises(DataError, match="must be a string"):
        JsonlTask(_write(tmp_path / "num.jsonl", [{"prompt": 3}, {"prompt": "x"}]), eval_size=1)


def test_batches_are_deterministic_and_cover_each_epoch(tmp_path):
    task = JsonlTask(_write(tmp_path / "p.jsonl", _records(30)), eval_size=6, seed=1)
    assert task.num_train == 24
    again = JsonlTask(tmp_path / "p.jsonl", eval_size=6, seed=1)
    for step in (0, 1, 7, 100):
        assert task.train_examples(step, 5, seed=2) == again.train_examples(step, 5, seed=2)
    assert task.train_examples(0, 5, seed=2) != task.train_examples(0, 5, seed=3)
    # One epoch of 24 = 6 steps × 4 visits every training example once; the next epoch reshuffles.
    epoch0 = [e.prompt for s in range(6) for e in task.train_examples(s, 4, seed=0)]
    epoch1 = [e.prompt for s in range(6, 12) for e in task.train_examples(s, 4, seed=0)]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 24 and epoch0 != epoch1
    # A batch that straddles two epochs is the concatenation of both orders.
    assert [e.prompt for e in task.train_examples(1, 20, seed=0)] == (epoch0 + epoch1)[20:40]
    with pytest.raises(ValueError, match="step must be"):
        task.train_examples(-1, 4, seed=0)


def test_held_out_set_is_fixed_and_disjoint(tmp_path):
    records = _records(40) + [{"prompt": "q3", "answer": 3}, {"prompt": "q5", "answer": 5}]  # duplicate prompts
    task = JsonlTask(_write(tmp_path / "p.jsonl", records), eval_size=10, seed=0)
    held = {e.prompt for e in task.eval_examples()}
    assert len(task.eval_examples()) == 10 and task.eval_examples(3) == task.eval_examples()[:3]
    assert held == {e.prompt for e in JsonlTask(tmp_path / "p.jsonl", eval_size=10, seed=0).eval_examples()}
    seen = {e.prompt for s in range(50) for e in task.train_examples(s, 7, seed=s % 3)}
    assert not held & seen
    assert held | seen == {f"q{i}" for i in range(40)}
    with pytest.raises(ValueError, match=r"n must be in \[1, 10\]"):
        task.eval_examples(11)
    # Default held-out size: 10 % of the records.
    assert len(JsonlTask(tmp_path / "p.jsonl").eval_examples()) == 4


def test_eval_file_is_held_out_from_training(tmp_path):
    train = _write(tmp_path / "train.jsonl", _records(12))
    evals = _write(tmp_path / "eval.jsonl", [{"prompt": "q1", "answer": 1}, {"prompt": "new", "answer": 9}])
    task = JsonlTask(train, eval_path=evals)
    assert [e.prompt for e in task.eval_examples()] == ["q1", "new"]
    assert task.num_train == 11
    assert "q1" not in {e.prompt for s in range(20) for e in task.train_examples(s, 5, seed=0)}


def test_builtin_verifiers():
    ex = Example("p", answer=" 42 ")
    exact = make_verifier("exact_match", has_answers=True, eos_token="$")
    assert exact(ex, "42$__") == 1.0
    assert exact(ex, "  42\n$") == 1.0
    assert exact(ex, "421$") == 0.0
    assert exact(ex, "42") == 0.0  # no EOS: truncated
    contains = make_verifier("contains", has_answers=True, eos_token="$")
    assert contains(ex, "so it is 42.$") == 1.0 and contains(ex, "4 2$") == 0.0
    assert contains(ex, "$ 42") == 0.0  # after EOS does not count
    no_eos = make_verifier("exact_match", has_answers=True)
    assert no_eos(ex, " 42 ") == 1.0
    assert make_verifier("none", has_answers=True) is None
    assert make_verifier("auto", has_answers=False) is None
    assert make_verifier("auto", has_answers=True)(ex, "42") == 1.0
    with pytest.raises(ValueError, match="needs reference answers"):
        make_verifier("exact_match", has_answers=False)
    with pytest.raises(ValueError, match="unknown verifier 'regex'"):
        make_verifier("regex", has_answers=True)


def test_python_verifier_and_none(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(example, completion):\n    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = make_verifier("python:my_rewards:length", has_answers=False)
    assert fn(Example("p"), "abcde") == 0.5
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        make_verifier("python:no_such_module_xyz:f", has_answers=False)
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        make_verifier("python:my_rewards:missing", has_answers=False)
    with pytest.raises(ValueError, match="python:module:function"):
        make_verifier("python:my_rewards", has_answers=False)
    task = JsonlTask(_write(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(5)]), eval_size=1)
    assert not task.has_verifier and math.isnan(task.verify(task.eval_examples()[0], "x"))
    py_task = JsonlTask(tmp_path / "p.jsonl", eval_size=1, verifier="python:my_rewards:length")
    assert py_task.has_verifier and py_task.verify(Example("q"), "ab") == 0.2
    answered = JsonlTask(_write(tmp_path / "a.jsonl", _records(5)), eval_size=1, eos_token="$")
    assert answered.verify(Example("q", answer="3"), "3$") == 1.0


def test_hf_dataset_task_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'opd\[hub\]'"):
        HFDatasetTask("some/dataset", "train")


def test_hf_dataset_task_with_a_fake_datasets_module(monkeypatch, tmp_path):
    rows = {"train": [{"question": f"q{i}", "label": i} for i in range(20)],
            "test": [{"question": "t0", "label": 0}, {"question": "t1", "label": 1}]}
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, split):
        calls.append((name, split))
        return rows[split]

    fake.load_dataset = load_dataset
    fake.load_from_disk = lambda path: {"train": rows["train"]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = HFDatasetTask("org/data", "train", eval_split="test",
                         layout=RecordLayout(prompt_field="question", answer_field="label"))
    assert calls == [("org/data", "train"), ("org/data", "test")]
    assert [e.prompt for e in task.eval_examples()] == ["t0", "t1"] and task.num_train == 20
    assert task.verify(task.eval_examples()[1], "1") == 1.0
    disk = tmp_path / "saved"
    disk.mkdir()
    (disk / "dataset_dict.json").write_text("{}")
    local = HFDatasetTask(str(disk), "train",
                          layout=RecordLayout(prompt_field="question", answer_field="label"), eval_size=5)
    assert local.num_train == 15
    with pytest.raises(DataError, match=r"no split 'validation'; splits: \['train'\]"):
        HFDatasetTask(str(disk), "validation", layout=RecordLayout(prompt_field="question"))
    eval_file = _write(tmp_path / "eval.jsonl", [{"question": "q3", "label": 3}, {"question": "e", "label": 0}])
    with_file = HFDatasetTask("org/data", "train", eval_path=str(eval_file),
                              layout=RecordLayout(prompt_field="question", answer_field="label"))
    assert [e.prompt for e in with_file.eval_examples()] == ["q3", "e"] and with_file.num_train == 19
    with pytest.raises(DataError, match=r"org/data\[train\] row 0: missing field 'prompt'"):
        HFDatasetTask("org/data", "train")


def test_errors_in_the_eval_file_name_that_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", _records(4))
    evals = _write(tmp_path / "held.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"held\.jsonl:2: missing field 'prompt'"):
        JsonlTask(train, eval_path=evals, layout=RecordLayout(answer_field=None))


def test_system_prompt_is_every_plain_records_teacher_context(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "hint": f"h{i}"}) + "\n"
                            for i in range(10)))
    task = JsonlTask(path, eval_size=2, layout=RecordLayout(system_prompt="be brief"))
    assert {e.teacher_context for e in task.all_examples()} == {"be brief"}
    with_field = JsonlTask(path, eval_size=2, layout=RecordLayout(system_prompt="be brief", context_field="hint"))
    assert all(e.teacher_context == "h" + e.prompt.split("+")[0] for e in with_field.all_examples())


def test_chat_records_through_build_task(tmp_path):
    import random

    from opd.config.load import load_config
    from opd.factories import build_task
    from opd.models import build_model, tiny_llama_config
    from opd.tasks.arith_chat import arith_chat_tokenizer, conversation

    tok = arith_chat_tokenizer()
    folder = tmp_path / "student"
    build_model(tiny_llama_config(len(tok), layers=1, hidden=16, tokenizer=tok, max_positions=40), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(conversation(random.Random(i))) + "\n" for i in range(20)))
    cfg = load_config(None, [f"student.model={folder}", "teacher.model=self", "data.task=jsonl", f"data.path={path}",
                             "data.format=chat", "data.answer_field=null", "data.train_turns=all", "eval.size=4"])
    task = build_task(cfg, eos_token="$")
    assert len(task.eval_examples()) == 8 and all(e.messages is not None for e in task.eval_examples())
    long = tmp_path / "long.jsonl"
    row = {"messages": [{"role": "user", "content": "1" * 60}, {"role": "assistant", "content": "1"}]}
    long.write_text(json.dumps(conversation(random.Random(0))) + "\n" + json.dumps(row) + "\n")
    cfg.data.path = str(long)
    with pytest.raises(ValueError, match=rf"{long}:2: the conversation before assistant turn \(message 2\) is 64 "
                                         r"tokens; .*context of 40 tokens \(at most 32 prompt tokens\)"):
        build_task(cfg, eos_token="$")
