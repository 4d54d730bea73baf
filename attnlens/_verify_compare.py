"""verify's measurements: the largest errors per head, the magnitudes they are relative to, and the per-head bounds.

Pure functions of tensors. Which entries count is a boolean ``keep`` in the layout of the compared tensor (None: all
of them, with no padding); reductions run per head over everything else.

**Where errors are measured.** The largest absolute value of a tensor is exact in any floating dtype (``abs`` and
``max`` never round), so magnitudes are taken in the tensors' own dtype. A difference rounds: float64 tensors are
subtracted in float64, as before, and every other dtype in float32 (a half tensor is widened first, exactly). For
float32 tensors that is exact wherever the two entries are within a factor two of each other (Sterbenz), and
otherwise the correctly rounded difference: rounding is monotone, so the largest measured error is the exact one
rounded to float32, off by at most ``2^-24`` of itself. Half tensors widened to float32 are off by as little. A row
then passes only if ``(1 + 2^-23)`` times its measured error is within tolerance: never more lenient than the exact
error would be (``e <= fl(e) / (1 - 2^-24) < fl(e) (1 + 2^-23)``), and stricter only within ``2^-23`` of the boundary,
a hundred-thousandth of the smallest float32 tolerance (``4u = 2^-22``) that is not zero. A zero tolerance stays
exact: a float32 difference is 0 exactly when the entries are equal.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from attnlens.errors import AttentionCaptureError

__all__ = ["MEASURED_SLACK", "Scratch", "errors", "magnitude", "max_norm", "ratio", "slack", "value_output_extent"]

MEASURED_SLACK = 2.0**-23
"""Relative slack of an error measured in float32 (module docstring): a row passes if ``(1 + slack) e <= tol``."""


def slack(dtype: torch.dtype) -> float:
    """The relative slack of an error measured for tensors of ``dtype``: 0 in float64, :data:`MEASURED_SLACK` else."""
    return 0.0 if dtype == torch.float64 else MEASURED_SLACK


class Scratch:
    """Reusable buffers for the differences: a fresh tensor of the square per comparison costs more than the sum."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.Size, torch.dtype, torch.device], Tensor] = {}

    def like(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of this shape, dtype and device (the same one each time: use it before the next)."""
        key = (shape, dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]


def _largest_abs(x: Tensor, head_dim: int | None) -> Tensor:
    """``max |x|`` overall, or per index of ``head_dim``, from the largest and smallest entries (no ``|x|`` formed).

    NaN anywhere gives NaN (``amax`` and ``amin`` propagate it, and so does ``maximum``).
    """
    if head_dim is None:
        return torch.maximum(x.amax(), -x.amin())
    dims = [d for d in range(x.ndim) if d != head_dim]
    return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))


def magnitude(x: Tensor, keep: Tensor | None, head_dim: int | None, scratch: Scratch | None = None) -> Tensor:
    """Largest ``|x|`` over the entries where ``keep``, per index of ``head_dim`` (or overall), as float64 (exact).

    Entries outside ``keep`` never count, also when they are NaN; one NaN inside makes the result NaN.
    """
    if keep is not None:
        kept = (scratch or Scratch()).like(x.shape, x.dtype, x.device)
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=kept)
    return _largest_abs(x, head_dim).double()


def errors(
    reference: Tensor,
    recomputed: Tensor,
    keep: Tensor | None,
    head_dim: int | None,
    scale: Tensor,
    scratch: Scratch | None = None,
) -> list[tuple[float, float]]:
    """``(max_abs_error, max_rel_error)`` over the entries where ``keep``, per index of ``head_dim`` (or overall).

    ``scale`` is :func:`magnitude` of ``reference`` over the same entries (computed once per reference, however many
    recomputations are compared with it). The difference is taken in float64 for float64 tensors and in float32
    otherwise (module docstring), into a buffer of ``scratch``; an all-zero reference gives a relative error of 0
    where the error is 0, else inf.
    """
    if reference.shape != recomputed.shape:
        raise AttentionCaptureError(
            f"captured tensor of shape {tuple(reference.shape)}, recomputed {tuple(recomputed.shape)}"
        )
    wide = torch.float64 if torch.float64 in (reference.dtype, recomputed.dtype) else torch.float32
    difference = (scratch or Scratch()).like(reference.shape, wide, reference.device)
    torch.sub(recomputed.to(wide), reference.to(wide), out=difference)
    if keep is not None:
        difference.masked_fill_(~keep, 0.0)
    out = []
    for err, mag in zip(_largest_abs(difference, head_dim).reshape(-1).tolist(), scale.reshape(-1).tolist()):
        rel = err / mag if mag > 0 else (0.0 if err == 0 else math.inf)
        out.append((err, rel if not math.isnan(mag) else math.nan))
    return out


def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 1 where the denominator is 0 (an all-zero reference fails on its own)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(torch.float64).tiny), 1.0)


def max_norm(x: Tensor, valid: Tensor) -> Tensor:
    """Largest vector norm over valid positions of ``x`` ``[batch, head, pos, d_head]``, per head (float64)."""
    norms = x.double().norm(dim=-1).masked_fill(~rearrange(valid, "batch pos -> batch 1 pos"), 0.0)
    return norms.amax(dim=(0, 2))


def value_output_extent(v: Tensor, W_O: Tensor, keep: Tensor | None, scratch: Scratch | None = None) -> Tensor:
    """Per query head ``h``, the largest entry of what one key's value sends to the output: ``max |v_j W_O[h]|``.

    Over the positions ``j`` where ``keep`` and every output feature, as float64. One head at a time, so that no more
    than one ``[batch, pos, d_model]`` product is ever held.

    Args:
        v: the model's values ``[batch, kv_head, pos, d_head]``.
        W_O: the output projection ``[head, d_head, d_model]``; query head ``h`` reads key/value head
            ``h // (head / kv_head)``.
        keep: boolean ``[batch, pos, 1]`` (None: every position).
        scratch: buffers for :func:`magnitude`.

    Returns:
        ``[head]``.
    """
    group = W_O.shape[0] // v.shape[1]
    extents = [magnitude(v[:, head // group] @ W_O[head], keep, None, scratch) for head in range(W_O.shape[0])]
    return torch.stack(extents)
