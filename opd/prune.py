"""Depth pruning: a smaller student made from the teacher by keeping ``N`` of its ``L`` decoder blocks.

Which blocks to keep is chosen by a measured score on the user's prompts, or given explicitly:

* ``angular`` — each block's *angular distance* between its input and output hidden states,
  ``d(x, y) = arccos(x·y / (‖x‖ ‖y‖)) / π`` (Gromov et al., "The Unreasonable Ineffectiveness of the
  Deeper Layers", arXiv 2403.17887, eq. 7, with a block of one layer), averaged over the prompts at
  the last prompt token; the ``N`` blocks that change the residual stream most are kept. Ranking
  by ``1 − cos`` (ShortGPT's Block Influence, arXiv 2403.03853, used by Minitron for depth, arXiv
  2407.14679) gives the same order, since both are decreasing in ``cos``.
* ``contiguous`` — Gromov et al.'s own rule: remove the run of ``n = L − N`` consecutive blocks
  whose input and output are closest, ``ℓ* = argmin_ℓ d(x^(ℓ), x^(ℓ+n))``.
* ``uniform`` — the baseline: ``N`` blocks evenly spaced over the depth, first and last included,
  ``round(i (L − 1) / (N − 1))`` for ``i = 0 … N − 1``.
* an explicit list of block indices.

The pruned model is the teacher with the other blocks removed (embeddings, final norm and head
kept; each kept block's weights unchanged), an ordinary ``transformers`` model of the same class:
its forward pass equals running only the kept blocks of the teacher, in order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from opd.rollout import position_ids_from_mask

__all__ = [
    "PRUNE_METHODS",
    "PruneError",
    "PruneMethod",
    "angular_distance",
    "block_distances",
    "check_layer_indices",
    "choose_layers",
    "decoder_layers",
    "layer_hidden_states",
    "measure_block_distances",
    "prune_layers",
    "uniform_layers",
]

PruneMethod = Literal["angular", "contiguous", "uniform"]
PRUNE_METHODS: tuple[str, ...] = ("angular", "contiguous", "uniform")
#: Where a causal LM keeps its stack of decoder blocks (Llama, Qwen, Mistral, Gemma, Phi3 / GPT-2 /
#: GPT-NeoX / OPT).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


class PruneError(ValueError):
    """A pruning request that cannot be carried out (the message says what and how to fix it)."""


# ---------------------------------------------------------------------------------------------
# scores (pure functions)
def angular_distance(x_NH: Tensor, y_NH: Tensor) -> Tensor:
    """Per-row angular distance ``arccos(x·y / (‖x‖ ‖y‖)) / π ∈ [0, 1]`` (Gromov et al., arXiv
    2403.17887, eq. 7), computed in float32; a zero vector counts as orthogonal to everything.

    Raises:
        ValueError: the shapes differ.
    """
    if x_NH.shape != y_NH.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x_NH.shape)} and {tuple(y_NH.shape)}")
    x, y = x_NH.float(), y_NH.float()
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    cos = (x * y).sum(dim=-1) / norms.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _last_positions(mask_BL: Tensor) -> Tensor:
    """Index of each row's last real token (left or right padding)."""
    positions = torch.arange(mask_BL.shape[1], device=mask_BL.device).expand_as(mask_BL)
    return torch.where(mask_BL.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)


def block_distances(hidden: Sequence[Tensor], mask_BL: Tensor, *, span: int = 1) -> Tensor:
    """``d(x^(ℓ), x^(ℓ+span))`` for ``ℓ = 0 … L − span``, per row at its last real token:
    ``[B, L − span + 1]``.

    ``hidden`` holds ``L + 1`` tensors ``[B, L_seq, H]``: the input of block 0, then the output of
    each block (before any final norm), as :func:`layer_hidden_states` returns them.

    Raises:
        ValueError: fewer than two hidden states, ``span`` outside ``1 … L``, a row with no real token,
            or shapes that do not match.
    """
    n_layers = len(hidden) - 1
    if n_layers < 1:
        raise ValueError("hidden must hold at least two tensors (the input of block 0 and its output)")
    if not 1 <= span <= n_layers:
        raise ValueError(f"span must be in 1..{n_layers}, got {span}")
    if mask_BL.shape != hidden[0].shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask_BL.shape)}, hidden states {tuple(hidden[0].shape)}")
    if not bool(mask_BL.bool().any(dim=1).all()):
        raise ValueError("a row of the mask has no real token")
    last_B = _last_positions(mask_BL)
    rows = torch.arange(mask_BL.shape[0], device=mask_BL.device)
    at_last = [h[rows, last_B] for h in hidden]
    return torch.stack([angular_distance(at_last[i], at_last[i + span]) for i in range(n_layers - span + 1)], dim=1)


