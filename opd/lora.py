"""LoRA students through ``peft``: wrapping, adapter save / load, merging, and the frozen base.

Every ``peft``-specific line of opd lives here. A LoRA student is the same ``*ForCausalLM`` object
with LoRA layers injected in place (``transformers``' PEFT integration, ``model.add_adapter``,
which calls ``peft.inject_adapter_in_model``), not a ``PeftModel`` wrapper: the rollout loop, the
completion forward (``logits_to_keep``, the KV-cache keyword), :func:`opd.rollout.lm_head_of` and
``accelerate`` see the model class they already know. Each adapted linear layer computes
(Hu et al., arXiv 2106.09685)::

    y = W x + b + (α / r) · B A dropout(x)        W: [out, in] frozen; A: [r, in], B: [out, r] trained

``B`` starts at zero, so the wrapped student starts exactly at its base model, and the base
weights never change during training: **the frozen base is the initial student**. That is what
lets a self-teacher (``teacher.model=self``, ``self_mode=frozen``) score with the student's own
module under :func:`adapters_disabled` instead of a deep copy of the weights.

What the checkpoint and final-save code calls (the files are written by ``save_pretrained`` in the
layouts ``peft`` and ``transformers`` read):

* :func:`save_student` ``(model, tokenizer, folder, merged=False)`` — a LoRA student writes its
  adapter (``adapter_model.safetensors`` with ``base_model.model.``-prefixed keys + ``adapter_config.json``;
  ``PeftModel.from_pretrained(base, folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)``
  load it); ``merged=True`` writes full merged weights (``W + (α/r)·B A``) that any HF tool loads
  without ``peft``. A plain student writes its weights either way.
* :func:`apply_student_weights` ``(model, weights, source)`` — the inverse, exact (bitwise), for the
  weights read from such a folder (adapter or full alike), with a one-line error when they do not
  fit the model; :func:`load_student_weights` ``(model, folder)`` reads the folder and applies them.
* :func:`merged_state_dict` (and :func:`merge_lora_state_dict` for a state dict gathered from shards)
  — the merged weights under the plain model's parameter names, what a serving engine must receive
  (opd/rollout/vllm_engine.py pushes them for a LoRA student); :func:`merged_copy` — a plain
  merged model object (``opd export --check``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraSettings",
    "adapter_base_path",
    "adapters_disabled",
    "apply_lora",
    "apply_student_weights",
    "is_adapter_folder",
    "is_lora",
    "load_adapter_model",
    "load_student_weights",
    "lora_parameter_names",
    "merge_lora_state_dict",
    "merged_copy",
    "merged_state_dict",
    "save_student",
]

#: Files of an adapter folder (the names ``peft`` and ``transformers`` write and read).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The key prefix of ``PeftModel``-format adapter files (``transformers`` writes it too).
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    """The ``student.lora_*`` options: rank ``r``, scale numerator ``α`` (the update is scaled by
    ``α / r``), dropout on the adapter's input, and the modules to adapt (``peft`` names: a module
    is adapted when its name equals or ends with an entry; ``all-linear`` = every linear layer but
    the output head)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or any(not isinstance(t, str) or not t for t in self.target_modules):
            raise ValueError(f"LoRA target modules must be a non-empty list of module names, got "
                             f"{list(self.target_modules)!r}; e.g. ['all-linear'] or ['q_proj', 'v_proj']")

    @classmethod
    def from_student_config(cls, student: Any) -> "LoraSettings | None":
        """The settings of a ``student`` config section, or None when ``lora_rank`` is 0 (full fine-tuning)."""
        if not student.lora_rank:
            return None
        return cls(rank=int(student.lora_rank), alpha=float(student.lora_alpha), dropout=float(student.lora_dropout),
                   target_modules=tuple(student.lora_target_modules))

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of these settings."""
        LoraConfig = _peft().LoraConfig
        targets: str | list[str] = "all-linear" if list(self.target_modules) == ["all-linear"] else list(
            self.target_modules)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none")


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # an optional dependency
        raise ValueError("LoRA students need the peft package: pip install 'opd[lora]' (or pip install peft)") from err
    return peft


def _tuner_layer_class() -> type | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return BaseTunerLayer


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``peft`` adapter layer in ``model`` (also through DDP/FSDP wrappers)."""
    cls = _tuner_layer_class()
    if cls is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA (any ``peft`` adapter) layers."""
    return bool(_tuner_layers(model))


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter's own parameters (``...lora_A.default.weight`` etc.), in module order."""
    names = []
    for prefix, layer in _tuner_layers(model):
        for attr in layer.adapter_layer_names:
            for name, _ in getattr(layer, attr).named_parameters():
                names.append(f"{prefix}.{attr}.{name}")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings | Any) -> nn.Module:
    """Inject LoRA layers into ``model`` in place and freeze everything else; returns ``model``.

    ``settings`` is a :class:`LoraSettings` or a ``peft.LoraConfig`` (an adapter folder's own
    config, when rebuilding a saved adapter). ``A`` is initialised from torch's global RNG (Kaiming
    uniform) and ``B`` at zero, so the wrapped model computes exactly what it computed before.

    Raises:
        ValueError: ``peft`` is missing; the model already has an adapter; the target modules match
            no module (the message lists the linear layers there are); a target is not a linear
            layer, or is the output head (the memory-efficient loss reads the head's weight
            directly, and a tied head would change the input embedding when merged).
    """
    _peft()
    if is_lora(model):
        raise ValueError(f"{type(model).__name__} already carries a LoRA adapter; wrap the base model once")
    config = settings.peft_config() if isinstance(settings, LoraSettings) else copy.deepcopy(settings)
    if not hasattr(model, "add_adapter"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no add_adapter); LoRA students must be "
                         "*ForCausalLM models")
    try:
        model.add_adapter(config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "no target modules" not in str(err).lower():
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target modules {sorted(config.target_modules)} match no module of "
                         f"{type(model).__name__}; its linear layers are named {linear}; use e.g. ['all-linear'] or "
                         f"{linear[:2]}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, layer in _tuner_layers(model):
        base = layer.get_base_layer()
        if layer is head or base is head:
            raise ValueError(f"LoRA on the output head ({name}) is not supported: the memory-efficient loss reads "
                             "the head weight directly; remove it from student.lora_target_modules")
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA target {name} is a {type(base).__name__}; opd adapts linear layers only "
                             "(embeddings are tied to the output head); remove it from student.lora_target_modules")
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base inside the block: every adapter layer returns ``W x + b``.

    This is how a LoRA self-teacher scores without a second copy of the weights: the adapter is
    switched off on the shared module for the teacher's forward and switched back on after it.
    On exit each layer's previous on/off state and each adapter parameter's ``requires_grad``
    (``peft`` clears it when disabling) are restored exactly. The switch is a property of the
    module, so nothing else may run the same module concurrently (another thread training the
    student would see the base too).
    """
    layers = [layer for _, layer in _tuner_layers(model)]
    previous = [bool(layer.disable_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for attr in layer.adapter_layer_names
             for p in getattr(layer, attr).parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.enable_adapters(not was_disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


#: Name parts that wrappers insert between a model and its modules (DDP, FSDP1, torch.compile).
_WRAPPER_PARTS = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _unwrapped_name(name: str, tuner_prefixes: Sequence[str]) -> str | None:
    """The plain model's name of a LoRA model's state-dict key; None for adapter-only keys."""
    for prefix in tuner_prefixes:
        if name.startswith(prefix + "."):
            rest = name[len(prefix) + 1:]
            if rest.startswith("base_layer."):
                return f"{prefix}.{rest[len('base_layer.'):]}"
            return None  # lora_A / lora_B / dropout ... of this layer
    return name


def merge_lora_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA model's full ``state_dict`` (e.g. gathered from FSDP shards, names as in
    ``model.state_dict()``) turned into the plain model's: for every adapted layer ``p``,

        p.weight = p.base_layer.weight + Σ_a scaling_a · (p.lora_B.a.weight @ p.lora_A.a.weight)

    over its active adapters (none when the adapters are disabled or already merged), the other
    ``base_layer.`` keys renamed, the adapter keys dropped; every other entry is passed through (the
    same tensor). ``scaling = α / r`` is read from ``model``'s layers.
    """
    layers = {_clean(n): layer for n, layer in _tuner_layers(model)}
    prefixes = sorted(layers, key=len, reverse=True)
    state = {_clean(k): v for k, v in state_dict.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _unwrapped_name(key, prefixes)
        if name is not None:
            out[name] = value
    for prefix, layer in layers.items():
        if layer.disable_adapters or layer.merged:
            continue
        weight = out[f"{prefix}.weight"]
        merged = weight
        for a in layer.active_adapters:
            if a not in layer.lora_A:
                continue
            if layer.use_dora.get(a) or getattr(layer, "fan_in_fan_out", False):
                raise ValueError(f"{prefix}: merging DoRA / fan-in-fan-out adapters is not supported here")
            b_w, a_w = state[f"{prefix}.lora_B.{a}.weight"], state[f"{prefix}.lora_A.{a}.weight"]
            # peft's order (delta = (B @ A) · s; W + delta): in fp32 both merges give the same bits
            merged = merged + ((b_w.float() @ a_w.float()) * layer.scaling[a]).to(weight.dtype)
        out[f"{prefix}.weight"] = merged
    return out


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """:func:`merge_lora_state_dict` of ``model.state_dict()``: the merged model's weights under the
    plain model's names without copying the model (only the adapted weights are new tensors). For a
    model without LoRA this is ``model.state_dict()``. What a serving engine needs to receive after
    each update of a LoRA student (the names of the model it loaded)."""
    return merge_lora_state_dict(model, model.state_dict())


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every adapter merged into its base weights (``peft``'s
    ``merge(safe_merge=True)``: ``W ← W + (α/r)·B A``, checked for NaN) and the LoRA layers
    replaced by their base layers. ``model`` itself is not changed. The copy is the model class
    ``model`` already is, with no ``peft`` attributes, so ``save_pretrained`` writes full weights
    that ``AutoModelForCausalLM.from_pretrained`` loads without ``peft``; its outputs equal the LoRA
    model's up to float rounding (``W x + s·B(A x)`` vs ``(W + s·B A) x``).

    Memory: one more copy of the student's weights while it exists.
    """
    clone = copy.deepcopy(model)
    for name, layer in _tuner_layers(clone):
        if not layer.disable_adapters and not layer.merged:
            layer.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, attr, layer.get_base_layer())
    clone.__dict__.pop("peft_config", None)
    clone._hf_peft_config_loaded = False  # transformers' save_pretrained would otherwise write an adapter
    clone.requires_grad_(True)
    return clone.train(model.training)


def _plain_skeleton(model: nn.Module) -> nn.Module:
    """The plain model class of ``model`` on the meta device (no memory): config and generation
    config to write next to a state dict."""
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    return skeleton


def save_student(model: nn.Module, tokenizer: Any, folder: str | Path, *, merged: bool,
                 state_dict: Mapping[str, Tensor] | None = None) -> Path:
    """Write the student (and its tokenizer, unless None) to ``folder``; returns the folder.

    * plain student: ``save_pretrained`` (``merged`` is irrelevant);
    * LoRA student, ``merged=False`` (checkpoints): the adapter only, ``adapter_model.safetensors``
      + ``adapter_config.json`` (whose ``base_model_name_or_path`` names the base), exactly what
      :func:`apply_student_weights` restores;
    * LoRA student, ``merged=True`` (the run's ``final/``, ``opd export``): full merged weights
      (:func:`merge_lora_state_dict`) written through a meta-device skeleton of the plain model
      class, so only the merged matrices are new memory; any HF tool loads them without ``peft``.

    ``state_dict``: the full weights when the model is sharded (``accelerator.get_state_dict``,
    names as in ``model.state_dict()``); by default the model's own. Call it on the main process
    with the unwrapped model (``accelerator.unwrap_model``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if merged and is_lora(model):
        weights = merge_lora_state_dict(model, model.state_dict() if state_dict is None else state_dict)
        _plain_skeleton(model).save_pretrained(folder, state_dict=weights)
    else:
        model.save_pretrained(folder, state_dict=None if state_dict is None else dict(state_dict))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved adapter (``adapter_config.json``) rather than full weights."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base_path(folder: str | Path) -> str | None:
    """The base model an adapter folder was trained on (its config's ``base_model_name_or_path``)."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def _read_safetensors(files: Sequence[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _check_adapter_config(model: nn.Module, folder: Path) -> None:
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    live = model.peft_config[_ADAPTER] if _ADAPTER in getattr(model, "peft_config", {}) else None
    if live is None:
        return
    diffs = []
    for key in ("r", "lora_alpha", "use_rslora", "use_dora"):
        a, b = saved.get(key), getattr(live, key, None)
        if a is not None and b is not None and a != b:
            diffs.append(f"{key}: saved {a!r}, student {b!r}")
    if diffs:
        raise ValueError(f"the adapter in {folder} was trained with other LoRA settings ({'; '.join(diffs)}); set "
                         "student.lora_* as in that run")


def _is_adapter_state(weights: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(_PEFT_PREFIX) or ".lora_A." in k or ".lora_B." in k for k in weights)


def _apply_adapter(model: nn.Module, weights: Mapping[str, Tensor], source: str) -> None:
    peft = _peft()
    state = {(k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k): v for k, v in weights.items()}
    expected = peft.get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"the adapter in {source} does not fit the student: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}; the LoRA rank or target modules differ")
    dtypes = sorted({(str(state[k].dtype), str(expected[k].dtype)) for k in expected
                     if state[k].dtype != expected[k].dtype})
    if dtypes:
        saved, live = (", ".join(sorted({d[i] for d in dtypes})).replace("torch.", "") for i in (0, 1))
        raise ValueError(f"the adapter in {source} is stored in {saved} but the student's adapter is {live}; load the "
                         "base model in the dtype the run trained in (student.dtype; opd export --dtype)")
    peft.set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)
    loaded = peft.get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    bad = [k for k in expected if not torch.equal(loaded[k], state[k].to(loaded[k].dtype))]
    if bad:  # never silently resume from something else than what was saved
        raise ValueError(f"loading the adapter from {source} did not restore {bad[:5]} exactly")


def _apply_full(model: nn.Module, weights: Mapping[str, Tensor], source: str) -> None:
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied embeddings are stored once
    if set(missing) - tied or unexpected:
        raise ValueError(f"the weights in {source} do not match the student: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def apply_student_weights(model: nn.Module, weights: Mapping[str, Tensor], source: str | Path = "the checkpoint") -> None:
    """Copy weights read from a folder :func:`save_student` wrote (``*.safetensors``, keys as stored)
    into ``model`` in place, exactly: adapter weights (``base_model.model.…lora_A.weight`` …) into a
    LoRA ``model`` — every adapter value is checked bitwise after loading, the base weights are not
    touched (they are ``student.model``'s) — or full weights into a plain ``model`` (a tied output
    embedding may be absent). ``source`` names the folder in messages.

    Raises:
        ValueError: adapter weights for a plain student or full weights for a LoRA student (the
            message says which ``student.lora_rank`` fits), or keys / shapes that differ.
    """
    adapter, lora, where = _is_adapter_state(weights), is_lora(model), str(source)
    if adapter and not lora:
        raise ValueError(f"{where} holds a LoRA adapter but the student has no LoRA; set student.lora_rank (and the "
                         "other student.lora_* options) as in the run that wrote it")
    if lora and not adapter:
        raise ValueError(f"{where} holds full weights but the student is a LoRA model; set student.lora_rank=0 to "
                         "load them, or point at an adapter folder")
    (_apply_adapter if adapter else _apply_full)(model, weights, where)


def load_student_weights(model: nn.Module, folder: str | Path) -> None:
    """Load what :func:`save_student` wrote into ``model`` in place, exactly
    (:func:`apply_student_weights` of the folder's weights; for an adapter folder, its rank and α
    are first compared with the student's).

    Raises:
        ValueError: see :func:`apply_student_weights`; other LoRA settings than the student's.
        FileNotFoundError: no weights in ``folder``.
    """
    folder = Path(folder)
    adapter = is_adapter_folder(folder)
    if adapter and is_lora(model):
        _check_adapter_config(model, folder)
    files = [folder / ADAPTER_WEIGHTS] if adapter else sorted(folder.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no safetensors weights in {folder} (expected model.safetensors or "
                                f"{ADAPTER_WEIGHTS})")
    apply_student_weights(model, _read_safetensors(files), folder)


def load_adapter_model(folder: str | Path, *, base: str | None = None, dtype: str = "float32",
                       device: str | torch.device = "cpu") -> nn.Module:
    """The LoRA student saved in adapter ``folder``: its base model (``base``, default the folder's
    ``base_model_name_or_path``) loaded with :func:`opd.models.load_model`, wrapped with the
    folder's own ``LoraConfig`` and filled by :func:`load_student_weights`.

    Raises:
        ValueError: the folder names no base model and ``base`` is not given.
    """
    from opd.models import load_model

    folder = Path(folder)
    base = base or adapter_base_path(folder)
    if not base:
        raise ValueError(f"the adapter in {folder} does not name its base model; pass it (opd export --base MODEL)")
    config = _peft().LoraConfig.from_pretrained(str(folder))
    config.inference_mode = False
    model = apply_lora(load_model(base, dtype=dtype, device=device), config)
    load_student_weights(model, folder)
    return model
