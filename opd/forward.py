"""The one forward pass that scores completions: shared by student training, teacher scoring and the
teacher server (it sits below the rollout engine and serving; :mod:`opd.rollout` re-exports it).

A batch is a left-padded prompt block followed by a right-padded completion block::

    prompt_ids_BP      _ _ ^ 3 2 1 + 5 4 0 =        (left padding, mask 0 on "_")
    completion_ids_BT                        8 6 1 $ _ _   (right padding after EOS)

The logits that predict completion token ``t`` sit at the position of the token before it (the
last prompt token for ``t = 0``), so the model reads ``prompt ++ completion[:-1]`` and only the
last ``T`` positions go through the LM head. Position ids come from the attention mask
(``cumsum(mask) − 1``), so left padding never shifts the positions (and RoPE phases) of the real
tokens: row ``b`` of a padded batch computes exactly what the unpadded row computes alone.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn

from opd.math._checks import check_ndim, check_same_shape

__all__ = [
    "HeadNotLinearError",
    "cache_kwarg",
    "completion_forward",
    "forward_params",
    "lm_head_of",
    "lm_head_vocab_size",
    "model_device",
    "output_cache",
    "position_ids_from_mask",
]

#: Config attributes that make the output layer more than ``hidden @ W.T + b``; the value that
#: means "off" for each. ``lm_head_of`` refuses a model where one of them is set to anything else.
_HEAD_MODIFIERS: dict[str, tuple[Any, ...]] = {
    "final_logit_softcapping": (None, 0, 0.0),  # Gemma 2/3: logits = c·tanh(logits / c)
    "attn_logit_softcapping_final": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),  # Cohere: logits *= logit_scale
    "logits_scaling": (None, 1, 1.0),  # Granite, MiniCPM3: logits /= logits_scaling
    "lm_head_multiplier": (None, 1, 1.0),  # Falcon-H1: logits *= lm_head_multiplier
    "output_multiplier_scale": (None, 1, 1.0),
    "mup_width_multiplier": (None, 1, 1.0),
}


class HeadNotLinearError(ValueError):
    """The model's output layer is not a plain linear map, so hidden states + head weight
    cannot reproduce its logits."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def position_ids_from_mask(mask_BL: Tensor) -> Tensor:
    """Position ids ``clamp(cumsum(mask) − 1, min=0)``: 0 for the first real token of each row,
    whatever the left padding. Padding positions get a harmless clamped value."""
    return (mask_BL.long().cumsum(dim=-1) - 1).clamp(min=0)


