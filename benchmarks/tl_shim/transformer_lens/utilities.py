"""The two helpers TransformerLens's FactoredMatrix tests call, written from their documented meaning."""

from __future__ import annotations

from torch import Tensor


def get_corner(tensor: Tensor, k: int = 3) -> Tensor:
    """The first ``k`` entries along every dimension."""
    return tensor[tuple(slice(0, k) for _ in range(tensor.ndim))]


def transpose(tensor: Tensor) -> Tensor:
    """Swap the last two dimensions."""
    return tensor.transpose(-1, -2)
