"""``opd eval MODEL --prompts FILE`` with conversation rows (``{"messages": [...]}``): each model renders
them with its own chat template and the last assistant turn is the reference answer — the accuracy
equals a naive reference written here (``transformers`` ``generate``, greedy, on the template's
rendering of the conversation before that turn, exact match after cutting at EOS).

Models: the shipped arith_chat pair (a chat template, EOS ``$``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.cli import main as opd_main


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    from opd.tasks.arith_chat import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("chatrows") / "held.jsonl", 24, seed="eval-chat-rows")


def naive_accuracy(name: str, path: Path, max_new_tokens: int) -> float:
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer

    folder = resolve_model_path(name)
    tok, model = load_tokenizer(folder), load_model(folder).eval()
    right = 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        completion = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
        if tok.eos_token not in completion:
            continue  # cut at the limit: wrong, as opd scores it
        right += completion.split(tok.eos_token)[0].strip() == messages[last]["content"].strip()
    return right / len(rows)


def test_conversation_rows_are_scored_with_each_models_template(chat_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = opd_main(["eval", "builtin:arith_chat/teacher", "builtin:arith_chat/student", "--prompts", str(chat_file),
                     "--max-new-tokens", "6", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "conversations in 'messages'" in printed and "last assistant turn is the answer" in printed
    results = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    for name in ("builtin:arith_chat/teacher", "builtin:arith_chat/student"):
        assert results[name]["eval/n"] == 24
        assert results[name]["eval/accuracy"] == pytest.approx(naive_accuracy(name, chat_file, 6), abs=1e-9)
    assert results["builtin:arith_chat/teacher"]["eval/accuracy"] >= 0.9


def test_prompt_rows_are_not_taken_for_conversations(tmp_path):
    from opd.commands.eval import chat_rows

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "1+2=", "answer": "3", "messages": []}) + "\n")
    conv = tmp_path / "conv.jsonl"
    conv.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert not chat_rows(plain, messages_field="messages", prompt_field="prompt")
    assert chat_rows(conv, messages_field="messages", prompt_field="prompt")
    assert not chat_rows(broken, messages_field="messages", prompt_field="prompt")
