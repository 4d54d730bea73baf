"""The head view: one layer and head at a time as an interactive heatmap, in self-contained HTML.

Token text only ever reaches the page as JSON (with ``<``, ``>`` and ``&`` escaped) that the script puts on a canvas
or in ``textContent``, so a token such as ``</script><script>...`` or ``<img onerror=...>`` shows as text and never
runs. Weights are stored rounded to 4 decimals (integers in units of 1e-4) with the trailing zeros of each row (the
masked future of a causal pattern) dropped. Beyond about a million weights they are stored as the overview stores
them (one byte each, zlib), within the page's budget of bytes; a long input that does not fit is stored as each
head's maxima over blocks of tokens, and the page says so.
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlens.viz._checks import _json_for_script, _query_tokens, _to_numpy, new_id
from attnlens.viz._packing import MAX_BYTES, UNPACK_JS, pack_heads, pooled_cells
from attnlens.viz._source import _is_array, block_labels, block_reduce, block_size, resolve
from attnlens.viz.labels import visible

__all__ = ["HTMLView", "pattern_html", "save_html"]


class HTMLView(str):
    """A view's self-contained HTML: a ``str`` that a notebook displays as the view, and that saves as a page."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        return str(self)

    def save(self, path: str | Path, *, title: str = "attnlens") -> Path:
        """Write the view as a complete page (see :func:`save_html`); returns the path."""
        return save_html(str(self), path, title=title)


# Weights are stored as integers in units of 1 / _SCALE, i.e. rounded to 4 decimals.
_SCALE = 10_000
# Beyond this many weights in all, JSON text would take tens of MB: one byte per weight instead.
_JSON_CELLS = 1 << 20


def _encode_rows(weights: np.ndarray) -> list[Any]:
    """``[..., q_pos, k_pos]`` weights as nested lists of ints (units of 1e-4), trailing zeros of each row dropped.

    Non-finite weights are stored as null.
    """
    k_pos = weights.shape[-1]
    finite = np.isfinite(weights).reshape(-1, k_pos)
    units = np.rint(np.where(finite, weights.reshape(-1, k_pos), 0.0) * _SCALE).astype(np.int64)
    kept = (units != 0) | ~finite
    # Each row runs up to its last kept entry; the reader treats missing entries as zero.
    lengths = np.where(kept.any(-1), k_pos - np.argmax(kept[:, ::-1], axis=-1), 0).tolist()
    rows: list[Any] = []
    for units_row, finite_row, length in zip(units, finite, lengths, strict=True):
        row = units_row[:length].tolist()
        if not finite_row[:length].all():
            row = [value if ok else None for value, ok in zip(row, finite_row[:length].tolist(), strict=True)]
        rows.append(row)
    for size in reversed(weights.shape[1:-1]):
        rows = [rows[i : i + size] for i in range(0, len(rows), size)]
    return rows


