"""Attention maths as pure functions: tensors in, tensors out.

Nothing here knows about Hugging Face: the GPT-2 specifics (the fused q/k/v layout, which scale a layer uses,
in which order a given transformers release applies it) live in :mod:`attnlens.models.gpt2`, which hands this module
plain tensors and numbers.

Numerical conventions, shared by every function below:

* Scores of half-precision inputs (float16, bfloat16) are soft-maxed in float32 and the pattern is cast back to the
  value dtype, so a half model's patterns are as accurate as its q and k allow.
* Boolean masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: ``True`` means "may attend".
  Masked positions get exactly zero probability, never a tiny leak.
* A query row with no key it may attend to (a fully masked row, e.g. a left-padding query) gets a pattern of zeros,
  and therefore an output of zeros, never NaN. torch's own kernels differ among themselves on such rows.
* Float masks are added to the scores, as in torch. A row whose float mask is ``-inf`` everywhere is also zeroed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from attnlens._llamalike import expand_kv, gated_mlp, repeat_kv, rms_norm, sliding_window_mask
from attnlens._rotary import apply_rotary, rotary_cos_sin, rotate_half

__all__ = [
    "ACTIVATIONS",
    "AttentionOutputs",
    "AttentionWeights",
    "apply_rotary",
    "attention",
    "attention_pattern",
    "attention_scores",
    "causal_mask",
    "expand_kv",
    "gated_mlp",
    "masked_softmax",
    "merge_heads",
    "padding_mask",
    "qkv",
    "repeat_kv",
    "rms_norm",
    "rotary_cos_sin",
    "rotate_half",
    "scaled_dot_product_attention",
    "sliding_window_mask",
    "split_heads",
]

_HALF = (torch.float16, torch.bfloat16)


def _gelu_new(x: Tensor) -> Tensor:
    # GPT-2's original tanh approximation, written in the order the reference implementation evaluates it.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# Each formula below is written in the order transformers.activations evaluates it, so that a recomputation is
# bitwise the model's own: the tanh approximations differ among themselves in their last bits.


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_python(x: Tensor) -> Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_python_tanh(x: Tensor) -> Tensor:
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_accurate(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _laplace(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0))))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_fast": _gelu_fast,
    "gelu_python": _gelu_python,
    "gelu_python_tanh": _gelu_python_tanh,
    "gelu_accurate": _gelu_accurate,
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "laplace": _laplace,
    "linear": lambda x: x,
}
"""MLP activations by their transformers name (the parameter-free entries of transformers' ``ACT2FN`` on 4.57 and 5.x);
a config naming any other is refused, never approximated."""


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """Split the last axis into heads: ``[..., pos, (head d_head)] -> [..., head, pos, d_head]``."""
    return rearrange(x, "... pos (head d_head) -> ... head pos d_head", head=n_heads)


def merge_heads(x: Tensor) -> Tensor:
    """Inverse of :func:`split_heads`: ``[..., head, pos, d_head] -> [..., pos, (head d_head)]``."""
    return rearrange(x, "... head pos d_head -> ... pos (head d_head)")


def causal_mask(q_len: int, k_len: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Boolean causal mask ``[q_pos, k_pos]``, ``True`` where a query may attend.

    Aligned top-left, as ``is_causal=True`` in torch: query ``i`` sees keys ``0..i``.

    Args:
        q_len: number of query positions.
        k_len: number of key positions (default ``q_len``).
        device: where to build the mask.
    """
    k_len = q_len if k_len is None else k_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask: Tensor, q_len: int | None = None, *, causal: bool = True) -> Tensor:
    """Combine a tokenizer's ``attention_mask`` with causality into a boolean mask ``[batch, 1, q_pos, k_pos]``.

    Args:
        attention_mask: ``[batch, k_pos]``, 1 (or True) for real tokens and 0 for padding.
        q_len: number of query positions (default: ``k_pos``).
        causal: also forbid attending to later positions.

    Returns:
        ``True`` where query ``q_pos`` may attend to key ``k_pos``; broadcasts over heads.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, pos], got shape {tuple(attention_mask.shape)}")
    k_len = attention_mask.shape[-1]
    q_len = k_len if q_len is None else q_len
    keys = rearrange(attention_mask.bool(), "batch k_pos -> batch 1 1 k_pos")
    if not causal:
        return keys.expand(-1, -1, q_len, -1)
    return keys & causal_mask(q_len, k_len, device=attention_mask.device)


def attention_scores(
    query: Tensor,
    key: Tensor,
    scale: float | None = None,
    *,
    upcast: bool = False,
    divisors: Sequence[float] | None = None,
) -> Tensor:
    """Pre-softmax attention scores ``query @ key^T * scale``, ``[..., q_pos, k_pos]``.

    The arithmetic order is selectable so that a recomputation can reproduce a reference implementation bit for bit:

    * default: ``matmul(query, key^T) * scale``;
    * ``divisors``: ``matmul(query, key^T) / d0 / d1 ...`` with each divisor a 0-dim tensor of the scores' dtype
      (``scale`` is then ignored);
    * ``upcast=True``: a float32 batched ``baddbmm`` with ``alpha=scale`` (scale folded into the product, as
      Megatron-style "reordered and upcast" attention does), returning float32 scores.

    Args:
        query: ``[..., q_pos, d_k]``.
        key: ``[..., k_pos, d_k]``.
        scale: factor applied to the scores; default ``1/sqrt(d_k)``.
        upcast: compute in float32 with the scale folded into the matmul.
        divisors: divide by these instead of multiplying by ``scale``.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        *batch, q_len, d_k = query.shape
        k_len = key.shape[-2]
        q = query.reshape(-1, q_len, d_k).float()
        k_t = key.transpose(-1, -2).reshape(-1, d_k, k_len).float()
        empty = torch.empty(q.shape[0], q_len, k_len, dtype=torch.float32, device=query.device)
        # Under autocast, baddbmm would run in half precision: "upcast" must mean float32 there too (as in HF).
        with torch.autocast(query.device.type, enabled=False):
            return torch.baddbmm(empty, q, k_t, beta=0, alpha=scale).reshape(*batch, q_len, k_len)
    exact = 1.0 / math.prod(divisors) if divisors is not None else scale
    if query.dtype in (torch.float32, torch.float64) and _is_power_of_two(exact):
        # Scaling by a power of two commutes with rounding (short of the subnormal range, which then stays within
        # a subnormal of 0 and soft-maxes the same), so scaling q first gives the same bits as scaling the product,
        # and saves a full pass over [q_pos, k_pos]. GPT-2's d_head of 64 makes 1/sqrt(d_head) = 1/8.
        return torch.matmul(query * exact, key.transpose(-1, -2))
    scores = torch.matmul(query, key.transpose(-1, -2))
    if divisors is None:
        return scores * scale
    for divisor in divisors:
        scores = scores / torch.full([], divisor, dtype=scores.dtype, device=scores.device)
    return scores


