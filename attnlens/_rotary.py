"""Rotary position embeddings (GPT-NeoX / Pythia, Llama, Mistral, Qwen): the rotate-half convention of transformers.

Pure functions, re-exported by :mod:`attnlens.functional`; kept apart from its attention maths beside the other
Llama-family maths in :mod:`attnlens._llamalike`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rotary", "rotary_cos_sin", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """``[..., d] -> [..., d]``: the halves ``(x1, x2)`` of the last axis become ``(-x2, x1)``.

    Feature ``i`` of the first half pairs with feature ``i + d/2`` (GPT-NeoX's and Hugging Face's convention), not
    with its neighbour ``i + 1`` as in GPT-J's interleaved pairs.
    """
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, rotary_dim: int | None = None) -> Tensor:
    """Rotate the first ``rotary_dim`` features of each head by position; the others pass through unchanged.

    ``x_rot * cos + rotate_half(x_rot) * sin`` on ``x_rot = x[..., :rotary_dim]``, then the untouched
    ``x[..., rotary_dim:]`` appended: the operations, their order and their dtype are those of transformers'
    ``apply_rotary_pos_emb`` (GPT-NeoX, 4.57 and 5.x), so with the ``cos``/``sin`` a model's attention module receives
    the result is bitwise the model's own rotated queries and keys (each output element is the same two rounded
    products and one rounded sum, whatever the axis order).

    Args:
        x: queries or keys ``[batch, pos, head, d_head]`` (the axis order of attnlens; Hugging Face's attention
            modules hold them as ``[batch, head, pos, d_head]``).
        cos: ``[batch, pos, rotary_dim]`` or ``[pos, rotary_dim]``, the cosines as the model's rotary embedding hands
            them to its attention modules (``position_embeddings[0]``), in ``x``'s dtype.
        sin: the sines, shaped and typed as ``cos``.
        rotary_dim: how many leading features of each head rotate (even, at most ``d_head``); default
            ``cos.shape[-1]``. When given, it must equal ``cos.shape[-1]``: a check that the cosines belong to the
            model they are applied to.

    Returns:
        ``[batch, pos, head, d_head]`` in ``x``'s dtype.

    Raises:
        ValueError: cosines and sines of different shapes, a ``rotary_dim`` that is odd, wider than the head or not
            the cosines' width, or positions that do not match ``x``'s, each named.
        TypeError: ``cos``/``sin`` in another dtype than ``x`` (cast them as the model does, to ``x.dtype``).
    """
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    width = cos.shape[-1]
    if rotary_dim is not None and rotary_dim != width:
        raise ValueError(f"rotary_dim={rotary_dim} but cos and sin are {width} wide ([..., pos, rotary_dim])")
    if width % 2 or width > x.shape[-1]:
        raise ValueError(f"the rotary width must be even and at most d_head={x.shape[-1]}, got {width}")
    if x.ndim != 4 or cos.ndim not in (2, 3) or cos.shape[-2] != x.shape[1]:
        raise ValueError(
            f"x must be [batch, pos, head, d_head] and cos/sin [batch, pos, rotary_dim] or [pos, rotary_dim] with "
            f"the same pos, got x {tuple(x.shape)} and cos {tuple(cos.shape)}"
        )
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(
            f"cos/sin ({cos.dtype}, {sin.dtype}) must have x's dtype {x.dtype}: the model casts them to its own dtype "
            "before rotating, and a mixed product would promote and round differently"
        )
    # [batch, pos, rotary_dim] -> [batch, pos, 1, rotary_dim]: one angle per position, shared by every head.
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    x_rot, x_pass = x[..., :width], x[..., width:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


def rotary_cos_sin(
    position_ids: Tensor, *, rotary_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the default (unscaled) rotary embedding, as GPT-NeoX's rotary embedding computes them.

    Feature pair ``i`` (``i < rotary_dim / 2``) turns by ``position * base ** (-2 i / rotary_dim)``; the angles are
    computed in float32 and the cosines and sines cast to ``dtype`` at the end, as transformers does.

    Args:
        position_ids: integer positions ``[batch, pos]``.
        rotary_dim: the rotary width (even); ``int(d_head * rotary_pct)`` for a GPT-NeoX config.
        base: the base of the frequencies (``rotary_emb_base`` / ``rope_theta``).
        dtype: the dtype of the returned tensors (the model's own).

    Returns:
        ``(cos, sin)``, each ``[batch, pos, rotary_dim]``, for :func:`apply_rotary`.
    """
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"rotary_dim must be even and positive, got {rotary_dim}")
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=position_ids.device) / rotary_dim
    inv_freq = 1.0 / (base**steps)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
