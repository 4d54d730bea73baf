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

from typing import Any, NamedTuple

import torch
from torch import Tensor

from attnlens._factored_index import ShapeMismatchError, keep_dim, split_index

__all__ = ["SVD", "FactoredMatrix"]


class SVD(NamedTuple):
    """A thin SVD ``U [..., ldim, k]``, ``S [..., k]``, ``Vh [..., k, rdim]`` with ``U @ diag(S) @ Vh`` the product.

    It unpacks as ``torch.linalg.svd``'s three values; ``.V`` is TransformerLens's third value, ``Vh.mT``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def V(self) -> Tensor:
        """Right singular vectors as columns ``[..., rdim, k]`` (``U @ diag(S) @ V.mT`` is the product)."""
        return self.Vh.transpose(-1, -2)


def _linalg(x: Tensor) -> Tensor:
    """Half-precision factors go through float32: CPU linear algebra has no half kernels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _is_tensor_like(x: object) -> bool:
    """A duck-typed tensor that TransformerLens accepts as a factor or operand: shape, ndim, ``@``, broadcast_to."""
    return all(hasattr(x, name) for name in ("shape", "ndim", "__matmul__", "broadcast_to", "unsqueeze"))


def _describe(x: Any) -> tuple[list[int], torch.dtype | None, torch.device | None]:
    """Shape, dtype and device of a product's side, as the user made it (a FactoredMatrix by its ``A``).

    A tensor-like that has no dtype or device gives None: nothing to compare, its own ``@`` decides.
    """
    tensor = x.A if isinstance(x, FactoredMatrix) else x
    return list(x.shape), getattr(tensor, "dtype", None), getattr(tensor, "device", None)


def _check_product(left: Any, right: Any) -> None:
    """Refuse ``left @ right`` by the user's shapes, dtypes and devices before torch meets the factors inside."""
    (ls, ldt, ldev), (rs, rdt, rdev) = _describe(left), _describe(right)
    what = f"FactoredMatrix product {ls} @ {rs}"
    if len(rs) == 1 and ls[-1] != rs[0]:
        raise ValueError(f"{what}: the left side's {ls[-1]} columns do not match a vector of {rs[0]}")
    if len(ls) == 1 and ls[0] != rs[-2]:
        raise ValueError(f"{what}: a vector of {ls[0]} does not match the right side's {rs[-2]} rows")
    if len(ls) > 1 and len(rs) > 1:
        if ls[-1] != rs[-2]:
            raise ValueError(f"{what}: the left side's {ls[-1]} columns do not match the right side's {rs[-2]} rows")
        try:
            torch.broadcast_shapes(torch.Size(ls[:-2]), torch.Size(rs[:-2]))
        except RuntimeError:
            raise ShapeMismatchError(
                f"{what}: leading dimensions {ls[:-2]} and {rs[:-2]} do not broadcast (shape mismatch)"
            ) from None
    if ldt is not None and rdt is not None and ldt != rdt:
        raise TypeError(f"{what}: the sides have different dtypes ({ldt} @ {rdt}); convert one first, e.g. .to({ldt})")
    if ldev is not None and rdev is not None and ldev != rdev:
        raise ValueError(f"{what}: the sides are on different devices ({ldev} @ {rdev}); move one first with .to()")