def _is_power_of_two(x: float) -> bool:
    mantissa, _ = math.frexp(x)
    return x > 0 and mantissa == 0.5


def masked_softmax(scores: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Softmax over keys with a boolean or additive mask; half inputs are soft-maxed in float32.

    Args:
        scores: ``[..., q_pos, k_pos]``.
        attn_mask: broadcastable to ``scores``; boolean (``True`` = may attend) or float (added to the scores).

    Returns:
        The pattern ``[..., q_pos, k_pos]`` in float32 for half-precision scores, else in the scores' dtype.
        Masked entries are exactly 0 and rows with no allowed key are all 0.
    """
    if scores.dtype in _HALF:
        scores = scores.float()
    if attn_mask is None:
        return torch.softmax(scores, dim=-1)
    if attn_mask.dtype == torch.bool:
        allowed = attn_mask
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        allowed = attn_mask != float("-inf")
        scores = scores + attn_mask.to(scores.dtype)
    return _softmax_masked(scores, allowed)


def _softmax_masked(masked: Tensor, allowed: Tensor) -> Tensor:
    """Softmax of scores already ``-inf`` where not ``allowed`` (half in float32); rows with no allowed key are 0."""
    pattern = torch.softmax(masked.float() if masked.dtype in _HALF else masked, dim=-1)
    # Rows without any allowed key are NaN after softmax; test on the (usually broadcast, so small) mask.
    dead = ~allowed.any(dim=-1, keepdim=True)
    if bool(dead.any()):
        pattern = pattern.masked_fill(dead, 0.0)
    return pattern


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_pattern: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention with the names and semantics of torch's function, and its pattern on request.

    ``softmax(query @ key^T * scale + mask) @ value``, with the numerical conventions of this module (float32 softmax
    for half inputs; fully masked rows give zeros, never NaN). Works on any device and any number of leading batch
    dimensions; ``d_v`` may differ from ``d_k``.

    Args:
        query: ``[..., q_pos, d_k]``.
        key: ``[..., k_pos, d_k]``.
        value: ``[..., k_pos, d_v]``.
        attn_mask: broadcastable to ``[..., q_pos, k_pos]``; boolean (``True`` = may attend) or float (added).
        is_causal: causal mask aligned top-left, as in torch; cannot be combined with ``attn_mask``.
        scale: score scale; default ``1/sqrt(d_k)``.
        return_pattern: also return the attention pattern.

    Returns:
        ``output [..., q_pos, d_v]``, or ``(output, pattern [..., q_pos, k_pos])`` with ``return_pattern=True``.
        The pattern has the value dtype.

    Raises:
        ValueError: shapes that do not fit (d_k, k_pos, leading dims, a mask that does not broadcast to the scores),
            naming them; ``attn_mask`` together with ``is_causal``.
        TypeError: a mask neither bool nor float.
    """
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must share d_k, got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must share k_pos, got {key.shape[-2]} and {value.shape[-2]}")
    if is_causal:
        if attn_mask is not None:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in torch)")
        attn_mask = causal_mask(query.shape[-2], key.shape[-2], device=query.device)
    _check_broadcast(query, key, value, attn_mask)
    pattern = masked_softmax(attention_scores(query, key, scale), attn_mask).to(value.dtype)
    output = torch.matmul(pattern, value)
    return (output, pattern) if return_pattern else output


