"""Models and tokenizers: tiny Llama models built from config, and loading through ``transformers``.

Everything here goes through the standard ``transformers`` classes (``LlamaForCausalLM``,
``AutoModelForCausalLM``, ``AutoTokenizer``), so a checkpoint written with ``save_pretrained``
by this package loads in any Hugging Face tool, and any causal LM from the hub or a local folder
loads here. Tiny models for tests and the built-in tasks are built from a config in-process: no
download ever.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "DType",
    "build_model",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "tiny_llama_config",
]

DType = Literal["float32", "bfloat16", "float16", "auto"]

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

#: Files that make a folder loadable by ``AutoModelForCausalLM`` (config + one weight format).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Files that make a folder loadable by ``AutoTokenizer`` (any one of them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def tiny_llama_config(
    vocab_size: int,
    *,
    layers: int,
    hidden: int,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 64,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LlamaConfig:
    """Config of a small Llama decoder with tied input/output embeddings.

    Multi-head attention (``num_key_value_heads == heads``), head dimension ``hidden // heads``,
    SwiGLU MLP of width ``intermediate`` (default ``4 * hidden``), RoPE over ``max_positions``.
    With a ``tokenizer``, its bos/eos/pad ids are written into the config (so ``generate`` stops
    at the right EOS and pads with the right id) and ``vocab_size`` must cover it.

    Parameter count: ``V*H + layers*(4*H^2 + 3*H*I + 2*H) + H`` (tied embeddings).

    Raises:
        ValueError: a non-positive size, ``hidden`` not divisible by ``heads``, or a
            ``vocab_size`` smaller than the tokenizer's vocabulary.
    """
    for name, value in (("vocab_size", vocab_size), ("layers", layers), ("hidden", hidden),
                        ("heads", heads), ("max_positions", max_positions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}); e.g. hidden={heads * max(1, hidden // heads)}")
    intermediate = 4 * hidden if intermediate is None else intermediate
    if not isinstance(intermediate, int) or intermediate < 1:
        raise ValueError(f"intermediate must be a positive integer, got {intermediate!r}")
    special_ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary ({len(tokenizer)}); "
                f"pass vocab_size >= {len(tokenizer)}"
            )
        special_ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **special_ids,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` in float32, on CPU, in eval mode.

    The initialisation depends only on ``config`` and ``seed`` (the global RNG is saved and
    restored, so building a model does not disturb the caller's random stream). The model's
    ``generation_config`` carries the config's bos/eos/pad ids.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _is_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is meant as a filesystem path rather than a hub id (``org/name``
    whose ``org`` is an existing local folder counts as a path: ``runs/typo`` fails at once instead
    of after the hub's retries)."""
    if os.path.exists(name_or_path):
        return True
    p = name_or_path
    return (
        p.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(p) or p.count("/") > 1
        or (os.sep != "/" and os.sep in p) or (p.count("/") == 1 and os.path.isdir(p.split("/")[0]))
    )


def _check_local_folder(path: Path, required: tuple[str, ...], what: str, need_config: bool) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} path {str(path)!r} does not exist; pass an existing folder written by "
            "save_pretrained, or a Hugging Face hub id such as 'org/name'"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path {str(path)!r} is a file; pass the folder that contains it")
    present = {p.name for p in path.iterdir()}
    missing_config = need_config and "config.json" not in present
    if missing_config or not present.intersection(required):
        expected = ("config.json and one of " if need_config else "one of ") + ", ".join(required)
        raise FileNotFoundError(
            f"{str(path)!r} is not a {what} folder: expected {expected}; found "
            f"{sorted(present) or 'an empty folder'}. Write it with save_pretrained()."
        )


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: DType = "float32",
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM`` from a local folder or a hub id.

    Local folders load offline. ``dtype="auto"`` keeps the dtype stored in the checkpoint.
    The model is returned in eval mode on ``device``.

    Raises:
        ValueError: ``dtype`` is not one of float32, bfloat16, float16, auto.
        FileNotFoundError: the path does not exist, or the folder lacks ``config.json`` or the
            weights (the message lists the expected and the present files).
        OSError: a hub id that could not be loaded (no network, unknown id); the message says so.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    name = os.fspath(name_or_path)
    if _is_local(name):
        _check_local_folder(Path(name).expanduser(), _WEIGHT_FILES, "model", need_config=True)
        name = str(Path(name).expanduser())
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype])
    except OSError as err:
        raise OSError(
            f"could not load the model {name!r}: it is not a local folder, and loading it as a "
            f"Hugging Face hub id failed ({err}). Check the id, your network, or HF_HUB_OFFLINE."
        ) from err
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer`` from a local folder or a hub id.

    Raises:
        FileNotFoundError: the path does not exist or holds no tokenizer files (the message
            lists the expected and the present files).
        OSError: a hub id that could not be loaded.
    """
    name = os.fspath(name_or_path)
    if _is_local(name):
        _check_local_folder(Path(name).expanduser(), _TOKENIZER_FILES, "tokenizer", need_config=False)
        name = str(Path(name).expanduser())
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise OSError(
            f"could not load the tokenizer {name!r}: it is not a local folder, and loading it as a "
            f"Hugging Face hub id failed ({err}). Check the id, your network, or HF_HUB_OFFLINE."
        ) from err
