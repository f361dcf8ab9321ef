"""``opd eval`` without a run folder takes the completion length from the data, or asks for it, and
warns when more than 5 % of a model's completions were cut at the limit (issue 16.11).

The model is hand-built so that its greedy completion is known in advance: after ``=`` it writes a
fixed 12-letter chain and then EOS, whatever the prompt. With the old fixed default of 8 new tokens it
would score 0 with every completion truncated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.cli import main as opd_main

CHAIN = "bcdefghijklm"  # 12 letters: longer than the old default of 8 new tokens


def _chain_model(root: Path) -> Path:
    """A Llama whose greedy continuation of ``=`` is ``CHAIN`` then EOS ``</s>``: one-hot embeddings,
    blocks whose outputs are zeroed (the residual stream is the current token) and an output matrix
    that maps each token to its successor."""
    from opd.models import build_model, tiny_llama_config
    from opd.tokenization import char_tokenizer

    tok = char_tokenizer("a" + CHAIN + "=", eos="</s>")
    vocab = len(tok)
    config = tiny_llama_config(vocab, layers=1, hidden=32, tokenizer=tok)
    config.tie_word_embeddings = False
    model = build_model(config, seed=0)
    ids = [tok.convert_tokens_to_ids(c) for c in "=" + CHAIN]
    nxt = {i: tok.convert_tokens_to_ids("a") for i in range(vocab)}
    nxt.update(zip(ids[:-1], ids[1:]))
    nxt[ids[-1]] = tok.eos_token_id
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.get_input_embeddings().weight.copy_(torch.eye(vocab, 32))
        head = torch.zeros(vocab, 32)
        for i, j in nxt.items():
            head[j, i] = 1.0
        model.get_output_embeddings().weight.copy_(head)
    out = root / "chain"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evallen")
    model = _chain_model(root)
    rows = [{"prompt": p + "=", "answer": CHAIN} for p in ("a", "b", "ab", "ba", "abc", "cab", "bb", "cc")] * 5
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model, prompts


def _eval(args: list[str], tmp_path: Path, capsys) -> tuple[dict, str, str]:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    assert opd_main(["eval", *args, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    return json.loads(out.read_text()), captured.out, captured.err


def test_length_comes_from_the_data_without_a_run(files, tmp_path, capsys):
    model, prompts = files
    data, out, err = _eval([str(model), "--prompts", str(prompts)], tmp_path, capsys)
    r = data["results"][0]
    # 12 answer tokens + EOS = 13, plus max(2, 13 // 4) = 3 headroom
    assert data["settings"]["max_new_tokens"] == 16
    assert "max_new_tokens 16 (from the data: longest answer 12 tokens + EOS + headroom)" in out
    assert (r["eval/accuracy"], r["eval/truncation_rate"], r["eval/mean_length"]) == (1.0, 0.0, 13.0)
    assert "warning" not in err


def test_truncation_above_five_percent_is_warned(files, tmp_path, capsys):
    model, prompts = files
    data, out, err = _eval([str(model), "--prompts", str(prompts), "--max-new-tokens", "8"], tmp_path, capsys)
    r = data["results"][0]
    assert (r["eval/accuracy"], r["eval/truncation_rate"]) == (0.0, 1.0)
    assert f"opd eval: warning: 100.0% of {model}'s completions hit max_new_tokens=8" in err
    assert "raise --max-new-tokens" in err
    # exactly at the limit (13 = answer + EOS): nothing is cut, nothing is said
    data, _, err = _eval([str(model), "--prompts", str(prompts), "--max-new-tokens", "13"], tmp_path, capsys)
    assert data["results"][0]["eval/truncation_rate"] == 0.0 and "warning" not in err


def test_the_warning_threshold_is_five_percent():
    from opd.commands.eval import truncation_warning

    assert truncation_warning("m", 0.05, 8) is None
    assert truncation_warning("m", 0.051, 8).startswith("opd eval: warning: 5.1% of m's completions")


def test_a_verifier_without_a_length_bound_requires_max_new_tokens(files, capsys):
    model, prompts = files
    assert opd_main(["eval", str(model), "--prompts", str(prompts), "--verifier", "contains"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "verifier contains" in err[0] and "pass --max-new-tokens N" in err[0]


def test_builtin_task_uses_its_own_longest_answer(capsys):
    """arith with 9 digits: answers of up to 10 digits + EOS = 11 tokens (``ArithTask.max_new_tokens``)."""
    assert opd_main(["eval", "builtin:arith/smoke_teacher", "--digits", "9", "--size", "4"]) == 0
    out = capsys.readouterr().out
    assert "max_new_tokens 11 (the task's longest answer + EOS)" in out
