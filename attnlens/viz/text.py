"""The text view: the tokens as running text, coloured by how much the selected heads attend from (or to) one token.

Hovering a token selects it, clicking pins it (click again to release); the head selector takes one head or several
(their mean is shown); a switch chooses "attention from the token" (its pattern row) or "to the token" (its column).
Patterns are stored as in the overview (one byte per weight, lower triangle, zlib). The view needs every weight of a
head (a token's row and its column), so a long input keeps whole heads while they fit the page's budget
(``max_bytes``): the heads selected first, then the others in order; the page lists the heads it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnlens._indices import pair_list
from attnlens.viz._packing import MAX_BYTES, UNPACK_JS, pack_heads
from attnlens.viz._source import resolve
from attnlens.viz.html import HTMLView, render
from attnlens.viz.labels import visible

__all__ = ["text_html"]


def text_html(
    patterns: Any,
    tokens: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    batch: int | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    direction: str = "from",
    token: int | None = None,
    tokenizer: Any = None,
    title: str = "",
    max_bytes: int = MAX_BYTES,
) -> HTMLView:
    """Tokens as running text; the selected token's attention (of the selected heads) colours the others.

    After drawing, the root element carries ``data-state="drawn"``, ``data-heads`` (the selection, e.g.
    ``"L0H1,L1H3"``), ``data-direction`` and, with a token selected, ``data-selected`` (its position); each token's
    ``<span>`` carries ``data-w``, the weight it is coloured by (the mean over the selected heads).

    Args:
        patterns: An :class:`attnlens.AttentionTrace` (one row of it, padding removed), ``[layer, batch, head,
            q_pos, k_pos]`` patterns with ``batch`` naming the row, or ``[layer, head, q_pos, k_pos]``.
        tokens: The token texts; default: from the trace, or positions.
        layers: The model's layer numbers along the first axis (tensors only; a trace names its own).
        batch: The row of a trace or of 5-D patterns (default 0 for a trace).
        heads: The heads selected first, as ``(layer, head)`` pairs (model numbers), or the ``(layer, head, score)``
            rows of ``HeadScores.top`` / ``ScanResult.top``; default the first head.
        direction: ``"from"`` colours what the token attends to; ``"to"`` colours what attends to the token.
        token: A position selected (pinned) first; default none.
        tokenizer: With a trace, label the tokens by this tokenizer's decoding of each id.
        title: Heading shown above the text (plain text).
        max_bytes: Budget of the stored weights (base64 characters): the selected heads are always stored, the others
            (in layer order) while they fit; the head list offers only the heads stored, and the page says how many.

    Returns:
        An :class:`HTMLView`: a ``str`` of self-contained HTML that a notebook displays and ``.save(path)`` writes.

    Raises:
        ValueError: If the shapes, tokens, batch row, heads, direction or token do not fit.
    """
    source = resolve(patterns, tokens, layers, batch, tokenizer)
    layer_numbers, head_numbers = source.layers, source.heads
    n_head, n_pos = len(head_numbers), source.shape[-1]
    if direction not in ("from", "to"):
        raise ValueError(f"direction must be 'from' or 'to', got {direction!r}")
    if token is not None and not 0 <= token < n_pos:
        raise ValueError(f"token {token} is out of range for {n_pos} positions")
    chosen = [(layer_numbers[0], head_numbers[0])] if heads is None else pair_list(heads)
    if not chosen:
        raise ValueError("heads must name at least one (layer, head) pair")
    initial: list[int] = []
    for layer, head in chosen:
        if layer not in layer_numbers or head not in head_numbers:
            raise ValueError(f"head ({layer}, {head}) is not in the data: layers {layer_numbers}, heads {head_numbers}")
        index = layer_numbers.index(layer) * n_head + head_numbers.index(head)
        if index not in initial:
            initial.append(index)
    # Selected heads first, so that they are stored whatever the budget; then the rest in layer order.
    order = initial + [i for i in range(len(layer_numbers) * n_head) if i not in initial]
    packed = pack_heads(
        lambda i: source.head(*divmod(order[i], n_head)), len(order), max_bytes=max_bytes, at_least=len(initial)
    )
    data = {
        "layers": layer_numbers,
        "heads": head_numbers,
        "n_pos": n_pos,
        "texts": source.texts,
        "labels": [visible(t) for t in source.texts],
        "stored": order[: packed["count"]],
        "initial": {"heads": initial, "direction": direction, "token": token},
        "packed": packed,
    }
    return render(_TEMPLATE, data, title, UNPACK=UNPACK_JS)


_TEMPLATE = """\
<div class="attnlens-text" id="@ID@" data-state="loading">
<style>
#@ID@ { font: 13px/1.4 system-ui, sans-serif; color: #222; }
#@ID@ .al-title { font-weight: 600; margin-bottom: 4px; }
#@ID@ .al-controls { display: flex; gap: 12px; align-items: flex-start; flex-wrap: wrap; margin-bottom: 6px; }
#@ID@ .al-text { font: 15px/1.9 ui-monospace, monospace; white-space: pre-wrap; max-width: 60em; }
#@ID@ .al-tok { cursor: pointer; border-radius: 2px; padding: 1px 0; }
#@ID@ .al-tok.al-sel { outline: 2px solid #e4007c; }
#@ID@ .al-note { color: #666; }
#@ID@ .al-status { font: 12px ui-monospace, monospace; white-space: pre; min-height: 1.4em; margin-top: 6px; }
</style>
@HEADING@
<div class="al-controls">
<label>Heads (mean of the selected)<br><select multiple size="5" data-role="heads"></select></label>
<div>
<label><input type="radio" name="@ID@-dir" value="from" data-role="from"> attention from the token</label><br>
<label><input type="radio" name="@ID@-dir" value="to" data-role="to"> attention to the token</label>
</div>
</div>
<div class="al-note" data-role="stored"></div>
<div class="al-text" data-role="text"></div>
<div class="al-status" data-role="status">hover a token (click to pin it)</div>
<script type="application/json" id="@ID@-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var root = document.getElementById("@ID@");
  var data = JSON.parse(document.getElementById("@ID@-data").textContent);
  var select = root.querySelector("[data-role=heads]"), text = root.querySelector("[data-role=text]");
  var fromBox = root.querySelector("[data-role=from]"), toBox = root.querySelector("[data-role=to]");
  var status = root.querySelector("[data-role=status]");
  var n = data.n_pos, nh = data.heads.length;
