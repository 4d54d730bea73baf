"""The maths Llama-shaped models add to GPT-2's: RMSNorm, grouped key/value heads, gated MLPs, sliding windows.

Pure functions, re-exported by :mod:`attnlens.functional` (which holds the conventions they share). Each is written in
the operations, order and dtypes of transformers' Llama, Mistral, Qwen2 and Qwen3 modules (4.57 and 5.x), so that a
recomputation from the same inputs is bitwise the model's own where the same kernels run on the same shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expand_kv", "gated_mlp", "repeat_kv", "rms_norm", "sliding_window_mask"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Root-mean-square normalisation over the last axis, as ``LlamaRMSNorm`` (and Mistral's, Qwen2's, Qwen3's).

    ``weight * (x / sqrt(mean(x^2) + eps))``, with the statistics and the division in float32 whatever ``x``'s dtype,
    the result cast back to ``x``'s dtype *before* the weight multiplies it (so a half model's weight product rounds
    once, in half). Qwen3's per-head ``q_norm`` / ``k_norm`` are the same module on ``[..., d_head]``.

    Args:
        x: ``[..., d]`` (``[batch, pos, d_model]`` for a layer's norms, ``[batch, pos, head, d_head]`` for q/k norms).
        weight: ``[d]``, the module's ``weight``.
        eps: the module's ``variance_epsilon`` (the config's ``rms_norm_eps``).

    Returns:
        ``[..., d]`` in the promoted dtype of ``weight`` and ``x`` (the model's own: both share it).
    """
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def expand_kv(x: Tensor, group: int, *, dim: int = -3) -> Tensor:
    """Share each key/value head with its ``group`` query heads, as a view: no memory is copied.

    Grouped-query attention pairs query head ``h`` with key/value head ``h // group``. The returned view inserts a
    ``group`` axis of stride 0 after the key/value head axis, so ``view[..., kv_head, g, ...]`` is query head
    ``kv_head * group + g``'s key (or value). Flattening ``(kv_head group)`` into one head axis cannot be a view (the
    two strides do not combine); :func:`repeat_kv` does that, with a copy.

    Args:
        x: keys or values with a key/value head axis at ``dim`` (``[batch, kv_head, pos, d_head]`` for ``dim=-3``;
            ``[kv_head, d_model, d_head]`` weights for ``dim=0``).
        group: query heads per key/value head (``n_heads // n_kv_heads``).
        dim: the key/value head axis.

    Returns:
        ``x`` with a ``group`` axis after ``dim`` (``[batch, kv_head, group, pos, d_head]`` for ``dim=-3``), sharing
        ``x``'s storage.
    """
    if group < 1:
        raise ValueError(f"group must be a positive number of query heads per key/value head, got {group}")
    dim = dim % x.ndim
    shape = list(x.shape)
    shape.insert(dim + 1, group)
    return x.unsqueeze(dim + 1).expand(shape)


def repeat_kv(x: Tensor, group: int, *, dim: int = -3) -> Tensor:
    """Key/value heads repeated per query head, ``[.., kv_head, ..] -> [.., (kv_head group), ..]``: a copy.

    Bitwise the ``repeat_kv`` of transformers' eager attention (for ``[batch, kv_head, pos, d_head]``, ``dim=-3``);
    query head ``h`` gets key/value head ``h // group``. Use :func:`expand_kv` for a view without the copy.
    """
    dim = dim % x.ndim
    if group == 1:
        return x
    return expand_kv(x, group, dim=dim).flatten(dim, dim + 1)


def gated_mlp(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    *,
    act: str = "silu",
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """The gated (SwiGLU) MLP of Llama-shaped models: ``down(act(gate(x)) * up(x))``, in ``LlamaMLP``'s order.

    Args:
        x: ``[..., d_model]``.
        gate_weight: ``[d_mlp, d_model]``, ``nn.Linear`` layout (``mlp.gate_proj.weight``).
        up_weight: ``[d_mlp, d_model]`` (``mlp.up_proj.weight``).
        down_weight: ``[d_model, d_mlp]`` (``mlp.down_proj.weight``).
        act: the activation's transformers name, a key of :data:`attnlens.functional.ACTIVATIONS`.
        gate_bias: ``[d_mlp]`` or None (Llama's ``mlp_bias``).
        up_bias: ``[d_mlp]`` or None.
        down_bias: ``[d_model]`` or None.

    Returns:
        ``[..., d_model]``.
    """
    from attnlens.functional import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    hidden = ACTIVATIONS[act](F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)
    return F.linear(hidden, down_weight, down_bias)


def sliding_window_mask(
    q_len: int, k_len: int | None = None, *, window: int, device: torch.device | str | None = None
) -> Tensor:
    """Boolean causal sliding-window mask ``[q_pos, k_pos]``: query ``i`` sees keys ``j`` with ``i - window < j <= i``.

    At most ``window`` keys, itself included: the ``sliding_window`` of a Mistral / Qwen2 / Qwen3 config as
    transformers' masks apply it (``kv_idx > q_idx - sliding_window``, 4.57 and 5.x). Aligned top-left as
    :func:`attnlens.functional.causal_mask`.
    """
    if window < 1:
        raise ValueError(f"a sliding window must hold at least one key, got window={window}")
    k_len = q_len if k_len is None else k_len
    q_index = torch.arange(q_len, device=device)[:, None]
    k_index = torch.arange(k_len, device=device)[None, :]
    return (k_index <= q_index) & (k_index > q_index - window)
