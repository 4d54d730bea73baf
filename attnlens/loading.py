"""One-call loading: :func:`load` gives ``(model, tokenizer)`` for a hub name, a local folder or the demo.

The rule every entry point follows (trace, verify, scan, decompose, the metrics that run a model, head_importance):
``model`` is a loaded model (or its :class:`~attnlens.models.Adapter`), or a name or path, which is loaded through
:func:`load` for that call; its tokenizer then turns text into ids unless ``tokenizer=`` is given. Loading takes
seconds: to make several calls, load once with :func:`load` and pass the model.

The model class comes from the adapter registry (:data:`attnlens.models.REGISTRY`, by the checkpoint's
``config.model_type``); transformers' own loading progress bar is kept quiet while attnlens loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from attnlens.models import Adapter

__all__ = ["DEMO_NAMES", "load", "name_demo", "quiet_transformers", "resolve"]

DEMO_NAMES = ("demo",)
"""Names that mean the embedded demo checkpoint (so does ``None``); a local folder of that name needs ``./demo``."""

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' ``Loading weights`` progress bar for the duration, restoring its setting after."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def name_demo(model: nn.Module, tokenizer: Any) -> None:
    """Name a freshly loaded demo checkpoint ``"demo"``, the name it loads by, instead of this installation's folder.

    Reports, traces and saved results record the model's ``name_or_path``: the folder would put a path of the machine
    that ran the code into every printed report and executed notebook, and means nothing on another machine.
    """
    from attnlens.models import set_name

    set_name(model, DEMO_NAMES[0])
    if tokenizer is not None and hasattr(tokenizer, "name_or_path"):
        tokenizer.name_or_path = DEMO_NAMES[0]


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; give a torch.dtype or a name such as 'float32' or 'bfloat16'")
    return value


def _tokenizer(name_or_path: str) -> Any:
    """The checkpoint's tokenizer, or None when it has none (a weights-only folder, or none on the hub)."""
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None  # AutoTokenizer would build an empty tokenizer from the config alone
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a checkpoint of any supported architecture and its tokenizer, ready for every attnlens call.

    Args:
        name_or_path: a hub name (``"gpt2"``), a local checkpoint folder, or ``"demo"`` / ``None`` for the embedded
            demo checkpoint. The architecture is the config's ``model_type``; each supported one has an adapter in
            :data:`attnlens.models.REGISTRY`. Safetensors are preferred; remote code never runs.
        dtype: the dtype to load the weights in (a ``torch.dtype`` or its name); default the stored dtype.
        device: the device to put the model on; default the CPU.
        attn_implementation: ``"eager"``, ``"sdpa"``, ...; default the transformers release's own choice.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, and its tokenizer, or ``None`` for a folder without
        tokenizer files (then pass token ids, or ``tokenizer=``).

    Raises:
        UnsupportedModelError: the checkpoint's ``model_type`` has no adapter, or its config is refused.
        OSError: no such folder, and the hub did not provide it.
        ValueError: an unknown ``dtype`` name.

    Example:
        >>> model, tok = attnlens.load("demo")
        >>> tr = attnlens.trace(model, "The cat sat on the mat", tokenizer=tok)
    """
    from attnlens.models import load as load_model

    dtype = _as_dtype(dtype)
    demo = name_or_path is None or (isinstance(name_or_path, str) and name_or_path in DEMO_NAMES)
    if demo:
        from attnlens.demo import DEMO_PATH

        if not (DEMO_PATH / "config.json").is_file():
            raise FileNotFoundError(f"the demo checkpoint is missing from this installation ({DEMO_PATH})")
        name_or_path = DEMO_PATH
    path = os.fspath(name_or_path)  # type: ignore[arg-type]
    with quiet_transformers():
        model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        tokenizer = _tokenizer(path)
    if demo:
        name_demo(model, tokenizer)
    return model.eval(), tokenizer


def resolve(
    model: nn.Module | Adapter | str | os.PathLike[str], tokenizer: Any, caller: str
) -> tuple[nn.Module | Adapter, Any]:
    """``(model, tokenizer)`` for an entry point: a name or path is loaded through :func:`load`, with its tokenizer.

    A loaded model (or Adapter) is returned as given. A ``tokenizer`` passed by the user always wins.

    Raises:
        TypeError: ``model`` is bytes (a path must be a str or os.PathLike).
        OSError / UnsupportedModelError: as :func:`load`, prefixed with the caller's name.
    """
    if isinstance(model, bytes):
        raise TypeError(f"{caller} takes a model, or a name or path as str; got bytes {model!r}")
    if not isinstance(model, (str, os.PathLike)):
        return model, tokenizer
    loaded, own_tokenizer = load(model)
    return loaded, own_tokenizer if tokenizer is None else tokenizer
