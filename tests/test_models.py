"""Tiny Llama configs, seeded building, and loading through AutoModelForCausalLM/AutoTokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.models import build_model, count_parameters, load_model, load_tokenizer, tiny_llama_config
from opd.tokenization import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer("0123456789+=")


def expected_params(vocab: int, layers: int, hidden: int, intermediate: int) -> int:
    """Naive count: embeddings (tied) + per layer q,k,v,o + gate,up,down + 2 norms + final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("layers, hidden, heads, intermediate", [(1, 32, 4, None), (2, 64, 4, None), (3, 24, 2, 40)])
def test_config_and_parameter_count(tok, layers, hidden, heads, intermediate):
    config = tiny_llama_config(len(tok), layers=layers, hidden=hidden, heads=heads,
                               intermediate=intermediate, tokenizer=tok)
    assert config.tie_word_embeddings
    assert config.num_key_value_heads == heads and config.head_dim == hidden // heads
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    model = build_model(config, seed=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert count_parameters(model) == expected_params(len(tok), layers, hidden, intermediate or 4 * hidden)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0


def test_feasibility_sizes():
    # feasibility.md: 4x128 with a 16-token vocabulary has 1,051,776 parameters, 2x64 has 132,416.
    assert count_parameters(build_model(tiny_llama_config(16, layers=4, hidden=128), 0)) == 1_051_776
    assert count_parameters(build_model(tiny_llama_config(16, layers=2, hidden=64), 0)) == 132_416


def test_config_errors(tok):
    with pytest.raises(ValueError, match=r"hidden \(30\) must be divisible by heads \(4\)"):
        tiny_llama_config(16, layers=1, hidden=30)
    with pytest.raises(ValueError, match=r"vocab_size \(8\) is smaller than the tokenizer's vocabulary \(16\)"):
        tiny_llama_config(8, layers=1, hidden=32, tokenizer=tok)
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        tiny_llama_config(16, layers=0, hidden=32)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    config = tiny_llama_config(16, layers=1, hidden=32)
    before = torch.get_rng_state()
    a, b, c = build_model(config, seed=3), build_model(config, seed=3), build_model(config, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.dtype == torch.float32
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not a.training


def test_save_and_load_round_trip(tok, tmp_path):
    model = build_model(tiny_llama_config(len(tok), layers=1, hidden=32, tokenizer=tok), seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = tok(["12+34=", "99+01="], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        loaded = load_model(tmp_path)
        assert torch.equal(loaded(ids).logits, expected)
        auto = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(auto(ids).logits, expected)
    assert not loaded.training
    assert load_model(str(tmp_path), dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(tmp_path, dtype="auto").model.embed_tokens.weight.dtype == torch.float32
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()


def test_load_errors(tok, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a model folder: expected config.json and one of model.safetensors"):
        load_model(empty)
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder: expected one of tokenizer.json"):
        load_tokenizer(empty)
    tok_only = tmp_path / "tok_only"
    tok.save_pretrained(tok_only)
    with pytest.raises(FileNotFoundError, match=r"found \['tokenizer.json', 'tokenizer_config.json'\]"):
        load_model(tok_only)
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_model(tok_only / "tokenizer.json")
    with pytest.raises(ValueError, match=r"dtype must be one of \['auto', 'bfloat16', 'float16', 'float32'\]"):
        load_model(tok_only, dtype="fp32")  # type: ignore[arg-type]


def test_unknown_hub_id_offline():
    # conftest sets HF_HUB_OFFLINE=1: a hub id fails fast, and the error says what was tried.
    with pytest.raises(OSError, match="could not load the model 'opd-test/does-not-exist'"):
        load_model("opd-test/does-not-exist")
