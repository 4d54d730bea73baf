"""How results show in notebooks and leave as data: bounded HTML (tables, small heatmaps), dicts, JSON, pandas.

Every ``_repr_html_`` here is bounded in size whatever the model: tables stop at :data:`MAX_ROWS` rows and heatmaps
at :data:`MAX_CELLS` cells in all (beyond that the top heads are listed instead), so that a result typed at the end of
a cell never writes megabytes into a notebook. Nothing here imports pandas until ``to_pandas`` is called.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MAX_CELLS",
    "MAX_ROWS",
    "DecompositionTables",
    "HeadTables",
    "heatmap",
    "json_text",
    "pandas",
    "table",
    "top_heads",
]

MAX_ROWS = 40
"""Rows shown in one HTML table; the rest are counted in a last line."""

MAX_CELLS = 750
"""Heatmap cells drawn in one result's HTML, over all its heatmaps (GPT-2 small: 144 per score; about 50 bytes each)."""

# Five stops of matplotlib's viridis, interpolated linearly: close enough for a thumbnail, no dependency.
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_STYLE = "border-collapse:collapse;font-size:11px;font-family:monospace"
_TABLE_CELLS = "<style>.attnlens-table td,.attnlens-table th{padding:1px 6px;text-align:right}</style>"
_CELL_SIZE = "<style>.attnlens-heatmap td{width:10px;height:10px;padding:0}</style>"  # once, not per cell


def pandas() -> Any:
    """The pandas module, or an ImportError that says how to install it (pandas is optional)."""
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError("to_pandas needs pandas, which is not installed: pip install pandas") from error
    return pd


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_text(data: dict[str, Any], **kwargs: Any) -> str:
    """JSON of plain data, NaN written as ``null`` and infinities as ``"inf"`` / ``"-inf"`` (strict JSON)."""
    return json.dumps(_finite(data), allow_nan=False, **kwargs)


