"""Shape and value checks used at the public edge of the math layer.

Every public function of ``opd.math`` validates its inputs with these helpers, so a wrong call
fails with a ``ValueError`` that names the arguments and their shapes instead of a broadcast
error deep inside a kernel.
"""

from __future__ import annotations

from torch import Tensor


def check_same_shape(**tensors: Tensor | None) -> None:
    """Raise ``ValueError`` unless all non-``None`` tensors have one shape.

    >>> check_same_shape(logprobs_BT=torch.zeros(2, 3), mask_BT=torch.ones(2, 3))
    """
    items = [(name, t) for name, t in tensors.items() if t is not None]
    if not items:
        return
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
                "they must be equal"
            )


def check_leading_shape(reference_name: str, reference: Tensor, **tensors: Tensor | None) -> None:
    """Raise unless every tensor's shape starts with ``reference.shape``.

    Used for ``[..., V]`` or ``[..., K]`` tensors that share the token dimensions ``[...]`` of a
    per-token tensor (for example ``sampled_ids_N`` against ``logits_NV``).
    """
    n = reference.dim()
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape[:n] != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; its leading dimensions must equal "
                f"{reference_name}'s shape {tuple(reference.shape)}"
            )


def check_ndim(name: str, t: Tensor, ndim: int) -> None:
    """Raise unless ``t`` has exactly ``ndim`` dimensions."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless ``low <= value <= high`` (bounds optional, open bounds with the flags)."""
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
