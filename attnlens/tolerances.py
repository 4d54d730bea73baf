"""verify's tolerances: derived from the dtype's unit roundoff and the sizes being compared.

A recomputation in another (equally valid) arithmetic order differs from the model's own numbers by rounding alone;
how much depends on the dtype (its unit roundoff ``u``), on the precision its matrix products accumulate in, on the
lengths of the reductions (``d_model``, ``d_head``, ``k_pos``) and, for the pattern and ``z``, on magnitudes that
:func:`attnlens.verify.verify` measures on the model's own tensors. docs/verify.md derives each bound and lists the
measured errors; the smallest corruption verify is guaranteed to catch per dtype is stated there too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlens.models.wrappers import is_compiled

__all__ = [
    "QUANTITIES",
    "TOLERANCES",
    "UNIT_ROUNDOFF",
    "ErrorBound",
    "bitwise_guaranteed",
    "check_tolerance",
    "derived_tolerances",
    "logit_tolerance",
    "softmax_rounding",
]

QUANTITIES = ("q", "k", "v", "pattern_hf_order", "pattern", "z", "attn_out", "hidden", "logits")
"""What verify compares, in report order. The first six are per head, ``attn_out`` per layer, the last two once."""

UNIT_ROUNDOFF: dict[str, float] = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
"""Unit roundoff ``u`` (half the machine epsilon) of each dtype: the largest relative error of one rounding."""

_ACCUMULATOR = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}
# Half-precision matmuls accumulate in float32 (CPU kernels, cuBLAS's default compute type), then round once.


@dataclass(frozen=True)
class ErrorBound:
    """One quantity's tolerance: ``rounding * u + (accumulation * u_acc + inputs * u) * sqrt(n) [+ propagated]``.

    Attributes:
        rounding: how many roundings to the model's dtype separate the two sides (with a margin).
        accumulation: the constant of the probabilistic ``sqrt(n)`` bound of the difference between two
            length-``n`` reductions summed in different orders, in the accumulator's precision ``u_acc`` (float32
            for half dtypes). 6 covers the two independent orders (sqrt(2)) and the largest of up to ~10^6 entries
            compared (about 4.5 standard deviations); measured on CUDA, where cuBLAS and the model's fused addmm
            order sums differently, float32 q/k/v and attn_out reached 1.03 and 1.17 times a constant of 1.
        length: the reduction length ``n`` (a model dimension; ``k_pos`` is the number of positions).
        propagated: what else enters (errors of earlier quantities, scaled by a factor measured on the model's own
            tensors); docs/verify.md derives each.
        inputs: the constant of a ``sqrt(n)`` term in the model's own ``u``: each of the ``n`` inputs was rounded to
            the dtype (z entering attn_out; every layer's output in the end-to-end rows).
    """

    rounding: float
    accumulation: float
    length: str
    propagated: str = ""
    inputs: float = 0.0


TOLERANCES: dict[str, ErrorBound] = {
    "q": ErrorBound(4, 6, "d_model"),
    "k": ErrorBound(4, 6, "d_model"),
    "v": ErrorBound(4, 6, "d_model"),
    "pattern_hf_order": ErrorBound(4, 0, "d_head", "S * (u_acc * d_head + u); 0 (bitwise) where guaranteed"),
    "pattern": ErrorBound(4, 0, "d_head", "S * (tol_q + tol_k + u), S = scale * max|q| * max|k| / sqrt(d_head)"),
    "z": ErrorBound(4, 1, "k_pos", "max|v| / max|z| * (2 * (tol_pattern - 4u) + tol_v + 2u)"),
    "attn_out": ErrorBound(8, 6, "d_model", inputs=2),
    "hidden": ErrorBound(0, 0, "d_model", "times n_layer: the whole forward rebuilt", inputs=16),
    "logits": ErrorBound(0, 0, "d_model", "times n_layer: the whole forward rebuilt", inputs=16),
}
"""How each quantity's tolerance is derived from the dtype's unit roundoff and the model's dimensions.

:func:`derived_tolerances` turns these into numbers for one model and dtype; :func:`verify` adds the factors measured
on the model's own tensors per layer and head. docs/verify.md gives the derivation and the measured errors.
"""


def derived_tolerances(
    dtype: torch.dtype | str, d_model: int, d_head: int, n_layer: int, k_pos: int
) -> dict[str, float]:
    """The tolerances on ``max_rel_error`` that depend only on the dtype and the model's dimensions.

    ``pattern``, ``z`` and ``attn_out`` add a term propagated from earlier quantities, scaled by a factor measured on
    the model's own tensors (see :func:`verify`); this table holds only their rounding and accumulation terms.
    ``hidden`` and ``logits`` use ``u`` of the dtype (no higher-precision accumulation spans a whole forward).

    Args:
        dtype: the model's dtype.
        d_model: the residual width (the reduction length of q, k, v and attn_out).
        d_head: the head width (the reduction length of scores).
        n_layer: the number of layers (the end-to-end rows grow with it).
        k_pos: the number of positions (the length of the pattern-weighted sum of values).

    Returns:
        ``{quantity: tolerance}`` for every quantity in :data:`QUANTITIES`.
    """
    name = _dtype_name(dtype)
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerances for a {name} model; verify supports {', '.join(UNIT_ROUNDOFF)}")
    u, u_acc = UNIT_ROUNDOFF[name], UNIT_ROUNDOFF[_ACCUMULATOR[name]]
    lengths = {"d_model": d_model, "d_head": d_head, "k_pos": k_pos}
    table = {}
    for quantity, bound in TOLERANCES.items():
        n = lengths[bound.length]
        growth = n_layer if quantity in ("hidden", "logits") else 1
        table[quantity] = bound.rounding * u + (bound.accumulation * u_acc + bound.inputs * u) * math.sqrt(n) * growth
    return table


def softmax_rounding(u_soft: float, score_extent: Tensor, k_pos: int) -> tuple[Tensor, Tensor]:
    """How far a kernel's probabilities soft-maxed at unit roundoff ``u_soft`` are from the exact softmax, per head.

    For a model whose kernel soft-maxes in a coarser dtype than its own (a float64 GPT-NeoX or Llama-family model run
    eager soft-maxes in float32 and casts back), every probability the model applies carries that dtype's rounding.
    Its kernel rounds each score to the softmax dtype (``u |s_j|``), subtracts the row maximum ``m`` (``u |s_j - m|``;
    the rounding of ``m`` is common to the row and cancels in the normalisation), takes ``exp`` (at most 2 ulp,
    ``4u``: torch's vectorised and scalar ``expf`` are within 1 ulp), sums the row, takes the reciprocal of the sum and
    multiplies (``u``). With ``M = max |s|`` over the compared entries, the applied probability is
    ``p_j F_j / D`` with, to first order,

    * ``|F_j - 1| <= (3 M + 5) u`` (per entry: ``u |s_j| + u (|s_j| + |m|) + 4u + u``);
    * ``|D - 1| <= (3 M + 5) u + 3 sqrt(k_pos) u`` (common to the row: a ``p``-weighted mean of the ``F_j``, the
      reciprocal's rounding, and the sum of up to ``k_pos`` positive terms, whose rounding error has a standard
      deviation of at most ``u sqrt(k_pos / 3)`` of the sum: 3 covers about 5 of them, for up to ~10^6 rows).

    Args:
        u_soft: the unit roundoff of the dtype the kernel soft-maxes in.
        score_extent: ``M`` per head, the largest ``|score|`` the kernel soft-maxed (float64).
        k_pos: the number of key positions (the longest row).

    Returns:
        ``(per_entry, row_common)``: the bounds on ``|F_j - 1|`` and ``|D - 1|``, per head.
    """
    per_entry = (3 * score_extent + 5) * u_soft
    return per_entry, per_entry + 3 * math.sqrt(k_pos) * u_soft


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _overrides(dtype: torch.dtype, overrides: Mapping[Any, Any] | None) -> dict[str, float]:
    """Fixed tolerances replacing derived ones, from ``{quantity: tol}`` or ``{dtype: {quantity: tol}}``."""
    name = _dtype_name(dtype)
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerances for a {name} model; verify supports {', '.join(UNIT_ROUNDOFF)}")
    if not overrides:
        return {}
    if all(isinstance(value, Mapping) for value in overrides.values()):
        by_dtype = {_dtype_name(key): value for key, value in overrides.items()}
        unknown = sorted(set(by_dtype) - set(UNIT_ROUNDOFF))
        if unknown:
            raise ValueError(f"tolerances for unknown dtype(s) {', '.join(unknown)}; known: {', '.join(UNIT_ROUNDOFF)}")
        flat: Mapping[Any, Any] = by_dtype.get(name, {})
    elif not any(isinstance(value, Mapping) for value in overrides.values()):
        flat = overrides
    else:
        raise ValueError("tolerances must be {quantity: tol} or {dtype: {quantity: tol}}, not a mixture")
    table = {}
    for quantity, tol in flat.items():
        if quantity not in TOLERANCES:
            raise ValueError(f"tolerance for unknown quantity {quantity!r}; quantities: {', '.join(QUANTITIES)}")
        try:
            tol = float(tol)
        except (TypeError, ValueError):
            raise ValueError(f"tolerance for {quantity!r} must be a number >= 0, got {tol!r}") from None
        if not tol >= 0.0:
            raise ValueError(f"tolerance for {quantity!r} must be a number >= 0, got {tol}")
        table[quantity] = tol
    return table


def bitwise_guaranteed(model: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``pattern_hf_order`` must match bit for bit: an eager, uncompiled model in float32/float64 on CPU.

    There the recomputation runs the same CPU kernels on the same q and k in the same order as the model. Compiled
    modules fuse and reorder arithmetic, CUDA kernels may pick other reduction orders (or turn a division into a
    multiplication by the reciprocal), and half precision rounds the scores where an order change shows; there a
    derived tolerance applies instead.
    """
    return not is_compiled(model) and device.type == "cpu" and dtype in (torch.float32, torch.float64)


# Decompositions (attnlens.attribution): how far a sum of parts, or a logit attributed to them, may drift.


def check_tolerance(
    dtype: torch.dtype, n_layers: int, d_model: int, cancellation: float = 1.0, *, d_attn: int | None = None
) -> float:
    """The largest relative error ``Decomposition.check`` accepts (:mod:`attnlens.attribution`): rounding explains it.

    ``cancellation * ((4 * n_layers + 2) * u + 6 * u_acc * sqrt(d_attn * n_layers))``, from:

    * ``4 * n_layers + 2`` roundings to the model's dtype (unit roundoff ``u``), each at most ``u`` times the sum of
      the parts' magnitudes: the model's ``2 * n_layers + 1`` residual additions, its rounding of each attention
      output, the rounding of each head's result here, and one of margin;
    * the model's attention output projection sums ``d_attn = n_heads * d_head`` products in one order, the per-head
      results here in another: per layer a probabilistic ``sqrt(d_attn)`` bound in the accumulator's precision
      ``u_acc`` (float32 for half dtypes), independent across layers (``sqrt(n_layers)``), with the constant 6 of
      :data:`attnlens.tolerances.TOLERANCES` (two orders, about 4.5 standard deviations);
    * ``cancellation``: ``max_d sum_c |c| / max_d |x|`` measured on the decomposition, since every rounding is
      relative to the parts, and ``check`` divides by the residual.

    Args:
        dtype: the model's dtype.
        n_layers: the number of layers.
        d_model: the residual width.
        cancellation: see above (1 if the parts never cancel).
        d_attn: the attention output projection's input width, ``n_heads * d_head`` (default ``d_model``, as in
            GPT-2; wider in models whose ``head_dim`` is set on its own, e.g. Qwen3-4B: 32 x 128 for d_model 2560).

    Raises:
        ValueError: a dtype attnlens has no unit roundoff for.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance for a {name} model; attnlens supports {', '.join(UNIT_ROUNDOFF)}")
    u = UNIT_ROUNDOFF[name]
    u_acc = UNIT_ROUNDOFF["float64" if dtype == torch.float64 else "float32"]
    width = d_model if d_attn is None else d_attn
    return cancellation * ((4 * n_layers + 2) * u + 6 * u_acc * math.sqrt(width * n_layers))


def logit_tolerance(
    dtype: torch.dtype, n_layers: int, d_model: int, cancellation: float = 1.0, *, d_attn: int | None = None
) -> float:
    """How far ``logit_attribution(t).sum(0) + logit_bias(t)`` may be from the model's logit, relative to ``S``.

    ``S = (max_d |x_d| / sigma) * sum_d |gamma_d W_U[d, t]| + sum_d |beta_d W_U[d, t]| + |b_U[t]|`` bounds every term
    of the logit (``Decomposition.logit_bound`` is ``logit_tolerance * S``; for a difference, ``S_a + S_b``).
    The tolerance is ``2 * check_tolerance(...) + 8 * u + 12 * u_acc * sqrt(d_model)``:

    * the parts' sum is off the residual by at most ``check_tolerance * max_d |x|``; centred, then sent through
      ``gamma * W_U[:, t] / sigma``, that is at most twice the check tolerance times ``S``;
    * the model rounds the normalised residual (``|y_d| <= 2 S``-sized terms: ``2u``), sums ``d_model`` products in
      its accumulator (6, as in :func:`check_tolerance`, for each of the two sides' orders) and rounds the logit
      (``2u``); its layer-norm statistics and the attribution here add a few ``u`` (margin to 8).

    Args:
        dtype: the model's dtype.
        n_layers: the number of layers.
        d_model: the residual width.
        cancellation: as for :func:`check_tolerance`.
        d_attn: as for :func:`check_tolerance`.
    """
    name = str(dtype).removeprefix("torch.")
    u = UNIT_ROUNDOFF.get(name)
    if u is None:
        raise ValueError(f"no tolerance for a {name} model; attnlens supports {', '.join(UNIT_ROUNDOFF)}")
    u_acc = UNIT_ROUNDOFF["float64" if dtype == torch.float64 else "float32"]
    residual = check_tolerance(dtype, n_layers, d_model, cancellation, d_attn=d_attn)
    return 2 * residual + 8 * u + 12 * u_acc * math.sqrt(d_model)