def nested(x: Tensor | None) -> Any:
    """A tensor as nested lists of Python numbers (float64 where floating), or None."""
    if x is None:
        return None
    return x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).tolist()


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "") -> str:
    """An HTML table of at most :data:`MAX_ROWS` rows (escaped), with a line counting the rows left out."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows[:MAX_ROWS]
    )
    more = f"<div>... {len(rows) - MAX_ROWS} more rows</div>" if len(rows) > MAX_ROWS else ""
    top = f"<div>{html.escape(caption)}</div>" if caption else ""  # above the table, not squeezed to its width
    return f"{_TABLE_CELLS}{top}<table class='attnlens-table' style='{_STYLE}'><tr>{head}</tr>{body}</table>{more}"


def _colour(t: float) -> str:
    if math.isnan(t):
        return "#dddddd"
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    rgb = (round(a + (b - a) * f) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1], strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def heatmap(values: Tensor, layers: Sequence[int], heads: Sequence[int], title: str) -> str:
    """A ``[layer, head]`` table of coloured cells (value on hover), scaled from its smallest to its largest value."""
    x = values.detach().to("cpu", torch.float64)
    finite = x[torch.isfinite(x)]
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = high - low if high > low else 1.0
    cells = []
    for i, layer in enumerate(layers):
        row = "".join(
            f'<td style="background:{_colour((v - low) / span)}" title="{v:.3g}"></td>' for v in x[i].tolist()
        )
        cells.append(f"<tr><th>{layer}</th>{row}</tr>")
    head = "".join(f"<th>{h}</th>" for h in heads)
    return (
        f"<table class='attnlens-heatmap' style='{_STYLE};display:inline-block;margin-right:12px;vertical-align:top'>"
        f"<caption>{html.escape(title)} ({low:.2g}..{high:.2g})</caption><tr><th></th>{head}</tr>{''.join(cells)}"
        "</table>"
    )


def _top(values: Tensor, layers: Sequence[int], heads: Sequence[int], k: int = 3) -> str:
    flat = values.detach().to("cpu", torch.float64).flatten().nan_to_num(nan=-math.inf)
    order = flat.argsort(descending=True)[:k].tolist()
    return ", ".join(f"L{layers[j // len(heads)]}H{heads[j % len(heads)]} {flat[j]:.3g}" for j in order)


class HeadTables:
    """Notebook display and data export of a result made of ``[layer, head]`` tables (HeadScores, ScanResult).

    A subclass has ``layers`` and ``heads`` and gives its tables by :meth:`_tables` (name -> ``[layer, head]`` or
    None where undefined), and what pandas gets by :meth:`_columns` (default: the same tables).
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]

    def _tables(self) -> dict[str, Tensor | None]:
        raise NotImplementedError

    def _columns(self) -> dict[str, Tensor | None]:
        return self._tables()

    def _summary(self) -> str:
        return repr(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data: ``layers``, ``heads`` and each table as nested lists (``None`` where undefined)."""
        out: dict[str, Any] = {"layers": list(self.layers), "heads": list(self.heads)}
        out.update({name: nested(x) for name, x in self._tables().items()})
        return out

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (NaN as ``null``)."""
        return json_text(self.to_dict(), **kwargs)

    def to_pandas(self) -> pd.DataFrame:
        """One row per (layer, head), one column per table (needs pandas, which attnlens does not install)."""
        pd = pandas()
        rows: dict[str, list[Any]] = {
            "layer": [layer for layer in self.layers for _ in self.heads],
            "head": [head for _ in self.layers for head in self.heads],
        }
        for name, x in self._columns().items():
            if x is not None:
                rows[name] = x.detach().cpu().flatten().tolist()
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        tables = {name: x for name, x in self._tables().items() if x is not None}
        per_map = len(self.layers) * len(self.heads)
        drawn = min(len(tables), MAX_CELLS // max(per_map, 1))
        maps = [heatmap(x, self.layers, self.heads, name) for name, x in list(tables.items())[:drawn]]
        rest = [[name, _top(x, self.layers, self.heads)] for name, x in list(tables.items())[drawn:]]
        undefined = [name for name, x in self._tables().items() if x is None]
        parts = [f"<div><b>{html.escape(self._summary())}</b></div>", _CELL_SIZE, "<div>" + "".join(maps) + "</div>"]
        if rest:
            parts.append(table(["score", "top heads"], rest, caption="too many heads to draw; the top heads"))
        if undefined:
            parts.append(f"<div>undefined for these tokens: {html.escape(', '.join(undefined))}</div>")
        return "".join(parts)


class DecompositionTables:
    """Notebook display and data export of a :class:`~attnlens.attribution.Decomposition`.

    Components are ranked by the norm of what they wrote, ``||c||_2`` over ``d_model``, averaged over the real
    entries (batch, position); the HTML lists the largest :data:`MAX_ROWS`.
    """

    names: tuple[str, ...]
    contributions: Tensor
    residual: Tensor
    positions: Tensor
    valid: Tensor

    def errors(self) -> tuple[float, float]:
        raise NotImplementedError

    def norms(self) -> Tensor:
        """``[component, batch, pos]`` float64: the L2 norm over ``d_model`` of each component at each entry."""
        return self.contributions.detach().to(torch.float64).norm(dim=-1)

    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """Plain data: names, positions, valid, norms ``[component, batch, pos]``, the residual's norms, the error.

        Args:
            vectors: also the contributions ``[component, batch, pos, d_model]`` and the residual (large: GPT-2
                small at one position is about 130,000 numbers).
        """
        error, tolerance = self.errors()
        out: dict[str, Any] = {
            "names": list(self.names),
            "positions": nested(self.positions),
            "valid": nested(self.valid),
            "norms": nested(self.norms()),
            "residual_norms": nested(self.residual.detach().to(torch.float64).norm(dim=-1)),
            "error": error,
            "tolerance": tolerance,
        }
        if vectors:
            out["contributions"] = nested(self.contributions)
            out["residual"] = nested(self.residual)
        return out

    def to_json(self, *, vectors: bool = False, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (NaN as ``null``)."""
        return json_text(self.to_dict(vectors=vectors), **kwargs)

    def to_pandas(self) -> pd.DataFrame:
        """One row per component and entry: component, batch, position, valid, norm (needs pandas)."""
        pd = pandas()
        norms = self.norms()
        n_comp, batch, n_pos = norms.shape
        index = [(c, b, p) for c in range(n_comp) for b in range(batch) for p in range(n_pos)]
        return pd.DataFrame(
            {
                "component": [self.names[c] for c, _, _ in index],
                "batch": [b for _, b, _ in index],
                "position": [int(self.positions[b, p]) for _, b, p in index],
                "valid": [bool(self.valid[b, p]) for _, b, p in index],
                "norm": norms.flatten().tolist(),
            }
        )

    def _repr_html_(self) -> str:
        norms = self.norms()
        valid = self.valid.to(norms.device)
        mean = (norms * valid).sum((1, 2)) / valid.sum().clamp(min=1)
        order = mean.argsort(descending=True).tolist()
        share = mean / mean.sum() if float(mean.sum()) > 0 else mean
        rows = [[self.names[c], f"{float(mean[c]):.4g}", f"{float(share[c]):.1%}"] for c in order]
        error, tolerance = self.errors()
        batch, n_pos, d_model = self.residual.shape
        caption = (
            f"{len(self.names)} components, batch {batch} x {n_pos} positions, d_model {d_model}; sum vs residual: "
            f"relative error {error:.3g} (tolerance {tolerance:.3g}); components by mean norm"
        )
        return table(["component", "mean norm", "share"], rows, caption=caption)


def top_heads(
    scores: Tensor,
    k: int = 5,
    *,
    largest: bool = True,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[tuple[int, int, float]]:
    """The ``k`` heads with the highest (or lowest) score in a ``[layer, head]`` tensor: ``[(layer, head, score)]``.

    Args:
        scores: ``[layer, head]``, e.g. from :func:`induction_scores`.
        k: how many heads.
        largest: best = highest score (``False``: lowest, e.g. for :func:`entropy`).
        layers: the layer number of each row (default ``0, 1, ...``).
        heads: the head number of each column (default ``0, 1, ...``).

    Returns:
        ``[(layer, head, score)]``, best first. Heads whose score is NaN rank last (after every number, for
        ``largest=True`` and ``False`` alike): they are listed only when fewer than ``k`` heads have a number.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a [layer, head] tensor, got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(scores.shape)}")
    n_layers, n_heads = scores.shape
    layers = range(n_layers) if layers is None else layers
    heads = range(n_heads) if heads is None else heads
    values = scores.flatten().tolist()
    # NaN (a score undefined for a head) ranks last either way, as the worst; ties keep [layer, head] order.
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if largest else values[i]))[
        : max(0, k)
    ]
    return [(layers[i // n_heads], heads[i % n_heads], values[i]) for i in order]
