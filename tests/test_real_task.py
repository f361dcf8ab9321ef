"""The chat_basics task (opd/tasks/chat_basics.py): verifiers on hand-written completions, disjoint
train and held-out pools, deterministic records, the JSONL path a run reads (data.format=chat with
``verifier: python:opd.tasks.chat_basics:verify``), and the pad = eos message (opd keeps the EOS in
the completion mask whatever the pad id)."""

from __future__ import annotations

import pytest
import torch

from opd.chat import ChatFormat
from opd.data import JsonlTask, RecordLayout
from opd.models import build_model, tiny_llama_config
from opd.rollout import Sampling, generate_rollouts
from opd.rollout.vllm_engine import sampling_args
from opd.tasks.base import Example
from opd.tasks.chat_basics import DEFAULT_FAMILIES, FAMILIES, ChatBasicsTask, check_family, records, verify, write_jsonl
from opd.tokenization import char_tokenizer, compare_tokenizers

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +?\"'.,:\n"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer(ALPHABET, bos="^", eos="$", pad="_", unk="~")
    t.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>", "<system>"]})
    t.chat_template = TEMPLATE
    return t


@pytest.mark.parametrize("family, text, answer, ok", [
    ("sums", "4 + 7 = 11", "11", True),
    ("sums", "11 is 4 + 7", "11", False),  # the last number is the answer
    ("sums", "The answer is 1,100.", "1100", True),
    ("sums", "no number", "11", False),
    ("capitals", "The capital of France is Paris.", "Paris", True),
    ("capitals", "paris", "Paris", True),
    ("capitals", "Parisian food", "Paris", False),
    ("capitals", "It is Mexico City.", "Mexico City", True),
    ("casing", "APPLE", "APPLE", True),
    ("casing", "Apple", "APPLE", False),
    ("casing", "PINEAPPLES", "APPLE", False),
    ("plurals", 'The plural of "box" is "boxes".', "boxes", True),
    ("plurals", "boxs", "boxes", False),
    ("next", "The number after 41 is 42.", "42", True),
    ("next", "42 comes after 41.", "42", False),
    ("opposites", 'The opposite of "hot" is "cold".', "cold", True),
    ("opposites", "coldness", "cold", False),
])
def test_family_checks(family, text, answer, ok):
    assert check_family(family, text, answer) is ok


def test_verify_cuts_at_the_end_of_turn_and_scores_truncation_zero():
    ex = Example(prompt="q", answer="cold", fields={"family": "opposites", "answer": "cold"})
    assert verify(ex, "cold<|im_end|>") == 1.0
    assert verify(ex, "hot<|im_end|>cold") == 0.0  # after the end of turn does not count
    assert verify(ex, "cold and more") == 0.0  # never stopped: truncated
    with pytest.raises(ValueError, match="need 'family' and 'answer' fields"):
        verify(Example(prompt="q"), "x<|im_end|>")
    with pytest.raises(ValueError, match="unknown chat_basics family 'poems'"):
        check_family("poems", "x", "y")


def test_records_are_deterministic_and_held_out_questions_never_train():
    a, b = records(30, held_out=False, seed=0), records(30, held_out=False, seed=0)
    assert a == b and records(30, held_out=False, seed=1) != a
    train = {r["messages"][0]["content"] for r in records(200, held_out=False)}
    held = {r["messages"][0]["content"] for r in records(200, held_out=True)}
    assert train and held and not train & held
    counts = {f: sum(r["family"] == f for r in a) for f in DEFAULT_FAMILIES}
    assert set(counts.values()) == {30} and len(a) == 30 * len(DEFAULT_FAMILIES)
    every = records(12, held_out=False, families=list(FAMILIES)) + records(12, held_out=True, families=list(FAMILIES))
    for r in every:  # every reference answer passes its own family's check
        assert check_family(r["family"], r["answer"], r["answer"])
    # held-out questions go through the pool before any repeats
    for family in DEFAULT_FAMILIES:
        qs = [r["messages"][0]["content"] for r in records(40, held_out=True) if r["family"] == family]
        pool = len(set(qs))
        assert 8 <= pool < 40 and len(set(qs[:pool])) == pool
    with pytest.raises(ValueError, match=r"unknown chat_basics families \['x'\]"):
        records(1, held_out=True, families=["x"])


