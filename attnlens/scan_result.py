"""ScanResult: per-head statistics of :func:`attnlens.scan`, and their JSON file format (no pickle).

Every float is written with Python's shortest round-trip representation, so a saved result loads back bit for bit;
an undefined value (NaN: a mean over no rows, a standard error over fewer than two) is written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlens._display import HeadTables, top_heads

__all__ = ["SCORE_NAMES", "ScanResult"]

SCORE_NAMES = (
    "previous_token",
    "duplicate_token",
    "induction",
    "first_token",
    "entropy",
    "distance",
    "self",
)
"""The statistics :func:`attnlens.scan` computes (see its docstring for the definitions)."""

_FORMAT = 1
_KIND = "attnlens.ScanResult"


def _nested(x: Tensor) -> list[list[float | int | None]]:
    if x.dtype == torch.int64:
        return [[int(v) for v in row] for row in x.tolist()]
    return [[None if math.isnan(v) else float(v) for v in row] for row in x.tolist()]


def _tensor(rows: Any, dtype: torch.dtype, what: str, shape: tuple[int, int]) -> Tensor:
    try:
        values = [[math.nan if v is None else v for v in row] for row in rows]
        x = torch.tensor(values, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scan result: {what} is not a [layer, head] table of numbers ({error})") from None
    if tuple(x.shape) != shape:
        raise ValueError(f"scan result: {what} has shape {tuple(x.shape)}, expected [layer, head] = {list(shape)}")
    return x


@dataclass(frozen=True, eq=False, repr=False)
class ScanResult(HeadTables):
    """Per-head statistics of attention over a corpus, from :func:`attnlens.scan`.

    Attributes:
        scores: the statistics computed, in :data:`SCORE_NAMES` order.
        layers: the layer of each row of every table, as scanned.
        heads: the head of each column.
        mean: score name -> ``[layer, head]`` float64 mean over the qualifying query rows (NaN if none qualified).
        stderr: score name -> ``[layer, head]`` float64 standard error of that mean (sample standard deviation of the
            rows over ``sqrt(count)``; rows of one window are not independent, so read it as a lower bound).
        count: score name -> ``[layer, head]`` int64 number of query rows that qualified.
        n_tokens: tokens scanned (``n_windows * seq_len``).
        n_windows: windows scanned.
        provenance: the model's provenance (as :attr:`AttentionTrace.provenance`), the scan's arguments, and the
            data's: ``data_sha256`` (of the scanned token ids), ``documents``, ``empty_documents``,
            ``dropped_tokens``.
    """

    scores: tuple[str, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    mean: dict[str, Tensor]
    stderr: dict[str, Tensor]
    count: dict[str, Tensor]
    n_tokens: int
    n_windows: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def _tables(self) -> dict[str, Tensor | None]:  # the notebook view: means
        return {name: self.mean[name] for name in self.scores}

    def _columns(self) -> dict[str, Tensor | None]:  # to_pandas: mean, stderr and count of each score
        out: dict[str, Tensor | None] = {}
        for name in self.scores:
            out.update({name: self.mean[name], f"{name}_stderr": self.stderr[name], f"{name}_count": self.count[name]})
        return out

    def top(self, name: str, k: int = 5, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest (or lowest) mean: ``[(layer, head, mean)]``, best first, NaN last."""
        if name not in self.mean:
            raise ValueError(f"unknown score {name!r}; this scan has {', '.join(self.scores)}")
        return top_heads(self.mean[name], k, largest=largest, layers=self.layers, heads=self.heads)

    def plot(self, name: str, *, title: str | None = None, **kwargs: Any) -> Any:
        """A ``[layer, head]`` heatmap of one mean (:func:`attnlens.viz.plot_head_scores`; needs matplotlib).

        Args:
            name: the score.
            title: the title (default: the score and the number of tokens).
            **kwargs: passed on (``ax``, ``cmap``, ``fmt``, ``annotate``).

        Returns:
            The matplotlib Figure.
        """
        from attnlens import viz

        if name not in self.mean:
            raise ValueError(f"unknown score {name!r}; this scan has {', '.join(self.scores)}")
        if self.heads != tuple(range(len(self.heads))):
            raise ValueError(f"plot draws heads 0, 1, ... in order; this scan kept heads {list(self.heads)}")
        title = f"{name}, mean over {self.n_tokens:,} tokens" if title is None else title
        return viz.plot_head_scores(self.mean[name], title=title, layers=self.layers, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists, numbers, ``None`` for NaN), as written by :meth:`save`."""
        return {
            "format": _FORMAT,
            "kind": _KIND,
            "scores": list(self.scores),
            "layers": list(self.layers),
            "heads": list(self.heads),
            "n_tokens": self.n_tokens,
            "n_windows": self.n_windows,
            "mean": {name: _nested(self.mean[name]) for name in self.scores},
            "stderr": {name: _nested(self.stderr[name]) for name in self.scores},
            "count": {name: _nested(self.count[name]) for name in self.scores},
            "provenance": self.provenance,
        }

    def to_json(self, **kwargs: Any) -> str:
        """The result as JSON text (what :meth:`save` writes); ``kwargs`` go to :func:`json.dumps`."""
        return json.dumps(self.to_dict(), **{"indent": 1, **kwargs}, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result to a JSON file, atomically (a temporary file, then renamed over ``path``)."""
        path = os.fspath(path)
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(self.to_json())
        os.replace(temporary, path)

    @classmethod
    def from_dict(cls, data: Any) -> ScanResult:
        """Rebuild a result from :meth:`to_dict`'s data, checking its shape first."""
        if not isinstance(data, dict) or data.get("kind") != _KIND:
            raise ValueError(f"not an attnlens scan result (expected kind {_KIND!r})")
        if data.get("format") != _FORMAT:
            raise ValueError(f"scan result format {data.get('format')!r}; this attnlens reads format {_FORMAT}")
        try:
            scores = tuple(str(s) for s in data["scores"])
            layers = tuple(int(x) for x in data["layers"])
            heads = tuple(int(x) for x in data["heads"])
            shape = (len(layers), len(heads))
            tables = {
                key: {name: _tensor(data[key][name], dtype, f"{key}[{name!r}]", shape) for name in scores}
                for key, dtype in (("mean", torch.float64), ("stderr", torch.float64), ("count", torch.int64))
            }
            return cls(
                scores=scores,
                layers=layers,
                heads=heads,
                mean=tables["mean"],
                stderr=tables["stderr"],
                count=tables["count"],
                n_tokens=int(data["n_tokens"]),
                n_windows=int(data["n_windows"]),
                provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"scan result is missing or mangles an entry ({error!r})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScanResult:
        """Read a result written by :meth:`save`."""
        with open(path, encoding="utf-8") as file:
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)}: not JSON ({error})") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        def numbers(given: tuple[int, ...]) -> str:  # 0..47 rather than 48 numbers
            run = len(given) > 2 and given == tuple(range(given[0], given[0] + len(given)))
            return f"{given[0]}..{given[-1]}" if run else str(list(given))

        return (
            f"ScanResult(scores={list(self.scores)}, layers={numbers(self.layers)}, heads={numbers(self.heads)}, "
            f"n_tokens={self.n_tokens}, n_windows={self.n_windows})"
        )
