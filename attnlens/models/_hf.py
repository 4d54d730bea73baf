"""Hugging Face conventions that several adapters share: the rotation argument, loading, config-derived fields."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from attnlens.errors import AttentionCaptureError
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


def _token_id(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def config_fields(config: Any) -> dict[str, Any]:
    """The Adapter fields every adapter reads from a Hugging Face config the same way (keyword arguments)."""
    return {
        "use_cache": bool(getattr(config, "use_cache", False)),
        "bos_token_id": _token_id(getattr(config, "bos_token_id", None)),
        "eos_token_id": _token_id(getattr(config, "eos_token_id", None)),
        "name": str(getattr(config, "_name_or_path", "") or ""),
        "config_sha256": config_sha256(config),
    }