@lru_cache(maxsize=None)
def forward_params(cls: type) -> frozenset[str]:
    """Names of the keyword arguments ``cls.forward`` accepts (cached per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers ≥ 5.2x) or the older ``past_key_values``."""
    params = forward_params(type(model))
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (``out.cache``, else the older ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _check_batch(prompt_ids_BP: Tensor, prompt_mask_BP: Tensor, completion_ids_BT: Tensor,
                 completion_mask_BT: Tensor) -> None:
    for name, t in (("prompt_ids_BP", prompt_ids_BP), ("prompt_mask_BP", prompt_mask_BP),
                    ("completion_ids_BT", completion_ids_BT), ("completion_mask_BT", completion_mask_BT)):
        check_ndim(name, t, 2)
    check_same_shape(prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP)
    check_same_shape(completion_ids_BT=completion_ids_BT, completion_mask_BT=completion_mask_BT)
    if prompt_ids_BP.shape[0] != completion_ids_BT.shape[0]:
        raise ValueError(f"prompt_ids_BP has {prompt_ids_BP.shape[0]} rows but completion_ids_BT has "
                         f"{completion_ids_BT.shape[0]}; they must be equal")
    if prompt_ids_BP.shape[1] == 0 or not bool((prompt_mask_BP[:, -1] != 0).all()):
        raise ValueError(
            "every prompt must end with a real token (left padding): the last prompt token predicts the first "
            "completion token. Encode prompts with opd.rollout.encode_prompts (padding_side='left') and make "
            "sure no prompt is empty."
        )


def completion_forward(
    model: nn.Module,
    prompt_ids_BP: Tensor,
    prompt_mask_BP: Tensor,
    completion_ids_BT: Tensor,
    completion_mask_BT: Tensor,
    *,
    output: Literal["logits", "hidden"] = "logits",
) -> Tensor:
    """The model's outputs at the positions that predict each completion token.

    The input is ``x = prompt ++ completion[:, :-1]`` with attention mask
    ``prompt_mask ++ completion_mask[:, :-1]`` and position ids ``clamp(cumsum(mask) − 1, 0)``.
    Row ``b``, completion step ``t`` reads position ``P − 1 + t`` of ``x``: the logits of
    ``π(· | prompt_b, y_<t)``. Only those ``T`` positions are projected through the LM head
    (``logits_to_keep=T``).

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM``); gradients flow unless the caller
            disables them.
        prompt_ids_BP, prompt_mask_BP: left-padded prompts (every row ends with a real token).
        completion_ids_BT, completion_mask_BT: right-padded completions. Padding positions come
            after every real token, so they never influence a real position; their outputs are
            meaningless and must be masked by the caller.
        output: ``"logits"`` → ``[B, T, V]`` logits exactly as the model's own forward computes
            them (soft-capping etc. included); ``"hidden"`` → ``[B, T, H]`` final hidden states of
            the decoder (after its last norm), to be combined with :func:`lm_head_of`.

    Returns:
        ``[B, T, V]`` logits or ``[B, T, H]`` hidden states in the model's dtype (``T = 0`` gives an
        empty tensor).

    Raises:
        ValueError: shapes that do not match, a prompt that does not end with a real token, or an
            unknown ``output``.
    """
    if output not in ("logits", "hidden"):
        raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
    _check_batch(prompt_ids_BP, prompt_mask_BP, completion_ids_BT, completion_mask_BT)
    b, t = completion_ids_BT.shape
    device = model_device(model)
    keep = max(t - 1, 0)  # the last completion token predicts nothing we score
    ids = torch.cat([prompt_ids_BP.to(device), completion_ids_BT[:, :keep].to(device)], dim=1)
    mask = torch.cat([prompt_mask_BP.to(device).long(), completion_mask_BT[:, :keep].to(device).long()], dim=1)
    positions = position_ids_from_mask(mask)
    if output == "hidden":
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model")
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, hidden.shape[1] - t:]
    if t == 0:
        vocab = lm_head_vocab_size(model)
        return torch.zeros(b, 0, vocab, device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
    if "logits_to_keep" in forward_params(type(model)):
        kwargs["logits_to_keep"] = t
    logits = model(**kwargs).logits
    return logits[:, logits.shape[1] - t:]


def lm_head_vocab_size(model: nn.Module) -> int:
    """Rows of the output layer (may exceed ``len(tokenizer)`` when the embedding is padded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight_VH, bias_V | None)`` such that ``logits = hidden @ weight.T + bias`` for the hidden
    states that ``completion_forward(..., output="hidden")`` returns.

    The tensors are the model's own parameters (not copies; tied embeddings stay tied).

    Raises:
        HeadNotLinearError: the output layer is not an ``nn.Linear`` (the message names its type),
            or the config applies a transformation after it: logit soft-capping
            (``final_logit_softcapping``) or a logit scale (``logit_scale``, ``logits_scaling``,
            ``lm_head_multiplier``, ...); the message names the attribute found and its value.
            Use ``output="logits"`` for such models.
    """
    config = getattr(model, "config", None)
    if config is not None:
        configs = [config]
        if hasattr(config, "get_text_config"):
            text = config.get_text_config()
            if text is not config:
                configs.append(text)
        for cfg in configs:
            for attr, neutral in _HEAD_MODIFIERS.items():
                value = getattr(cfg, attr, None)
                if value not in neutral:
                    raise HeadNotLinearError(
                        f"{type(model).__name__} applies {attr}={value!r} to its logits after the output layer, so "
                        "hidden states @ head weight do not reproduce its logits. Score this model with full "
                        "logits (output='logits'; for a teacher raise full_as_hidden_above_vocab above its "
                        "vocabulary size)."
                    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise HeadNotLinearError(
            f"{type(model).__name__} has no output embedding layer (get_output_embeddings() returned None); "
            "hidden-state scoring needs a causal LM with an lm_head"
        )
    if not isinstance(head, nn.Linear):
        raise HeadNotLinearError(
            f"{type(model).__name__}.get_output_embeddings() is a {type(head).__name__}, not a plain "
            "torch.nn.Linear, so its logits cannot be rebuilt from hidden states; use output='logits'"
        )
    return head.weight, head.bias
