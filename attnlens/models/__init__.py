"""Adapters from model libraries to attnlens. Each architecture is one module; today: Hugging Face GPT-2."""

from __future__ import annotations

from typing import Any

import torch

from attnlens.models import gpt2
from attnlens.weights import ModelWeights, track

__all__ = ["extract_weights", "gpt2"]


def extract_weights(
    model: Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ModelWeights:
    """Extract every attention weight of a GPT-2 model, split per head, as views of its own parameters.

    Nothing is copied, moved or converted: each per-layer tensor shares storage with the model's parameter, keeps
    its device, dtype and autograd connection, and every access returns the model's current values, also after
    ``model.half()``, ``model.to(...)``, ``param.data = ...`` or ``load_state_dict`` (see :mod:`attnlens.weights`).

    Args:
        model: a Hugging Face GPT-2 model (``GPT2Model``, ``GPT2LMHeadModel``, ``GPT2DoubleHeadsModel``,
            ``GPT2ForSequenceClassification``, ``GPT2ForTokenClassification``, ``GPT2ForQuestionAnswering``), also
            wrapped by ``torch.compile`` or by PEFT with its adapters merged or disabled; or a hub name or local
            folder of a GPT-2 checkpoint, loaded with ``from_pretrained`` (safetensors preferred, never remote code).
        dtype: only when ``model`` is a name or path: the dtype to load it in.
        device: only when ``model`` is a name or path: the device to load it on.

    Returns:
        The model's :class:`~attnlens.ModelWeights`.

    Raises:
        UnsupportedModelError: ``model`` is not a supported GPT-2 model, or its config asks for maths attnlens does
            not reproduce (cross-attention, an unknown flag, an unknown activation), or whose weights are not what
            it computes with: an active PEFT adapter (merge_and_unload() it first), parameters on the meta device
            (offloaded by accelerate, or never loaded).
        OSError: a name or path that could not be loaded.

    Example:
        >>> w = attnlens.extract_weights(model)
        >>> w.W_E.shape, w.layers[0].W_Q.shape   # [d_vocab, d_model], [head, d_model, d_head]
    """
    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        model = gpt2.load(str(model), dtype=dtype, device=device)
    elif dtype is not None or device is not None:
        raise ValueError("dtype and device apply only when loading by name or path; extraction never converts")
    # Views taken under no_grad would not carry gradients to the parameters later; take them with autograd on.
    with torch.enable_grad():
        weights = gpt2.extract(model)
    return track(weights, model)