def _check_broadcast(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> None:
    """Refuse leading dims or a mask that do not broadcast to the scores, naming the shapes (torch would not)."""
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch) dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast"
        ) from None
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool (True = may attend) or float (added), got {attn_mask.dtype}")
    scores = (*batch, query.shape[-2], key.shape[-2])
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, scores) == torch.Size(scores)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape {scores} "
            "[..., q_pos, k_pos]"
        )


class AttentionWeights(Protocol):
    """What :func:`qkv` and :func:`attention` read from a layer (``attnlens.LayerWeights`` provides it).

    ``W_Q``, ``W_K``, ``W_V``: ``[head, d_model, d_head]``; ``b_Q``, ``b_K``, ``b_V``: ``[head, d_head]``;
    ``W_O``: ``[head, d_head, d_model]``; ``b_O``: ``[d_model]``; ``scale`` and ``upcast`` as in
    :func:`attention_scores`. Read-only, so frozen dataclasses qualify.
    """

    @property
    def W_Q(self) -> Tensor: ...
    @property
    def W_K(self) -> Tensor: ...
    @property
    def W_V(self) -> Tensor: ...
    @property
    def b_Q(self) -> Tensor: ...
    @property
    def b_K(self) -> Tensor: ...
    @property
    def b_V(self) -> Tensor: ...
    @property
    def W_O(self) -> Tensor: ...
    @property
    def b_O(self) -> Tensor: ...
    @property
    def scale(self) -> float: ...
    @property
    def upcast(self) -> bool: ...


def qkv(x: Tensor, layer: AttentionWeights) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head queries, keys and values of a (normalised) residual stream.

    Args:
        x: ``[batch, pos, d_model]``, the input of the attention module (after the layer norm).
        layer: per-head weights ``W_Q [head, d_model, d_head]``, ``W_K``/``W_V`` ``[kv_head, d_model, d_head]`` and
            biases ``b_* [head or kv_head, d_head]``.

    Returns:
        ``q`` ``[batch, head, pos, d_head]``, ``k, v`` ``[batch, kv_head, pos, d_head]``.
    """
    return _project(x, layer.W_Q, layer.b_Q), _project(x, layer.W_K, layer.b_K), _project(x, layer.W_V, layer.b_V)


def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x @ W[h] + b[h]`` per head: ``[batch, pos, d_model] -> [batch, head, pos, d_head]``."""
    out = einsum(x, W, "batch pos d_model, head d_model d_head -> batch head pos d_head")
    return out + rearrange(b, "head d_head -> head 1 d_head")


