"""Weights of a GPT-2-style model, split per head, and their low-rank QK and OV circuits.

``ModelWeights`` and ``LayerWeights`` are frozen dataclasses of tensors named and shaped as in TransformerLens:
``x @ W_Q[h] + b_Q[h]`` is head ``h``'s query for a row vector ``x``.

Never stale. Weights returned by :func:`attnlens.extract_weights` are views of the model's own parameters (nothing
copied) and every access returns the model's current values, whatever happened to the model since:

- In-place edits (``param.mul_`` under ``no_grad``, ``param.data[...] = ...``, ``load_state_dict``) write into the
  storage the views share, so they show at once.
- Conversions and replacements (``model.half()``, ``model.to(device)``, ``param.data = new_tensor``,
  ``load_state_dict(..., assign=True)``, ``param.requires_grad_()``) give a parameter new storage, a new object or a
  new autograd state, which a view taken before cannot follow. Each tracked tensor therefore remembers the parameter
  it was read from, which module slots hold that parameter, its ``data_ptr()`` and the view's layout; every access
  compares them (about a microsecond) and, on a change, takes the view again from the current parameter. A
  parameter whose shape or strides changed, or that modules which shared it no longer share, raises
  :class:`~attnlens.errors.StaleWeightsError` instead (extract again).
- Views are always taken with autograd enabled, so a weight's ``requires_grad`` is its parameter's and gradients
  reach the parameter, also when extraction ran under ``torch.no_grad()``.

Torch's version counters cannot do this job: an edit through ``param.data`` does not bump the parameter's
``_version``. So nothing built from several parameters is cached: the stacked forms (``ModelWeights.W_Q`` as
``[layer, head, d_model, d_head]``, a copy) are stacked at each access, like TransformerLens's, and ``QK`` / ``OV``
return a new :class:`FactoredMatrix` each time, which itself computes its decompositions from the current factors.
Keep a stack in a variable when you use it in a loop; per-layer views (``w.layers[i].W_Q``) cost nothing.

Copies are values, not views: :meth:`ModelWeights.processed`, ``copy.deepcopy`` and ``dataclasses.replace`` give
weights that do not follow the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnlens._live import _describe, _Live, _Source
from attnlens.errors import PositionDependentCircuitError
from attnlens.factored import FactoredMatrix

__all__ = ["FactoredMatrix", "LayerNormWeights", "LayerWeights", "MLPWeights", "ModelWeights"]


@dataclass(frozen=True, eq=False, repr=False)
class LayerNormWeights(_Live):
    """A layer norm ``(x - mean) / sqrt(var + eps) * w + b``; with ``rms``, RMSNorm ``x / sqrt(mean(x^2) + eps) * w``.

    Attributes:
        w: ``[d_model]`` (``[d_head]`` for a per-head q/k norm).
        b: ``[d_model]`` (zeros for an RMSNorm, which has no shift).
        eps: the epsilon in the denominator.
        rms: no centring and no shift (:func:`attnlens.functional.rms_norm`).
    """

    w: Tensor
    b: Tensor
    eps: float
    rms: bool = False
    _sources: dict[str, _Source] = field(default_factory=dict, init=False, compare=False, repr=False)

    __repr__ = _describe


@dataclass(frozen=True, eq=False, repr=False)
class MLPWeights(_Live):
    """A transformer MLP: ``act(x @ W_in + b_in) @ W_out + b_out``, or gated (``W_gate`` set).

    A gated (SwiGLU) MLP computes ``(act(x @ W_gate + b_gate) * (x @ W_in + b_in)) @ W_out + b_out``.

    Attributes:
        W_in: ``[d_model, d_mlp]`` (a gated MLP's up projection).
        b_in: ``[d_mlp]``.
        W_out: ``[d_mlp, d_model]``.
        b_out: ``[d_model]``.
        act: the activation's name, a key of :data:`attnlens.functional.ACTIVATIONS`.
        W_gate: ``[d_model, d_mlp]``, the gate of a gated (SwiGLU) MLP, or None.
        b_gate: ``[d_mlp]`` or None.
    """

    W_in: Tensor
    b_in: Tensor
    W_out: Tensor
    b_out: Tensor
    act: str
    W_gate: Tensor | None = None
    b_gate: Tensor | None = None
    _sources: dict[str, _Source] = field(default_factory=dict, init=False, compare=False, repr=False)

    __repr__ = _describe


@dataclass(frozen=True, eq=False, repr=False)
class LayerWeights(_Live):
    """One transformer block's weights: attention split per head, its layer norms and its MLP.

    Attributes:
        layer: index of the block.
        W_Q: ``[head, d_model, d_head]``.
        W_K: ``[kv_head, d_model, d_head]`` (``kv_head == head`` without grouped-query attention; see
            :meth:`grouped` for the per-query-head view).
        W_V: ``[kv_head, d_model, d_head]``.
        b_Q: ``[head, d_head]``.
        b_K: ``[kv_head, d_head]``.
        b_V: ``[kv_head, d_head]``.
        W_O: ``[head, d_head, d_model]``.
        b_O: ``[d_model]``.
        ln_1: the layer norm before attention.
        ln_2: the layer norm before the MLP.
        mlp: the MLP.
        scale: the factor applied to ``q @ k^T``: ``1/sqrt(d_head)`` (1 without ``scale_attn_weights``), divided by
            ``layer + 1`` under ``scale_attn_by_inverse_layer_idx``.
        upcast: scores are computed and soft-maxed in float32 with the scale folded into the product
            (``reorder_and_upcast_attn``).
        score_divisors: how the model's transformers release applies ``scale`` in its eager kernel: ``None`` when it
            multiplies by ``scale``, else the numbers it divides by in turn. Used only to reproduce the model's
            scores bit for bit; mathematically the same as ``scale``.
        rotary_dim: how many leading features of each query and key head a rotary embedding turns by position
            before the scores (0: none). ``W_Q``/``W_K`` are then the projections *before* the rotation: the scores
            read ``rotate(x W_Q + b_Q) . rotate(x W_K + b_K)``, with the rotation of each position, which the
            weights do not hold (:func:`attnlens.functional.attention` takes it as ``rotation``), and :attr:`QK`
            raises :class:`~attnlens.PositionDependentCircuitError`.
        q_norm: a per-head norm on each query head (``[d_head]``) before the rotation (Qwen3), or None.
        k_norm: the same on each key head, or None.
        window: a sliding window (each query sees at most this many keys, itself included), or None.
    """

    layer: int
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor
    b_K: Tensor
    b_V: Tensor
    W_O: Tensor
    b_O: Tensor
    ln_1: LayerNormWeights
    ln_2: LayerNormWeights
    mlp: MLPWeights
    scale: float
    upcast: bool = False
    score_divisors: tuple[float, ...] | None = None
    rotary_dim: int = 0
    q_norm: LayerNormWeights | None = None
    k_norm: LayerNormWeights | None = None
    window: int | None = None
    _sources: dict[str, _Source] = field(default_factory=dict, init=False, compare=False, repr=False)

    __repr__ = _describe

    @property
    def n_heads(self) -> int:
        """Number of (query) heads."""
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        """Number of key/value heads; query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``."""
        return self.W_K.shape[0]

    def grouped(self, name: str) -> Tensor:
        """``W_K``, ``W_V``, ``b_K`` or ``b_V`` per query head, as a zero-copy view ``[kv_head, group, ...]``.

        ``grouped("W_K")[kv_head, g]`` is query head ``kv_head * group + g``'s key weight (``group = n_heads //
        n_kv_heads``); ``.flatten(0, 1)`` gives ``[head, ...]`` (a copy when ``group > 1``).
        """
        from attnlens._llamalike import expand_kv

        if name not in ("W_K", "W_V", "b_K", "b_V"):
            raise KeyError(f"no grouped weight {name!r}; choose from W_K, W_V, b_K, b_V")
        return expand_kv(getattr(self, name), self.n_heads // self.n_kv_heads, dim=0)

    @property
    def d_head(self) -> int:
        """Dimension of each head's queries, keys and values."""
        return self.W_Q.shape[-1]

    @property
    def QK(self) -> FactoredMatrix:
        """QK circuit ``W_Q @ W_K^T`` ``[head, d_model, d_model]`` (unscaled: scores are ``x_q QK x_k^T * scale``).

        Raises:
            PositionDependentCircuitError: the layer rotates q and k by position (``rotary_dim > 0``), so no
                position-free bilinear form gives its scores.
        """
        _refuse_rotary_qk((self,))
        return FactoredMatrix(self.W_Q, self.grouped("W_K").flatten(0, 1).transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """OV circuit ``W_V @ W_O`` ``[head, d_model, d_model]``, per query head (each with its group's ``W_V``)."""
        return FactoredMatrix(self.grouped("W_V").flatten(0, 1), self.W_O)


_STACKED = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O")


@dataclass(frozen=True, eq=False, repr=False)
class ModelWeights(_Live):
    """All weights of a GPT-2-style model, by TransformerLens names.

    Attributes:
        n_layers: number of blocks.
        n_heads: heads per block.
        d_model: width of the residual stream.
        d_head: width of each head.
        d_mlp: width of the MLP's hidden layer.
        d_vocab: vocabulary size.
        n_ctx: maximum number of positions.
        W_E: token embedding ``[d_vocab, d_model]``.
        W_pos: learned position embedding ``[n_ctx, d_model]``, added to the token embedding; ``None`` for a model
            without one, whose positions enter as a rotation of q and k instead (see ``LayerWeights.rotary_dim``).
        W_U: unembedding ``[d_model, d_vocab]``, or ``None`` for a model without a language-model head.
        ln_f: the final layer norm.
        layers: one :class:`LayerWeights` per block.
        name: where the weights came from (the model's ``name_or_path``), for provenance.
        b_U: unembedding bias ``[d_vocab]``: ``None`` for a model's own weights (GPT-2 has none); set by
            :meth:`processed` when ``fold_ln`` folds the final layer norm's bias into the unembedding.
        n_kv_heads: key/value heads per block under grouped-query attention (each serves ``n_heads // n_kv_heads``
            query heads, ``W_K``/``W_V`` per layer ``[kv_head, d_model, d_head]``); None: ``n_heads``.
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    W_E: Tensor
    W_pos: Tensor | None
    W_U: Tensor | None
    ln_f: LayerNormWeights
    layers: tuple[LayerWeights, ...]
    name: str = ""
    b_U: Tensor | None = None
    n_kv_heads: int | None = None
    _sources: dict[str, _Source] = field(default_factory=dict, init=False, compare=False, repr=False)

    __repr__ = _describe

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        """The device the weights are on."""
        return self.W_E.device

    def stacked(self, name: str) -> Tensor:
        """One per-layer weight stacked over layers, e.g. ``stacked("W_Q")`` is ``[layer, head, d_model, d_head]``.

        A copy, stacked from the current parameters at each call (see the module docstring for why it is not kept).
        """
        if name not in _STACKED:
            raise KeyError(f"no stacked weight {name!r}; choose from {', '.join(_STACKED)}")
        return torch.stack([getattr(layer, name) for layer in self.layers])

    @property
    def W_Q(self) -> Tensor:
        """``[layer, head, d_model, d_head]``."""
        return self.stacked("W_Q")

    @property
    def W_K(self) -> Tensor:
        """``[layer, kv_head, d_model, d_head]`` (``kv_head == head`` without grouped-query attention)."""
        return self.stacked("W_K")

    @property
    def W_V(self) -> Tensor:
        """``[layer, kv_head, d_model, d_head]`` (``kv_head == head`` without grouped-query attention)."""
        return self.stacked("W_V")

    @property
    def W_O(self) -> Tensor:
        """``[layer, head, d_head, d_model]``."""
        return self.stacked("W_O")

    @property
    def b_Q(self) -> Tensor:
        """``[layer, head, d_head]``."""
        return self.stacked("b_Q")

    @property
    def b_K(self) -> Tensor:
        """``[layer, kv_head, d_head]``."""
        return self.stacked("b_K")

    @property
    def b_V(self) -> Tensor:
        """``[layer, kv_head, d_head]``."""
        return self.stacked("b_V")

    @property
    def b_O(self) -> Tensor:
        """``[layer, d_model]``."""
        return self.stacked("b_O")

    def processed(
        self,
        *,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        center_reading_weights: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> ModelWeights:
        """A processed copy, as TransformerLens's default loader makes it; these weights stay as they are.

        The options carry TransformerLens's names and defaults, and run in its order:

        - ``fold_ln``: each layer norm's scale ``w`` and shift ``b`` move into the weights that read its output
          (``ln_1`` into ``W_Q/W_K/W_V`` and ``b_Q/b_K/b_V``, ``ln_2`` into the MLP's ``W_in/b_in``, the final norm into
          ``W_U`` and a new ``b_U = b @ W_U``). The layer norms become ``w = 1``, ``b = 0``. Without an unembedding,
          the final norm stays as it is.
        - ``center_reading_weights`` (with ``fold_ln``; TransformerLens's ``fold_layer_norm(center_weights=...)``):
          the reading weights are also centred over ``d_model``. The normalised input has mean 0, so their mean row
          is never used; ``False`` folds without centring (what TransformerLens does for RMS norms).
        - ``center_writing_weights``: ``W_E``, ``W_pos`` (where there is one), ``W_O``, ``b_O``, the MLP's ``W_out``
          and ``b_out`` have their mean over ``d_model`` removed. Every reader of the residual stream is a layer
          norm, which removes that mean first, so nothing downstream changes; the residual stream itself becomes its
          centred version.
        - ``center_unembed``: ``W_U`` (and ``b_U``) have their mean over ``d_vocab`` removed, so the logits become
          ``logits - logits.mean(-1, keepdim=True)``: a constant per position, the same probabilities.
        - ``fold_value_biases``: ``b_V`` becomes 0 and ``b_O`` holds ``b_O + sum_h b_V[h] @ W_O[h]`` (a pattern row
          sums to 1, so each head's value bias adds the constant ``b_V[h] @ W_O[h]`` to the layer's output). Each
          head's output ``z @ W_O`` then lacks that constant, which ``b_O`` carries: per-head attributions and
          ablations of ``z`` differ from those on unfolded weights by exactly ``b_V[h] @ W_O[h]``.
        - ``refactor_factored_attn_matrices`` (off by default, as in TransformerLens): each head's ``W_Q, b_Q, W_K,
          b_K`` are replaced by the balanced factors of the bias-augmented ``[W_Q; b_Q] @ [W_K; b_K]^T`` (its SVD
          ``U S Vh`` as ``U sqrt(S)`` and ``sqrt(S) Vh``), and ``W_V, W_O`` by ``U S`` and ``Vh`` of ``W_V @ W_O``
          (so ``W_O`` has orthonormal rows), with the value biases folded as above. Scores, patterns and head
          outputs keep their values; q, k, v and z change. Singular vectors are defined up to sign, so the factors
          equal TransformerLens's up to the sign of each column.

        Nothing else changes: the hidden state after the final layer norm and (up to the ``center_unembed`` shift)
        the logits are the model's, within float rounding. Attention patterns keep their values, and without
        ``fold_value_biases`` and the refactoring, so do ``z`` and head outputs; ``q``, ``k``, ``v`` keep theirs
        without the refactoring (the folding moves the layer norm's affine map into them).

        Returns:
            New :class:`ModelWeights` of detached copies (same dtype and device; the maths runs in float32 at least),
            computed now: a snapshot that does not follow later changes of the model (call ``processed`` again).
            ``QK`` / ``OV`` and everything that takes weights accept it like the model's own.
        """
        from attnlens._processing import Processing, process

        options = Processing(
            fold_ln=fold_ln,
            center_reading_weights=center_reading_weights,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        with torch.no_grad():
            return process(self, options)

    @property
    def rotary(self) -> bool:
        """Whether any layer rotates its queries and keys by position (a rotary embedding; then ``W_pos`` is None)."""
        return any(layer.rotary_dim for layer in self.layers)

    @property
    def QK(self) -> FactoredMatrix:
        """Stacked QK circuits ``[layer, head, d_model, d_model]`` (low-rank: inner dimension ``d_head``).

        Raises:
            PositionDependentCircuitError: a layer rotates q and k by position (see :attr:`LayerWeights.QK`).
        """
        _refuse_rotary_qk(self.layers)
        W_K = torch.stack([layer.grouped("W_K").flatten(0, 1) for layer in self.layers])
        return FactoredMatrix(self.W_Q, W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """Stacked OV circuits ``[layer, head, d_model, d_model]`` (low-rank: inner dimension ``d_head``).

        Per query head: under grouped-query attention each query head's ``W_V`` is its key/value head's (repeated).
        """
        W_V = torch.stack([layer.grouped("W_V").flatten(0, 1) for layer in self.layers])
        return FactoredMatrix(W_V, self.W_O)


def _refuse_rotary_qk(layers: tuple[LayerWeights, ...]) -> None:
    rotary = [layer.layer for layer in layers if layer.rotary_dim]
    if rotary:
        raise PositionDependentCircuitError(
            f"layers {rotary} rotate their queries and keys by position (a rotary embedding): a score there reads "
            "q_i R(j - i) k_j^T on the rotated features, not x_i W_Q W_K^T x_j^T, so no position-free QK circuit "
            "(nor a composition score built on it) describes them. Study the scores themselves "
            "(attnlens.trace(..., store=['scores', 'q', 'k']) keeps them and the rotated q and k); the OV circuits "
            "are position-free and available"
        )


def _centre(x: Tensor, dim: int = -1) -> Tensor:
    return x - x.mean(dim, keepdim=True)


def copy_ln(ln: LayerNormWeights) -> LayerNormWeights:
    return LayerNormWeights(w=ln.w.detach().clone(), b=ln.b.detach().clone(), eps=ln.eps, rms=ln.rms)
