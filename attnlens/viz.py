"""Pictures of attention: matplotlib heatmaps and self-contained interactive HTML views.

Everything here takes plain tensors (torch or numpy) and token strings, so it draws patterns from any source:
:func:`attnlens.trace`, a model's own ``outputs.attentions``, or hand-made arrays.

* :func:`plot_pattern` draws one head's pattern ``[q_pos, k_pos]``; :func:`plot_head_scores` draws a
  ``[layer, head]`` grid of head scores with the values written in the cells. Both return a matplotlib
  ``Figure``.
* :func:`pattern_html` returns an HTML fragment (a ``<div>`` with its own style and script) that lets the reader pick
  a layer and a head and hover a cell to read ``query -> key: weight``. :func:`save_html` writes it as a page.

Caveats:

* matplotlib is an optional dependency (``pip install attnlens[viz]``) and is imported inside the plotting functions
  only: importing this module, or making HTML, never loads it.
* Figures made here are not registered with ``pyplot``: nothing accumulates in pyplot's figure list when drawing
  hundreds of heads, and a notebook shows a returned figure once. To show one in a script's window, pass ``ax=``
  from ``plt.subplots()`` and call ``plt.show()``.
* The HTML works offline and fetches nothing: data, style and script are inline. Token text only ever reaches the
  page as JSON (with ``<``, ``>`` and ``&`` escaped) that the script puts on a canvas or in ``textContent``, so a
  token such as ``</script><script>...`` or ``<img onerror=...>`` shows as text and never runs.
* Weights are stored in the HTML rounded to 4 decimals (as integers in units of 1e-4), and the trailing zeros of
  each row (the masked future of a causal pattern) are dropped: a causal GPT-2-small view of 128 tokens
  (12 layers x 12 heads) is 4.1 MB, against 6.4 MB dense and 12.9 MB as 4-decimal floats.
"""

from __future__ import annotations

import html as _html
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["pattern_html", "plot_head_scores", "plot_pattern", "save_figure", "save_html"]

_FIGURE_SUFFIXES = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# Weights are stored as integers in units of 1 / _SCALE, i.e. rounded to 4 decimals.
_SCALE = 10_000


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by the matplotlib and HTML paths.


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """A float64 numpy copy of a torch tensor (any dtype or device, with or without grad) or an array-like."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        # bfloat16 has no numpy dtype, hence the cast before .numpy().
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a torch tensor or a numeric array, got {type(values).__name__}") from exc
    return array


def _check_tokens(tokens: Sequence[str] | None, k_pos: int, name: str = "tokens") -> list[str]:
    """The token strings of the key positions; positions as strings when tokens is None."""
    if tokens is None:
        return [str(i) for i in range(k_pos)]
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of token strings, got one string {tokens[:40]!r}")
    tokens = list(tokens)
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(token).__name__} {token!r}")
    if len(tokens) != k_pos:
        raise ValueError(f"got {len(tokens)} {name} for a pattern over {k_pos} key positions (k_pos); they must match")
    return tokens


def _query_tokens(tokens: list[str], q_pos: int) -> list[str]:
    # With fewer queries than keys (a KV cache, or only the last positions traced) the queries are the last tokens.
    if q_pos > len(tokens):
        raise ValueError(f"pattern has more query positions ({q_pos}) than key positions ({len(tokens)})")
    return tokens[len(tokens) - q_pos :]


def _mpl_label(token: str, max_chars: int = 20) -> str:
    """A token as a one-line matplotlib tick label: newlines visible, ``$`` not taken for mathtext."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("$", r"\$")


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("attnlens.viz plotting needs matplotlib: pip install 'attnlens[viz]'") from exc
    if ax is not None:
        # The root figure, also when ax sits in a SubFigure.
        root = ax.figure
        while not isinstance(root, Figure):
            root = root.figure
        return root, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


# ----------------------------------------------------------------------------------------------------------------
# matplotlib


