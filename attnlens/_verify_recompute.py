"""verify's recomputation from the weights alone: pure functions of tensors and :class:`~attnlens.ModelWeights`.

Per layer the attention quantities come from :func:`attnlens.functional.attention` (and
:func:`~attnlens.functional.attention_pattern` for a pattern alone); here are the two other recomputations: the
pattern from the model's own q and k in the installed transformers' eager arithmetic (:func:`hf_order_pattern`, of
:func:`hf_order_scores`), and the whole forward pass from the weights (:func:`rebuild`), whose attention needs only
each layer's output (:func:`attention_output`: torch's fused kernel, which never forms the ``[q_pos, k_pos]`` square).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from attnlens import functional
from attnlens.functional import _project, _queries_keys  # the q/k (norms, rotation) and v steps of attention()
from attnlens.models import QKV, AttentionSpec
from attnlens.patterns import masked_scores
from attnlens.weights import LayerNormWeights, LayerWeights, ModelWeights

__all__ = ["attention_output", "hf_order_pattern", "hf_order_scores", "is_causal", "layer_norm", "mlp", "rebuild"]


def layer_norm(x: Tensor, ln: LayerNormWeights) -> Tensor:
    """A LayerNorm (or RMSNorm) of ``x [..., d_model]`` with its weights."""
    if ln.rms:
        return functional.rms_norm(x, ln.w, ln.eps)
    return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)


def mlp(x: Tensor, layer: LayerWeights) -> Tensor:
    """A layer's MLP on ``x [..., d_model]``: plain, or gated (Llama's) where the weights have a gate."""
    weights = layer.mlp
    act = functional.ACTIVATIONS[weights.act]
    if weights.W_gate is None:
        return act(x @ weights.W_in + weights.b_in) @ weights.W_out + weights.b_out
    gate = x @ weights.W_gate if weights.b_gate is None else x @ weights.W_gate + weights.b_gate
    return (act(gate) * (x @ weights.W_in + weights.b_in)) @ weights.W_out + weights.b_out


def rebuild(
    weights: ModelWeights,
    ids: Tensor,
    pos: Tensor,
    allowed: Tensor,
    *,
    parallel_residual: bool = False,
    rotations: Mapping[int, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The whole forward pass from the weights alone: final hidden state ``[batch, pos, d_model]`` and logits.

    With ``parallel_residual`` (see :attr:`attnlens.models.Adapter.parallel_residual`) each block's attention and
    MLP read the same residual stream, and both outputs are added to it. A model without a position embedding
    (``W_pos`` None) takes its positions from ``rotations``: each rotary layer's ``(cos, sin)`` as the model's
    attention module received it (a function of the positions alone, captured rather than recomputed so that the
    rebuild rotates exactly as the model did).

    Args:
        weights: the weights to rebuild from.
        ids: ``[batch, pos]`` token ids.
        pos: ``[batch or 1, pos]`` the positions the model used.
        allowed: boolean ``[batch or 1, 1, q_pos, k_pos]`` (``True`` = may attend).
        parallel_residual: the block's layout, as above.
        rotations: ``{layer: (cos, sin)}`` for the rotary layers.

    Returns:
        ``(hidden, logits)``: ``[batch, pos, d_model]`` after the final norm, and ``[batch, pos, d_vocab]`` (None
        without an unembedding).
    """
    residual = weights.W_E[ids] if weights.W_pos is None else weights.W_E[ids] + weights.W_pos[pos]
    rotations = rotations or {}
    causal = is_causal(allowed, ids.shape[1])  # the same mask in every layer: compared with the square once
    for layer in weights.layers:
        rotation = rotations.get(layer.layer) if layer.rotary_dim else None
        attn_out = attention_output(layer_norm(residual, layer.ln_1), layer, allowed, rotation=rotation, causal=causal)
        if parallel_residual:
            residual = residual + attn_out + mlp(layer_norm(residual, layer.ln_2), layer)
        else:
            residual = residual + attn_out
            residual = residual + mlp(layer_norm(residual, layer.ln_2), layer)
    hidden = layer_norm(residual, weights.ln_f)
    if weights.W_U is None:
        return hidden, None
    logits = hidden @ weights.W_U
    return hidden, logits if weights.b_U is None else logits + weights.b_U


def is_causal(allowed: Tensor, n_pos: int) -> bool:
    """Whether ``allowed`` is the plain ``[pos, pos]`` causal mask of ``n_pos`` positions (no batch axis or padding)."""
    return allowed.ndim == 2 and torch.equal(allowed, functional.causal_mask(n_pos, device=allowed.device))


