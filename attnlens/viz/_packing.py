"""Compact storage of many attention patterns for the overview and text views, and where they come from.

Each weight is quantised to one byte: ``round(w * 254)`` (so it is kept to within ``1/508``, about 0.002, of its
value), 255 marks a NaN. Of a causal pattern (square, nothing above the diagonal) only the lower triangle is kept.
The bytes of all heads are compressed with zlib and base64-encoded; the page inflates them with the browser's own
``DecompressionStream`` (Chromium 80+, Firefox 113+, Safari 16.4+), so nothing is fetched.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlens.viz._checks import _check_layers, _check_tokens, _to_numpy
from attnlens.viz.labels import token_texts

LEVELS = 254
NAN_CODE = 255
# The largest error of a stored weight: half a quantisation step.
PRECISION = 0.5 / LEVELS


def pack_patterns(weights: np.ndarray) -> dict[str, Any]:
    """``[layer, head, q_pos, k_pos]`` weights in [0, 1] as ``{"tri", "blob"}``: bytes, zlib, base64.

    Raises:
        ValueError: If a finite weight lies outside [0, 1] (the views draw attention weights, not scores).
    """
    finite = np.isfinite(weights)
    values = np.where(finite, weights, 0.0)
    if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
        raise ValueError(
            f"the views draw attention weights in [0, 1]; got values from {values.min():.4g} to {values.max():.4g} "
            "(pre-softmax scores? pass the pattern)"
        )
    codes = np.rint(np.clip(values, 0.0, 1.0) * LEVELS).astype(np.uint8)
    codes[~finite] = NAN_CODE
    q_pos, k_pos = weights.shape[-2:]
    above = np.triu(np.ones((q_pos, k_pos), dtype=bool), 1)
    tri = q_pos == k_pos and not bool(((weights != 0) & above).any())
    if tri:
        codes = codes[..., ~above]  # row-major: row q holds keys 0..q
    # Level 1: within a few per cent of level 6 in size on patterns, and several times faster.
    blob = zlib.compress(np.ascontiguousarray(codes).tobytes(), 1)
    return {"tri": tri, "levels": LEVELS, "blob": base64.b64encode(blob).decode("ascii")}


def score_table(scores: Any, layer_numbers: list[int], n_head: int) -> dict[str, list[list[float | None]]]:
    """Head scores as ``{name: [layer][head]}`` lists rounded to 3 decimals (None for NaN).

    Takes a mapping of names to ``[layer, head]`` arrays, an :class:`attnlens.metrics.HeadScores` (undefined scores
    left out) or an :class:`attnlens.ScanResult` (its means).
    """
    if scores is None:
        return {}
    if hasattr(scores, "mean") and isinstance(scores.mean, dict):  # ScanResult
        items = dict(scores.mean)
    elif hasattr(scores, "names") and not isinstance(scores, dict):  # HeadScores
        items = {name: getattr(scores, name) for name in scores.names if getattr(scores, name) is not None}
    elif isinstance(scores, dict):
        items = dict(scores)
    else:
        raise TypeError(
            f"scores must be a dict of [layer, head] arrays, a HeadScores or a ScanResult, got {type(scores).__name__}"
        )
    table = {}
    for name, value in items.items():
        grid = _to_numpy(value, f"scores[{name!r}]")
        if grid.shape != (len(layer_numbers), n_head):
            raise ValueError(
                f"scores[{name!r}] has shape {tuple(grid.shape)}; the patterns have "
                f"{len(layer_numbers)} layers and {n_head} heads"
            )
        table[str(name)] = [[round(float(v), 3) if np.isfinite(v) else None for v in row] for row in grid]
    return table


def resolve(
    patterns: Any,
    tokens: Sequence[str] | None,
    layers: Sequence[int] | None,
    batch: int | None,
    tokenizer: Any,
) -> tuple[np.ndarray, list[str], list[int], list[int], Any]:
    """(weights ``[layer, head, pos, pos]``, token texts, layer numbers, head numbers, the trace or None).

    ``patterns`` is an :class:`attnlens.AttentionTrace` (one row, padding removed), ``[layer, batch, head, q_pos,
    k_pos]`` with ``batch`` naming the row, or ``[layer, head, q_pos, k_pos]``.
    """
    if hasattr(patterns, "attention_mask") and hasattr(patterns, "input_ids"):
        trace = patterns
        row = 0 if batch is None else int(batch)
        if not 0 <= row < trace.batch:
            raise ValueError(f"batch row {row} is out of range for a trace of {trace.batch} rows")
        if "pattern" not in trace.stored:
            raise ValueError("this trace stored no patterns; trace with store including 'pattern'")
        keep = trace.attention_mask[row].bool().cpu()
        weights = _to_numpy(trace.patterns[:, row], "patterns")[..., keep.numpy(), :][..., keep.numpy()]
        if tokens is None:
            ids = trace.input_ids[row].cpu()[keep]
            if tokenizer is not None:
                tokens = token_texts(tokenizer, ids)
            elif trace.tokens is not None:
                tokens = [t for t, k in zip(trace.tokens[row], keep.tolist()) if k]
            else:
                tokens = [str(int(i)) for i in ids]
        if layers is not None:
            raise ValueError("a trace names its own layers; leave layers=None")
        return weights, list(tokens), list(trace.layers), list(trace.heads), trace
    if tokenizer is not None:
        raise ValueError("tokenizer= labels the ids of an AttentionTrace; with a tensor pass the token strings")
    weights = _to_numpy(patterns, "patterns")
    if weights.ndim == 5:
        if batch is None:
            raise ValueError(
                f"patterns of shape {tuple(weights.shape)} are [layer, batch, head, q_pos, k_pos]: pass batch=ROW"
            )
        if not 0 <= batch < weights.shape[1]:
            raise ValueError(f"batch row {batch} is out of range for {weights.shape[1]} rows")
        weights = weights[:, batch]
    elif batch is not None:
        raise ValueError("batch= picks a row of [layer, batch, head, q_pos, k_pos] patterns or of a trace")
    if weights.ndim != 4:
        raise ValueError(f"patterns must be [layer, head, q_pos, k_pos], got shape {tuple(weights.shape)}")
    if 0 in weights.shape:
        raise ValueError(f"patterns must not be empty, got shape {tuple(weights.shape)}")
    n_layer, n_head, q_pos, k_pos = weights.shape
    if q_pos != k_pos:
        raise ValueError(f"these views draw square patterns (q_pos == k_pos), got {q_pos} queries and {k_pos} keys")
    texts = _check_tokens(tokens, k_pos)
    return weights, texts, _check_layers(layers, n_layer), list(range(n_head)), None


# Inflating the packed bytes in the page; `data` is the view's JSON, `done` gets a head accessor.
UNPACK_JS = """
  function unpack(data, done, fail) {
    if (typeof DecompressionStream === "undefined") { fail("this browser has no DecompressionStream"); return; }
    var bin = atob(data.packed.blob), bytes = new Uint8Array(bin.length), i;
    for (i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    new Response(stream).arrayBuffer().then(function (buffer) {
      var codes = new Uint8Array(buffer), n = data.n_pos, tri = data.packed.tri;
      var size = tri ? n * (n + 1) / 2 : n * n;
      // Weight of key k for query q in head number `index` (layer-major): NaN for 255, 0 above the diagonal.
      function get(index, q, k) {
        if (tri && k > q) { return 0; }
        var code = codes[index * size + (tri ? q * (q + 1) / 2 : q * n) + k];
        return code === 255 ? NaN : code / data.packed.levels;
      }
      done(get, codes, size);
    }, function (error) { fail(String(error)); });
  }
  // viridis sampled at 0, 1/8, ..., 1; linear interpolation in between.
  var STOPS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
               [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function viridis(t) {
    if (!(t >= 0)) { t = 0; }
    if (t > 1) { t = 1; }
    var x = t * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    var a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }
"""
