"""matplotlib figures: one head's pattern, a ``[layer, head]`` grid of head scores, every head of a trace at once.

Long inputs keep a fixed pixel budget: beyond ``max_cells`` positions a pattern is drawn as the maximum (or mean) over
blocks of positions, in a figure of fixed size with thinned tick labels, and the title says so. A 1024-token head or
every head of GPT-2 small over 1024 tokens draws in well under a few hundred MB; the figures never copy a whole stack
of patterns (each head is read, reduced and drawn in turn).

matplotlib is an optional dependency (``pip install 'attnlens[viz]'``) imported inside these functions only. Figures
are not registered with ``pyplot``: nothing accumulates in pyplot's figure list when drawing hundreds of heads, and a
notebook shows a returned figure once. To show one in a script's window, pass ``ax=`` from ``plt.subplots()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnlens.viz._checks import _check_layers, _check_tokens, _query_tokens, _to_numpy
from attnlens.viz._source import _is_array, block_reduce, block_size, native
from attnlens.viz.labels import visible

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_head_scores", "plot_heads", "plot_logit_lens", "plot_overview", "plot_pattern", "save_figure"]

_FIGURE_SUFFIXES = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# Up to this many positions every token gets a tick label and the figure grows with the input, up to a side of
# _LABELLED_SIDE inches (50 positions): matplotlib needs about 40 bytes per pixel to draw an image, so a 128-token
# figure at its old 38 inches took 1.3 GB at 150 dpi, at 16 inches it takes about 250 MB.
_LABELLED = 128
_LABELLED_SIDE = 16.0
# A longer input: a figure of fixed size (inches) with about this many tick labels per axis.
_LONG_SIDE = 10.0
_LONG_TICKS = 32
# Largest figure side in inches of plot_head_scores (a [layer, head] grid of a very large model).
_MAX_SCORES_SIDE = 30.0


def _mpl_label(token: str, max_chars: int = 20) -> str:
    """A token as a one-line matplotlib tick label: spaces and newlines visible, ``$`` not taken for mathtext."""
    # Control characters (and ␍) have no glyph in matplotlib's default font: shown as escapes such as \x05.
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in visible(token)).replace("␍", "\\r")
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("$", r"\$")


def _new_axes(ax: Axes | None, figsize: tuple[float, float], *, subplots: bool = True) -> tuple[Figure, Any]:
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
    return fig, fig.add_subplot() if subplots else None


def plot_pattern(
    pattern: Any,
    tokens: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    max_cells: int = 512,
    reduce: str = "max",
) -> Figure:
    """Heatmap of one head's attention pattern, queries down the y axis and keys along the x axis.

    Up to 128 positions every token labels its row and column, and the figure grows with the input up to 17 x 16
    inches (at 50 positions; more positions share that size). Longer inputs get a figure of fixed size (11.5 x 10
    inches) with about 32 tick labels per axis (position and token), and beyond ``max_cells`` positions each cell is
    the maximum (or mean) of a block of positions; the title says which.

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
        max_cells: Most cells per axis drawn for an input longer than 128 positions; more positions are reduced over
            blocks (a 1024-token head: blocks of 2 x 2).
        reduce: How a block becomes one cell: "max" (default: a sharp head, such as previous-token, stays as sharp)
            or "mean".

    Returns:
        The matplotlib Figure holding the heatmap and its colour bar.

    Raises:
        ValueError: If ``pattern`` is not 2-D, the number of tokens does not match ``k_pos``, or ``reduce`` or
            ``max_cells`` is invalid.
        ImportError: If matplotlib is not installed.
    """
    _check_reduction(reduce, max_cells)
    weights = _to_numpy(pattern, "pattern")
    if weights.ndim != 2:
        raise ValueError(
            f"plot_pattern draws one head: pattern must be [q_pos, k_pos], got shape {tuple(weights.shape)}; "
            "select a batch item, layer and head first, e.g. patterns[0, layer, head]"
        )
    q_pos, k_pos = weights.shape
    key_tokens = _check_tokens(tokens, k_pos)
    query_tokens = _query_tokens(key_tokens, q_pos)
    offset = k_pos - q_pos

    if max(q_pos, k_pos) <= _LABELLED:
        side = min(_LABELLED_SIDE, max(4.0, 0.28 * max(q_pos, k_pos) + 2.0))
        fig, ax = _new_axes(ax, (side + 1.0, side))
        image = ax.imshow(weights, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
        if tokens is not None:
            fontsize = float(np.clip(360 / max(q_pos, k_pos), 4, 10))
            ax.set_xticks(range(k_pos), [_mpl_label(t) for t in key_tokens], rotation=90, fontsize=fontsize)
            ax.set_yticks(range(q_pos), [_mpl_label(t) for t in query_tokens], fontsize=fontsize)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    else:
        # A fixed figure, and no more cells than it has pixels: blocks of positions reduced to one cell each.
        block_q, block_k = block_size(q_pos, max_cells), block_size(k_pos, max_cells)
        cells = block_reduce(weights, block_q, block_k, reduce)
        fig, ax = _new_axes(ax, (_LONG_SIDE + 1.5, _LONG_SIDE))
        # Extent in token positions: the axes count positions whatever the block size.
        extent = (-0.5, k_pos - 0.5, offset + q_pos - 0.5, offset - 0.5)
        image = ax.imshow(cells, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest", extent=extent)
        if tokens is not None:
            _thin_ticks(ax.set_xticks, key_tokens, 0, rotation=90)
            _thin_ticks(ax.set_yticks, query_tokens, offset)
        blocks = block_q > 1 or block_k > 1
        how = f"{reduce} of {block_q} x {block_k} blocks" if blocks else "every weight"
        ax.set_xlabel(f"key position (blocks of {block_k})" if block_k > 1 else "key position")
        ax.set_ylabel(f"query position (blocks of {block_q})" if block_q > 1 else "query position")
        title = f"{title} ({k_pos} tokens: {how})" if title else f"{k_pos} tokens: {how}"
    ax.figure.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    if title is not None:
        ax.set_title(title)
    return fig


def _check_reduction(reduce: str, max_cells: int) -> None:
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if int(max_cells) < 1:
        raise ValueError(f"max_cells must be at least 1 (cells per axis), got {max_cells}")


def _thin_ticks(setter: Any, tokens: list[str], offset: int, **kwargs: Any) -> None:
    """About ``_LONG_TICKS`` evenly spaced ticks, each labelled with its position and token."""
    step = max(1, -(-len(tokens) // _LONG_TICKS))
    where = list(range(0, len(tokens), step))
    setter(
        [offset + i for i in where], [f"{offset + i} {_mpl_label(tokens[i], 12)}" for i in where], fontsize=7, **kwargs
    )


def plot_head_scores(
    scores: Any,
    name: str | None = None,
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
        scores: ``[layer, head]`` scores (torch tensor or numpy array), e.g. a previous-token or induction score;
            or an :class:`attnlens.metrics.HeadScores` or :class:`attnlens.ScanResult` with ``name`` naming the
            score (its layers label the rows, the name is the default title). NaN cells (a score that is
            undefined for that head) are left blank.
        name: The score to draw from a ``HeadScores`` or ``ScanResult``; must be None for a plain grid.
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
    scores, layers, title = _named_scores(scores, name, layers, title)
    grid = _to_numpy(scores, "scores")
    if grid.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(grid.shape)}")
    n_layer, n_head = grid.shape
    layer_numbers = _check_layers(layers, n_layer)
    if annotate is None:
        annotate = grid.size <= 1024

    width = min(_MAX_SCORES_SIDE, max(4.0, 0.6 * n_head + 2.0))
    fig, ax = _new_axes(ax, (width, min(_MAX_SCORES_SIDE, max(3.0, 0.45 * n_layer + 1.5))))
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


def plot_logit_lens(
    values: Any,
    names: Sequence[str] | None = None,
    tokens: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
) -> Figure:
    """The logit lens as a heatmap: a logit read after each layer (rows) at each position (columns).

    Args:
        values: ``[layer, pos]`` (torch tensor or numpy array), e.g. ``stack.logit_lens(targets)[:, 0]`` for the first
            row of :func:`attnlens.residual.accumulated_resid`'s stack.
        names: one label per row (``stack.names``); default ``0, 1, ...``.
        tokens: one label per column (the positions' tokens); default the column numbers.
        ax: Axes to draw into; by default a new figure is made (not registered with pyplot).
        title: Title of the axes.
        cmap: A matplotlib colour map name.

    Returns:
        The matplotlib Figure holding the heatmap and its colour bar (NaN cells blank).

    Raises:
        ValueError: ``values`` is not 2-D, or the labels do not match its shape.
        ImportError: If matplotlib is not installed.
    """
    grid = _to_numpy(values, "values")
    if grid.ndim != 2:
        raise ValueError(f"values must be [layer, pos], got shape {tuple(grid.shape)}")
    n_rows, n_pos = grid.shape
    rows = [str(i) for i in range(n_rows)] if names is None else [str(name) for name in names]
    columns = [str(i) for i in range(n_pos)] if tokens is None else [_mpl_label(t) for t in tokens]
    if len(rows) != n_rows or len(columns) != n_pos:
        raise ValueError(f"values is [layer, pos] = {[n_rows, n_pos]}; got {len(rows)} names and {len(columns)} tokens")
    fig, ax = _new_axes(ax, (max(4.0, 0.6 * n_pos + 2.5), max(3.0, 0.4 * n_rows + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", origin="lower")
    ax.figure.colorbar(image, ax=ax, label="logit")
    ax.set_xticks(range(n_pos), columns, rotation=90 if tokens is not None else 0)
    ax.set_yticks(range(n_rows), rows)
    ax.set_xlabel("position")
    ax.set_ylabel("residual entering")
    if title is not None:
        ax.set_title(title)
    return fig


def _named_scores(scores: Any, name: str | None, layers: Any, title: str | None) -> tuple[Any, Any, str | None]:
    """The grid, row layers and title of one named score of a ``HeadScores`` or ``ScanResult``."""
    table = scores.mean if hasattr(scores, "mean") and isinstance(scores.mean, dict) else None
    if table is None and hasattr(scores, "names") and hasattr(scores, "heads"):
        table = {n: getattr(scores, n) for n in scores.names}
    if table is None:
        if name is not None:
            raise ValueError("name= picks a score of a HeadScores or ScanResult; pass a plain grid without it")
        return scores, layers, title
    if name is None or name not in table:
        raise ValueError(f"name the score to draw, one of {sorted(table)}; got {name!r}")
    if table[name] is None:
        raise ValueError(f"the {name} score is undefined for these tokens (no repeated token?)")
    if list(scores.heads) != list(range(len(scores.heads))):
        raise ValueError(
            f"plot_head_scores draws heads 0, 1, ... in order; these scores keep heads {list(scores.heads)}"
        )
    return table[name], list(scores.layers) if layers is None else layers, name if title is None else title


def plot_overview(
    patterns: Any,
    *,
    layers: Sequence[int] | None = None,
    cmap: str = "viridis",
    panel: float = 1.1,
    max_cells: int = 128,
    reduce: str = "max",
) -> Figure:
    """Every head's pattern as a small heatmap: layers down, heads across (a picture of :func:`overview_html`).

    Args:
        patterns: ``[layer, head, q_pos, k_pos]`` attention weights of one batch item.
        layers: The model's layer numbers along the first axis; default 0, 1, ...
        cmap: A matplotlib colour map name; the scale is 0 to 1 in every panel.
        panel: Size of one panel in inches.
        max_cells: Most cells per axis of a panel; longer inputs are reduced over blocks of positions (a 1024-token
            input: blocks of 8 x 8), said in the figure's title.
        reduce: How a block becomes one cell: "max" (default) or "mean".

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: If ``patterns`` is not 4-D.
        ImportError: If matplotlib is not installed.
    """
    _check_reduction(reduce, max_cells)
    # A tensor or array is read one head at a time: a long input's stack is never copied whole.
    stack = patterns if _is_array(patterns) else _to_numpy(patterns, "patterns")
    if stack.ndim != 4 or 0 in stack.shape:
        raise ValueError(f"patterns must be [layer, head, q_pos, k_pos], got shape {tuple(stack.shape)}")
    n_layer, n_head, q_pos, k_pos = (int(n) for n in stack.shape)
    layer_numbers = _check_layers(layers, n_layer)
    block_q, block_k = block_size(q_pos, max_cells), block_size(k_pos, max_cells)
    fig, _ = _new_axes(None, (panel * n_head + 1.0, panel * n_layer + 0.5), subplots=False)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for (row, col), ax in np.ndenumerate(axes):
        cells = np.asarray(block_reduce(native(stack[row, col]), block_q, block_k, reduce), dtype=np.float64)
        ax.imshow(cells, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
            ax.set_title(f"head {col}", fontsize=8)
        if col == 0:
            ax.set_ylabel(f"layer {layer_numbers[row]}", fontsize=8)
    if block_q > 1 or block_k > 1:
        fig.suptitle(f"{k_pos} tokens: each cell the {reduce} of a block of {block_q} x {block_k} weights", fontsize=9)
    return fig


def plot_heads(
    tr: Any,
    heads: Any,
    tokens: Sequence[str] | None = None,
    *,
    batch: int = 0,
    cols: int | None = None,
    panel: float = 3.0,
    cmap: str = "viridis",
) -> Figure:
    """Chosen heads of a trace side by side, on one 0..1 colour scale with one colour bar, tokens on the outer axes.

    Args:
        tr: An :class:`attnlens.AttentionTrace` holding the heads' layers and heads.
        heads: ``(layer, head)`` pairs (model numbers), or the ``(layer, head, score)`` rows of ``HeadScores.top`` /
            ``ScanResult.top``; drawn in this order, row by row.
        tokens: The key token strings; default the trace's own tokens of that row, or positions.
        batch: The row of the trace.
        cols: Panels per row; default all in one row up to 4, then 4 per row.
        panel: Size of one panel in inches.
        cmap: A matplotlib colour map name.

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: A head the trace does not hold, an empty selection, or a bad batch row.
        ImportError: If matplotlib is not installed.
    """
    from attnlens._indices import pair_list

    chosen = pair_list(heads)
    if not chosen:
        raise ValueError("heads is empty: name at least one (layer, head) pair")
    for layer, head in chosen:
        if layer not in tr.layers or head not in tr.heads:
            raise ValueError(
                f"head ({layer}, {head}) is not in the trace: layers {list(tr.layers)}, heads {list(tr.heads)}"
            )
    if not 0 <= batch < tr.input_ids.shape[0]:
        raise ValueError(f"batch {batch} is out of range for {tr.input_ids.shape[0]} row(s)")
    if tokens is None and tr.tokens is not None:
        tokens = tr.tokens[batch]
    n = len(chosen)
    cols = min(n, 4) if cols is None else cols
    rows = -(-n // cols)
    fig, _ = _new_axes(None, (panel * cols + 1.0, panel * rows + 0.6), subplots=False)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    images = []
    for ax, (layer, head) in zip(axes.flat, chosen):
        weights = _to_numpy(tr.pattern(layer)[batch, tr.heads.index(head)], "pattern")
        images.append(ax.imshow(weights, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest"))
        ax.set_title(f"L{layer}H{head}", fontsize=9)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    k_pos = tr.input_ids.shape[-1]
    labels = _check_tokens(tokens, k_pos)
    # Labels only where there is room: up to about 8 per inch of panel, else every n-th one, on the outer axes only.
    ticks = list(range(0, k_pos, max(1, int(np.ceil(k_pos / (8 * panel))))))
    for ax in axes[-1]:
        ax.set_xticks(ticks, [_mpl_label(labels[i], 12) for i in ticks], rotation=90, fontsize=7)
    for ax in axes[:, 0]:
        ax.set_yticks(ticks, [_mpl_label(labels[i], 12) for i in ticks], fontsize=7)
    fig.colorbar(images[0], ax=axes, label="attention weight", shrink=0.8)  # one scale, 0..1, for every panel
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
