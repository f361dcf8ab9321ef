"""Models and tokenizers: tiny Llama models built from config, and loading through ``transformers``.

Everything here goes through the standard ``transformers`` classes (``LlamaForCausalLM``,
``AutoModelForCausalLM``, ``AutoTokenizer``), so a checkpoint written with ``save_pretrained``
by this package loads in any Hugging Face tool, and any causal LM from the hub or a local folder
loads here. Tiny models for tests and the built-in tasks are built from a config in-process: no
download ever.

A ``.gguf`` file loads too (dequantized, with the tokenizer and chat template stored in it; see
:mod:`opd.gguf`). A hub id is tried on the hub only when the hub can be reached: with
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``), or when the hub's host does not answer within
a few seconds, only the local Hugging Face cache is read, so a name that is not there fails at once
instead of after the hub client's retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "DType",
    "build_model",
    "count_parameters",
    "hub_offline_reason",
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


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub must not be contacted now, or None when it can be.

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value, or no TCP connection to the
    hub's host (``HF_ENDPOINT``, default huggingface.co, port 443) within ``timeout`` seconds. A
    configured HTTPS proxy is trusted (the host may only be reachable through it).
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is not reachable from here ({err.strerror or type(err).__name__})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_load(loader, name: str, what: str, **kwargs):
    """``loader(name, **kwargs)`` for a hub id: from the local cache only when the hub is unreachable
    (:func:`hub_offline_reason`), so a missing name fails in seconds with one line."""
    offline = hub_offline_reason()
    try:
        return loader(name, local_files_only=offline is not None, **kwargs)
    except (OSError, ValueError) as err:
        if offline is not None:
            raise OSError(
                f"could not load the {what} {name!r}: it is not a local folder or .gguf file, and as a Hugging Face "
                f"hub id it is not in the local cache, while the hub is off ({offline}); pass a local folder, a .gguf "
                "file or builtin:smollm2-135m-instruct, or download it where the hub is reachable") from None
        raise OSError(
            f"could not load the {what} {name!r}: it is not a local folder, and loading it as a Hugging Face hub id "
            f"failed ({_first_line(err)}). Check the id, your network, or HF_HUB_OFFLINE.") from None


def _resolve_builtin_gguf(name: str) -> str:
    """``builtin:<gguf name>`` → the file (:data:`opd.gguf.BUILTIN_GGUF`); anything else unchanged."""
    if name.startswith("builtin:"):
        from opd.gguf import BUILTIN_GGUF, builtin_gguf_path

        if name[len("builtin:"):] in BUILTIN_GGUF:
            return str(builtin_gguf_path(name[len("builtin:"):]))
    return name


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: DType = "float32",
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM`` from a local folder, a ``.gguf`` file or a hub id.

    Local folders load offline. A ``.gguf`` file (or ``builtin:smollm2-135m-instruct``) is
    dequantized to ``dtype`` (:func:`opd.gguf.load_gguf_model`). ``dtype="auto"`` keeps the dtype
    stored in the checkpoint. A hub id is read from the local cache only when the hub is off
    (:func:`hub_offline_reason`). The model is returned in eval mode on ``device``.

    Raises:
        ValueError: ``dtype`` is not one of float32, bfloat16, float16, auto.
        FileNotFoundError: the path does not exist, or the folder lacks ``config.json`` or the
            weights (the message lists the expected and the present files).
        opd.gguf.GgufError: a GGUF file that cannot be loaded (``gguf`` missing, truncated,
            unsupported architecture).
        OSError: a hub id that could not be loaded (no network, unknown id); the message says so.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    name = _resolve_builtin_gguf(os.fspath(name_or_path))
    if _is_gguf(name):
        from opd.gguf import load_gguf_model

        gguf_dtype = torch.float32 if dtype == "auto" else _DTYPES[dtype]  # GGUF weights are dequantized
        return load_gguf_model(name, dtype=gguf_dtype).to(device).eval()
    if _is_local(name):
        _check_local_folder(Path(name).expanduser(), _WEIGHT_FILES, "model", need_config=True)
        name = str(Path(name).expanduser())
        model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype])
    else:
        model = _hub_load(AutoModelForCausalLM.from_pretrained, name, "model", dtype=_DTYPES[dtype])
    return model.to(device).eval()


def load_model_config(name_or_path: str | os.PathLike[str]) -> PretrainedConfig:
    """A model's configuration without its weights: a local folder's ``config.json``, a ``.gguf`` file's
    metadata (:func:`opd.gguf.load_gguf_config`; also ``builtin:smollm2-135m-instruct``) or a hub id's.

    Raises:
        FileNotFoundError, opd.gguf.GgufError, OSError: as :func:`load_model`.
    """
    name = _resolve_builtin_gguf(os.fspath(name_or_path))
    if _is_gguf(name):
        from opd.gguf import load_gguf_config

        return load_gguf_config(name)
    if _is_local(name):
        _check_local_folder(Path(name).expanduser(), ("config.json",), "model", need_config=False)
        return AutoConfig.from_pretrained(str(Path(name).expanduser()))
    return _hub_load(AutoConfig.from_pretrained, name, "model configuration")


def _is_gguf(name: str) -> bool:
    from opd.gguf import is_gguf_path

    return is_gguf_path(name)


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer`` from a local folder, a ``.gguf`` file or a hub id.

    A ``.gguf`` file gives the tokenizer and chat template stored in its metadata
    (:func:`opd.gguf.load_gguf_tokenizer`).

    Raises:
        FileNotFoundError: the path does not exist or holds no tokenizer files (the message
            lists the expected and the present files).
        opd.gguf.GgufError: a GGUF file that cannot be loaded.
        OSError: a hub id that could not be loaded.
    """
    name = _resolve_builtin_gguf(os.fspath(name_or_path))
    if _is_gguf(name):
        from opd.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(name)
    if _is_local(name):
        _check_local_folder(Path(name).expanduser(), _TOKENIZER_FILES, "tokenizer", need_config=False)
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
    return _hub_load(AutoTokenizer.from_pretrained, name, "tokenizer")
