"""Where a view's patterns come from, read one head at a time, and block reduction of long patterns.

A trace of GPT-2 small over 1024 tokens holds 144 squares of a million weights (600 MB in float32); a float64 copy of
them all would double that and more. The views therefore never copy the whole stack: :class:`Source` hands out one
head at a time (padding removed, float64), and long patterns are reduced block by block (:func:`block_reduce`) before
anything is drawn or stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnlens.viz._checks import _check_layers, _check_tokens, _to_numpy
from attnlens.viz.labels import token_texts

REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class Source:
    """``[layer, head, q_pos, k_pos]`` patterns of one sequence, in their own dtype and device until a head is read.

    Attributes:
        stack: ``[layer, head, q_pos', k_pos']`` torch tensor or numpy array (before padding removal).
        keep: Positions kept (the sequence without its padding), or None for all.
        texts: The ``k_pos`` token texts.
        layers: The model's layer numbers along the first axis.
        heads: The model's head numbers along the second axis.
        trace: The :class:`attnlens.AttentionTrace` it came from, or None.
    """

    stack: Any
    keep: np.ndarray | None
    texts: list[str]
    layers: list[int]
    heads: list[int]
    trace: Any = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(layer, head, q_pos, k_pos)`` after padding removal."""
        n_layer, n_head, q_pos, k_pos = (int(s) for s in self.stack.shape)
        if self.keep is not None:
            q_pos = k_pos = len(self.keep)
        return n_layer, n_head, q_pos, k_pos

    def head(self, li: int, hi: int) -> np.ndarray:
        """The ``[q_pos, k_pos]`` weights of the head at index ``(li, hi)``: float32 or float64, a view if it can be."""
        weights = native(self.stack[li, hi])
        if self.keep is not None:
            weights = weights[self.keep][:, self.keep]
        return weights

    def dense(self) -> np.ndarray:
        """All heads as one float64 ``[layer, head, q_pos, k_pos]`` array: only for short inputs."""
        n_layer, n_head = self.shape[:2]
        heads = [[self.head(li, hi) for hi in range(n_head)] for li in range(n_layer)]
        return np.array(heads, dtype=np.float64)


def resolve(
    patterns: Any,
    tokens: Sequence[str] | None,
    layers: Sequence[int] | None,
    batch: int | None,
    tokenizer: Any,
    *,
    square: bool = True,
) -> Source:
    """The patterns of one sequence as a :class:`Source`, checked.

    ``patterns`` is an :class:`attnlens.AttentionTrace` (one row, padding removed), ``[layer, batch, head, q_pos,
    k_pos]`` with ``batch`` naming the row, or ``[layer, head, q_pos, k_pos]``. With ``square`` the views need
    ``q_pos == k_pos``.
    """
    if hasattr(patterns, "attention_mask") and hasattr(patterns, "input_ids"):
        trace = patterns
        row = 0 if batch is None else int(batch)
        if not 0 <= row < trace.batch:
            raise ValueError(f"batch row {row} is out of range for a trace of {trace.batch} rows")
        if "pattern" not in trace.stored:
            raise ValueError("this trace stored no patterns; trace with store including 'pattern'")
        mask = trace.attention_mask[row].bool().cpu()
        keep = None if bool(mask.all()) else np.flatnonzero(mask.numpy())
        if tokens is None:
            ids = trace.input_ids[row].cpu()[mask]
            if tokenizer is not None:
                tokens = token_texts(tokenizer, ids)
            elif trace.tokens is not None:
                tokens = [t for t, k in zip(trace.tokens[row], mask.tolist(), strict=True) if k]
            else:
                tokens = [str(int(i)) for i in ids]
        if layers is not None:
            raise ValueError("a trace names its own layers; leave layers=None")
        # Indexing the row of the stack is a view: nothing is copied until a head is read.
        source = Source(trace.patterns[:, row], keep, [], list(trace.layers), list(trace.heads), trace)
        texts = _check_tokens(list(tokens), source.shape[-1])
        return Source(source.stack, keep, texts, source.layers, source.heads, trace)
    if tokenizer is not None:
        raise ValueError("tokenizer= labels the ids of an AttentionTrace; with a tensor pass the token strings")
    stack = patterns if _is_array(patterns) else _to_numpy(patterns, "patterns")
    if stack.ndim == 5:
        if batch is None:
            raise ValueError(
                f"patterns of shape {tuple(stack.shape)} are [layer, batch, head, q_pos, k_pos]: pass batch=ROW"
            )
        if not 0 <= batch < stack.shape[1]:
            raise ValueError(f"batch row {batch} is out of range for {stack.shape[1]} rows")
        stack = stack[:, batch]
    elif batch is not None:
        raise ValueError("batch= picks a row of [layer, batch, head, q_pos, k_pos] patterns or of a trace")
    if stack.ndim != 4:
        raise ValueError(f"patterns must be [layer, head, q_pos, k_pos], got shape {tuple(stack.shape)}")
    if 0 in stack.shape:
        raise ValueError(f"patterns must not be empty, got shape {tuple(stack.shape)}")
    n_layer, n_head, q_pos, k_pos = (int(s) for s in stack.shape)
    if square and q_pos != k_pos:
        raise ValueError(f"these views draw square patterns (q_pos == k_pos), got {q_pos} queries and {k_pos} keys")
    texts = _check_tokens(tokens, k_pos)
    return Source(stack, None, texts, _check_layers(layers, n_layer), list(range(n_head)))