def test_jsonl_path_a_run_reads(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 8, held_out=False)
    held = write_jsonl(tmp_path / "eval.jsonl", 4, held_out=True, families=["sums", "capitals"])
    task = JsonlTask(train, eval_path=held,
                     layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=tok)),
                     verifier="python:opd.tasks.chat_basics:verify", eos_token="$")
    examples = task.eval_examples()
    assert len(examples) == 8 and [e.fields["family"] for e in examples[:2]] == ["sums", "capitals"]
    ex = examples[0]
    assert ex.prompt == f"^<user>{ex.messages[0]['content']}$<assistant>" or ex.prompt.endswith("<assistant>")
    assert task.verify(ex, f"It is {ex.fields['answer']}.<|im_end|>") == 1.0
    assert task.verify(ex, "It is 1000.<|im_end|>") == 0.0


def test_task_class_renders_chat_prompts(tok):
    task = ChatBasicsTask(tok, families=["capitals"], n_eval_per_family=3)
    ex = task.eval_examples()[0]
    assert ex.prompt.endswith("<assistant>") and ex.prompt.count("<user>") == 1
    assert task.verify(ex, f"{ex.answer}$") == 1.0 and task.verify(ex, f"{ex.answer}") == 0.0
    batch = task.train_examples(step=3, batch_size=5, seed=0)
    assert batch == task.train_examples(step=3, batch_size=5, seed=0) and len(batch) == 5
    held = {e.messages[0]["content"] for e in task.eval_examples()}
    assert not held & {e.messages[0]["content"] for s in range(20) for e in task.train_examples(s, 8, 0)}
    no_template = char_tokenizer("ab")
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        ChatBasicsTask(no_template)


def test_pad_equal_eos_keeps_the_eos_in_the_completion_mask():
    # SmolLM2's tokenizer has pad == eos; opd masks completions by the stop position, so the EOS stays
    tok = char_tokenizer("abc", bos="^", eos="$", pad="_", unk="?")
    tok.pad_token = "$"
    assert tok.pad_token_id == tok.eos_token_id
    cfg = tiny_llama_config(len(tok), layers=1, hidden=8, heads=2, tokenizer=tok)
    model = build_model(cfg, seed=0)
    head = torch.nn.Linear(8, len(tok), bias=True)  # EOS is the argmax after every prefix
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
    model.lm_head = head
    r = generate_rollouts(model, tok, [Example(prompt="ab"), Example(prompt="abcab")],
                          Sampling(max_new_tokens=4, greedy=True))
    assert r.completion_ids_BT[:, 0].tolist() == [tok.eos_token_id] * 2
    assert r.completion_mask_BT[:, 0].tolist() == [True, True]  # the EOS is in the loss
    assert r.completion_mask_BT[:, 1:].sum() == 0 and not r.truncated_B.any()
    # vLLM: opd's stop ids, vLLM's own EOS handling off; the same mask builder lays the rows out
    args = sampling_args(type("S", (), {"max_new_tokens": 4, "prefix_tokens": None, "greedy": True})(),
                         [tok.eos_token_id], None)
    assert args["stop_token_ids"] == [tok.eos_token_id] and args["ignore_eos"] is True
    warning = compare_tokenizers(tok, tok).warnings[0]
    assert warning.startswith("student pad_token_id == eos_token_id == 2 ('$'): harmless in opd")
    assert "keeps that EOS in the loss" in warning


def test_shipped_example_files_are_what_the_generator_writes(tmp_path):
    from pathlib import Path

    from opd.config.load import load_config

    folder = Path(__file__).resolve().parent.parent / "examples" / "real_models"
    for name, n, held in (("train.jsonl", 100, False), ("eval.jsonl", 14, True)):
        fresh = write_jsonl(tmp_path / name, n, held_out=held)
        assert (folder / name).read_text() == fresh.read_text(), name
    cfg = load_config(folder / "distill.yaml")
    assert cfg.teacher.model == "builtin:smollm2-135m-instruct" and cfg.data.format == "chat"
    assert cfg.data.verifier == "python:opd.tasks.chat_basics:verify"
