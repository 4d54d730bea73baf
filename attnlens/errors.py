"""Exceptions and warnings raised by attnlens, and the switch that turns config warnings into errors.

Each message names what was given and what was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = [
    "AttentionCaptureError",
    "PositionDependentCircuitError",
    "StaleWeightsError",
    "UnknownConfigWarning",
    "UnsupportedModelError",
    "strict_config",
]


class UnsupportedModelError(ValueError):
    """The model, checkpoint or config is not one whose attention attnlens computes exactly."""


class PositionDependentCircuitError(UnsupportedModelError):
    """A position-free QK circuit was asked of a model whose scores depend on position through its q and k.

    Under a rotary embedding the score of query position ``i`` and key position ``j`` is
    ``x_i W_Q R(i)^T R(j) W_K^T x_j^T``, with ``R`` the rotation: ``W_Q W_K^T`` alone is not what any score reads
    (and the rotation depends on ``j - i``), so ``QK`` and the composition scores built on it are refused instead of
    returning a number that means something else. OV circuits are position-free and stay available.
    """


class AttentionCaptureError(RuntimeError):
    """The model did not produce the attention tensors asked of it (missing, empty or of the wrong shape)."""


class StaleWeightsError(RuntimeError):
    """Extracted weights can no longer follow their model (a parameter changed shape or was replaced inconsistently)."""


class UnknownConfigWarning(UserWarning):
    """The model's config has keys whose effect attnlens does not know; ``attnlens.verify`` proves the numbers.

    Raised as :class:`UnsupportedModelError` instead inside :func:`strict_config`.
    """


# A context variable rather than a module global: strictness set in one thread or task never leaks into another.
_STRICT_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("attnlens_strict_config", default=False)


@contextlib.contextmanager
def strict_config(strict: bool = True) -> Iterator[None]:
    """Inside the block, a config key of unknown effect raises :class:`UnsupportedModelError` instead of warning.

    Outside it (the default), such a key gives an :class:`UnknownConfigWarning` naming it, and attnlens goes on: run
    :func:`attnlens.verify` on your inputs to prove that its numbers are the model's own. Keys known to be inert
    pass silently either way, and flags that change the maths (cross-attention, pruned heads, ...) are refused
    either way. Blocks nest; ``strict_config(False)`` lifts strictness for an inner block.

    Example:
        >>> with attnlens.strict_config():
        ...     report = attnlens.verify(model, input_ids)  # refuses a config with unknown keys
    """
    token = _STRICT_CONFIG.set(bool(strict))
    try:
        yield
    finally:
        _STRICT_CONFIG.reset(token)


def config_is_strict() -> bool:
    """Whether the current code runs inside :func:`strict_config` (with ``strict=True``)."""
    return _STRICT_CONFIG.get()
