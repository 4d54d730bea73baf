"""Layer and head numbers as users give them: ints, numpy integers, integer arrays or tensors; never bools."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

__all__ = ["as_index", "check_indices", "index_list", "numbers"]


def as_index(item: Any, what: str) -> int:
    """One layer or head number: any integer (Python, numpy, a one-element integer tensor), never a bool."""
    if isinstance(item, bool) or str(getattr(item, "dtype", "")) in ("bool", "torch.bool"):
        raise ValueError(f"{what} must be integers, got the bool {item!r}")
    try:
        return operator.index(item)
    except TypeError:
        raise ValueError(f"{what} must be integers, got {item!r}") from None


def index_list(given: Any, what: str) -> list[int]:
    """Layer or head numbers as a list of ints, from an int, an iterable of ints, or an integer array or tensor."""
    if getattr(given, "ndim", None) == 0 or not isinstance(given, Iterable):
        return [as_index(given, what)]
    if isinstance(given, (str, bytes)):
        raise ValueError(f"{what} must be integers, got {given!r}")
    return [as_index(item, what) for item in given]


def check_indices(given: Any, size: int, what: str) -> tuple[int, ...]:
    """Validate layer or head numbers: ints in ``[-size, size)`` (negatives count from the end), no repeats."""
    if given is None:
        return tuple(range(size))
    items = index_list(given, what)
    if not items:
        raise ValueError(f"{what} is empty; pass None for all {size}")
    out = []
    for item in items:
        if not -size <= item < size:
            raise ValueError(f"{what} {item} is out of range: the model has {size} (0..{size - 1})")
        out.append(item % size)
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated} given more than once")
    return tuple(out)


def numbers(given: Any, size: int, what: str, axis: str) -> tuple[int, ...]:
    """The layer or head number of each of ``size`` entries along an axis: default ``0..size-1``; distinct, >= 0."""
    if given is None:
        return tuple(range(size))
    items = index_list(given, what)
    if not items:
        raise ValueError(f"{what} is empty; give one number per {axis} of the patterns ({size}), or None")
    if len(items) != size:
        raise ValueError(
            f"{what} names {len(items)} {axis}(s) but the patterns hold {size} along that axis: give one number per "
            f"entry, or None for 0..{size - 1}"
        )
    if any(i < 0 for i in items):
        raise ValueError(f"{what} must be numbers >= 0, got {items}")
    repeated = sorted({i for i in items if items.count(i) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated} given more than once")
    return tuple(items)