def plot_pattern(
    pattern: Any,
    tokens: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> Figure:
    """Heatmap of one head's attention pattern, queries down the y axis and keys along the x axis.

    Args:
        pattern: ``[q_pos, k_pos]`` attention weights (torch tensor or numpy array) of one head and batch item.
        tokens: The ``k_pos`` token strings of the key positions. When ``q_pos < k_pos`` the queries are the last
            ``q_pos`` tokens. None labels the axes with positions.
        ax: Axes to draw into; by default a new figure is made (not registered with pyplot).
        title: Title of the axes.
        cmap: A matplotlib colour map name.
        vmin: Weight at the bottom of the colour scale; None uses the pattern's minimum.
        vmax: Weight at the top of the colour scale. The default 0..1 keeps colours comparable across heads; None
            stretches the scale to the pattern's maximum.

    Returns:
        The matplotlib Figure holding the heatmap and its colour bar.

    Raises:
        ValueError: If ``pattern`` is not 2-D or the number of tokens does not match ``k_pos``.
        ImportError: If matplotlib is not installed.
    """
    weights = _to_numpy(pattern, "pattern")
    if weights.ndim != 2:
        raise ValueError(
            f"plot_pattern draws one head: pattern must be [q_pos, k_pos], got shape {tuple(weights.shape)}; "
            "select a batch item, layer and head first, e.g. patterns[0, layer, head]"
        )
    q_pos, k_pos = weights.shape
    key_tokens = _check_tokens(tokens, k_pos)
    query_tokens = _query_tokens(key_tokens, q_pos)

    side = max(4.0, 0.28 * max(q_pos, k_pos) + 2.0)
    fig, ax = _new_axes(ax, (side + 1.0, side))
    image = ax.imshow(weights, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention weight", shrink=0.8)

    # Every label up to 128 tokens; beyond that matplotlib's own sparse ticks (positions) stay readable.
    if tokens is not None and max(q_pos, k_pos) <= 128:
        fontsize = float(np.clip(360 / max(q_pos, k_pos), 4, 10))
        ax.set_xticks(range(k_pos), [_mpl_label(t) for t in key_tokens], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(q_pos), [_mpl_label(t) for t in query_tokens], fontsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is not None:
        ax.set_title(title)
    return fig


def plot_head_scores(
    scores: Any,
    *,
    title: str | None = None,
    ax: Axes | None = None,
    layers: Sequence[int] | None = None,
    cmap: str = "viridis",
    fmt: str = ".2f",
    annotate: bool | None = None,
) -> Figure:
    """Grid heatmap of one score per head, layers down the y axis and heads along the x axis, values in the cells.

    Args:
        scores: ``[layer, head]`` scores (torch tensor or numpy array), e.g. a previous-token or induction score.
            NaN cells (a score that is undefined for that head) are left blank.
        title: Title of the axes.
        ax: Axes to draw into; by default a new figure is made (not registered with pyplot).
        layers: The model's layer numbers of the rows, when the scores cover only some layers; default 0, 1, ...
        cmap: A matplotlib colour map name.
        fmt: Format spec of the values written in the cells.
        annotate: Write the values in the cells; None (default) writes them when there are at most 1024 cells.

    Returns:
        The matplotlib Figure holding the grid and its colour bar.

    Raises:
        ValueError: If ``scores`` is not 2-D or ``layers`` does not have one entry per row.
        ImportError: If matplotlib is not installed.
    """
    grid = _to_numpy(scores, "scores")
    if grid.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(grid.shape)}")
    n_layer, n_head = grid.shape
    layer_numbers = _check_layers(layers, n_layer)
    if annotate is None:
        annotate = grid.size <= 1024

    fig, ax = _new_axes(ax, (max(4.0, 0.6 * n_head + 2.0), max(3.0, 0.45 * n_layer + 1.5)))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="score")
    ax.set_xticks(range(n_head), [str(h) for h in range(n_head)])
    ax.set_yticks(range(n_layer), [str(layer) for layer in layer_numbers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if title is not None:
        ax.set_title(title)

    if annotate:
        colormap = image.get_cmap()
        fontsize = float(np.clip(110 / max(n_head, n_layer), 5, 9))
        for (row, col), value in np.ndenumerate(grid):
            if not np.isfinite(value):
                continue
            # Dark text on light cells and light text on dark ones, judged by the cell colour's luminance.
            red, green, blue, _ = colormap(image.norm(value))
            luminance = 0.299 * red + 0.587 * green + 0.114 * blue
            colour = "black" if luminance > 0.5 else "white"
            ax.text(col, row, format(value, fmt), ha="center", va="center", color=colour, fontsize=fontsize)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write a figure as PNG, SVG or PDF, chosen by the file's suffix.

    Args:
        fig: A matplotlib Figure, e.g. from :func:`plot_pattern`.
        path: Destination ending in ``.png``, ``.svg`` or ``.pdf``; its folder must exist.
        dpi: Resolution of PNG output.

    Returns:
        The path written.

    Raises:
        ValueError: If the suffix is not one of the three.
    """
    path = Path(path)
    fmt = _FIGURE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the figure format of {str(path)!r}: use one of {sorted(_FIGURE_SUFFIXES)}")
    fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------------------------
# HTML


def _check_layers(layers: Sequence[int] | None, n_layer: int) -> list[int]:
    if layers is None:
        return list(range(n_layer))
    numbers = [int(layer) for layer in layers]
    if len(numbers) != n_layer:
        raise ValueError(f"layers names {len(numbers)} layers but the data has {n_layer} along its layer axis")
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"layers must not repeat a layer number, got {numbers}")
    return numbers


def _json_for_script(value: Any) -> str:
    """JSON that is inert inside a ``<script>`` element: no ``<``, ``>`` or ``&`` left to end or open a tag."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


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
    tokens: Sequence[str] | None,
    *,
    layers: Sequence[int] | None = None,
    title: str = "",
    layer: int | None = None,
    head: int = 0,
) -> str:
    """A self-contained interactive view of attention patterns, as an HTML fragment.

    The reader picks a layer and a head; the pattern is drawn as a heatmap on a canvas (queries down, keys across,
    colour 0 to 1 or stretched to the head's maximum) and hovering a cell shows ``"query" -> "key": weight``.
    The page state also follows the URL fragment, for deep links and tests: ``#layer=5&head=1`` selects a view and
    ``&q=7&k=3`` pins a cell (layer is the model's layer number). After drawing, the view's root element carries
    ``data-state="drawn"``, ``data-layer``, ``data-head`` and ``data-cells``.

    Show it in a notebook with ``IPython.display.HTML(pattern_html(...))``, or write a page with :func:`save_html`.
    Two views in one notebook do not clash: every call uses fresh element ids.

    Args:
        patterns: ``[layer, head, q_pos, k_pos]`` attention weights of one batch item (torch or numpy).
        tokens: The ``k_pos`` token strings of the key positions (queries are the last ``q_pos`` of them); None
            labels positions with numbers.
        layers: The model's layer numbers along the first axis, when only some layers were traced; default 0, 1, ...
        title: Heading shown above the controls (plain text).
        layer: Layer number shown first (one of ``layers``); default the first.
        head: Head shown first.

    Returns:
        An HTML fragment (pure ASCII) with inline style, data and script; it loads nothing from the network.

    Raises:
        ValueError: If ``patterns`` is not 4-D, the tokens do not match ``k_pos``, or ``layer``/``head`` is not in
            the data.
    """
    weights = _to_numpy(patterns, "patterns")
    if weights.ndim != 4:
        hint = " (select one batch item, e.g. patterns[0])" if weights.ndim == 5 else ""
        raise ValueError(f"patterns must be [layer, head, q_pos, k_pos], got shape {tuple(weights.shape)}{hint}")
    n_layer, n_head, q_pos, k_pos = weights.shape
    if 0 in weights.shape:
        raise ValueError(f"patterns must not be empty, got shape {tuple(weights.shape)}")
    key_tokens = _check_tokens(tokens, k_pos)
    query_tokens = _query_tokens(key_tokens, q_pos)
    layer_numbers = _check_layers(layers, n_layer)
    if layer is None:
        layer = layer_numbers[0]
    if layer not in layer_numbers:
        raise ValueError(f"layer {layer} is not among the layers of the data {layer_numbers}")
    if not 0 <= head < n_head:
        raise ValueError(f"head {head} is out of range for {n_head} heads")

    data = {
        "layers": layer_numbers,
        "n_head": n_head,
        "q_pos": q_pos,
        "k_pos": k_pos,
        "q_tokens": query_tokens,
        "k_tokens": key_tokens,
        "scale": _SCALE,
        "initial": {"layer": layer_numbers.index(layer), "head": head},
        "patterns": _encode_rows(weights),
    }
    view_id = f"attnlens-{uuid.uuid4().hex[:12]}"
    heading = f'<div class="al-title">{_html.escape(title)}</div>' if title else ""
    return (
        _TEMPLATE.replace("@ID@", view_id)
        .replace("@HEADING@", heading.encode("ascii", "xmlcharrefreplace").decode("ascii"))
        .replace("@DATA@", _json_for_script(data))
    )


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
#@ID@ .al-scale { color: #666; }
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
  function weight(li, h, q, k) {
    var row = data.patterns[li][h][q];
    if (k >= row.length) { return 0; }
    return row[k] === null ? NaN : row[k] / data.scale;
  }
  function show(token, limit) {
    // JSON quoting makes spaces and newlines inside tokens visible.
    var text = JSON.stringify(token);
    limit = limit || 24;
    return text.length > limit ? text.slice(0, limit - 2) + "\\u2026\\"" : text;
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
    data.q_tokens.forEach(function (t) { left = Math.max(left, ctx.measureText(show(t)).width); });
    data.k_tokens.forEach(function (t) { top = Math.max(top, ctx.measureText(show(t)).width); });
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
      data.q_tokens.forEach(function (t, i) { ctx.fillText(show(t), left - 4, top + (i + 0.5) * cell); });
      data.k_tokens.forEach(function (t, i) {
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
    return show(data.q_tokens[q], 80) + " -> " + show(data.k_tokens[k], 80) + ": " + (isNaN(w) ? "nan" : w.toFixed(4)) +
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
  fromHash();
})();
</script>
</div>"""
