"""How an index of a ``FactoredMatrix`` reads: the leading dimensions, then one row and one column index.

A ``FactoredMatrix`` ``[..., ldim, rdim]`` is indexed as its dense product would be, except that the rows index the
left factor and the columns the right one, so that a block costs only its own size. This module turns what the user
wrote (integers, numpy integers, slices, lists, arrays, integer or boolean tensors, ``...`` and ``None``) into that
split; :meth:`attnlens.FactoredMatrix.__getitem__` applies it to the factors.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Item = int | slice | Tensor | None


class IndexTooLongError(IndexError, ValueError):
    """More indices than dimensions: an IndexError, as torch's own, and a ValueError, as TransformerLens's."""


class ShapeMismatchError(ValueError, RuntimeError):
    """Shapes that do not fit: a ValueError, as attnlens's errors are, and a RuntimeError, as torch's own are."""


def index_item(item: Any) -> Item:
    """One element of an index as a dense tensor reads it (``...`` is handled by :func:`split_index`).

    Numpy integers and 0-d integer tensors are ints (torch selects with them, as with ints); lists, tuples and arrays
    become tensors. A ``uint8`` tensor is a boolean mask, as torch reads it (with torch's deprecation warning).
    True/False (which torch reads as a new axis, not a selection) are refused.
    """
    if item is None or isinstance(item, slice):
        return item
    if isinstance(item, bool) or (isinstance(item, Tensor) and item.dtype == torch.bool and item.ndim == 0):
        raise IndexError(f"a FactoredMatrix is not indexed by True/False (got {item!r}); use integers or a mask")
    if isinstance(item, Tensor):
        if item.dtype == torch.uint8:
            warnings.warn(
                "indexing a FactoredMatrix with a torch.uint8 tensor reads it as a boolean mask, as torch does "
                "(deprecated there); use a torch.bool mask",
                UserWarning,
                stacklevel=4,
            )
            item = item.bool()
        if item.dtype != torch.bool and (item.is_floating_point() or item.is_complex()):
            raise IndexError(f"tensors that index a FactoredMatrix must be integer or boolean, got {item.dtype}")
        return int(item) if item.ndim == 0 and item.dtype != torch.bool else item
    try:
        return operator.index(item)  # Python and numpy integers
    except TypeError:
        pass
    try:
        tensor = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError):
        raise IndexError(f"cannot index a FactoredMatrix with {type(item).__name__} {item!r}") from None
    return index_item(tensor)


def _width(item: Item) -> int:
    """How many dimensions of the indexed tensor an item uses: none for ``None``, ``k`` for a ``k``-D mask."""
    if item is None:
        return 0
    return item.ndim if isinstance(item, Tensor) and item.dtype == torch.bool else 1


@dataclass(frozen=True)
class SplitIndex:
    """An index of a FactoredMatrix, split: ``lead`` indexes both factors, ``row`` the left, ``column`` the right."""

    lead: tuple[Item, ...]
    row: Item | None
    column: Item | None


def split_index(index: Any, shape: torch.Size) -> SplitIndex:
    """Split a FactoredMatrix index ``[*lead, row, column]`` of a product of ``shape``, ``...`` expanded.

    Raises:
        IndexTooLongError: more indices than dimensions.
        IndexError: two ``...``; ``None`` after a row or column index (the result would not be a matrix); a mask
            across the matrix dimensions; tensors on both the leading dimensions and the rows or columns.
    """
    raw = index if isinstance(index, tuple) else (index,)
    if sum(1 for i in raw if i is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    items: list[Item] = []
    ellipsis_at = None
    for i in raw:
        if i is Ellipsis:
            ellipsis_at = len(items)
        else:
            items.append(index_item(i))
    ndim, n_lead = len(shape), len(shape) - 2
    used = sum(_width(i) for i in items)
    if used > ndim:
        raise IndexTooLongError(
            f"too long an index: too many indices ({used}) for a FactoredMatrix of shape {list(shape)} ({ndim} "
            f"dimensions)"
        )
    if ellipsis_at is not None:
        items[ellipsis_at:ellipsis_at] = [slice(None)] * (ndim - used)
    split, start = len(items), 0
    for position, item in enumerate(items):
        n = _width(item)
        if item is None:
            if split < len(items):
                raise IndexError(
                    f"None after a row or column index of a FactoredMatrix of shape {list(shape)}: a new axis is a "
                    f"leading dimension, so None goes before the row and column indices"
                )
            continue
        if start < n_lead < start + n or (start >= n_lead and n > 1):
            mask_shape = list(item.shape) if isinstance(item, Tensor) else []
            raise IndexError(
                f"a boolean mask of shape {mask_shape} covers dimensions {start}..{start + n - 1} of a FactoredMatrix "
                f"of shape {list(shape)}: a mask selects along leading dimensions, or along the rows or the "
                f"columns alone"
            )
        if start >= n_lead and split == len(items):
            split = position
        start += n
    lead, rest = items[:split], items[split:]
    if any(isinstance(i, Tensor) for i in lead) and any(isinstance(i, Tensor) for i in rest):
        raise IndexError(
            f"tensors index both the leading dimensions and the rows or columns of a FactoredMatrix of shape "
            f"{list(shape)}, which a dense tensor would pair element by element; index in two steps: the "
            f"leading dimensions first (sub = fm[lead]), then the rows and columns of sub"
        )
    return SplitIndex(tuple(lead), rest[0] if rest else None, rest[1] if len(rest) == 2 else None)


def keep_dim(index: Item, size: int, what: str) -> slice | Tensor:
    """A row or column index; an integer becomes a one-wide slice, so that the result stays a matrix."""
    if index is None:
        return slice(None)
    if not isinstance(index, int):
        return index
    if not -size <= index < size:
        raise IndexError(f"{what} {index} is out of range for {size} {what}s")
    return slice(index, index + 1 if index != -1 else None)
