"""The maths of a decomposition of the residual stream: component names, the sum check, a final norm linearised.

Pure functions, tensors in and tensors out; :mod:`attnlens.attribution` and :mod:`attnlens.residual` use them on the
model's own residual. A layer norm (``(x - mean_d(x)) / sqrt(var(x) + eps)``) and an RMSNorm (``x / sqrt(mean_d(x^2) +
eps)``) are linearised by freezing their scale at the real residual's; only the layer norm centres.
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import Tensor

__all__ = ["component_names", "frozen_norm", "frozen_sigma", "linearised_logits", "residual_error"]


def component_names(n_layers: int, n_heads: int) -> tuple[str, ...]:
    """The components in the order of a decomposition's ``component`` axis.

    ``"embed"``, ``"pos_embed"``, then per layer ``l``: ``"L{l}H{h}"`` for each head, ``"L{l}.b_O"``, ``"L{l}.mlp"``.
    """
    names = ["embed", "pos_embed"]
    for layer in range(n_layers):
        names += [f"L{layer}H{head}" for head in range(n_heads)]
        names += [f"L{layer}.b_O", f"L{layer}.mlp"]
    return tuple(names)


def residual_error(contributions: Tensor, residual: Tensor, valid: Tensor) -> tuple[float, float]:
    """How far the float64 sum of the parts is from the residual, and how much the parts cancel.

    Args:
        contributions: ``[component, batch, pos, d_model]``.
        residual: ``[batch, pos, d_model]``, the model's own.
        valid: ``[batch, pos]`` bool, the entries to compare (real tokens).

    Returns:
        ``(error, cancellation)``: the largest over valid entries of ``max_d |sum_c c - x| / max_d |x|``, and of
        ``max_d sum_c |c| / max_d |x|`` (at least 1; how much larger the parts are than their sum).
    """
    parts = contributions.double()
    scale = residual.double().abs().amax(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    error = (parts.sum(dim=0) - residual.double()).abs().amax(dim=-1) / scale
    cancellation = parts.abs().sum(dim=0).amax(dim=-1) / scale
    if not bool(valid.any()):
        return 0.0, 1.0
    # NaN anywhere (a non-finite residual) must not hide behind amax: report it as such.
    worst = error[valid]
    worst_error = float("nan") if bool(worst.isnan().any()) else float(worst.amax())
    return worst_error, float(cancellation[valid].amax())


def linearised_logits(contributions: Tensor, sigma: Tensor, direction: Tensor, *, centre: bool) -> Tensor:
    """Each component's direct effect on a logit through a layer norm whose scale is frozen.

    Args:
        contributions: ``[component, batch, pos, d_model]``.
        sigma: ``[batch, pos]``, ``sqrt(var(x) + eps)`` of the real residual ``x``.
        direction: ``[batch, pos, d_model]``, ``gamma * W_U[:, t]`` (or ``gamma * (W_U[:, a] - W_U[:, b])``).
        centre: subtract each component's mean over ``d_model`` (a layer norm); False for an RMSNorm. Required:
            the wrong choice is a plausible number, not an error.

    Returns:
        ``[component, batch, pos]``: ``((c - mean_d(c)) / sigma) . direction``, in the dtype of ``direction``.
    """
    parts = contributions.to(direction.dtype)
    centred = parts - parts.mean(dim=-1, keepdim=True) if centre else parts
    return einsum(centred, direction, "component batch pos d_model, batch pos d_model -> component batch pos") / sigma


def frozen_sigma(residual: Tensor, eps: float, dtype: torch.dtype, *, rms: bool = False) -> Tensor:
    """``sqrt(var(x) + eps)`` over ``d_model`` (biased variance, as layer norm uses), in ``dtype``: ``[batch, pos]``.

    With ``rms``: ``sqrt(mean(x^2) + eps)``, an RMSNorm's scale.
    """
    x = residual.to(dtype)
    if rms:
        return torch.sqrt(x.pow(2).mean(dim=-1) + eps)
    return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)


def frozen_norm(parts: Tensor, sigma: Tensor, gamma: Tensor, *, centre: bool) -> Tensor:
    """Components through a final norm whose scale is frozen: ``gamma * (c - mean_d(c)) / sigma`` (no bias).

    Args:
        parts: ``[..., batch, pos, d_model]``, in the dtype of the computation.
        sigma: ``[batch, pos]``, from :func:`frozen_sigma` of the real residual.
        gamma: ``[d_model]``, the norm's weight.
        centre: a layer norm (True) or an RMSNorm, which does not remove the mean (False).

    Returns:
        ``parts``'s shape and dtype; for parts that sum to the real residual, the results plus the norm's bias sum to
        the norm's output on it.
    """
    if centre:
        parts = parts - parts.mean(dim=-1, keepdim=True)
    return parts / sigma[..., None] * gamma.to(parts.dtype)
