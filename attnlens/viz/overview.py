"""The overview: every layer x head as small multiples, each with its head scores; a click opens one head large.

Patterns are stored compactly (one byte per weight, lower triangle only, zlib; see :mod:`attnlens.viz._packing`)
and drawn on ``<canvas>`` elements. When every weight of every head does not fit the page's budget (``max_bytes``,
4 MB by default: GPT-2 small's 144 heads beyond a few hundred tokens), each head is stored as the largest weight of
each block of b x b tokens, and the page says so: a sharp head stays visible, the page stays a few MB at any length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnlens.viz._packing import MAX_BYTES, UNPACK_JS, pack_heads, pooled_cells, score_table
from attnlens.viz._source import block_labels, block_reduce, block_size, resolve
from attnlens.viz.html import HTMLView, render
from attnlens.viz.labels import visible

__all__ = ["overview_html"]


def overview_html(
    patterns: Any,
    tokens: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    batch: int | None = None,
    scores: Any = "auto",
    tokenizer: Any = None,
    title: str = "",
    max_bytes: int = MAX_BYTES,
) -> HTMLView:
    """Every head's pattern as a thumbnail, its head scores beside it; clicking one opens it large with labels.

    The large view labels its axes with the tokens (up to 60 positions) and shows ``query -> key: weight`` for the
    hovered cell. After drawing, the root element carries ``data-state="drawn"``, ``data-heads`` (thumbnails drawn)
    and ``data-draw-ms`` (milliseconds from the script's start); with a head open, ``data-open="layer,head"``.

    Args:
        patterns: An :class:`attnlens.AttentionTrace` (one row of it, padding removed), ``[layer, batch, head,
            q_pos, k_pos]`` patterns with ``batch`` naming the row, or ``[layer, head, q_pos, k_pos]`` (q_pos ==
            k_pos).
        tokens: The token texts (spaces and newlines are shown as ``␣`` and ``⏎``); default: from the trace, or
            positions.
        layers: The model's layer numbers along the first axis (tensors only; a trace names its own).
        batch: The row of a trace or of 5-D patterns (default 0 for a trace).
        scores: Head scores to write beside each thumbnail: a dict of ``[layer, head]`` arrays, an
            :class:`attnlens.metrics.HeadScores` or an :class:`attnlens.ScanResult`; ``"auto"`` (default) computes
            :func:`attnlens.metrics.head_scores` of a trace (over all its rows) and shows none for tensors; None
            shows none.
        tokenizer: With a trace, label the tokens by this tokenizer's decoding of each id.
        title: Heading shown above the grid (plain text).
        max_bytes: Budget of the stored weights (base64 characters). When every weight of every head does not fit,
            each head is stored as the maximum over blocks of b x b tokens (b as small as fits), said on the page;
            the root element then carries ``data-block``.

    Returns:
        An :class:`HTMLView`: a ``str`` of self-contained HTML that a notebook displays and ``.save(path)`` writes.

    Raises:
        ValueError: If the shapes, tokens, batch row or scores do not fit, or a weight lies outside [0, 1].
    """
    source = resolve(patterns, tokens, layers, batch, tokenizer)
    n_layer, n_head, _, n_pos = source.shape
    if isinstance(scores, str):
        if scores != "auto":
            raise ValueError(f"scores must be 'auto', None, a dict, a HeadScores or a ScanResult, got {scores!r}")
        scores = None
        if source.trace is not None:
            from attnlens import metrics

            scores = metrics.head_scores(source.trace)

    def head(index: int, block: int = 1) -> Any:
        return block_reduce(source.head(*divmod(index, n_head)), block, block, "max")

    packed = pack_heads(head, n_layer * n_head, max_bytes=max_bytes)
    block = 1
    if packed["count"] < n_layer * n_head:
        block = block_size(n_pos, pooled_cells(n_layer * n_head, max_bytes))
        packed = pack_heads(lambda i: head(i, block), n_layer * n_head, max_bytes=None)
    data = {
        "layers": source.layers,
        "heads": source.heads,
        "n_pos": packed["k_pos"],
        "n_tokens": n_pos,
        "block": block,
        "labels": block_labels([visible(t) for t in source.texts], block),
        "scores": score_table(scores, source.layers, source.heads),
        "packed": packed,
    }
    return render(_TEMPLATE, data, title, UNPACK=UNPACK_JS)


_TEMPLATE = """\
<div class="attnlens-overview" id="@ID@" data-state="loading">
<style>
#@ID@ { font: 12px/1.3 system-ui, sans-serif; color: #222; }
#@ID@ .al-title { font-weight: 600; margin-bottom: 4px; }
#@ID@ .al-note { color: #666; margin-bottom: 4px; }
#@ID@ .al-grid { display: grid; justify-content: start; gap: 6px; align-items: start; }
#@ID@ .al-rowhead, #@ID@ .al-colhead { font-weight: 600; color: #555; align-self: center; text-align: center; }
#@ID@ .al-card { cursor: pointer; border: 2px solid transparent; border-radius: 3px; padding: 1px; }
#@ID@ .al-card:hover, #@ID@ .al-card.al-open { border-color: #e4007c; }
#@ID@ .al-card canvas { display: block; width: 88px; height: 88px; }
#@ID@ .al-card .al-name { font-weight: 600; }
#@ID@ .al-card .al-score { font: 10px ui-monospace, monospace; color: #444; white-space: pre; }
#@ID@ .al-detail { margin-top: 10px; border-top: 1px solid #ccc; padding-top: 6px; }
#@ID@ .al-detail canvas { display: block; cursor: crosshair; }
#@ID@ .al-status { font: 12px ui-monospace, monospace; white-space: pre; min-height: 1.4em; margin-top: 4px; }
</style>
@HEADING@
<div class="al-note" data-role="note">every layer (rows) and head (columns); click a head to see it large</div>
<div class="al-grid" data-role="grid"></div>
<div class="al-detail" data-role="detail" hidden>
<div><b data-role="detail-title"></b> <button type="button" data-role="close">close</button></div>
<canvas data-role="big"></canvas>
<div class="al-status" data-role="status">hover a cell: query -&gt; key: weight</div>
</div>
<script type="application/json" id="@ID@-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var started = performance.now();
  var root = document.getElementById("@ID@");
  var data = JSON.parse(document.getElementById("@ID@-data").textContent);
  var grid = root.querySelector("[data-role=grid]"), note = root.querySelector("[data-role=note]");
  var detail = root.querySelector("[data-role=detail]"), big = root.querySelector("[data-role=big]");
  var status = root.querySelector("[data-role=status]");
  var n = data.n_pos, nh = data.heads.length, names = Object.keys(data.scores);
  var SHORT = {previous_token: "prev", first_token: "first", entropy: "entropy", duplicate_token: "dup",
               induction: "induct"};
@UNPACK@
  if (data.block > 1) {
    note.textContent = "long input (" + data.n_tokens + " tokens): each cell is the largest weight in a block of " +
      data.block + " x " + data.block + " tokens (the page stores these maxima, not every weight); " +
      "click a head to see it large";
    root.dataset.block = String(data.block);
  }
  var lut = new Uint8ClampedArray(256 * 4), v, c;
  for (v = 0; v < 256; v++) {
    c = v === 255 ? [200, 200, 200] : viridis(v / data.packed.levels);
    lut[4 * v] = c[0]; lut[4 * v + 1] = c[1]; lut[4 * v + 2] = c[2]; lut[4 * v + 3] = 255;
  }
  function cut(label, limit) { return label.length > limit ? label.slice(0, limit - 1) + "\\u2026" : label; }
  function div(cls, text) {
    var el = document.createElement("div");
    el.className = cls;
    if (text !== undefined) { el.textContent = text; }
    return el;
  }

  unpack(data, function (get, codes, size) {
    var thumbs = [], opened = null;
    function drawThumb(canvas, index) {
      var ctx = canvas.getContext("2d"), image = ctx.createImageData(n, n), px = image.data;
      var base = index * size, tri = data.packed.tri, q, k, code, o, at = base;
      for (q = 0; q < n; q++) {
        for (k = 0; k < n; k++) {
          code = (tri && k > q) ? 0 : codes[at++];
          o = 4 * (q * n + k);
          px[o] = lut[4 * code]; px[o + 1] = lut[4 * code + 1]; px[o + 2] = lut[4 * code + 2]; px[o + 3] = 255;
        }
      }
      ctx.putImageData(image, 0, 0);
    }
    grid.style.gridTemplateColumns = "max-content repeat(" + nh + ", 92px)";
    grid.appendChild(div("al-colhead", ""));
    data.heads.forEach(function (h) { grid.appendChild(div("al-colhead", "head " + h)); });
    data.layers.forEach(function (layer, li) {
      grid.appendChild(div("al-rowhead", "layer " + layer));
      data.heads.forEach(function (head, hi) {
        var card = div("al-card"), canvas = document.createElement("canvas"), index = li * nh + hi, tip = [];
        card.dataset.layer = String(layer);
        card.dataset.head = String(head);
        canvas.width = n; canvas.height = n;
        if (n < 88) { canvas.style.imageRendering = "pixelated"; }
        drawThumb(canvas, index);
        card.appendChild(canvas);
        card.appendChild(div("al-name", "L" + layer + "H" + head));
        names.forEach(function (name) {
          var value = data.scores[name][li][hi], text = value === null ? "nan" : value.toFixed(2);
          card.appendChild(div("al-score", (SHORT[name] || cut(name, 7)) + " " + text));
          tip.push(name + " " + text);
        });
        card.title = "layer " + layer + ", head " + head + (tip.length ? "\\n" + tip.join("\\n") : "");
        card.addEventListener("click", function () { open(li, hi, card); });
        thumbs.push(canvas);
        grid.appendChild(card);
      });
    });

    var cell, labels, left, top, font = "11px ui-monospace, monospace", ctx = big.getContext("2d"), marked = null;
    var dpr = window.devicePixelRatio || 1;
    function paint() {
      var li = opened[0], hi = opened[1];
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, big.width, big.height);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(thumbs[li * nh + hi], left, top, n * cell, n * cell);
      if (labels) {
        ctx.font = font; ctx.fillStyle = "#222"; ctx.textBaseline = "middle"; ctx.textAlign = "right";
        data.labels.forEach(function (t, i) { ctx.fillText(cut(t, 16), left - 4, top + (i + 0.5) * cell); });
        data.labels.forEach(function (t, i) {
          ctx.save(); ctx.translate(left + (i + 0.5) * cell, top - 4); ctx.rotate(-Math.PI / 2);
          ctx.textAlign = "left"; ctx.fillText(cut(t, 16), 0, 0); ctx.restore();
        });
      }
      if (marked) {
        ctx.strokeStyle = "#e4007c"; ctx.lineWidth = Math.max(1, Math.min(2, cell / 6));
        ctx.strokeRect(left + marked[1] * cell, top + marked[0] * cell, cell, cell);
      }
    }
    function open(li, hi, card) {
      var prev = root.querySelector(".al-open");
      if (prev) { prev.classList.remove("al-open"); }
      card.classList.add("al-open");
      opened = [li, hi];
      marked = null;
      cell = Math.max(1, Math.min(20, Math.floor(640 / n)));
      labels = n <= 60;
      left = 0; top = 0;
      if (labels) {
        ctx.font = font;
        data.labels.forEach(function (t) { left = Math.max(left, ctx.measureText(cut(t, 16)).width); });
        left = top = Math.ceil(left) + 6;
      }
      var width = left + n * cell, height = top + n * cell;
      big.width = Math.round(width * dpr); big.height = Math.round(height * dpr);
      big.style.width = width + "px"; big.style.height = height + "px";
      root.querySelector("[data-role=detail-title]").textContent =
        "layer " + data.layers[li] + ", head " + data.heads[hi];
      detail.hidden = false;
      paint();
      root.dataset.open = data.layers[li] + "," + data.heads[hi];
    }
    big.addEventListener("mousemove", function (event) {
      if (!opened) { return; }
      var rect = big.getBoundingClientRect();
      var k = Math.floor((event.clientX - rect.left - left) / cell);
      var q = Math.floor((event.clientY - rect.top - top) / cell);
      if (q < 0 || q >= n || k < 0 || k >= n) { return; }
      var w = get(opened[0] * nh + opened[1], q, k);
      marked = [q, k];
      paint();
      status.textContent = data.block > 1 ?
        "queries " + data.labels[q] + " -> keys " + data.labels[k] + ": max " + (isNaN(w) ? "nan" : w.toFixed(3)) :
        cut(data.labels[q], 40) + " -> " + cut(data.labels[k], 40) + ": " +
        (isNaN(w) ? "nan" : w.toFixed(3)) + "   (query " + q + ", key " + k + ")";
      root.dataset.cell = q + "," + k;
    });
    root.querySelector("[data-role=close]").addEventListener("click", function () {
      detail.hidden = true;
      opened = null;
      var prev = root.querySelector(".al-open");
      if (prev) { prev.classList.remove("al-open"); }
      delete root.dataset.open;
    });
    root.dataset.heads = String(thumbs.length);
    root.dataset.drawMs = (performance.now() - started).toFixed(1);
    root.dataset.state = "drawn";
  }, function (message) {
    note.textContent = "cannot draw the overview: " + message;
    root.dataset.state = "failed";
  });
})();
</script>
</div>"""
