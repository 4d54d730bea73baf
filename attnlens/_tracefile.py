"""The checks :meth:`attnlens.AttentionTrace.load` runs on a trace file before trusting it.

A trace file is a safetensors file whose header holds JSON metadata (layers, heads, what was stored, tokens,
provenance) beside the tensors. Both can be edited by hand or damaged; :func:`check_file` makes sure that they agree
with each other (every stored stack present, of the shape the metadata implies, of a dtype that makes sense) so
that a damaged file fails when loaded, with the reason, never later as a wrong number or a stray ``IndexError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_file"]

_KEYS = ("layers", "heads", "n_heads", "stored", "tokens", "provenance")


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"metadata {name!r} must be a non-empty list of integers, got {value!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise ValueError(f"metadata {name!r} must hold integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"metadata {name!r} repeats an entry: {value!r}")
    return tuple(value)


def _shape(name: str, n_layers: int, batch: int, n_heads: int, n_pos: int, x: Tensor) -> tuple[int, ...]:
    """The shape a stored stack must have; its last axis (d_head or d_model) is free."""
    if name in ("pattern", "scores"):
        return (n_layers, batch, n_heads, n_pos, n_pos)
    if name in ("q", "k", "v"):
        return (n_layers, batch, n_heads, n_pos, x.shape[-1] if x.ndim == 5 else -1)
    return (n_layers, batch, n_pos, n_heads, x.shape[-1] if x.ndim == 5 else -1)  # z, result


def check_file(meta: Mapping[str, Any], tensors: dict[str, Tensor], store_names: Sequence[str]) -> dict[str, Any]:
    """The fields of an :class:`~attnlens.AttentionTrace` from a file's metadata and tensors, after checking them.

    Args:
        meta: the decoded JSON metadata.
        tensors: every tensor of the file, by name (``input_ids``, ``attention_mask`` and the stacks).
        store_names: the names a trace may store, in their canonical order.

    Raises:
        ValueError: saying what does not fit (a missing key, a value of the wrong type, a tensor of the wrong shape
            or dtype, a tensor too many or too few).
    """
    missing = [key for key in _KEYS if key not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    layers, heads = _ints(meta["layers"], "layers"), _ints(meta["heads"], "heads")
    n_heads = meta["n_heads"]
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= max(heads):
        raise ValueError(
            f"metadata 'n_heads' must be an integer above every head number {list(heads)}, got {n_heads!r}"
        )
    stored = meta["stored"]
    if not isinstance(stored, list) or not stored or any(name not in store_names for name in stored):
        raise ValueError(f"metadata 'stored' must be a non-empty list of {', '.join(store_names)}, got {stored!r}")
    if len(set(stored)) != len(stored):
        raise ValueError(f"metadata 'stored' repeats an entry: {stored!r}")
    provenance = meta["provenance"]
    if not isinstance(provenance, dict) or not all(isinstance(v, str) for v in provenance.values()):
        raise ValueError(f"metadata 'provenance' must be an object of strings, got {provenance!r}")

    expected = {*stored, "input_ids", "attention_mask"}
    if set(tensors) != expected:
        extra, lacking = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ValueError(f"its tensors do not match its metadata: missing {lacking}, unexpected {extra}")
    ids, mask = tensors.pop("input_ids"), tensors.pop("attention_mask")
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer [batch, pos] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if mask.shape != ids.shape or mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(
            f"attention_mask must be an integer tensor of input_ids' shape {tuple(ids.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    batch, n_pos = ids.shape
    for name in stored:
        x = tensors[name]
        want = _shape(name, len(layers), batch, len(heads), n_pos, x)
        if tuple(x.shape) != want or not x.dtype.is_floating_point:
            raise ValueError(
                f"{name!r} is {x.dtype} of shape {tuple(x.shape)}; the metadata ({len(layers)} layers, "
                f"{len(heads)} heads, batch {batch}, {n_pos} positions) needs floats of shape {want}"
            )
    tokens = meta["tokens"]
    if tokens is not None and not (
        isinstance(tokens, list)
        and len(tokens) == batch
        and all(isinstance(row, list) and len(row) == n_pos and all(isinstance(t, str) for t in row) for row in tokens)
    ):
        raise ValueError(f"metadata 'tokens' must be null or {batch} lists of {n_pos} strings")
    return {
        "layers": layers,
        "heads": heads,
        "n_heads": n_heads,
        "stored": tuple(name for name in store_names if name in stored),
        "input_ids": ids,
        "attention_mask": mask,
        "tokens": tokens,
        "provenance": dict(provenance),
        "_stacks": tensors,
    }