def attention_output(
    x: Tensor,
    layer: LayerWeights,
    allowed: Tensor,
    *,
    rotation: tuple[Tensor, Tensor] | None = None,
    causal: bool | None = None,
) -> Tensor:
    """``functional.attention(x, layer, allowed, rotation=rotation).output`` through torch's fused attention kernel.

    The same q, k (norms, rotation), v and output projection; softmax(scale q k^T) v in one fused call (the causal
    flash kernel where ``allowed`` is the plain causal mask and the layer has no window), which never forms the
    square. A query row with no allowed key gives zeros, as in :mod:`attnlens.functional`. A different order of the
    same sums: equal to :func:`~attnlens.functional.attention`'s output up to rounding, never bit for bit; the
    ``hidden`` and ``logits`` rows it feeds have a tolerance over the whole network (``attnlens.tolerances``).

    Args:
        x: ``[batch, pos, d_model]``, the layer's normalised input.
        layer: the layer's weights.
        allowed: boolean ``[batch or 1, 1, q_pos, k_pos]`` or ``[q_pos, k_pos]`` (``True`` = may attend).
        rotation: ``(cos, sin)`` for a rotary layer, as for :func:`~attnlens.functional.attention`.
        causal: :func:`is_causal` of ``allowed`` and ``x``'s positions, where the caller knows it (None: found out
            here, by comparing the square with a causal mask).

    Returns:
        ``[batch, pos, d_model]``.
    """
    q, k = _queries_keys(x, layer, rotation)
    v = _project(x, layer.W_V, layer.b_V)
    group = q.shape[1] // k.shape[1]
    k, v = functional.repeat_kv(k, group), functional.repeat_kv(v, group)
    if layer.window is not None:
        allowed = allowed & functional.sliding_window_mask(
            q.shape[-2], k.shape[-2], window=layer.window, device=q.device
        )
    if layer.window is None and (is_causal(allowed, q.shape[-2]) if causal is None else causal):
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scale)
    else:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.scale)
        # torch's kernels differ on rows with no key to attend to (zeros, NaN); attnlens's are zeros.
        z = z.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    # One matrix product over (head d_head), the merged heads as the model's output projection reads them.
    merged = rearrange(z, "batch head pos d_head -> batch pos (head d_head)")
    return merged @ rearrange(layer.W_O, "head d_head d_model -> (head d_head) d_model") + layer.b_O


def hf_order_scores(qkv: QKV, layer: LayerWeights, n_kv_heads: int, allowed: Tensor) -> Tensor:
    """The scores from the model's own q and k, in the arithmetic order of the installed transformers' eager kernel.

    The pattern tap's (:func:`attnlens.patterns.masked_scores`), with the layer's spec as the weights carry it: HF
    eager scales the scores in its own order (``layer.score_divisors`` / ``layer.upcast``) and masks with the dtype's
    most negative value, where ``-inf`` is used here: that gives the same row maximum and sums, so the allowed entries
    of :func:`hf_order_pattern` match bit for bit.

    Args:
        qkv: the model's own q ``[batch, head, pos, d_head]``, k and v ``[batch, kv_head, pos, d_head]``.
        layer: the layer's weights (for its spec).
        n_kv_heads: the model's number of key/value heads.
        allowed: boolean ``[batch or 1, 1, q_pos, k_pos]``.

    Returns:
        ``[batch, head, q_pos, k_pos]``, ``-inf`` where blocked (by ``allowed`` or the layer's window).
    """
    q, k, _ = qkv
    spec = AttentionSpec(
        layer.scale, q.shape[1], n_kv_heads, upcast=layer.upcast, divisors=layer.score_divisors, window=layer.window
    )
    blocked = ~allowed
    if layer.window is not None:
        n_pos = q.shape[-2]
        blocked = blocked | ~functional.sliding_window_mask(n_pos, window=layer.window, device=q.device)
    # Eager repeats each key/value head per query head (a copy, as transformers' repeat_kv) before its matmul.
    k = functional.repeat_kv(k, q.shape[1] // n_kv_heads)
    return masked_scores(q, k, spec, blocked, contiguous_k=False)


def hf_order_pattern(
    qkv: QKV, layer: LayerWeights, n_kv_heads: int, allowed: Tensor, softmax_dtype: torch.dtype | None = None
) -> Tensor:
    """The pattern from the model's own q and k, in the arithmetic order of the installed transformers' eager kernel.

    :func:`hf_order_scores`, soft-maxed in the kernel's ``softmax_dtype`` (float32 for GPT-NeoX and the Llama family,
    also for a float64 model), else in their own dtype (half scores stay half, unlike
    :func:`attnlens.functional.masked_softmax` and the tap).

    Args:
        qkv: the model's own q ``[batch, head, pos, d_head]``, k and v ``[batch, kv_head, pos, d_head]``.
        layer: the layer's weights (for its spec).
        n_kv_heads: the model's number of key/value heads.
        allowed: boolean ``[batch or 1, 1, q_pos, k_pos]``.
        softmax_dtype: the dtype the layer's eager kernel soft-maxes in (its ``AttentionSpec.softmax_dtype``).

    Returns:
        ``[batch, head, q_pos, k_pos]`` in the values' dtype.
    """
    scores = hf_order_scores(qkv, layer, n_kv_heads, allowed)
    return torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(qkv[2].dtype)
