"""bench/gpu.py: the prepared GPU script runs end to end on the CPU with ``--dry-run`` (tiny sizes), and
its GPU sizes are the ones it promises (Qwen2.5-0.5B / 1.5B shapes, V = 151936). No timing is asserted."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("trl")
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("opd_bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(table: str, first: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{table}")


def _number(cell: str) -> float:
    assert re.fullmatch(r"[\d,]+(\.\d+)?", cell), f"not a measured number: {cell!r}"
    return float(cell.replace(",", ""))


def test_dry_run_exercises_every_part_on_the_cpu(gpu, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "gpu.md"
    results = ROOT / "bench" / "results.md"
    before = results.read_text() if results.exists() else None
    default_out = ROOT / "bench" / "data" / "gpu.md"
    existed = default_out.exists()
    try:
        code = gpu.main(["--dry-run", "--in-process", "--threads", "1", "--parts", "opd,trl,rollout-hf,loss",
                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = out.read_text()
    for framework in ("opd", "trl"):
        row = _row(table, framework)
        assert _number(row[1]) > 0 and _number(row[2]) == 4 * 6  # 4 prompts × 6 tokens (no EOS at random init)
        assert _number(row[3]) > 0
    assert "× TRL's tokens/s" in _row(table, "opd")[5]
    hf = _row(table, "hf")
    assert _number(hf[3]) > 0
    assert _row(table, "vllm")[5] == "not run"  # left out here: vLLM's CPU start-up takes a minute
    for divergence in ("rkl", "jsd"):
        for variant in ("dense", "chunked", "trl_chunked"):
            row = next(r for r in (line.strip("| ").split(" | ") for line in table.splitlines())
                       if r[:2] == [divergence, variant])
            assert _number(row[2]) > 0, row
            if variant != "dense":  # the same loss as dense, from the same inputs
                assert float(row[5]) < 1e-5
    # a dry run never touches the repository's results
    assert (results.read_text() if results.exists() else None) == before
    assert default_out.exists() == existed


def test_gpu_sizes_are_the_promised_qwen2_shapes(gpu):
    from transformers import Qwen2ForCausalLM

    tok = gpu.char_tokenizer_of_size(151936)
    assert len(tok) == 151936 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.decode(tok("123+45=").input_ids, skip_special_tokens=True) == "123+45="
    counts = {}
    for role in ("student", "teacher"):
        with torch.device("meta"):
            model = Qwen2ForCausalLM(gpu.qwen2_config(gpu.SIZES["gpu"][role], 151936, tok))
        counts[role] = sum(p.numel() for p in model.parameters())
        assert model.config.tie_word_embeddings and model.get_output_embeddings().weight.shape[0] == 151936
    assert 0.45e9 < counts["student"] < 0.55e9 and 1.45e9 < counts["teacher"] < 1.6e9


def test_vllm_row_says_why_when_the_engine_cannot_run(gpu, monkeypatch):
    why = gpu.vllm_unavailable()
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert (why is None) == (has_vllm and importlib.util.find_spec("opd.rollout.vllm_engine") is not None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    assert gpu.vllm_unavailable().startswith("not available")
