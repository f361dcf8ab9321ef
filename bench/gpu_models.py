"""The model pair of bench/gpu.py: random-init Qwen2-style student and teacher at the issue's sizes
(student ≈ 0.5 B, teacher ≈ 1.5 B, V = 151936) or tiny ``--dry-run`` sizes, with a character-level
tokenizer of exactly V ids — nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"vocab": 151936,
            "student": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2},
            "teacher": {"hidden": 1536, "intermediate": 8960, "layers": 28, "heads": 12, "kv_heads": 2},
            "prompts": 32, "tokens": 256, "warmup": 2, "steps": 5, "rollout_reps": 3,
            "loss_tokens": 4096, "loss_reps": 5},
    "dry": {"vocab": 1024,
            "student": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "kv_heads": 1},
            "teacher": {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2},
            "prompts": 4, "tokens": 6, "warmup": 1, "steps": 2, "rollout_reps": 2,
            "loss_tokens": 64, "loss_reps": 2},
}


def char_tokenizer_of_size(vocab: int):
    """A one-token-per-character fast tokenizer with exactly ``vocab`` ids: pad ``_`` = 0, bos ``^``,
    eos ``$``, unk ``?``, the arithmetic characters, then filler code points from U+4E00 up
    (surrogates skipped). Built directly (opd.tokenization.char_tokenizer checks its alphabet in
    quadratic time, too slow at 151936 characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from opd.tasks.arith import ARITH_ALPHABET

    specials = ["_", "^", "$", "?"]
    chars = [*specials, *ARITH_ALPHABET]
    code = 0x4E00
    while len(chars) < vocab:
        if not 0xD800 <= code <= 0xDFFF:
            chars.append(chr(code))
        code += 1
    table = {c: i for i, c in enumerate(chars)}
    if len(table) != vocab:
        raise ValueError(f"the tokenizer has {len(table)} distinct characters, expected {vocab}")
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="^ $A", pair="^ $A $B:1", special_tokens=[("^", 1)])
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="^", eos_token="$", pad_token="_",
                                   unk_token="?", padding_side="left")


def qwen2_config(spec: dict[str, Any], vocab: int, tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                       num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                       num_key_value_heads=spec["kv_heads"], max_position_embeddings=2048, rope_theta=1e6,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_pair(folder: Path, size: str, device: str) -> dict[str, Any]:
    """Save the random-init student and teacher (bf16, seeds 1 and 2) and the tokenizer under ``folder``."""
    import torch
    from transformers import Qwen2ForCausalLM

    spec = SIZES[size]
    tok = char_tokenizer_of_size(spec["vocab"])
    out: dict[str, Any] = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        path = folder / role
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(qwen2_config(spec[role], spec["vocab"], tok)).to(torch.bfloat16)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(model.config, key))
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        del model
    return out