def pattern_html(
    patterns: Any,
    tokens: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    title: str = "",
    layer: int | None = None,
    head: int = 0,
    max_bytes: int = MAX_BYTES,
) -> HTMLView:
    """A self-contained interactive view of attention patterns, as an HTML fragment.

    The reader picks a layer and a head; the pattern is drawn as a heatmap on a canvas (queries down, keys across,
    colour 0 to 1 or stretched to the head's maximum) and hovering a cell shows ``"query" -> "key": weight``.
    The page state also follows the URL fragment, for deep links and tests: ``#layer=5&head=1`` selects a view and
    ``&q=7&k=3`` pins a cell (layer is the model's layer number). After drawing, the view's root element carries
    ``data-state="drawn"``, ``data-layer``, ``data-head`` and ``data-cells``.

    Show it in a notebook with ``IPython.display.HTML(pattern_html(...))``, or write a page with :func:`save_html`.
    Two views in one notebook do not clash: every call uses fresh element ids.

    Up to about a million weights in all (and 6 characters each within ``max_bytes``), each is stored to 4
    decimals. Beyond, one byte per weight (within 0.002) as in :func:`attnlens.viz.overview_html`, every head while
    the page stays within ``max_bytes``; when they do not fit, each head is stored as the largest weight in each block
    of b x b tokens (a sharp head stays visible), the page says so and the root element carries ``data-block="b"``.

    Args:
        patterns: ``[layer, head, q_pos, k_pos]`` attention weights of one batch item (torch or numpy), or an
            :class:`attnlens.AttentionTrace` (its first row, padding removed; tokens default to the trace's).
        tokens: The ``k_pos`` token strings of the key positions (queries are the last ``q_pos`` of them); None
            labels positions with numbers.
        layers: The model's layer numbers along the first axis, when only some layers were traced; default 0, 1, ...
        title: Heading shown above the controls (plain text).
        layer: Layer number shown first (one of ``layers``); default the first.
        head: Head shown first.
        max_bytes: Budget of the stored weights of a long input (base64 characters; the page stays under about
            this plus its labels).

    Returns:
        An HTML fragment (pure ASCII) with inline style, data and script, as an :class:`HTMLView` (a ``str`` that
        notebooks display); it loads nothing from the network.

    Raises:
        ValueError: If ``patterns`` is not 4-D, the tokens do not match ``k_pos``, or ``layer``/``head`` is not in
            the data.
    """
    if hasattr(patterns, "attention_mask") and hasattr(patterns, "input_ids"):
        source = resolve(patterns, tokens, layers, None, None, square=False)
    else:
        array = patterns if _is_array(patterns) else _to_numpy(patterns, "patterns")
        if array.ndim != 4:
            hint = " (select one batch item, e.g. patterns[0])" if array.ndim == 5 else ""
            raise ValueError(f"patterns must be [layer, head, q_pos, k_pos], got shape {tuple(array.shape)}{hint}")
        source = resolve(array, tokens, layers, None, None, square=False)
    n_layer, n_head, q_pos, k_pos = source.shape
    key_tokens = source.texts
    query_tokens = _query_tokens(key_tokens, q_pos)
    layer_numbers = source.layers
    if layer is None:
        layer = layer_numbers[0]
    if layer not in layer_numbers:
        raise ValueError(f"layer {layer} is not among the layers of the data {layer_numbers}")
    if not 0 <= head < n_head:
        raise ValueError(f"head {head} is out of range for {n_head} heads")

    data: dict[str, Any] = {
        "layers": layer_numbers,
        "n_head": n_head,
        "q_pos": q_pos,
        "k_pos": k_pos,
        "q_labels": [visible(t) for t in query_tokens],
        "k_labels": [visible(t) for t in key_tokens],
        "scale": _SCALE,
        "initial": {"layer": layer_numbers.index(layer), "head": head},
        "block_q": 1,
        "block_k": 1,
        "note": "",
    }
    # JSON text takes up to 6 characters a weight ("10000,"): only where that fits the budget too.
    if n_layer * n_head * q_pos * k_pos <= min(_JSON_CELLS, max_bytes // 6):
        data["patterns"] = _encode_rows(source.dense())
        return render(_TEMPLATE, data, title, UNPACK=UNPACK_JS)
    # Long inputs: one byte per weight, and whole heads only while they fit the budget; else block maxima.
    packed = pack_heads(lambda i: source.head(*divmod(i, n_head)), n_layer * n_head, max_bytes=max_bytes)
    if packed["count"] < n_layer * n_head:
        cells = pooled_cells(n_layer * n_head, max_bytes)
        block_q, block_k = block_size(q_pos, cells), block_size(k_pos, cells)
        if block_q != block_k and q_pos == k_pos:
            block_q = block_k = max(block_q, block_k)
        packed = pack_heads(
            lambda i: block_reduce(source.head(*divmod(i, n_head)), block_q, block_k, "max"),
            n_layer * n_head,
            max_bytes=None,
        )
        data.update(
            q_pos=packed["q_pos"],
            k_pos=packed["k_pos"],
            q_labels=block_labels(query_tokens, block_q, k_pos - q_pos),
            k_labels=block_labels(key_tokens, block_k),
            block_q=block_q,
            block_k=block_k,
            note=f"long input ({k_pos} tokens): each cell is the largest weight in a block of {block_q} queries x "
            f"{block_k} keys (the page stores these maxima, not every weight)",
        )
    data["packed"] = packed
    return render(_TEMPLATE, data, title, UNPACK=UNPACK_JS)


def render(template: str, data: dict[str, Any], title: str, **parts: str) -> HTMLView:
    """A view's template filled in: a fresh element id, the escaped title, the data as script-safe JSON.

    ``parts`` fill further ``@NAME@`` slots verbatim (trusted code such as a shared script, never user text).
    """
    heading = f'<div class="al-title">{_html.escape(title)}</div>' if title else ""
    slots = {
        **parts,
        "ID": new_id(),
        "HEADING": heading.encode("ascii", "xmlcharrefreplace").decode("ascii"),
        "DATA": _json_for_script(data),
    }
    # One pass over the template only: a title or token that spells a slot (say "@DATA@") is text, never filled in.
    return HTMLView(re.sub(r"@([A-Z]+)@", lambda m: slots[m.group(1)], template))


def save_html(html: str, path: str | Path, *, title: str = "attnlens") -> Path:
    """Write HTML to a file, wrapping a fragment (such as :func:`pattern_html`'s) into a complete page.

    Args:
        html: A fragment, or a whole document (starting with ``<!DOCTYPE``), which is written unchanged.
        path: Destination file; its folder must exist.
        title: The page title used when wrapping a fragment (plain text).

    Returns:
        The path written.
    """
    path = Path(path)
    if not html.lstrip()[:9].lower().startswith("<!doctype"):
        # data-attnlens-page lets the views keep the URL fragment in step with the selection on a page of their own.
        html = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_html.escape(title)}</title>\n</head>\n<body data-attnlens-page>\n{html}\n</body>\n</html>\n"
        )
    path.write_text(html, encoding="utf-8")
    return path