def uniform_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` block indices evenly spaced over ``num_layers``, first and last included:
    ``round(i (L − 1) / (N − 1))`` (``[L − 1]`` for ``N = 1``)."""
    _check_count(num_layers, keep)
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def choose_layers(num_layers: int, keep: int, method: PruneMethod, *, layer_scores: Sequence[float] | None = None,
                  span_scores: Sequence[float] | None = None) -> list[int]:
    """The sorted block indices to keep (module docstring).

    Args:
        layer_scores: ``angular``: one score per block (higher = more important = kept); ties keep the
            earlier block.
        span_scores: ``contiguous``: ``d(x^(ℓ), x^(ℓ+n))`` for ``ℓ = 0 … keep`` with ``n = L − keep``;
            the run starting at the smallest is removed (ties: the earliest).

    Raises:
        PruneError: a bad count, an unknown method, or scores of the wrong length.
    """
    _check_count(num_layers, keep)
    if method == "uniform":
        return uniform_layers(num_layers, keep)
    if method == "angular":
        if layer_scores is None or len(layer_scores) != num_layers:
            raise PruneError(f"method angular needs one score per block ({num_layers}), got "
                             f"{None if layer_scores is None else len(layer_scores)}")
        order = sorted(range(num_layers), key=lambda i: (-float(layer_scores[i]), i))
        return sorted(order[:keep])
    if method == "contiguous":
        n = num_layers - keep
        if n == 0:
            return list(range(num_layers))
        if span_scores is None or len(span_scores) != num_layers - n + 1:
            raise PruneError(f"method contiguous needs {num_layers - n + 1} span scores (span {n}), got "
                             f"{None if span_scores is None else len(span_scores)}")
        start = min(range(len(span_scores)), key=lambda i: (float(span_scores[i]), i))
        return [i for i in range(num_layers) if not start <= i < start + n]
    raise PruneError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")


def _check_count(num_layers: int, keep: int) -> None:
    if not isinstance(keep, int) or not 1 <= keep <= num_layers:
        raise PruneError(f"the student must keep between 1 and {num_layers} of the teacher's {num_layers} layers, "
                         f"got {keep!r}; pass e.g. --keep {max(1, num_layers // 3)}")


# ---------------------------------------------------------------------------------------------
# the model
def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, blocks)``: the module list of decoder blocks and where it hangs.

    Raises:
        PruneError: no known stack of blocks whose length is the config's ``num_hidden_layers``.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in _LAYER_PATHS:
        parent: nn.Module | None = model
        *head, last = path.split(".")
        for part in head:
            parent = getattr(parent, part, None)
        blocks = getattr(parent, last, None) if parent is not None else None
        if isinstance(blocks, nn.ModuleList) and len(blocks) == expected:
            return parent, last, blocks  # type: ignore[return-value]
    raise PruneError(f"{type(model).__name__}: no stack of {expected} decoder blocks at "
                     f"{' / '.join(_LAYER_PATHS)}; depth pruning supports decoder-only models laid out like those")


def layer_hidden_states(model: nn.Module, ids_BL: Tensor, mask_BL: Tensor) -> list[Tensor]:
    """The input of block 0 and the output of every block (before the final norm), ``L + 1``
    tensors ``[B, L_seq, H]``, read with forward hooks during one ``model(ids, attention_mask)``."""
    _, _, blocks = decoder_layers(model)
    captured: list[Tensor | None] = [None] * (len(blocks) + 1)

    def first_input(_module, args, kwargs):
        captured[0] = (args[0] if args else kwargs["hidden_states"]).detach()

    def output_of(i: int):
        def hook(_module, _args, output):
            captured[i + 1] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    handles = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [b.register_forward_hook(output_of(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            # positions from the mask, as opd's own forward passes: left padding shifts no real token
            model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in captured):
        raise PruneError(f"{type(model).__name__}: a decoder block did not run during the forward pass")
    return captured  # type: ignore[return-value]


def measure_block_distances(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                            span: int = 1) -> Tensor:
    """Mean over all prompt rows of :func:`block_distances` (``[L − span + 1]``, float32) for
    ``(ids_BL, mask_BL)`` batches.

    Raises:
        PruneError: no prompts.
    """
    total, rows = None, 0
    for ids_BL, mask_BL in batches:
        d_BS = block_distances(layer_hidden_states(model, ids_BL, mask_BL), mask_BL, span=span)
        total = d_BS.sum(dim=0) if total is None else total + d_BS.sum(dim=0)
        rows += d_BS.shape[0]
    if total is None:
        raise PruneError("no prompts to measure the block scores on; pass a prompt file with at least one row")
    return total / rows


def check_layer_indices(keep: Sequence[int], num_layers: int) -> list[int]:
    """``keep`` sorted, after checking it lists distinct block indices in ``0 … num_layers − 1``.

    Raises:
        PruneError: an empty list, a repeated index or an index out of range (one line).
    """
    keep = list(keep)
    bad = [i for i in keep if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if not keep or bad or len(set(keep)) != len(keep):
        what = ("no layers" if not keep else f"indices {bad} outside 0..{num_layers - 1}" if bad
                else f"repeated indices {sorted({i for i in keep if keep.count(i) > 1})}")
        raise PruneError(f"--layers must list distinct block indices in 0..{num_layers - 1} (the teacher has "
                         f"{num_layers}); got {what}")
    return sorted(keep)


def prune_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the blocks ``keep`` (in increasing order), renumbered ``0 … N − 1``;
    the config's ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow. The
    input model is not changed.

    Raises:
        PruneError: an empty list, a repeated index or an index outside ``0 … L − 1``.
    """
    _, _, blocks = decoder_layers(model)
    n_layers = len(blocks)
    keep = check_layer_indices(keep, n_layers)
    pruned = copy.deepcopy(model)
    parent, attr, new_blocks = decoder_layers(pruned)
    kept = nn.ModuleList([new_blocks[i] for i in keep])
    for new_index, block in enumerate(kept):
        for sub in block.modules():  # the KV cache is indexed by these
            if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                sub.layer_idx = new_index
    setattr(parent, attr, kept)
    config = pruned.config
    for name in ("layer_types", "sliding_window_pattern_list", "no_rope_layers"):
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == n_layers:
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return pruned
