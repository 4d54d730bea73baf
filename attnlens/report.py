"""VerificationReport: what :func:`attnlens.verify` found, one row per quantity, layer and head.

Printed, it is a table of the worst head per layer and quantity, then every failing row; ``to_dict`` / ``to_json``
give plain data. Relative errors are scale-free: the largest absolute error over the largest absolute reference value
over the same entries.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["VerificationReport", "VerificationRow"]

_PER_HEAD = frozenset({"q", "k", "v", "pattern_hf_order", "pattern", "z"})


@dataclass(frozen=True, eq=False)
class VerificationRow:
    """One comparison: a quantity at one layer (and head), its largest errors and whether they are tolerated.

    Attributes:
        layer: the layer, or ``None`` for the final hidden state and logits.
        head: the head, or ``None`` for whole-layer and final quantities.
        quantity: one of :data:`QUANTITIES`.
        max_abs_error: largest ``|recomputed - model|`` over valid entries.
        max_rel_error: ``max_abs_error`` divided by the largest ``|model|`` over the same entries (scale-free).
        tolerance: the largest ``max_rel_error`` accepted.
        ok: ``max_rel_error <= tolerance`` (NaN is never ok).
    """

    layer: int | None
    head: int | None
    quantity: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    ok: bool


@dataclass(frozen=True, eq=False)
class VerificationReport:
    """The outcome of :func:`verify`: one row per quantity, layer and head, and what was run.

    Attributes:
        rows: every comparison, in layer, quantity, head order; final quantities last.
        model: the model's class and ``name_or_path``.
        dtype: the model's dtype (it selects the default tolerances).
        device: where the model ran.
        attn_implementation: the model's own attention kernel (its q, k, v, z and outputs come from it).
        pattern_implementation: the kernel whose attention probabilities were the reference (always ``"eager"``).
        layers: the layers compared.
        batch: number of sequences.
        pos: positions per sequence.
        n_valid: number of non-padding tokens compared.
        tolerances: the tolerance of each quantity, after any override.
        versions: torch, transformers and attnlens versions.
        notes: known reasons why the model's own kernel departs from what its config says, and config keys of unknown
            effect (printed with the table).
    """

    rows: tuple[VerificationRow, ...]
    model: str
    dtype: str
    device: str
    attn_implementation: str
    pattern_implementation: str
    layers: tuple[int, ...]
    batch: int
    pos: int
    n_valid: int
    tolerances: Mapping[str, float]
    versions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every row is within its tolerance."""
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> tuple[VerificationRow, ...]:
        """The rows outside their tolerance."""
        return tuple(row for row in self.rows if not row.ok)

    def row(self, quantity: str, layer: int | None = None, head: int | None = None) -> VerificationRow:
        """The row of one quantity at one layer and head (``KeyError`` if it was not compared)."""
        for row in self.rows:
            if (row.quantity, row.layer, row.head) == (quantity, layer, head):
                return row
        raise KeyError(f"no row for quantity={quantity!r}, layer={layer}, head={head}")

    def worst(self, quantity: str, layer: int | None = None) -> VerificationRow:
        """The row with the largest relative error of a quantity (at one layer, or over all layers)."""
        rows = [r for r in self.rows if r.quantity == quantity and (layer is None or r.layer == layer)]
        if not rows:
            raise KeyError(f"no rows for quantity={quantity!r}" + ("" if layer is None else f" at layer {layer}"))
        return max(rows, key=_badness)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists, dicts, floats, strings), e.g. to store alongside results."""
        out = asdict(self)
        out["ok"] = self.ok
        out["tolerances"] = dict(self.tolerances)
        out["versions"] = dict(self.versions)
        out["layers"] = list(self.layers)
        out["rows"] = [asdict(row) for row in self.rows]
        out["notes"] = list(self.notes)
        return out

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`; non-finite errors are written as the strings ``"nan"`` and ``"inf"``."""

        def finite(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {key: finite(item) for key, item in value.items()}
            if isinstance(value, list):
                return [finite(item) for item in value]
            return value

        return json.dumps(finite(self.to_dict()), allow_nan=False, **kwargs)

    def __repr__(self) -> str:
        worst = max(self.rows, key=_badness, default=None)
        worst_text = "" if worst is None else f", worst {worst.quantity} {worst.max_rel_error:.3g} rel"
        return (
            f"<VerificationReport {'OK' if self.ok else 'FAILED'}: {len(self.rows)} checks, {len(self.failures)} "
            f"failing{worst_text}; {self.model}, {self.dtype} on {self.device}, {self.attn_implementation!r}, "
            f"batch {self.batch} x {self.pos}; print() it for the table>"
        )

    def _table_rows(self) -> list[VerificationRow]:
        """The worst head per layer and quantity, in the table's order."""
        groups: dict[tuple[int | None, str], list[VerificationRow]] = {}
        for row in self.rows:
            groups.setdefault((row.layer, row.quantity), []).append(row)
        return [max(rows, key=_badness) for rows in groups.values()]

    def _repr_html_(self) -> str:
        from attnlens._display import table

        header = ["layer", "quantity", "worst head", "max abs err", "max rel err", "rel tol", "ok"]

        def cells(row: VerificationRow, per_head: bool) -> list[str]:
            return _format_row(row, per_head=per_head).split()

        status = "OK" if self.ok else f"FAILED ({len(self.failures)} of {len(self.rows)} checks)"
        caption = (
            f"attnlens verification: {status}. {self.model}, {self.dtype} on {self.device}, attention "
            f"{self.attn_implementation!r}; batch {self.batch} x {self.pos} positions"
        )
        rows = [cells(row, row.quantity in _PER_HEAD) for row in self._table_rows()]
        out = table(header, rows, caption=caption)
        if self.notes:
            out += "".join(f"<div>note: {html.escape(note)}</div>" for note in self.notes)
        if self.failures:
            out += table(header, [cells(row, True) for row in self.failures], caption="failing rows")
        return out

    def to_pandas(self) -> pd.DataFrame:
        """Every row as a pandas DataFrame (needs pandas, which attnlens does not install)."""
        from attnlens._display import pandas

        return pandas().DataFrame([asdict(row) for row in self.rows])

    def __str__(self) -> str:
        status = "OK" if self.ok else f"FAILED ({len(self.failures)} of {len(self.rows)} checks)"
        lines = [
            f"attnlens verification: {status}",
            f"{self.model}, {self.dtype} on {self.device}, attention {self.attn_implementation!r} "
            f"(patterns from {self.pattern_implementation!r}); batch {self.batch} x {self.pos} positions, "
            f"{self.n_valid} valid tokens",
            ", ".join(f"{name} {version}" for name, version in self.versions.items()),
            *(f"note: {note}" for note in self.notes),
            "",
            f"{'layer':>5}  {'quantity':<16}  {'worst head':>10}  {'max abs err':>11}  {'max rel err':>11}  "
            f"{'rel tol':>9}  ok",  # the tolerance bounds the relative error, the column beside it
        ]
        for worst in self._table_rows():
            lines.append(_format_row(worst, per_head=worst.quantity in _PER_HEAD))
        if self.failures:
            lines += ["", "failing rows:"]
            lines += [_format_row(row, per_head=True) for row in self.failures]
        return "\n".join(lines)


def _badness(row: VerificationRow) -> tuple[bool, float]:
    # NaN sorts as the worst of all.
    return (math.isnan(row.max_rel_error), row.max_rel_error if not math.isnan(row.max_rel_error) else 0.0)


def _format_row(row: VerificationRow, *, per_head: bool) -> str:
    layer = "final" if row.layer is None else str(row.layer)
    head = str(row.head) if per_head and row.head is not None else "-"
    return (
        f"{layer:>5}  {row.quantity:<16}  {head:>10}  {row.max_abs_error:>11.3g}  {row.max_rel_error:>11.3g}  "
        f"{'bitwise' if row.tolerance == 0 else format(row.tolerance, '.3g'):>9}  {'ok' if row.ok else 'FAIL'}"
    )
