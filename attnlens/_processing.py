"""Processed weights (:meth:`attnlens.ModelWeights.processed`): TransformerLens's weight processing, step by step.

Each step is an exact identity of the forward pass (in exact arithmetic) and runs in TransformerLens's order:
fold the layer norms (centring the reading weights, or not), centre the writing weights, centre the unembedding,
fold the value biases into ``b_O``, refactor the QK and OV factors. The maths runs in float32 at least and the
results are cast back to the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlens.errors import PositionDependentCircuitError
from attnlens.factored import FactoredMatrix
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights, _centre, copy_ln


@dataclass(frozen=True)
class Processing:
    """The options of :meth:`attnlens.ModelWeights.processed`, by TransformerLens's names."""

    fold_ln: bool = True
    center_reading_weights: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False


def fold_value_biases(b_V: Tensor, W_O: Tensor, b_O: Tensor) -> tuple[Tensor, Tensor]:
    """``(0, b_O + sum_h b_V[h] @ W_O[h])``: a pattern row sums to 1, so ``b_V`` adds a constant to the output.

    Args:
        b_V: ``[kv_head, d_head]`` (``kv_head`` divides ``head``: each query head reads its group's values).
        W_O: ``[head, d_head, d_model]``.
        b_O: ``[d_model]``.
    """
    per_head = b_V.repeat_interleave(W_O.shape[0] // b_V.shape[0], dim=0)
    return torch.zeros_like(b_V), b_O + torch.einsum("hd,hdm->m", per_head, W_O)


def refactor_qk(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The balanced factors of ``[W_Q; b_Q] @ [W_K; b_K]^T`` per head: the same bilinear form of ``[x, 1]``.

    Args:
        W_Q: ``[head, d_model, d_head]``.
        b_Q: ``[head, d_head]``.
        W_K: ``[head, d_model, d_head]``.
        b_K: ``[head, d_head]``.

    Returns:
        ``W_Q, b_Q, W_K, b_K`` of the same shapes, ``[W_Q; b_Q] = U sqrt(S)`` and ``[W_K; b_K] = Vh^T sqrt(S)``.
    """
    # A d_model + 1 input whose last coordinate is 1 carries the biases: q.k = [x, 1] Q_eff K_eff^T [y, 1]^T.
    Q_eff = torch.cat([W_Q, b_Q[:, None, :]], dim=1)
    K_eff = torch.cat([W_K, b_K[:, None, :]], dim=1)
    Q_even, K_even_T = FactoredMatrix(Q_eff, K_eff.transpose(-1, -2)).make_even().pair
    K_even = K_even_T.transpose(-1, -2)
    return Q_even[:, :-1], Q_even[:, -1], K_even[:, :-1], K_even[:, -1]


def refactor_ov(W_V: Tensor, W_O: Tensor) -> tuple[Tensor, Tensor]:
    """``W_V @ W_O`` per head as ``(U @ diag(S), Vh)``: ``W_O`` gets orthonormal rows, ``z`` the norm of the output."""
    U, S, Vh = FactoredMatrix(W_V, W_O).svd()
    return U * S[..., None, :], Vh


def process(weights: ModelWeights, options: Processing) -> ModelWeights:
    """See :meth:`ModelWeights.processed` (runs under ``no_grad``)."""
    norms = [weights.ln_f, *(ln for layer in weights.layers for ln in (layer.ln_1, layer.ln_2))]
    if any(ln.rms for ln in norms) or any(
        layer.mlp.W_gate is not None or layer.q_norm is not None for layer in weights.layers
    ):
        raise ValueError(
            "processed() folds and centres layer norms and plain MLPs; these weights have RMSNorms (which do not "
            "remove the mean, so centring would change the model), a gated MLP or per-head q/k norms. Use the "
            "weights as extracted"
        )
    dtype = weights.dtype
    work = torch.promote_types(dtype, torch.float32)

    def up(x: Tensor) -> Tensor:
        return x.detach().to(work)

    def down(x: Tensor) -> Tensor:
        return x.to(dtype).clone()

    def identity(ln: LayerNormWeights) -> LayerNormWeights:
        return LayerNormWeights(w=torch.ones_like(ln.w), b=torch.zeros_like(ln.b), eps=ln.eps)

    def write(x: Tensor) -> Tensor:  # a weight that writes to the residual stream: d_model is its last axis
        return _centre(x) if options.center_writing_weights else x

    def read(W: Tensor, dim: int) -> Tensor:  # W's mean row over d_model meets a normalised input, of mean 0
        return _centre(W, dim=dim) if options.center_reading_weights else W

    layers = []
    for layer in weights.layers:
        attn = {}
        for name in ("Q", "K", "V"):
            W, b = up(getattr(layer, f"W_{name}")), up(getattr(layer, f"b_{name}"))
            if options.fold_ln:
                # x_norm * w + b read by W: x_norm @ (w[:, None] * W) + b @ W.
                b = b + torch.einsum("m,hmd->hd", up(layer.ln_1.b), W)
                W = read(up(layer.ln_1.w)[None, :, None] * W, dim=-2)
            attn[f"W_{name}"], attn[f"b_{name}"] = W, b
        attn["W_O"], attn["b_O"] = write(up(layer.W_O)), write(up(layer.b_O))
        if options.fold_value_biases or options.refactor_factored_attn_matrices:
            # After centring, as TransformerLens: sum_h b_V[h] @ W_O[h] of centred W_O rows is itself centred.
            attn["b_V"], attn["b_O"] = fold_value_biases(attn["b_V"], attn["W_O"], attn["b_O"])
        if options.refactor_factored_attn_matrices:
            if layer.rotary_dim:
                raise PositionDependentCircuitError(
                    f"refactor_factored_attn_matrices would mix layer {layer.layer}'s query and key features, which "
                    "a rotary embedding turns by position after W_Q and W_K: the refactored weights would score "
                    "differently. Process without it (the OV refactoring alone is not offered either)"
                )
            if attn["W_V"].shape[0] != attn["W_O"].shape[0]:
                raise ValueError(
                    "refactor_factored_attn_matrices needs one W_V per head; this model shares keys and values "
                    "between query heads (grouped-query attention): process without it"
                )
            attn["W_Q"], attn["b_Q"], attn["W_K"], attn["b_K"] = refactor_qk(
                attn["W_Q"], attn["b_Q"], attn["W_K"], attn["b_K"]
            )
            attn["W_V"], attn["W_O"] = refactor_ov(attn["W_V"], attn["W_O"])
        mlp = layer.mlp
        W_in, b_in = up(mlp.W_in), up(mlp.b_in)
        if options.fold_ln:
            b_in = b_in + up(layer.ln_2.b) @ W_in
            W_in = read(up(layer.ln_2.w)[:, None] * W_in, dim=-2)
        layers.append(
            LayerWeights(
                layer=layer.layer,
                **dict[str, Any]({name: down(value) for name, value in attn.items()}),
                ln_1=identity(layer.ln_1) if options.fold_ln else copy_ln(layer.ln_1),
                ln_2=identity(layer.ln_2) if options.fold_ln else copy_ln(layer.ln_2),
                mlp=MLPWeights(
                    W_in=down(W_in),
                    b_in=down(b_in),
                    W_out=down(write(up(mlp.W_out))),
                    b_out=down(write(up(mlp.b_out))),
                    act=mlp.act,
                ),
                scale=layer.scale,
                upcast=layer.upcast,
                score_divisors=layer.score_divisors,
                rotary_dim=layer.rotary_dim,
            )
        )
    W_U = None if weights.W_U is None else up(weights.W_U)
    b_U = None if weights.b_U is None else up(weights.b_U)
    final_norm = copy_ln(weights.ln_f)
    if W_U is not None:
        if options.fold_ln:
            folded = up(weights.ln_f.b) @ W_U
            b_U = folded if b_U is None else b_U + folded
            W_U = read(up(weights.ln_f.w)[:, None] * W_U, dim=-2)
            final_norm = identity(weights.ln_f)
        if options.center_unembed:
            W_U = _centre(W_U)
            b_U = None if b_U is None else _centre(b_U)
    # Positional, in field order (the final norm's field name is reserved for the dataclass itself).
    return ModelWeights(
        weights.n_layers,
        weights.n_heads,
        weights.d_model,
        weights.d_head,
        weights.d_mlp,
        weights.d_vocab,
        weights.n_ctx,
        down(write(up(weights.W_E))),
        None if weights.W_pos is None else down(write(up(weights.W_pos))),
        None if W_U is None else down(W_U),
        final_norm,
        tuple(layers),
        weights.name,
        None if b_U is None else down(b_U),
    )