class FactoredMatrix:
    """A matrix ``A @ B`` kept as its factors, with leading (e.g. ``layer``, ``head``) dimensions.

    Args:
        A: ``[..., ldim, mdim]``.
        B: ``[..., mdim, rdim]``. The leading dimensions of ``A`` and ``B`` broadcast; both factors are expanded
            to the common leading shape (views, no copies), as in TransformerLens. Tensor-likes (objects with
            ``shape``, ``ndim``, ``@``, ``broadcast_to`` and ``unsqueeze``) are accepted for products; decompositions
            and indexing need tensors.

    Example:
        >>> ov = w.OV[1, 0]                      # [d_model, d_model], rank <= d_head
        >>> full_ov = w.W_E @ ov @ w.W_U         # [d_vocab, d_vocab], still two factors
        >>> full_ov[:100].AB.argmax(-1)          # the first 100 rows only
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        for factor in (A, B):
            if not isinstance(factor, Tensor) and not _is_tensor_like(factor):
                raise TypeError(f"factors must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors must be at least 2-D, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(torch.Size(A.shape[:-2]), torch.Size(B.shape[:-2]))
        except RuntimeError:
            raise ShapeMismatchError(
                f"leading dimensions do not broadcast (shape mismatch): A is {tuple(A.shape)}, B is {tuple(B.shape)}"
            ) from None
        a_dtype, b_dtype = getattr(A, "dtype", None), getattr(B, "dtype", None)
        if a_dtype is not None and b_dtype is not None and a_dtype != b_dtype:
            raise TypeError(
                f"factors have different dtypes: A is {a_dtype} and B is {b_dtype}; a FactoredMatrix needs the same "
                f"dtype for both (convert one, e.g. B.to(A.dtype))"
            )
        a_device, b_device = getattr(A, "device", None), getattr(B, "device", None)
        if a_device is not None and b_device is not None and a_device != b_device:
            raise ValueError(f"factors are on different devices: A on {a_device}, B on {b_device}; move one with .to()")
        # Both factors carry the common leading shape (as views), so A, B and every product of them agree on it.
        self.A = A if tuple(A.shape[:-2]) == tuple(lead) else A.broadcast_to((*lead, *A.shape[-2:]))
        self.B = B if tuple(B.shape[:-2]) == tuple(lead) else B.broadcast_to((*lead, *B.shape[-2:]))

    # Shape -----------------------------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """``[..., ldim, rdim]``, the shape of the product."""
        return torch.Size((*self.A.shape[:-2], self.A.shape[-2], self.B.shape[-1]))

    @property
    def ndim(self) -> int:
        """Number of dimensions of the product."""
        return len(self.shape)

    @property
    def has_leading_dims(self) -> bool:
        """Whether the product has dimensions before its rows and columns (e.g. ``layer``, ``head``)."""
        return self.ndim > 2

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

    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dimensions, then optionally the rows and the columns: ``fm[layer, head, rows, cols]``.

        The product is indexed as the dense tensor would be: integers (also numpy's), negative numbers, slices,
        lists, arrays, integer tensors, boolean masks (a mask over ``k`` dimensions uses ``k`` of them:
        ``w.QK[mask, :, 5]`` with a ``[layer, head]`` mask takes column 5 of each selected head), ``...`` and ``None``
        (a new leading dimension). Rows index ``A`` and columns index ``B``, so a block of a huge product costs only
        its own size and the inner dimension stays. Where a dense tensor and a matrix part ways:

        - an integer row or column keeps that dimension (one wide), as in TransformerLens, so the result stays a
          matrix (``fm[..., 3]`` is ``dense[..., 3:4]``);
        - tensors on both the rows and the columns select a block (``dense[rows][:, cols]``), not elements;
        - refused, by name: True/False, ``None`` after a row or column index, a mask across the matrix dimensions,
          tensors on both the leading dimensions and the rows or columns (index in two steps instead).
        """
        split = split_index(index, self.shape)
        A, B = self.A, self.B
        if split.lead:
            A, B = A[split.lead], B[split.lead]
        if split.row is not None:
            A = A[..., keep_dim(split.row, self.ldim, "row"), :]
        if split.column is not None:
            B = B[..., keep_dim(split.column, self.rdim, "column")]
        return FactoredMatrix(A, B)

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """Insert a leading dimension of size 1 at ``dim`` of the product's shape (it must land before the matrix)."""
        new_ndim = self.ndim + 1
        position = dim + new_ndim if dim < 0 else dim
        if not 0 <= position <= new_ndim - 3:
            raise IndexError(f"unsqueeze({dim}) of a {self.ndim}-D FactoredMatrix would not add a leading dimension")
        return FactoredMatrix(self.A.unsqueeze(position), self.B.unsqueeze(position))

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

    def __matmul__(self, other: Any) -> Any:
        """``self @ other``: a FactoredMatrix for a matrix or FactoredMatrix, a tensor ``[..., ldim]`` for a vector.

        The product keeps the smallest inner dimension there is (TransformerLens's ``mdim == min(a.mdim, a.rdim,
        b.ldim, b.mdim)``), so a chain of products never grows: where ``rdim`` is below ``mdim`` the left side is
        formed (``AB``, no larger than ``A``) and the operand becomes the right factor.
        """
        if isinstance(other, FactoredMatrix):
            _check_product(self, other)
            smallest = min(self.mdim, self.rdim, other.mdim)
            if self.rdim == smallest < self.mdim and self.rdim < other.mdim:
                return FactoredMatrix(self.AB, other.AB)
            if other.mdim <= self.mdim:
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if isinstance(other, Tensor) or _is_tensor_like(other):
            _check_product(self, other)
            if other.ndim == 1:
                return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
            if self.rdim < self.mdim:
                return FactoredMatrix(self.AB, other)
            return FactoredMatrix(self.A, self.B @ other)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        """``other @ self``: a FactoredMatrix for a matrix, a tensor ``[..., rdim]`` for a vector (smallest inner)."""
        if isinstance(other, Tensor) or _is_tensor_like(other):
            _check_product(other, self)
            if other.ndim == 1:
                return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
            if self.ldim < self.mdim:
                return FactoredMatrix(other, self.AB)
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

    def svd(self) -> SVD:
        """Thin SVD of the product, from QR decompositions of the factors (``torch.linalg.svd``'s convention).

        With ``k = min(ldim, mdim, rdim)`` (``mdim`` for circuits, whose inner ``d_head`` is the smallest; less for a
        block of fewer rows or columns than ``mdim``):

        Returns:
            An :class:`SVD` ``(U [..., ldim, k], S [..., k], Vh [..., k, rdim])``, ``S`` descending, with
            ``U @ diag(S) @ Vh == A @ B``. TransformerLens's ``svd()`` returns ``V = Vh.mT`` third: ``svd().V``
            (and :attr:`V`) spell it that way.
        """
        A, B = _linalg(self.A), _linalg(self.B)
        Q_A, R_A = torch.linalg.qr(A)  # R_A [..., min(ldim, mdim), mdim]
        Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))  # R_B [..., min(rdim, mdim), mdim]
        # The core is min(ldim, mdim) x min(rdim, mdim); only its thin SVD has factors that Q_A and Q_B can take.
        U, S, Vh = torch.linalg.svd(R_A @ R_B.transpose(-1, -2), full_matrices=False)
        return SVD(Q_A @ U, S, Vh @ Q_B.transpose(-1, -2))

    @property
    def U(self) -> Tensor:
        """Left singular vectors ``[..., ldim, k]``, ``k = min(ldim, mdim, rdim)``."""
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        """Singular values ``[..., k]``, descending, ``k = min(ldim, mdim, rdim)``."""
        return self.svd()[1]

    @property
    def Vh(self) -> Tensor:
        """Right singular vectors as rows ``[..., k, rdim]`` (``U @ diag(S) @ Vh`` is the product)."""
        return self.svd()[2]

    @property
    def V(self) -> Tensor:
        """Right singular vectors as columns ``[..., rdim, k]``: what TransformerLens's ``svd()`` returns third."""
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
        """``diag(S) @ Vh`` ``[..., k, rdim]``: the product with its orthonormal left factor ``U`` removed."""
        _, S, Vh = self.svd()
        return S[..., :, None] * Vh

    def collapse_r(self) -> Tensor:
        """``U @ diag(S)`` ``[..., ldim, k]``: the product with its orthonormal right factor ``Vh`` removed."""
        U, S, _ = self.svd()
        return U * S[..., None, :]

    def get_corner(self, k: int = 3) -> Tensor:
        """The first ``k`` entries along every dimension of the product (a quick look, formed from ``k`` rows only)."""
        lead = tuple(slice(0, k) for _ in range(self.ndim - 2))
        corner = (*lead, slice(0, k), slice(0, k))
        return self[corner].AB

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={list(self.shape)}, mdim={self.mdim})"
