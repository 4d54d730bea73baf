"""The checks :meth:`attnlens.AttentionTrace.load` runs on a trace file before trusting it.

A trace file is a safetensors file whose header holds JSON metadata (layers, heads, what was stored, the number of
query rows, tokens, provenance) beside the tensors. Both can be edited by hand or damaged; :func:`check_file` makes
sure that they agree with each other (every stored stack present, of the shape the metadata implies, of a dtype that
makes sense; query positions in range and distinct) so that a damaged file fails when loaded, with the reason, never
later as a wrong number or a stray ``IndexError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_file"]

_KEYS = ("layers", "heads", "n_heads", "stored", "tokens", "provenance")
_KEYS_2 = (*_KEYS, "rows")  # format 2 adds the number of query rows (null: every row)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"metadata {name!r} must be a non-empty list of integers, got {value!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise ValueError(f"metadata {name!r} must hold integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"metadata {name!r} repeats an entry: {value!r}")
    return tuple(value)


def _shape(
    name: str, n_layers: int, batch: int, n_heads: int, n_pos: int, n_rows: int, x: Tensor, head_major: bool
) -> tuple[int, ...]:
    """The shape a stored stack must have; its last axis (d_head or d_model) is free.

    ``head_major``: q, k, v as format 1 held them, ``[layer, batch, head, pos, d_head]``.
    """
    if name in ("pattern", "scores"):
        return (n_layers, batch, n_heads, n_rows, n_pos)
    last = x.shape[-1] if x.ndim == 5 else -1
    if name in ("q", "k", "v") and head_major:
        return (n_layers, batch, n_heads, n_pos, last)
    return (n_layers, batch, n_pos, n_heads, last)  # q, k, v, z, result


def _queries(rows: Any, queries: Tensor | None, batch: int, n_pos: int) -> Tensor | None:
    """The checked ``[batch, row]`` query positions (int64) of a trace of ``rows`` query rows, or None for all."""
    if rows is None or queries is None:  # the tensor names are checked before: queries is there iff rows is set
        return None
    if queries.dtype.is_floating_point or queries.dtype.is_complex or queries.dtype == torch.bool:
        raise ValueError(f"queries must be integer positions, got {queries.dtype}")
    if tuple(queries.shape) != (batch, rows):
        raise ValueError(
            f"queries has shape {tuple(queries.shape)}; the metadata ({rows} rows, batch {batch}) needs {(batch, rows)}"
        )
    if bool(((queries < 0) | (queries >= n_pos)).any()):
        raise ValueError(f"queries holds positions outside 0..{n_pos - 1}: {sorted(set(queries.flatten().tolist()))}")
    ordered = queries.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("queries repeats a position within a sequence; each row is one distinct query position")
    return queries.to(torch.int64)


def check_file(
    meta: Mapping[str, Any], tensors: dict[str, Tensor], store_names: Sequence[str], *, head_major: bool = False
) -> dict[str, Any]:
    """The fields of an :class:`~attnlens.AttentionTrace` from a file's metadata and tensors, after checking them.

    Args:
        meta: the decoded JSON metadata.
        tensors: every tensor of the file, by name (``input_ids``, ``attention_mask``, ``queries`` for a trace of
            some query rows, and the stacks).
        store_names: the names a trace may store, in their canonical order.
        head_major: a format 1 file: q, k, v are ``[layer, batch, head, pos, d_head]`` (returned as stored), and
            there are no query rows (no ``rows`` key).

    Raises:
        ValueError: saying what does not fit (a missing key, a value of the wrong type, a tensor of the wrong shape
            or dtype, a tensor too many or too few).
    """
    missing = [key for key in (_KEYS if head_major else _KEYS_2) if key not in meta]
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

    rows = None if head_major else meta["rows"]
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"metadata 'rows' must be null (every row) or a number of rows >= 1, got {rows!r}")
    expected = {*stored, "input_ids", "attention_mask", *(() if rows is None else ("queries",))}
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
    queries = _queries(rows, tensors.pop("queries", None), batch, n_pos)
    n_rows = n_pos if rows is None else rows
    for name in stored:
        x = tensors[name]
        want = _shape(name, len(layers), batch, len(heads), n_pos, n_rows, x, head_major)
        if tuple(x.shape) != want or not x.dtype.is_floating_point:
            in_rows = "" if rows is None else f", {rows} query rows"
            raise ValueError(
                f"{name!r} is {x.dtype} of shape {tuple(x.shape)}; the metadata ({len(layers)} layers, "
                f"{len(heads)} heads, batch {batch}, {n_pos} positions{in_rows}) needs floats of shape {want}"
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
        "queries": queries,
    }
