"""Weights of a GPT-2-style model, split per head, and their low-rank QK and OV circuits.

``ModelWeights`` and ``LayerWeights`` are frozen dataclasses of tensors. Per-layer tensors are views of the model's
own parameters (nothing is copied, moved or converted), so they always show the model's current values and keep its
device, dtype and autograd connection. The stacked forms (``ModelWeights.W_Q`` as ``[layer, head, d_model, d_head]``
and friends) are necessarily copies: each is built on first access, kept, and rebuilt only when a parameter it came
from has been modified in place since (tracked through torch's version counters), so a cached stack is never stale.

Names and shapes follow TransformerLens: ``x @ W_Q[h] + b_Q[h]`` is head ``h``'s query for a row vector ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactoredMatrix", "LayerNormWeights", "LayerWeights", "MLPWeights", "ModelWeights"]


def _describe(obj: Any) -> str:
    """A repr that shows tensors as shapes: the values of a 38M-parameter embedding are no use in a repr."""
    parts = []
    for f in fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            parts.append(f"{f.name}={list(value.shape)}")
        elif isinstance(value, tuple) and value and not isinstance(value[0], (int, float)):
            parts.append(f"{f.name}=({len(value)} x {type(value[0]).__name__})")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


class FactoredMatrix:
    """A matrix ``A @ B`` kept as its factors, with leading (e.g. ``layer``, ``head``) dimensions.

    The product is never formed unless asked for (``.AB``): a head's QK circuit is ``d_model x d_model`` but has rank
    ``d_head``, so its singular values, eigenvalues and norm come from ``d_head x d_head`` problems.

    Decompositions run in float32 for half-precision factors (CPU linear algebra has no half kernels); the results
    are cached per instance.

    Args:
        A: ``[..., ldim, mdim]``.
        B: ``[..., mdim, rdim]``.
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors must be at least 2-D, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        self.A = A
        self.B = B

    @property
    def shape(self) -> torch.Size:
        """``[..., ldim, rdim]``, the shape of the product."""
        batch = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return torch.Size((*batch, self.A.shape[-2], self.B.shape[-1]))

    @property
    def ndim(self) -> int:
        """Number of dimensions of the product."""
        return len(self.shape)

    @property
    def mdim(self) -> int:
        """Inner dimension: an upper bound on the rank."""
        return self.A.shape[-1]

    @cached_property
    def AB(self) -> Tensor:
        """The product ``A @ B`` ``[..., ldim, rdim]`` (materialised once, on request)."""
        return self.A @ self.B

    @cached_property
    def BA(self) -> Tensor:
        """The reversed product ``B @ A`` ``[..., mdim, mdim]``; it has the same non-zero eigenvalues as ``AB``."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise ValueError(f"BA needs a square product, this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T @ A^T``."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def _linalg(self, x: Tensor) -> Tensor:
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of the product, from QR decompositions of the factors.

        Returns:
            ``U [..., ldim, mdim]``, ``S [..., mdim]`` (descending) and ``Vh [..., mdim, rdim]`` with
            ``U @ diag(S) @ Vh == A @ B``.
        """
        return self._svd

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        A, B = self._linalg(self.A), self._linalg(self.B)
        Q_A, R_A = torch.linalg.qr(A)
        Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))
        U, S, Vh = torch.linalg.svd(R_A @ R_B.transpose(-1, -2))
        return Q_A @ U, S, Vh @ Q_B.transpose(-1, -2)

    @property
    def U(self) -> Tensor:
        """Left singular vectors ``[..., ldim, mdim]``."""
        return self._svd[0]

    @property
    def S(self) -> Tensor:
        """Singular values ``[..., mdim]``, descending."""
        return self._svd[1]

    @property
    def Vh(self) -> Tensor:
        """Right singular vectors ``[..., mdim, rdim]``."""
        return self._svd[2]

    @cached_property
    def eigenvalues(self) -> Tensor:
        """The ``mdim`` eigenvalues of ``BA`` (complex) ``[..., mdim]``: the non-zero eigenvalues of ``AB``."""
        return torch.linalg.eigvals(self._linalg(self.BA))

    def norm(self) -> Tensor:
        """Frobenius norm of the product ``[...]``."""
        return self.S.pow(2).sum(-1).sqrt()

    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix:
        if isinstance(other, FactoredMatrix):
            # Multiply through the smaller inner dimension so the result stays low-rank.
            if other.mdim <= self.mdim:
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if isinstance(other, Tensor):
            return FactoredMatrix(self.A, self.B @ other)
        return NotImplemented

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        if isinstance(other, Tensor):
            return FactoredMatrix(other @ self.A, self.B)
        return NotImplemented

    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dimensions, e.g. ``qk[layer, head]``; the matrix dimensions are not indexable."""
        n_lead = self.ndim - 2
        n_index = len(index) if isinstance(index, tuple) else 1
        if n_index > n_lead:
            raise IndexError(f"a FactoredMatrix of shape {tuple(self.shape)} has {n_lead} indexable dimension(s)")
        lead = self.shape[:-2]
        A = self.A.expand(*lead, *self.A.shape[-2:])
        B = self.B.expand(*lead, *self.B.shape[-2:])
        return FactoredMatrix(A[index], B[index])

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={list(self.shape)}, mdim={self.mdim})"


@dataclass(frozen=True, eq=False, repr=False)
class LayerNormWeights:
    """A layer norm: ``(x - mean) / sqrt(var + eps) * w + b``.

    Attributes:
        w: ``[d_model]``.
        b: ``[d_model]``.
        eps: the epsilon in the denominator.
    """

    w: Tensor
    b: Tensor
    eps: float

    __repr__ = _describe


@dataclass(frozen=True, eq=False, repr=False)
class MLPWeights:
    """A transformer MLP: ``act(x @ W_in + b_in) @ W_out + b_out``.

    Attributes:
        W_in: ``[d_model, d_mlp]``.
        b_in: ``[d_mlp]``.
        W_out: ``[d_mlp, d_model]``.
        b_out: ``[d_model]``.
        act: the activation's name, a key of :data:`attnlens.functional.ACTIVATIONS`.
    """

    W_in: Tensor
    b_in: Tensor
    W_out: Tensor
    b_out: Tensor
    act: str

    __repr__ = _describe


@dataclass(frozen=True, eq=False, repr=False)
class LayerWeights:
    """One transformer block's weights: attention split per head, its layer norms and its MLP.

    Attributes:
        layer: index of the block.
        W_Q: ``[head, d_model, d_head]``.
        W_K: ``[head, d_model, d_head]``.
        W_V: ``[head, d_model, d_head]``.
        b_Q: ``[head, d_head]``.
        b_K: ``[head, d_head]``.
        b_V: ``[head, d_head]``.
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

    __repr__ = _describe

    @property
    def n_heads(self) -> int:
        """Number of heads."""
        return self.W_Q.shape[0]

    @property
    def d_head(self) -> int:
        """Dimension of each head's queries, keys and values."""
        return self.W_Q.shape[-1]

    @cached_property
    def QK(self) -> FactoredMatrix:
        """QK circuit ``W_Q @ W_K^T`` ``[head, d_model, d_model]`` (unscaled: scores are ``x_q QK x_k^T * scale``)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @cached_property
    def OV(self) -> FactoredMatrix:
        """OV circuit ``W_V @ W_O`` ``[head, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)


