"""Input checks and escaping shared by the matplotlib figures and the HTML views."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np


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


def new_id() -> str:
    """A fresh element id, so that several views share a notebook or a page without clashing."""
    return f"attnlens-{uuid.uuid4().hex[:12]}"
