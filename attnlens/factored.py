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

import operator
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactoredMatrix"]


def _linalg(x: Tensor) -> Tensor:
    """Half-precision factors go through float32: CPU linear algebra has no half kernels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _describe(x: Tensor | FactoredMatrix) -> tuple[list[int], torch.dtype, torch.device]:
    """Shape, dtype and device of a product's side, as the user made it (a FactoredMatrix by its ``A``)."""
    tensor = x.A if isinstance(x, FactoredMatrix) else x
    return list(x.shape), tensor.dtype, tensor.device


def _check_product(left: Tensor | FactoredMatrix, right: Tensor | FactoredMatrix) -> None:
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
            raise ValueError(f"{what}: leading dimensions {ls[:-2]} and {rs[:-2]} do not broadcast") from None
    if ldt != rdt:
        raise TypeError(f"{what}: the sides have different dtypes ({ldt} @ {rdt}); convert one first, e.g. .to({ldt})")
    if ldev != rdev:
        raise ValueError(f"{what}: the sides are on different devices ({ldev} @ {rdev}); move one first with .to()")


def _index_item(item: Any) -> int | slice | Tensor:
    """One element of an index as a dense tensor reads it: an int, a slice, or an integer or boolean tensor.

    Numpy integers and 0-d integer tensors are ints (torch selects with them, as with ints); lists and arrays become
    tensors. True/False (which torch reads as a new axis, not a selection) are refused.
    """
    if item is None or item is Ellipsis:
        raise IndexError("a FactoredMatrix is indexed by integers, slices or tensors; None and ... are not used")
    if isinstance(item, slice):
        return item
    if isinstance(item, bool) or (isinstance(item, Tensor) and item.dtype == torch.bool and item.ndim == 0):
        raise IndexError(f"a FactoredMatrix is not indexed by True/False (got {item!r}); use integers or a mask")
    if isinstance(item, Tensor):
        if item.dtype != torch.bool and (item.is_floating_point() or item.is_complex()):
            raise IndexError(f"tensors that index a FactoredMatrix must be integer or boolean, got {item.dtype}")
        return int(item) if item.ndim == 0 else item
    try:
        return operator.index(item)  # Python and numpy integers
    except TypeError:
        pass
    try:
        tensor = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError):
        raise IndexError(f"cannot index a FactoredMatrix with {type(item).__name__} {item!r}") from None
    return _index_item(tensor)


def _keep_dim(index: int | slice | Tensor, size: int, what: str) -> slice | Tensor:
    """A row or column index; an integer becomes a one-wide slice, so that the result stays a matrix."""
    if not isinstance(index, int):
        return index
    if not -size <= index < size:
        raise IndexError(f"{what} {index} is out of range for {size} {what}s")
    return slice(index, index + 1 if index != -1 else None)


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
        if A.dtype != B.dtype:
            raise TypeError(
                f"factors have different dtypes: A is {A.dtype} and B is {B.dtype}; a FactoredMatrix needs the same "
                f"dtype for both (convert one, e.g. B.to(A.dtype))"
            )
        if A.device != B.device:
            raise ValueError(f"factors are on different devices: A on {A.device}, B on {B.device}; move one with .to()")
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

        The leading dimensions are indexed as the dense product would be: integers (also numpy's), negative numbers,
        slices, integer tensors, and boolean masks, a mask over ``k`` dimensions using ``k`` of them
        (``w.QK[mask, :, 5]`` with a ``[layer, head]`` mask takes column 5 of each selected head). Rows index ``A``
        and columns index ``B``, so a block of a huge product costs only its own size; an integer row or column keeps
        that dimension (one wide), as in TransformerLens, so the result stays a matrix; tensors on both the rows and
        the columns select a block (``dense[rows][:, cols]``), not elements. ``None``, ``...`` and True/False are not
        used, nor a mask across the matrix dimensions, nor tensors on both the leading dimensions and the rows or
        columns (a dense tensor would pair them: index in two steps instead).
        """
        items = [_index_item(i) for i in (index if isinstance(index, tuple) else (index,))]
        n_lead = self.ndim - 2
        used = [i.ndim if isinstance(i, Tensor) and i.dtype == torch.bool else 1 for i in items]
        if sum(used) > self.ndim:
            raise IndexError(f"too many indices ({sum(used)}) for a FactoredMatrix of shape {list(self.shape)}")
        split, start = len(items), 0
        for position, (item, n) in enumerate(zip(items, used)):
            if start < n_lead < start + n or (start >= n_lead and n > 1):
                shape = list(item.shape) if isinstance(item, Tensor) else []
                raise IndexError(
                    f"a boolean mask of shape {shape} covers dimensions {start}..{start + n - 1} of a FactoredMatrix "
                    f"of shape {list(self.shape)}: a mask selects along leading dimensions, or along the rows or the "
                    f"columns alone"
                )
            if start >= n_lead and split == len(items):
                split = position
            start += n
        lead, rest = items[:split], items[split:]
        if any(isinstance(i, Tensor) for i in lead) and any(isinstance(i, Tensor) for i in rest):
            raise IndexError(
                f"tensors index both the leading dimensions and the rows or columns of a FactoredMatrix of shape "
                f"{list(self.shape)}, which a dense tensor would pair element by element; index in two steps: the "
                f"leading dimensions first (sub = fm[lead]), then the rows and columns of sub"
            )
        A, B = self._expanded()
        if lead:
            A, B = A[tuple(lead)], B[tuple(lead)]
        if len(rest) >= 1:
            A = A[..., _keep_dim(rest[0], self.ldim, "row"), :]
        if len(rest) == 2:
            B = B[..., _keep_dim(rest[1], self.rdim, "column")]
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
        if isinstance(other, (FactoredMatrix, Tensor)):
            _check_product(self, other)
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
            _check_product(other, self)
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

        With ``k = min(ldim, mdim, rdim)`` (``mdim`` for circuits, whose inner ``d_head`` is the smallest; less for a
        block of fewer rows or columns than ``mdim``):

        Returns:
            ``U [..., ldim, k]``, ``S [..., k]`` (descending) and ``Vh [..., k, rdim]`` with
            ``U @ diag(S) @ Vh == A @ B``. (TransformerLens's third value is ``Vh.mT`` here: see :attr:`V`.)
        """
        A, B = _linalg(self.A), _linalg(self.B)
        Q_A, R_A = torch.linalg.qr(A)  # R_A [..., min(ldim, mdim), mdim]
        Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))  # R_B [..., min(rdim, mdim), mdim]
        # The core is min(ldim, mdim) x min(rdim, mdim); only its thin SVD has factors that Q_A and Q_B can take.
        U, S, Vh = torch.linalg.svd(R_A @ R_B.transpose(-1, -2), full_matrices=False)
        return Q_A @ U, S, Vh @ Q_B.transpose(-1, -2)

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
