"""Adapters from model libraries to attnlens: :func:`adapt` validates a model once and returns its :class:`Adapter`.

One module per architecture, each an :class:`~attnlens.models.base.Adapter` subclass registered here by its
``config.model_type``; today Hugging Face GPT-2 (:mod:`attnlens.models.gpt2`), GPT-NeoX / Pythia
(:mod:`attnlens.models.gpt_neox`) and Llama, Mistral, Qwen2, Qwen3 (:mod:`attnlens.models.llama`). Nothing outside
this package imports a specific adapter: everything is written against :class:`~attnlens.models.base.Adapter`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from attnlens._live import track
from attnlens.errors import UnsupportedModelError
from attnlens.models.base import QKV, Adapter, AttentionSpec, LayerSites, Rotation, Sites
from attnlens.models.gpt2 import GPT2Adapter
from attnlens.models.gpt_neox import GPTNeoXAdapter
from attnlens.models.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from attnlens.models.wrappers import unwrap
from attnlens.weights import ModelWeights

__all__ = [
    "QKV",
    "REGISTRY",
    "Adapter",
    "AttentionSpec",
    "LayerSites",
    "Rotation",
    "Sites",
    "adapt",
    "extract_weights",
    "load",
    "lock_key",
]

REGISTRY: dict[str, type[Adapter]] = {
    cls.model_type: cls
    for cls in (GPT2Adapter, GPTNeoXAdapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter)
}
"""The adapter class of each supported ``config.model_type``."""


def _supported() -> str:
    return ", ".join(name for cls in REGISTRY.values() for name in cls.supported_classes)


def _adapter_class(model: object) -> type[Adapter]:
    """The adapter class for a model: by its config's ``model_type``, else the one whose classes it belongs to."""
    inner = unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    cls = REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if cls is not None and cls.owns(inner):
        return cls
    # A supported class whose config names another model type: its adapter refuses the config by name.
    owner = next((cls for cls in REGISTRY.values() if cls.owns(inner)), None)
    if owner is not None:
        return owner
    raise UnsupportedModelError(
        "attnlens needs a supported Hugging Face model (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Qwen3), got "
        f"{type(model).__module__}."
        f"{type(model).__qualname__}; supported: {_supported()} (or a hub name / local path of such a checkpoint; "
        "torch.compile and PEFT wrappers of one)"
    )


def adapt(model: nn.Module | Adapter) -> Adapter:
    """Check a model once and return its :class:`Adapter`, which every attnlens entry point passes down.

    The adapter class is chosen by ``config.model_type`` (see :data:`REGISTRY`); it checks the class, the config
    policy, the model's state (wrappers, PEFT adapters, meta parameters, compiled blocks) and its attention modules.
    An Adapter is returned as it is.

    Raises:
        UnsupportedModelError: not a supported model, or one whose maths or state attnlens does not reproduce.
    """
    if isinstance(model, Adapter):
        return model
    return _adapter_class(model).from_model(model)


def lock_key(model: nn.Module) -> nn.Module:
    """The module whose lock calls on ``model`` share (see :mod:`attnlens.capture`); the model itself if unsupported."""
    inner = unwrap(model)
    for cls in REGISTRY.values():
        if cls.owns(inner):
            return cls.lock_key(inner)
    return model


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a supported checkpoint by hub name or local path, in eval mode (safetensors preferred, no remote code).

    Raises:
        UnsupportedModelError: the checkpoint's ``model_type`` has no adapter.
        OSError: it could not be found or read.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise OSError(
            f"could not read a config for {name_or_path!r}: not a local checkpoint folder, and the hub did not "
            f"provide it ({error})"
        ) from error
    cls = REGISTRY.get(getattr(config, "model_type", None) or "")
    if cls is None:
        raise UnsupportedModelError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint; attnlens supports GPT-2, GPT-NeoX, Llama, "
            "Mistral, Qwen2 and Qwen3 "
            f"({_supported()})"
        )
    return cls.load(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)


def extract_weights(
    model: nn.Module | Adapter | str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ModelWeights:
    """Extract every attention weight of a supported model, split per head, as views of its own parameters.

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
    if isinstance(model, (str, os.PathLike)):
        from attnlens.loading import load as load_checkpoint  # below trace, above models: imported on use

        model, _ = load_checkpoint(model, dtype=dtype, device=device)
    elif dtype is not None or device is not None:
        raise ValueError("dtype and device apply only when loading by name or path; extraction never converts")
    adapter = adapt(model)
    # Views taken under no_grad would not carry gradients to the parameters later; take them with autograd on.
    with torch.enable_grad():
        weights = adapter.extract()
    return track(weights, adapter.model)


def set_name(model: nn.Module, name: str) -> None:
    """Record ``name`` as the model's ``name_or_path``: what reports, traces and saved results say it is."""
    config = getattr(unwrap(model), "config", None)
    if config is not None:
        config._name_or_path = name
