"""A tiny GPT-2 checkpoint shipped with attnlens for offline demos and tests.

The checkpoint in ``attnlens/demo/checkpoint`` is a small :class:`transformers.GPT2LMHeadModel` (2 layers, 4 heads,
``n_embd`` 128, 256 positions) with a byte-level BPE tokenizer of about 1000 tokens, trained from scratch on
synthetic English-like text with repeated spans by :mod:`attnlens.demo.train`. Head L0H0 is a previous-token head
and head L1H0 an induction head (both were shaped by an auxiliary attention loss during training; the other six heads
were not), which makes it a known target for attention inspection without network access. It is not a language
model to rely on for anything else; see ``docs/demo-model.md``.

Importing this module does not import :mod:`transformers`; :func:`load_demo` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

__all__ = ["DEMO_PATH", "load_demo"]

DEMO_PATH: Path = Path(__file__).resolve().parent / "checkpoint"
"""Folder holding the demo checkpoint (``config.json``, ``model.safetensors`` and the tokenizer files)."""


def load_demo(
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """Load the bundled demo GPT-2 model and its tokenizer.

    Args:
        dtype: Optional dtype to load the weights in (e.g. ``torch.float64``); the stored weights are float32.
        device: Optional device to move the model to.
        attn_implementation: Optional attention implementation passed to ``from_pretrained``
            (e.g. ``"eager"`` or ``"sdpa"``); ``None`` keeps the transformers default.

    Returns:
        ``(model, tokenizer)``: the model in eval mode and its ``GPT2TokenizerFast``.

    Raises:
        FileNotFoundError: If the checkpoint folder is missing from the installation.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if not (DEMO_PATH / "config.json").is_file():
        raise FileNotFoundError(f"demo checkpoint not found in {DEMO_PATH}")
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from attnlens.loading import name_demo, quiet_transformers

    with quiet_transformers():
        model: Any = GPT2LMHeadModel.from_pretrained(DEMO_PATH, **kwargs)
    if dtype is not None:
        model = model.to(dtype=_as_dtype(dtype))
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_PATH)
    name_demo(model, tokenizer)  # reports say "demo", not this installation's folder
    return model, tokenizer


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value
