"""Hugging Face conventions that several adapters share: the rotation argument, loading, config-derived fields."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch
from torch import nn

from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models.base import Rotation

# Bookkeeping config entries that say nothing about the network itself (left out of the config hash).
_UNHASHED = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"})


def rotation(layer: int, kwargs: dict[str, Any]) -> Rotation:
    """``position_embeddings`` ``(cos, sin)``, each ``[batch or 1, pos, rotary_dim]``, as the attention module got it.

    Transformers 4.57 and 5.x compute the rotation once per forward and hand it to every rotary attention module.

    Raises:
        AttentionCaptureError: the attention module was called without it (not a transformers 4.57/5.x forward).
    """
    embeddings = kwargs.get("position_embeddings")
    if not isinstance(embeddings, tuple) or len(embeddings) != 2:
        raise AttentionCaptureError(
            f"layer {layer}'s attention module was called without position_embeddings=(cos, sin): attnlens "
            "reads the rotation the model uses from there (transformers 4.57 and 5.x pass it)"
        )
    cos, sin = embeddings
    return Rotation(cos=cos, sin=sin)


def config_sha256(config: Any) -> str:
    """The sha256 of a Hugging Face config's JSON, without bookkeeping entries and the attention implementation."""
    entries = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED and not k.startswith("_attn")}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


def load(
    name_or_path: str,
    *,
    model_type: str,
    family: str,
    check: Callable[[Any], object],
    classes: Sequence[str],
    default: str,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    attn_implementation: str | None,
    mismatch: str | None = None,
    unreadable: str = "",
) -> Any:
    """Load a checkpoint in eval mode: its own class (``architectures``), else ``default``; never remote code.

    Args:
        name_or_path: a hub name or a local checkpoint folder.
        model_type: the ``config.model_type`` the family has.
        family: the family's name, in the refusal of a checkpoint of another type (``..., not {family}``).
        check: the family's config policy check (raises :class:`UnsupportedModelError`).
        classes: the supported class names; the first of ``architectures`` among them is the class loaded.
        default: the class loaded when ``architectures`` names none of them.
        dtype: the weights' dtype; None keeps the stored one.
        device: where to move the model; None leaves it where transformers put it.
        attn_implementation: the attention kernel; None is transformers' default.
        mismatch: replaces ``, not {family}`` in the refusal of a checkpoint of another type.
        unreadable: said after the checkpoint's name when its config cannot be read, before the cause.

    Raises:
        UnsupportedModelError: the checkpoint is of another type, or its config is refused by ``check``.
        OSError: its config could not be read.
    """
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise OSError(f"could not read a config for {name_or_path!r}{unreadable} ({error})") from error
    if getattr(config, "model_type", None) != model_type:
        tail = f", not {family}" if mismatch is None else mismatch
        raise UnsupportedModelError(f"{name_or_path!r} is a {config.model_type!r} checkpoint{tail}")
    check(config)
    names = [name for name in (config.architectures or []) if name in classes]
    cls = getattr(transformers, names[0] if names else default)
    # dtype "auto": the stored dtype on every release (4.x would load float32, 5.x the config's dtype).
    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": "auto" if dtype is None else dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(name_or_path, config=config, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def paged_refusal(kernel: str, exact_kernels: Sequence[str]) -> str | None:
    """Why attnlens refuses to trace under ``kernel``, if it is a paged one (transformers' continuous batching)."""
    if "paged" not in kernel:
        return None
    return (
        f"attn_implementation={kernel!r} is a kernel for continuous batching with a paged cache; on a plain "
        "forward it fails or attends to other keys than the model's mask allows. Switch the model to "
        f"{' or '.join(repr(k) for k in exact_kernels)} (model.set_attn_implementation('sdpa')) to trace it"
    )


def _token_id(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ConfigFields(TypedDict):
    """The Adapter fields read from any Hugging Face config, typed so that ``Adapter(**fields)`` stays checked."""

    use_cache: bool
    bos_token_id: int | None
    eos_token_id: int | None
    name: str
    config_sha256: str


def config_fields(config: Any) -> ConfigFields:
    """The Adapter fields every adapter reads from a Hugging Face config the same way (keyword arguments)."""
    return ConfigFields(
        use_cache=bool(getattr(config, "use_cache", False)),
        bos_token_id=_token_id(getattr(config, "bos_token_id", None)),
        eos_token_id=_token_id(getattr(config, "eos_token_id", None)),
        name=str(getattr(config, "_name_or_path", "") or ""),
        config_sha256=config_sha256(config),
    )


def base_of(model: nn.Module, base_class: type | tuple[type, ...], attribute: str) -> nn.Module:
    """The base transformer inside a task-head model (its ``attribute``), the model itself if it is one; else the model.

    Every adapter's :meth:`~attnlens.models.Adapter.lock_key`: a task-head model and its base share one lock.
    """
    base = model if isinstance(model, base_class) else getattr(model, attribute, model)
    return base if isinstance(base, nn.Module) else model
