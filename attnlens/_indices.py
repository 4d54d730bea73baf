"""Layer and head numbers as users give them: ints, numpy integers, integer arrays or tensors; never bools."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

__all__ = [
    "as_index",
    "check_indices",
    "check_pairs",
    "index_list",
    "is_pairs",
    "layers_and_heads",
    "numbers",
    "pair_list",
]


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


def _is_top_row(item: Any) -> bool:
    """A ``(layer, head, score)`` row of ``.top()``, which names a pair with its score."""
    return isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], float)


def _is_pair(item: Any) -> bool:
    pair = isinstance(item, (tuple, list)) and len(item) == 2
    return pair or _is_top_row(item) or getattr(item, "shape", None) in ((2,), (2, 1))


def is_pairs(given: Any) -> bool:
    """Whether ``given`` is (layer, head) pairs: a non-empty list of 2-item tuples/lists, or a ``[n, 2]`` array."""
    if given is None or isinstance(given, (str, bytes)) or getattr(given, "ndim", None) == 0:
        return False
    if getattr(given, "ndim", None) == 2:
        return bool(given.shape[-1] == 2)
    if not isinstance(given, Iterable):
        return False
    items = list(given)
    flags = [_is_pair(item) for item in items]
    if any(flags) and not all(flags):
        raise ValueError(
            f"heads mixes head numbers and (layer, head) pairs: {items!r}; give head numbers (every layer) or "
            "pairs only"
        )
    return bool(items) and all(flags)


def pair_list(given: Any, what: str = "heads") -> list[tuple[int, int]]:
    """(layer, head) pairs as int pairs: from pairs of integers, a ``[n, 2]`` array, or ``.top()`` rows.

    The ``(layer, head, score)`` rows of ``HeadScores.top`` / ``ScanResult.top`` give their pair (the score is dropped).
    """
    if given is None or isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
        raise ValueError(f"{what} must be (layer, head) pairs, got {given!r}")
    out = []
    for pair in given:
        numbers = index_list(pair[:2] if _is_top_row(pair) else pair, what)
        if len(numbers) != 2:
            raise ValueError(f"{what} entry {pair!r} is not a (layer, head) pair")
        out.append((numbers[0], numbers[1]))
    return out


def check_pairs(given: Any, n_layers: int, n_heads: int, what: str = "heads") -> tuple[tuple[int, int], ...]:
    """Validate (layer, head) pairs: each number in range (negatives count from the end), no pair twice."""
    out = []
    for layer, head in pair_list(given, what):
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"{what} ({layer}, {head}): layer {layer} is out of range: the model has {n_layers}")
        if not -n_heads <= head < n_heads:
            raise ValueError(
                f"{what} ({layer}, {head}): head {head} is out of range: the model has {n_heads} per layer"
            )
        out.append((layer % n_layers, head % n_heads))
    repeated = sorted({p for p in out if out.count(p) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated} given more than once")
    return tuple(out)


def layers_and_heads(
    layers: Any, heads: Any, n_layers: int, n_heads: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...] | None]:
    """``(layers, heads, pairs)`` from a call's ``layers=`` and ``heads=`` (head numbers or (layer, head) pairs).

    Head numbers apply to every layer (``pairs`` is None). With pairs, the layers are the pairs' layers and the heads
    the union of their heads, each in order of first appearance: what is kept is that rectangle, which holds
    every pair.

    Raises:
        ValueError: numbers out of range or repeated; pairs together with ``layers=`` (they name the layers).
    """
    if is_pairs(heads):
        if layers is not None:
            raise ValueError("heads are (layer, head) pairs, which name the layers too; leave layers=None")
        pairs = check_pairs(heads, n_layers, n_heads)
        layer_list = tuple(dict.fromkeys(layer for layer, _ in pairs))
        head_list = tuple(dict.fromkeys(head for _, head in pairs))
        return layer_list, head_list, pairs
    return check_indices(layers, n_layers, "layers"), check_indices(heads, n_heads, "heads"), None