@UNPACK@
  // Options in layer order; an option's value is the head's place in the stored data.
  data.stored.map(function (flat, at) { return [flat, at]; })
    .sort(function (a, b) { return a[0] - b[0]; })
    .forEach(function (pair) {
      var option = document.createElement("option"), flat = pair[0];
      option.value = String(pair[1]);
      option.dataset.flat = String(flat);
      option.textContent = "L" + data.layers[Math.floor(flat / nh)] + "H" + data.heads[flat % nh];
      option.selected = data.initial.heads.indexOf(flat) >= 0;
      select.appendChild(option);
    });
  var total = data.layers.length * nh;
  if (data.stored.length < total) {
    root.querySelector("[data-role=stored]").textContent = "long input: the page holds " + data.stored.length +
      " of " + total + " heads (every weight of each); pass heads= to choose which";
    root.dataset.stored = String(data.stored.length);
  }
  (data.initial.direction === "to" ? toBox : fromBox).checked = true;
  var spans = data.texts.map(function (t, i) {
    var span = document.createElement("span");
    span.className = "al-tok";
    // Newlines stay line breaks and get a mark; an empty token still takes room.
    span.textContent = t === "" ? "\\u2205" : t.replace(/\\n/g, "\\u23ce\\n");
    span.dataset.i = String(i);
    text.appendChild(span);
    return span;
  });

  unpack(data, function (get) {
    var selected = null, pinned = false;
    function chosen() {
      return Array.prototype.filter.call(select.options, function (o) { return o.selected; })
        .map(function (o) { return [Number(o.value), Number(o.dataset.flat)]; });
    }
    function colour() {
      var heads = chosen(), from = fromBox.checked, i = selected, j, w, max = 0, best = -1, ws = [];
      root.dataset.heads = heads.map(function (x) {
        return "L" + data.layers[Math.floor(x[1] / nh)] + "H" + data.heads[x[1] % nh];
      }).join(",");
      root.dataset.direction = from ? "from" : "to";
      spans.forEach(function (span) { span.classList.remove("al-sel"); });
      if (i === null || heads.length === 0) {
        spans.forEach(function (span) { span.style.backgroundColor = ""; delete span.dataset.w; });
        delete root.dataset.selected;
        status.textContent = heads.length ? "hover a token (click to pin it)" : "select at least one head";
        return;
      }
      for (j = 0; j < n; j++) {
        w = 0;
        heads.forEach(function (x) { w += from ? get(x[0], i, j) : get(x[0], j, i); });
        w /= heads.length;
        ws.push(w);
        if (w > max) { max = w; best = j; }
      }
      spans.forEach(function (span, k) {
        var a = max > 0 && ws[k] > 0 ? ws[k] / max : 0;
        span.style.backgroundColor = a > 0 ? "rgba(33, 113, 181, " + (0.08 + 0.92 * a).toFixed(3) + ")" : "";
        span.style.color = a > 0.6 ? "#fff" : "";
        span.dataset.w = isNaN(ws[k]) ? "nan" : ws[k].toFixed(4);
      });
      spans[i].classList.add("al-sel");
      root.dataset.selected = String(i);
      status.textContent = (from ? "from " : "to ") + data.labels[i].slice(0, 40) + " (position " + i + ")" +
        (best >= 0 ? "; strongest " + data.labels[best].slice(0, 40) + " " + max.toFixed(3) : "") +
        "; colours relative to the strongest" + (pinned ? "; pinned" : "");
    }
    spans.forEach(function (span, i) {
      span.addEventListener("mouseenter", function () { if (!pinned) { selected = i; colour(); } });
      span.addEventListener("click", function () {
        pinned = !(pinned && selected === i);
        selected = i;
        colour();
      });
    });
    text.addEventListener("mouseleave", function () { if (!pinned) { selected = null; colour(); } });
    select.addEventListener("change", colour);
    fromBox.addEventListener("change", colour);
    toBox.addEventListener("change", colour);
    if (data.initial.token !== null) { selected = data.initial.token; pinned = true; }
    colour();
    root.dataset.state = "drawn";
  }, function (message) {
    status.textContent = "cannot draw the text view: " + message;
    root.dataset.state = "failed";
  });
})();
</script>
</div>"""
