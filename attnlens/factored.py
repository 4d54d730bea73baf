"""``FactoredMatrix``: a matrix ``A @ B`` kept as its two factors, as TransformerLens users know it.

A head's QK circuit ``W_Q @ W_K^T`` is ``d_model x d_model`` but has rank ``d_head``; the full OV circuit
``W_E @ W_V @ W_O @ W_U`` is ``d_vocab x d_vocab`` (2.5 billion entries for GPT-2) of the same rank. Kept as factors,
products, indexing, singular values, eigenvalues and norms cost ``d_head``-sized work, and any block of rows or columns
can be formed on its own (``full_ov[:1000].AB``) without ever forming the whole matrix.

Nothing derived is cached: the factors may be views of a model's parameters, which can change under the matrix, so
``S``, ``U``, ``Vh``, ``AB`` and ``eigenvalues`` are computed from the factors as they are at each access. Call
:meth:`FactoredMatrix.svd` once and keep its result when you need several of its parts.

Singular vectors follow :func:`torch.linalg.svd`: ``svd()`` returns ``U, S, Vh`` with ``U @ diag(S) @ Vh == A @ B``.
TransformerLens's ``svd()`` returns ``torch.svd``'s ``U, S, V`` (it names the third ``Vh``, but reconstructs with
``U @ diag(S) @ Vh.T``); that matrix is :attr:`FactoredMatrix.V` here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FactoredMatrix"]


def _linalg(x: Tensor) -> Tensor:
    """Half-precision factors go through float32: CPU linear algebra has no half kernels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _keep_dim(index: Any) -> Any:
    """An integer index becomes a one-wide slice, so that indexing a matrix dimension keeps the result a matrix."""
    if isinstance(index, int):
        return slice(index, index + 1 if index != -1 else None)
    if isinstance(index, Tensor) and index.ndim == 0:
        return index.reshape(1)
    return index


