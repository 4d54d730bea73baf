"""Compact storage of many attention patterns for the HTML views, within a budget of bytes.

Each weight is quantised to one byte: ``round(w * 254)`` (so it is kept to within ``1/508``, about 0.002, of its
value), 255 marks a NaN. Of a causal pattern (square, nothing above the diagonal) only the lower triangle is kept.
The bytes of all heads are compressed with zlib and base64-encoded; the page inflates them with the browser's own
``DecompressionStream`` (Chromium 80+, Firefox 113+, Safari 16.4+), so nothing is fetched.

A view of a long input does not embed every weight: heads are packed while the page stays within its budget
(``max_bytes``), and the views say on the page what they left out or reduced.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from attnlens.viz._checks import _to_numpy

LEVELS = 254
NAN_CODE = 255
# The largest error of a stored weight: half a quantisation step.
PRECISION = 0.5 / LEVELS
# The default budget of a view's packed weights (base64 characters): the page stays under about 5 MB.
MAX_BYTES = 4_000_000


def pooled_cells(n_heads: int, max_bytes: int) -> int:
    """Blocks per side for long inputs: ``n_heads`` lower triangles of one byte each fit ``max_bytes`` uncompressed."""
    raw = max_bytes * 3 // 4
    return int(np.clip(np.sqrt(2 * raw / max(1, n_heads)), 16, 256))


def _codes(weights: np.ndarray) -> np.ndarray:
    """``[q_pos, k_pos]`` weights in [0, 1] as one byte each (255 for NaN), computed in float64.

    A band of rows at a time: a long head is never copied whole in float64.

    Raises:
        ValueError: If a finite weight lies outside [0, 1] (the views draw attention weights, not scores).
    """
    codes = np.empty(weights.shape, dtype=np.uint8)
    step = max(1, (1 << 17) // max(1, weights.shape[-1]))
    for start in range(0, weights.shape[0], step):
        rows = np.asarray(weights[start : start + step], dtype=np.float64)
        finite = np.isfinite(rows)
        values = np.where(finite, rows, 0.0)
        if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
            raise ValueError(
                f"the views draw attention weights in [0, 1]; got values from {values.min():.4g} to "
                f"{values.max():.4g} (pre-softmax scores? pass the pattern)"
            )
        band = np.rint(np.clip(values, 0.0, 1.0) * LEVELS).astype(np.uint8)
        band[~finite] = NAN_CODE
        codes[start : start + step] = band
    return codes


def _causal(weights: np.ndarray) -> bool:
    q_pos, k_pos = weights.shape[-2:]
    return q_pos == k_pos and not bool(np.triu(weights != 0, 1).any())


def pack_heads(
    read: Callable[[int], np.ndarray], n_heads: int, *, max_bytes: int | None, at_least: int = 1
) -> dict[str, Any]:
    """The ``[q_pos, k_pos]`` weights of heads ``read(0)``, ``read(1)``, ... in one zlib stream, within a budget.

    Heads are read one at a time (a long input's stack is never copied whole) and added in order while the base64
    text stays under ``max_bytes``; the first ``at_least`` are always added. ``"count"`` says how many were. Of a
    causal square (nothing above the diagonal in any head packed) only the lower triangle is kept.

    Returns:
        ``{"tri", "levels", "q_pos", "k_pos", "count", "blob"}``.

    Raises:
        ValueError: If a finite weight lies outside [0, 1].
    """
    q_pos, k_pos = read(0).shape
    tri = q_pos == k_pos
    # Compressed bytes allowed: base64 writes 4 characters per 3 bytes.
    limit = None if max_bytes is None else max_bytes * 3 // 4
    while True:
        compressor = zlib.compressobj(1)  # level 1: within a few per cent of level 6 on patterns, several times faster
        chunks: list[bytes] = []
        size, count, restart = 0, 0, False
        below = np.tril(np.ones((q_pos, k_pos), dtype=bool)) if tri else None
        for index in range(n_heads):
            weights = read(index)
            if tri and not _causal(weights):
                restart = True  # this head attends to its future: store whole squares instead
                break
            codes = _codes(weights)
            data = (codes[below] if below is not None else np.ascontiguousarray(codes)).tobytes()  # row q: keys 0..q
            if limit is not None and count >= at_least:
                trial = compressor.copy()
                if size + len(trial.compress(data)) + len(trial.flush()) > limit:
                    break
            chunk = compressor.compress(data)
            chunks.append(chunk)
            size += len(chunk)
            count += 1
        if not restart:
            break
        tri = False
    chunks.append(compressor.flush())
    blob = base64.b64encode(b"".join(chunks)).decode("ascii")
    return {"tri": tri, "levels": LEVELS, "q_pos": q_pos, "k_pos": k_pos, "count": count, "blob": blob}


def score_table(
    scores: Any, layer_numbers: Sequence[int], head_numbers: Sequence[int]
) -> dict[str, list[list[float | None]]]:
    """Head scores as ``{name: [layer][head]}`` lists rounded to 3 decimals (None for NaN).

    Takes a mapping of names to ``[layer, head]`` arrays, an :class:`attnlens.metrics.HeadScores` (undefined scores
    left out) or an :class:`attnlens.ScanResult` (its means). The last two name their layers and heads, which must be
    the patterns' (``layer_numbers``, ``head_numbers``): a table of the same shape for other heads would label them
    wrongly.
    """
    if scores is None:
        return {}
    own = (getattr(scores, "layers", None), getattr(scores, "heads", None))
    if not isinstance(scores, dict) and isinstance(own[0], tuple) and isinstance(own[1], tuple):
        shown = (list(layer_numbers), list(head_numbers))
        if (list(own[0]), list(own[1])) != shown:
            raise ValueError(
                f"the scores are of layers {list(own[0])} and heads {list(own[1])}, the patterns show layers "
                f"{shown[0]} and heads {shown[1]}: score the same layers and heads (or pass a dict of arrays)"
            )
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
    n_head = len(head_numbers)
    for name, value in items.items():
        grid = _to_numpy(value, f"scores[{name!r}]")
        if grid.shape != (len(layer_numbers), n_head):
            raise ValueError(
                f"scores[{name!r}] has shape {tuple(grid.shape)}; the patterns have "
                f"{len(layer_numbers)} layers and {n_head} heads"
            )
        table[str(name)] = [[round(float(v), 3) if np.isfinite(v) else None for v in row] for row in grid]
    return table


# Inflating the packed bytes in the page; `data` is the view's JSON, `done` gets a head accessor.
UNPACK_JS = """
  function unpack(data, done, fail) {
    if (typeof DecompressionStream === "undefined") { fail("this browser has no DecompressionStream"); return; }
    var bin = atob(data.packed.blob), bytes = new Uint8Array(bin.length), i;
    for (i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    new Response(stream).arrayBuffer().then(function (buffer) {
      var codes = new Uint8Array(buffer), n = data.packed.k_pos, tri = data.packed.tri;
      var size = tri ? n * (n + 1) / 2 : data.packed.q_pos * n;
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