def _is_array(values: Any) -> bool:
    """A torch tensor or numpy array: read head by head, never copied whole."""
    return isinstance(values, np.ndarray) or (hasattr(values, "detach") and hasattr(values, "shape"))


def block_size(n: int, max_cells: int) -> int:
    """The smallest block length that brings ``n`` positions down to at most ``max_cells`` blocks."""
    return max(1, math.ceil(n / max(1, max_cells)))


def native(values: Any) -> np.ndarray:
    """A torch tensor or array as a float32 or float64 numpy array, without a copy where it already is one.

    Reading a head of a long input as float64 would copy 8 MB per head; numpy's reductions and the packing below
    work on float32 directly (bfloat16 and float16 are widened to float32: numpy has no bfloat16).
    """
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        tensor = values.detach().cpu()
        if str(tensor.dtype) not in ("torch.float32", "torch.float64"):
            tensor = tensor.float()
        return tensor.numpy()
    array = np.asarray(values)
    return array if array.dtype in (np.float32, np.float64) else _to_numpy(array, "patterns")


def block_reduce(weights: np.ndarray, block_q: int, block_k: int, how: str = "max") -> np.ndarray:
    """``[q_pos, k_pos]`` weights reduced over blocks of ``block_q`` queries x ``block_k`` keys, in float64.

    The last block of each axis may be shorter; "mean" averages over the weights it holds. A NaN in a block makes
    the block NaN (it is shown, not hidden). Max keeps a sharp head (previous token, first token) as sharp as it is;
    the mean shows how much weight a block carries per cell. One band of ``block_q`` rows is reduced at a time, so
    the temporaries stay O(k_pos), not another copy of the square.

    Args:
        weights: ``[q_pos, k_pos]``.
        block_q: Queries per block.
        block_k: Keys per block.
        how: "max" or "mean".

    Returns:
        ``[ceil(q_pos / block_q), ceil(k_pos / block_k)]``; with blocks of 1 x 1 the weights themselves.
    """
    if how not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {how!r}")
    if block_q == block_k == 1:
        return weights
    q_pos, k_pos = weights.shape
    n_q, n_k = math.ceil(q_pos / block_q), math.ceil(k_pos / block_k)
    out = np.empty((n_q, n_k))
    fill = -np.inf if how == "max" else 0.0
    line = np.full(n_k * block_k, fill)
    cols = np.minimum(block_k, k_pos - block_k * np.arange(n_k))
    for i in range(n_q):
        band = weights[i * block_q : (i + 1) * block_q]
        if how == "max":
            line[:k_pos] = band.max(axis=0)
            out[i] = line.reshape(n_k, block_k).max(axis=1)
        else:
            line[:k_pos] = band.sum(axis=0, dtype=np.float64)
            out[i] = line.reshape(n_k, block_k).sum(axis=1) / (cols * len(band))
    return out


def block_labels(texts: Sequence[str], block: int, offset: int = 0) -> list[str]:
    """Labels of blocks of ``block`` positions: the position range, e.g. ``"16-23"`` (a token's own text alone).

    A last block of one position is labelled by that position.
    """
    if block == 1:
        return list(texts)
    n = len(texts)
    ends = [(offset + i, offset + min(i + block, n) - 1) for i in range(0, n, block)]
    return [str(a) if a == b else f"{a}-{b}" for a, b in ends]