class FactoredMatrix:
    """A matrix ``A @ B`` kept as its factors, with leading (e.g. ``layer``, ``head``) dimensions.

    Args:
        A: ``[..., ldim, mdim]``.
        B: ``[..., mdim, rdim]``. The leading dimensions of ``A`` and ``B`` broadcast.

    Example:
        >>> ov = w.OV[1, 0]                      # [d_model, d_model], rank <= d_head
        >>> full_ov = w.W_E @ ov @ w.W_U         # [d_vocab, d_vocab], still two factors
        >>> full_ov[:100].AB.argmax(-1)          # the first 100 rows only
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(f"factors must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors must be at least 2-D, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        try:
            torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"leading dimensions do not broadcast: A is {tuple(A.shape)}, B is {tuple(B.shape)}"
            ) from None
        self.A = A
        self.B = B

    # Shape -----------------------------------------------------------------------------------------------------

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
    def ldim(self) -> int:
        """Rows of the product."""
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        """Columns of the product."""
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """Inner dimension: an upper bound on the rank."""
        return self.A.shape[-1]

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    def _expanded(self) -> tuple[Tensor, Tensor]:
        lead = self.shape[:-2]
        return self.A.expand(*lead, *self.A.shape[-2:]), self.B.expand(*lead, *self.B.shape[-2:])

    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dimensions, then optionally the rows and the columns: ``fm[layer, head, rows, cols]``.

        Rows index ``A`` and columns index ``B``, so a block of a huge product costs only its own size. An integer row
        or column index keeps that dimension (one wide), as in TransformerLens, so the result stays a matrix.
        Integers, slices, and 1-D integer or boolean tensors are accepted; ``None`` and ``...`` are not.
        """
        index = index if isinstance(index, tuple) else (index,)
        if any(i is None or i is Ellipsis for i in index):
            raise IndexError(
                "a FactoredMatrix is indexed by integers, slices or 1-D tensors; None and ... are not used"
            )
        n_lead = self.ndim - 2
        if len(index) > self.ndim:
            raise IndexError(f"too many indices ({len(index)}) for a FactoredMatrix of shape {tuple(self.shape)}")
        A, B = self._expanded()
        lead, rest = index[:n_lead], index[n_lead:]
        if lead:
            A, B = A[lead], B[lead]
        if len(rest) >= 1:
            A = A[..., _keep_dim(rest[0]), :]
        if len(rest) == 2:
            B = B[..., _keep_dim(rest[1])]
        return FactoredMatrix(A, B)

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """Insert a leading dimension of size 1 at ``dim`` of the product's shape (it must land before the matrix)."""
        new_ndim = self.ndim + 1
        position = dim + new_ndim if dim < 0 else dim
        if not 0 <= position <= new_ndim - 3:
            raise IndexError(f"unsqueeze({dim}) of a {self.ndim}-D FactoredMatrix would not add a leading dimension")
        A, B = self._expanded()
        return FactoredMatrix(A.unsqueeze(position), B.unsqueeze(position))

    # Products --------------------------------------------------------------------------------------------------

    @property
    def AB(self) -> Tensor:
        """The product ``A @ B`` ``[..., ldim, rdim]`` (formed at each access: index first to form a block)."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The reversed product ``B @ A`` ``[..., mdim, mdim]``; it has the same non-zero eigenvalues as ``AB``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square product, this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T @ A^T``."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Tensor | FactoredMatrix) -> Any:
        """``self @ other``: a FactoredMatrix for a matrix or FactoredMatrix, a tensor ``[..., ldim]`` for a vector."""
        if isinstance(other, FactoredMatrix):
            # Multiply through the smaller inner dimension so the result stays low-rank.
            if other.mdim <= self.mdim:
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if isinstance(other, Tensor):
            if other.ndim == 1:
                return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
            return FactoredMatrix(self.A, self.B @ other)
        return NotImplemented

    def __rmatmul__(self, other: Tensor) -> Any:
        """``other @ self``: a FactoredMatrix for a matrix, a tensor ``[..., rdim]`` for a vector."""
        if isinstance(other, Tensor):
            if other.ndim == 1:
                return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
            return FactoredMatrix(other @ self.A, self.B)
        return NotImplemented

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """Multiply by a scalar (a number or a one-element tensor); use ``@`` for matrix products."""
        if isinstance(scalar, Tensor):
            if scalar.numel() != 1:
                raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products")
            scalar = scalar.reshape(())
        elif not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self.A, self.B)

    # Decompositions --------------------------------------------------------------------------------------------

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of the product, from QR decompositions of the factors (``torch.linalg.svd``'s convention).

        Returns:
            ``U [..., ldim, mdim]``, ``S [..., mdim]`` (descending) and ``Vh [..., mdim, rdim]`` with
            ``U @ diag(S) @ Vh == A @ B``. (TransformerLens's third value is ``Vh.mT`` here: see :attr:`V`.)
        """
        A, B = _linalg(self.A), _linalg(self.B)
        Q_A, R_A = torch.linalg.qr(A)
        Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))
        U, S, Vh = torch.linalg.svd(R_A @ R_B.transpose(-1, -2))
        return Q_A @ U, S, Vh @ Q_B.transpose(-1, -2)

    @property
    def U(self) -> Tensor:
        """Left singular vectors ``[..., ldim, mdim]``."""
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        """Singular values ``[..., mdim]``, descending."""
        return self.svd()[1]

    @property
    def Vh(self) -> Tensor:
        """Right singular vectors as rows ``[..., mdim, rdim]`` (``U @ diag(S) @ Vh`` is the product)."""
        return self.svd()[2]

    @property
    def V(self) -> Tensor:
        """Right singular vectors as columns ``[..., rdim, mdim]``: what TransformerLens's ``svd()`` returns third."""
        return self.svd()[2].transpose(-1, -2)

    @property
    def eigenvalues(self) -> Tensor:
        """The ``mdim`` eigenvalues of ``BA`` (complex) ``[..., mdim]``: the non-zero eigenvalues of ``AB``."""
        return torch.linalg.eigvals(_linalg(self.BA))

    def norm(self) -> Tensor:
        """Frobenius norm of the product ``[...]``."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same product as ``(U sqrt(S)) @ (sqrt(S) Vh)``: both factors carry half of each singular value."""
        U, S, Vh = self.svd()
        root = S.sqrt()
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * Vh)

    def collapse_l(self) -> Tensor:
        """``diag(S) @ Vh`` ``[..., mdim, rdim]``: the product with its orthonormal left factor ``U`` removed."""
        _, S, Vh = self.svd()
        return S[..., :, None] * Vh

    def collapse_r(self) -> Tensor:
        """``U @ diag(S)`` ``[..., ldim, mdim]``: the product with its orthonormal right factor ``Vh`` removed."""
        U, S, _ = self.svd()
        return U * S[..., None, :]

    def get_corner(self, k: int = 3) -> Tensor:
        """The first ``k`` entries along every dimension of the product (a quick look, formed from ``k`` rows only)."""
        lead = tuple(slice(0, k) for _ in range(self.ndim - 2))
        corner = (*lead, slice(0, k), slice(0, k))
        return self[corner].AB

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={list(self.shape)}, mdim={self.mdim})"