# The view's markup, style and script. @ID@ is a fresh id per call; @DATA@ is escaped JSON; @HEADING@ escaped text.
# Token text reaches the page only through fillText (canvas) and textContent, never as markup.
_TEMPLATE = """\
<div class="attnlens-view" id="@ID@" data-state="loading">
<style>
#@ID@ { font: 13px/1.4 system-ui, sans-serif; color: #222; }
#@ID@ .al-title { font-weight: 600; margin-bottom: 4px; }
#@ID@ .al-controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 6px; }
#@ID@ .al-scale, #@ID@ .al-note { color: #666; }
#@ID@ .al-wrap { position: relative; display: inline-block; }
#@ID@ canvas { display: block; cursor: crosshair; }
#@ID@ .al-tip { position: absolute; pointer-events: none; background: rgba(20, 20, 20, 0.88); color: #fff;
  padding: 2px 6px; border-radius: 3px; white-space: pre; font: 12px ui-monospace, monospace; display: none; }
#@ID@ .al-status { font: 12px ui-monospace, monospace; white-space: pre; min-height: 1.4em; margin-top: 4px; }
</style>
@HEADING@
<div class="al-controls">
<label>Layer <select data-role="layer"></select></label>
<label>Head <select data-role="head"></select></label>
<label><input type="checkbox" data-role="stretch"> colours up to this head's max</label>
<span class="al-scale" data-role="scale"></span>
</div>
<div class="al-note" data-role="note"></div>
<div class="al-wrap"><canvas data-role="canvas"></canvas><div class="al-tip" data-role="tip"></div></div>
<div class="al-status" data-role="status">hover a cell: query -&gt; key: weight</div>
<script type="application/json" id="@ID@-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var root = document.getElementById("@ID@");
  var data = JSON.parse(document.getElementById("@ID@-data").textContent);
  var layerSel = root.querySelector("[data-role=layer]");
  var headSel = root.querySelector("[data-role=head]");
  var stretch = root.querySelector("[data-role=stretch]");
  var canvas = root.querySelector("[data-role=canvas]");
  var tip = root.querySelector("[data-role=tip]");
  var status = root.querySelector("[data-role=status]");
  var scaleNote = root.querySelector("[data-role=scale]");
  var nq = data.q_pos, nk = data.k_pos;
  var page = document.body && document.body.hasAttribute("data-attnlens-page");

  // viridis sampled at 0, 1/8, ..., 1; linear interpolation in between.
  var STOPS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
               [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function colour(t) {
    if (!(t >= 0)) { t = 0; }
    if (t > 1) { t = 1; }
    var x = t * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    var a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }
@UNPACK@
  var weight = null;
  function fromRows(li, h, q, k) {
    var row = data.patterns[li][h][q];
    if (k >= row.length) { return 0; }
    return row[k] === null ? NaN : row[k] / data.scale;
  }
  function show(label, limit) {
    // Labels arrive readable (spaces and newlines made visible): only long ones are cut.
    limit = limit || 24;
    return label.length > limit ? label.slice(0, limit - 1) + "\\u2026" : label;
  }
  function addOption(select, value, text) {
    var option = document.createElement("option");
    option.value = String(value);
    option.textContent = text;
    select.appendChild(option);
  }
  data.layers.forEach(function (layer, i) { addOption(layerSel, i, String(layer)); });
  for (var h = 0; h < data.n_head; h++) { addOption(headSel, h, String(h)); }

  var cell = Math.max(2, Math.min(24, Math.floor(480 / Math.max(nq, nk))));
  var labels = cell >= 8;
  var font = Math.min(12, cell) + "px ui-monospace, monospace";
  var ctx = canvas.getContext("2d");
  var left = 0, top = 0;
  if (labels) {
    ctx.font = font;
    data.q_labels.forEach(function (t) { left = Math.max(left, ctx.measureText(show(t)).width); });
    data.k_labels.forEach(function (t) { top = Math.max(top, ctx.measureText(show(t)).width); });
    left = Math.ceil(left) + 6;
    top = Math.ceil(top) + 6;
  }
  var dpr = window.devicePixelRatio || 1;
  var cssWidth = left + nk * cell, cssHeight = top + nq * cell;
  canvas.width = Math.round(cssWidth * dpr);
  canvas.height = Math.round(cssHeight * dpr);
  canvas.style.width = cssWidth + "px";
  canvas.style.height = cssHeight + "px";
  // One pixel per cell, scaled up without smoothing: fast even for thousands of positions.
  var grid = document.createElement("canvas");
  grid.width = nk;
  grid.height = nq;
  var gridCtx = grid.getContext("2d");
  var marked = null;

  function current() { return [Number(layerSel.value), Number(headSel.value)]; }

  function draw() {
    if (!weight) { return; }
    var sel = current(), li = sel[0], hd = sel[1], q, k, w, max = 0;
    for (q = 0; q < nq; q++) {
      for (k = 0; k < nk; k++) { w = weight(li, hd, q, k); if (w > max) { max = w; } }
    }
    var ceiling = stretch.checked && max > 0 ? max : 1;
    var image = gridCtx.createImageData(nk, nq), px = image.data, c, o;
    for (q = 0; q < nq; q++) {
      for (k = 0; k < nk; k++) {
        w = weight(li, hd, q, k);
        o = 4 * (q * nk + k);
        c = isNaN(w) ? [200, 200, 200] : colour(w / ceiling);
        px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; px[o + 3] = 255;
      }
    }
    gridCtx.putImageData(image, 0, 0);
    scaleNote.textContent = "colour scale 0 to " + ceiling.toFixed(4) + "; head max " + max.toFixed(4);
    root.dataset.layer = String(data.layers[li]);
    root.dataset.head = String(hd);
    root.dataset.cells = String(image.width * image.height);
    root.dataset.max = max.toFixed(4);
    paint();
    root.dataset.state = "drawn";
  }

  // Grid, labels and the outline of the highlighted cell; cheap enough to repeat on every hover move.
  function paint() {
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(grid, left, top, nk * cell, nq * cell);
    if (labels) {
      ctx.font = font;
      ctx.fillStyle = "#222";
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      data.q_labels.forEach(function (t, i) { ctx.fillText(show(t), left - 4, top + (i + 0.5) * cell); });
      data.k_labels.forEach(function (t, i) {
        ctx.save();
        ctx.translate(left + (i + 0.5) * cell, top - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left";
        ctx.fillText(show(t), 0, 0);
        ctx.restore();
      });
    }
    if (marked) {
      ctx.strokeStyle = "#e4007c";
      ctx.lineWidth = Math.max(1, Math.min(2, cell / 6));
      ctx.strokeRect(left + marked[1] * cell, top + marked[0] * cell, cell, cell);
    }
  }

  function describe(q, k) {
    var sel = current(), w = weight(sel[0], sel[1], q, k);
    if (data.note) {
      return "queries " + data.q_labels[q] + " -> keys " + data.k_labels[k] + ": max " +
        (isNaN(w) ? "nan" : w.toFixed(3)) + "   (layer " + data.layers[sel[0]] + ", head " + sel[1] + ")";
    }
    return show(data.q_labels[q], 80) + " -> " + show(data.k_labels[k], 80) + ": " + (isNaN(w) ? "nan" : w.toFixed(4)) +
      "   (layer " + data.layers[sel[0]] + ", head " + sel[1] + ", query " + (nk - nq + q) + ", key " + k + ")";
  }
  function pin(q, k) {
    status.textContent = describe(q, k);
    root.dataset.cell = q + "," + k;
    marked = [q, k];
    paint();
  }

  canvas.addEventListener("mousemove", function (event) {
    var rect = canvas.getBoundingClientRect();
    var k = Math.floor((event.clientX - rect.left - left) / cell);
    var q = Math.floor((event.clientY - rect.top - top) / cell);
    if (q < 0 || q >= nq || k < 0 || k >= nk) { tip.style.display = "none"; return; }
    if (!marked || marked[0] !== q || marked[1] !== k) { marked = [q, k]; paint(); }
    var text = describe(q, k);
    tip.textContent = text;
    status.textContent = text;
    tip.style.display = "block";
    tip.style.left = (left + (k + 1) * cell + 8) + "px";
    tip.style.top = (top + q * cell) + "px";
  });
  canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });

  function readHash() {
    var params = {}, raw = (window.location.hash || "").replace(/^#/, "");
    raw.split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq > 0) { params[part.slice(0, eq)] = part.slice(eq + 1); }
    });
    return params;
  }
  function fromHash() {
    var params = readHash(), li, hd, q, k;
    if ("layer" in params) {
      li = data.layers.indexOf(parseInt(params.layer, 10));
      if (li >= 0) { layerSel.value = String(li); }
    }
    if ("head" in params) {
      hd = parseInt(params.head, 10);
      if (hd >= 0 && hd < data.n_head) { headSel.value = String(hd); }
    }
    draw();
    q = parseInt(params.q, 10);
    k = parseInt(params.k, 10);
    if (q >= 0 && q < nq && k >= 0 && k < nk) { pin(q, k); }
  }
  function toHash() {
    if (!page) { return; }
    var sel = current();
    try {
      window.history.replaceState(null, "", "#layer=" + data.layers[sel[0]] + "&head=" + sel[1]);
    } catch (e) { /* some file:// pages refuse history changes; the view works without */ }
  }
  function onChange() { draw(); toHash(); }
  layerSel.addEventListener("change", onChange);
  headSel.addEventListener("change", onChange);
  stretch.addEventListener("change", draw);
  window.addEventListener("hashchange", fromHash);

  layerSel.value = String(data.initial.layer);
  headSel.value = String(data.initial.head);
  if (data.note) {
    root.querySelector("[data-role=note]").textContent = data.note;
    root.dataset.block = String(Math.max(data.block_q, data.block_k));
  }
  if (data.packed) {
    unpack(data, function (get) {
      weight = function (li, h, q, k) { return get(li * data.n_head + h, q, k); };
      fromHash();
    }, function (message) {
      status.textContent = "cannot draw the head view: " + message;
      root.dataset.state = "failed";
    });
  } else {
    weight = fromRows;
    fromHash();
  }
})();
</script>
</div>"""