@dataclass(frozen=True, eq=False)
class AttentionOutputs:
    """Everything one attention module computes, from its input to its output.

    Attributes:
        q: ``[batch, head, q_pos, d_head]`` (after the q norm and the rotation, where the layer has them).
        k: ``[batch, kv_head, k_pos, d_head]`` (likewise; ``kv_head == head`` without grouped-query attention).
        v: ``[batch, kv_head, k_pos, d_head]``.
        scores: masked pre-softmax scores ``[batch, head, q_pos, k_pos]`` (``-inf`` where masked).
        pattern: ``[batch, head, q_pos, k_pos]``.
        z: pattern-weighted values ``[batch, q_pos, head, d_head]`` (the input of ``W_O``).
        result: per-head contributions ``[batch, q_pos, head, d_model]`` (their sum plus ``b_O`` is ``output``);
            ``None`` unless asked for, as it is ``head`` times the size of the output.
        output: ``[batch, q_pos, d_model]``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    pattern: Tensor
    z: Tensor
    result: Tensor | None
    output: Tensor


def attention(
    x: Tensor,
    layer: AttentionWeights,
    attn_mask: Tensor | None = None,
    *,
    return_result: bool = False,
    rotation: tuple[Tensor, Tensor] | None = None,
) -> AttentionOutputs:
    """One attention module, from its (normalised) input to its output, from per-head weights.

    Args:
        x: ``[batch, pos, d_model]``.
        layer: the layer's weights and attention spec (``scale``, ``upcast``; where it has them ``rotary_dim``,
            per-head ``q_norm`` / ``k_norm`` RMSNorms, a sliding ``window``, and fewer key/value heads than query
            heads, each shared by ``head // kv_head`` query heads).
        attn_mask: boolean ``[batch, 1, q_pos, k_pos]`` (``True`` = may attend); default causal.
        return_result: also compute the per-head contributions ``[batch, pos, head, d_model]``.
        rotation: ``(cos, sin)``, each ``[batch, pos, rotary_dim]`` (or ``[pos, rotary_dim]``), for a layer with a
            rotary embedding (``layer.rotary_dim > 0``): the first ``rotary_dim`` features of each query and key
            head are turned by :func:`apply_rotary` before the scores. Take them from the model (what its attention
            module receives) or from :func:`rotary_cos_sin`.

    Raises:
        ValueError: a rotary layer without ``rotation`` (or a rotation of another width), or a rotation for a
            layer without a rotary embedding.
    """
    q, k = _queries_keys(x, layer, rotation)
    v = _project(x, layer.W_V, layer.b_V)
    scores, pattern = _pattern(q, k, layer, attn_mask)
    pattern = pattern.to(v.dtype)
    group = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `group` query heads
    z = rearrange(torch.matmul(pattern, repeat_kv(v, group)), "batch head pos d_head -> batch pos head d_head")
    output = einsum(z, layer.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + layer.b_O
    result = None
    if return_result:
        result = einsum(z, layer.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
    return AttentionOutputs(q=q, k=k, v=v, scores=scores, pattern=pattern, z=z, result=result, output=output)


def attention_pattern(
    x: Tensor,
    layer: AttentionWeights,
    attn_mask: Tensor | None = None,
    *,
    rotation: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``attention(x, layer, attn_mask, rotation=rotation).pattern`` alone, the same bits: no values, no output.

    Args:
        x: ``[batch, pos, d_model]``.
        layer: as for :func:`attention`.
        attn_mask: as for :func:`attention`.
        rotation: as for :func:`attention`.

    Returns:
        The pattern ``[batch, head, q_pos, k_pos]`` in the dtype of the layer's values.
    """
    q, k = _queries_keys(x, layer, rotation)
    v_dtype = torch.promote_types(torch.promote_types(x.dtype, layer.W_V.dtype), layer.b_V.dtype)
    return _pattern(q, k, layer, attn_mask)[1].to(v_dtype)


def _queries_keys(x: Tensor, layer: AttentionWeights, rotation: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The queries ``[batch, head, pos, d_head]`` and keys ``[batch, kv_head, pos, d_head]``, normed and rotated."""
    q, k = _project(x, layer.W_Q, layer.b_Q), _project(x, layer.W_K, layer.b_K)
    for norm, name in ((getattr(layer, "q_norm", None), "q"), (getattr(layer, "k_norm", None), "k")):
        if norm is not None:  # a per-head RMSNorm on d_head before the rotation (Qwen3's q_norm / k_norm)
            normed = rms_norm(q if name == "q" else k, norm.w, norm.eps)
            q, k = (normed, k) if name == "q" else (q, normed)
    rotary_dim = int(getattr(layer, "rotary_dim", 0))
    if rotation is not None or rotary_dim:
        if rotation is None or not rotary_dim:
            raise ValueError(
                f"this layer has rotary_dim={rotary_dim}: pass rotation=(cos, sin) exactly when it is positive "
                "(the rotation the model's attention module receives, or attnlens.functional.rotary_cos_sin)"
            )
        cos, sin = rotation
        # apply_rotary takes [batch, pos, head, d_head]; the rotation is elementwise, so the axis order is free.
        q, k = (apply_rotary(t.transpose(1, 2), cos, sin, rotary_dim=rotary_dim).transpose(1, 2) for t in (q, k))
    return q, k


def _pattern(q: Tensor, k: Tensor, layer: AttentionWeights, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The masked scores (``-inf`` where masked) and the pattern (float32 for half q/k) of one layer."""
    if attn_mask is None:
        attn_mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    window = getattr(layer, "window", None)
    if window is not None:  # never full causal: the keys that left the window are blocked too
        attn_mask = attn_mask & sliding_window_mask(q.shape[-2], k.shape[-2], window=window, device=q.device)
    group = q.shape[1] // k.shape[1]
    scores = attention_scores(q, repeat_kv(k, group), layer.scale, upcast=layer.upcast)
    # attention_scores returns a new tensor: masked in place, it is both the scores handed out and the softmax's input.
    scores.masked_fill_(~attn_mask, float("-inf"))
    return scores, _softmax_masked(scores, attn_mask)
