"""The lines view: one head's attention from chosen query tokens, drawn as arcs over the running text (as bertviz).

A square of weights cannot be read at a thousand tokens, but a few rows of it can: each chosen query token sends an
arc to every key it gives at least ``min_weight`` of its attention, thicker and darker the more it gives, and the keys
are tinted by their weight. Only those rows' large weights reach the page (a row holds at most ``1 / min_weight`` of
them), so the page stays small at any length; the page says which head, which queries, and how much of each query's
attention its lines show. Token text reaches the page only as JSON placed with ``textContent``: it never runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlens.viz._source import resolve
from attnlens.viz.html import HTMLView, render

__all__ = ["lines_html"]

# Weights are stored as integers in units of 1e-4 (4 decimals), as in pattern_html.
_SCALE = 10_000


def _query_positions(queries: Any, k_pos: int, first: int) -> list[int]:
    """Token positions of the chosen queries (``first`` is the first position that has a query row)."""
    if queries is None or (isinstance(queries, str) and queries == "last"):
        return [k_pos - 1]
    if isinstance(queries, str):
        raise ValueError(f"queries must be positions, a slice or 'last', got {queries!r}")
    if isinstance(queries, slice):
        positions = list(range(k_pos))[queries]
    elif isinstance(queries, (int, np.integer)):
        positions = [int(queries)]
    else:
        positions = [int(q) for q in queries]
    chosen: list[int] = []
    for position in positions:
        if not -k_pos <= position < k_pos:
            raise ValueError(f"query position {position} is out of range for {k_pos} tokens")
        position %= k_pos
        if position < first:
            raise ValueError(f"query position {position} has no row: the pattern's queries are positions {first}..")
        if position not in chosen:
            chosen.append(position)
    if not chosen:
        raise ValueError(f"queries {queries!r} select no position")
    return chosen


def lines_html(
    patterns: Any,
    tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int = 0,
    queries: Any = "last",
    layers: Sequence[int] | None = None,
    batch: int | None = None,
    tokenizer: Any = None,
    min_weight: float = 0.02,
    title: str = "",
) -> HTMLView:
    """Arcs from chosen query tokens to the keys they attend to, over the running text, for one head.

    Hovering a query token (underlined) shows only its arcs; clicking pins it (click again to release). After
    drawing, the root element carries ``data-state="drawn"``, ``data-layer``, ``data-head``, ``data-queries`` (the
    positions, comma-separated) and ``data-lines`` (arcs drawn); each arc is an SVG ``<path>`` with ``data-q``,
    ``data-k`` and ``data-w``; each token's ``<span>`` carries ``data-i`` and, when a drawn query attends to it,
    ``data-w`` (the largest weight it receives from the queries shown).

    Args:
        patterns: An :class:`attnlens.AttentionTrace` (one row of it, padding removed), ``[layer, batch, head,
            q_pos, k_pos]`` patterns with ``batch`` naming the row, or ``[layer, head, q_pos, k_pos]``. With fewer
            queries than keys the queries are the last ``q_pos`` tokens.
        tokens: The token texts; default: from the trace, or positions.
        layer: The model's layer number of the head drawn; default the first of the data.
        head: The head drawn.
        queries: Token positions whose rows are drawn: an int, a sequence of ints, a slice (negative positions count
            from the end) or ``"last"`` (default).
        layers: The model's layer numbers along the first axis (tensors only; a trace names its own).
        batch: The row of a trace or of 5-D patterns (default 0 for a trace).
        tokenizer: With a trace, label the tokens by this tokenizer's decoding of each id.
        min_weight: Smallest weight drawn as an arc; the page says how much of each query's attention is drawn.
        title: Heading shown above the text (plain text).

    Returns:
        An :class:`HTMLView`: a ``str`` of self-contained HTML that a notebook displays and ``.save(path)`` writes.

    Raises:
        ValueError: If the shapes, tokens, layer, head, queries or ``min_weight`` do not fit, or a weight lies outside
            [0, 1].
    """
    source = resolve(patterns, tokens, layers, batch, tokenizer, square=False)
    q_pos, k_pos = source.shape[2:]
    if layer is None:
        layer = source.layers[0]
    if layer not in source.layers:
        raise ValueError(f"layer {layer} is not among the layers of the data {source.layers}")
    if head not in source.heads:
        raise ValueError(f"head {head} is not among the heads of the data {source.heads}")
    if not 0 < min_weight <= 1:
        raise ValueError(f"min_weight must lie in (0, 1], got {min_weight}")
    first = k_pos - q_pos
    positions = _query_positions(queries, k_pos, first)
    head_weights = source.head(source.layers.index(layer), source.heads.index(head))
    weights = np.asarray(head_weights[[p - first for p in positions]], dtype=np.float64)
    finite = np.where(np.isfinite(weights), weights, 0.0)
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise ValueError(
            f"the views draw attention weights in [0, 1]; got values from {finite.min():.4g} to {finite.max():.4g} "
            "(pre-softmax scores? pass the pattern)"
        )
    rows = []
    for position, row in zip(positions, finite, strict=True):
        keys = np.flatnonzero(row >= min_weight)
        units = np.rint(row[keys] * _SCALE).astype(np.int64)
        rows.append(
            {
                "q": position,
                "keys": keys.tolist(),
                "w": units.tolist(),
                "drawn": round(float(row[keys].sum()), 4),
                "nan": bool(np.isnan(weights[positions.index(position)]).any()),
            }
        )
    data = {
        "layer": int(layer),
        "head": int(head),
        "n_pos": k_pos,
        "texts": source.texts,
        "rows": rows,
        "scale": _SCALE,
        "min_weight": min_weight,
    }
    return render(_TEMPLATE, data, title)


_TEMPLATE = """\
<div class="attnlens-lines" id="@ID@" data-state="loading">
<style>
#@ID@ { font: 13px/1.4 system-ui, sans-serif; color: #222; }
#@ID@ .al-title { font-weight: 600; margin-bottom: 4px; }
#@ID@ .al-note { color: #666; margin-bottom: 6px; max-width: 60em; }
#@ID@ .al-wrap { position: relative; max-width: 60em; }
#@ID@ .al-text { font: 15px/2.6 ui-monospace, monospace; white-space: pre-wrap; position: relative; z-index: 1; }
#@ID@ .al-tok { border-radius: 2px; padding: 1px 0; }
#@ID@ .al-query { text-decoration: underline; text-decoration-thickness: 2px; cursor: pointer; font-weight: 600; }
#@ID@ .al-query.al-sel { outline: 2px solid #e4007c; }
#@ID@ svg { position: absolute; left: 0; top: 0; pointer-events: none; z-index: 2; overflow: visible; }
#@ID@ .al-status { font: 12px ui-monospace, monospace; white-space: pre; min-height: 1.4em; margin-top: 6px; }
</style>
@HEADING@
<div class="al-note" data-role="note"></div>
<div class="al-wrap" data-role="wrap"><div class="al-text" data-role="text"></div></div>
<div class="al-status" data-role="status">hover an underlined query token (click to pin it)</div>
<script type="application/json" id="@ID@-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var root = document.getElementById("@ID@");
  var data = JSON.parse(document.getElementById("@ID@-data").textContent);
  var wrap = root.querySelector("[data-role=wrap]"), text = root.querySelector("[data-role=text]");
  var status = root.querySelector("[data-role=status]"), note = root.querySelector("[data-role=note]");
  var SVG = "http://www.w3.org/2000/svg";
  var COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  var svg = document.createElementNS(SVG, "svg");
  wrap.appendChild(svg);
  var byQuery = {};
  data.rows.forEach(function (row, i) { row.colour = COLOURS[i % COLOURS.length]; byQuery[row.q] = row; });
  note.textContent = "layer " + data.layer + ", head " + data.head + ": arcs from " + data.rows.length +
    " query token" + (data.rows.length === 1 ? "" : "s") + " (underlined) to every key given at least " +
    data.min_weight + " of its attention; " + data.n_pos + " tokens, only these rows are stored";
  var spans = data.texts.map(function (t, i) {
    var span = document.createElement("span");
    span.className = "al-tok" + (byQuery[i] ? " al-query" : "");
    span.textContent = t === "" ? "\\u2205" : t.replace(/\\n/g, "\\u23ce\\n");
    span.dataset.i = String(i);
    text.appendChild(span);
    return span;
  });
  var shown = null, pinned = false;

  function anchor(span, box) {
    var r = span.getBoundingClientRect();
    return [r.left - box.left + r.width / 2, r.top - box.top];
  }
  function describe(row) {
    var best = -1, w = 0;
    row.w.forEach(function (u, j) { if (u > w) { w = u; best = row.keys[j]; } });
    return "query " + row.q + " " + JSON.stringify(data.texts[row.q]).slice(0, 40) + ": " + row.keys.length +
      " arcs, " + (100 * row.drawn).toFixed(1) + "% of its attention drawn" +
      (best >= 0 ? "; strongest key " + best + " " + JSON.stringify(data.texts[best]).slice(0, 40) + " " +
      (w / data.scale).toFixed(4) : "") + (row.nan ? "; the row holds NaN" : "");
  }
  function draw() {
    var box = wrap.getBoundingClientRect(), rows = shown === null ? data.rows : [byQuery[shown]], lines = 0;
    var tint = {};
    svg.setAttribute("width", String(Math.ceil(box.width)));
    svg.setAttribute("height", String(Math.ceil(box.height)));
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    rows.forEach(function (row) {
      var top = 0, from = anchor(spans[row.q], box);
      row.w.forEach(function (u) { if (u > top) { top = u; } });
      row.keys.forEach(function (k, j) {
        var w = row.w[j] / data.scale;
        tint[k] = Math.max(tint[k] || 0, w);
        if (k === row.q) { return; }
        var to = anchor(spans[k], box), dx = Math.abs(from[0] - to[0]), dy = Math.abs(from[1] - to[1]);
        var lift = Math.min(80, 12 + (dx + dy) / 4), mx = (from[0] + to[0]) / 2;
        var my = Math.min(from[1], to[1]) - lift;
        var path = document.createElementNS(SVG, "path");
        path.setAttribute("d", "M" + to[0].toFixed(1) + " " + to[1].toFixed(1) + " Q" + mx.toFixed(1) + " " +
          my.toFixed(1) + " " + from[0].toFixed(1) + " " + from[1].toFixed(1));
        path.setAttribute("fill", "none");
        path.setAttribute("stroke", row.colour);
        path.setAttribute("stroke-width", (1 + 4 * w).toFixed(2));
        path.setAttribute("stroke-opacity", (0.2 + 0.8 * (top > 0 ? row.w[j] / top : 0)).toFixed(3));
        path.dataset.q = String(row.q);
        path.dataset.k = String(k);
        path.dataset.w = w.toFixed(4);
        svg.appendChild(path);
        lines += 1;
      });
    });
    spans.forEach(function (span, i) {
      var w = tint[i];
      span.classList.toggle("al-sel", shown === i);
      if (w === undefined) { span.style.backgroundColor = ""; delete span.dataset.w; return; }
      span.style.backgroundColor = "rgba(228, 0, 124, " + (0.08 + 0.6 * w).toFixed(3) + ")";
      span.dataset.w = w.toFixed(4);
    });
    root.dataset.lines = String(lines);
    status.textContent = shown === null ? (rows.length === 1 ? describe(rows[0]) :
      "hover an underlined query token (click to pin it)") : describe(byQuery[shown]) + (pinned ? "; pinned" : "");
  }
  data.rows.forEach(function (row) {
    var span = spans[row.q];
    span.addEventListener("mouseenter", function () { if (!pinned) { shown = row.q; draw(); } });
    span.addEventListener("mouseleave", function () { if (!pinned) { shown = null; draw(); } });
    span.addEventListener("click", function () {
      pinned = !(pinned && shown === row.q);
      shown = pinned ? row.q : null;
      draw();
    });
  });
  window.addEventListener("resize", draw);
  root.dataset.layer = String(data.layer);
  root.dataset.head = String(data.head);
  root.dataset.queries = data.rows.map(function (row) { return row.q; }).join(",");
  draw();
  root.dataset.state = "drawn";
})();
</script>
</div>"""
