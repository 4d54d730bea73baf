"""Exceptions raised by attnlens. Each message names what was given and what was expected."""

from __future__ import annotations

__all__ = ["AttentionCaptureError", "StaleWeightsError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model, checkpoint or config is not one whose attention attnlens computes exactly."""


class AttentionCaptureError(RuntimeError):
    """The model did not produce the attention tensors asked of it (missing, empty or of the wrong shape)."""


class StaleWeightsError(RuntimeError):
    """Extracted weights can no longer follow their model (a parameter changed shape or was replaced inconsistently)."""