_STACKED = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O")


@dataclass(frozen=True, eq=False, repr=False)
class ModelWeights:
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
        W_pos: position embedding ``[n_ctx, d_model]``.
        W_U: unembedding ``[d_model, d_vocab]``, or ``None`` for a model without a language-model head.
        ln_f: the final layer norm.
        layers: one :class:`LayerWeights` per block.
        name: where the weights came from (the model's ``name_or_path``), for provenance.
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    W_E: Tensor
    W_pos: Tensor
    W_U: Tensor | None
    ln_f: LayerNormWeights
    layers: tuple[LayerWeights, ...]
    name: str = ""
    _cache: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict, init=False, compare=False, repr=False)

    __repr__ = _describe

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        """The device the weights are on."""
        return self.W_E.device

    def _cached(self, key: str, sources: tuple[Tensor, ...], build: Callable[[], Any]) -> Any:
        versions = tuple(t._version for t in sources)
        hit = self._cache.get(key)
        if hit is None or hit[0] != versions:
            hit = (versions, build())
            self._cache[key] = hit
        return hit[1]

    def stacked(self, name: str) -> Tensor:
        """One per-layer weight stacked over layers, e.g. ``stacked("W_Q")`` is ``[layer, head, d_model, d_head]``.

        Built on first access and kept; rebuilt only if a source parameter was modified in place since.
        """
        if name not in _STACKED:
            raise KeyError(f"no stacked weight {name!r}; choose from {', '.join(_STACKED)}")
        parts = tuple(getattr(layer, name) for layer in self.layers)
        return self._cached(name, parts, lambda: torch.stack(parts))

    @property
    def W_Q(self) -> Tensor:
        """``[layer, head, d_model, d_head]``."""
        return self.stacked("W_Q")

    @property
    def W_K(self) -> Tensor:
        """``[layer, head, d_model, d_head]``."""
        return self.stacked("W_K")

    @property
    def W_V(self) -> Tensor:
        """``[layer, head, d_model, d_head]``."""
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
        """``[layer, head, d_head]``."""
        return self.stacked("b_K")

    @property
    def b_V(self) -> Tensor:
        """``[layer, head, d_head]``."""
        return self.stacked("b_V")

    @property
    def b_O(self) -> Tensor:
        """``[layer, d_model]``."""
        return self.stacked("b_O")

    @property
    def QK(self) -> FactoredMatrix:
        """Stacked QK circuits ``[layer, head, d_model, d_model]`` (low-rank: inner dimension ``d_head``)."""
        sources = tuple(t for layer in self.layers for t in (layer.W_Q, layer.W_K))
        return self._cached("QK", sources, lambda: FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2)))

    @property
    def OV(self) -> FactoredMatrix:
        """Stacked OV circuits ``[layer, head, d_model, d_model]`` (low-rank: inner dimension ``d_head``)."""
        sources = tuple(t for layer in self.layers for t in (layer.W_V, layer.W_O))
        return self._cached("OV", sources, lambda: FactoredMatrix(self.W_V, self.W_O))
