"""FactoredMatrix against the dense product, in float64: every operation TransformerLens users reach for."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import attnlens
from attnlens.weights import FactoredMatrix


@pytest.fixture
def fm_dense() -> tuple[FactoredMatrix, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    B = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    return FactoredMatrix(A, B), A @ B


def test_product_shape_and_dims(fm_dense) -> None:
    fm, dense = fm_dense
    assert_close(fm.AB, dense)
    assert fm.shape == dense.shape and fm.ndim == 3
    assert (fm.ldim, fm.mdim, fm.rdim) == (10, 4, 9)
    assert fm.pair[0] is fm.A and fm.pair[1] is fm.B
    assert_close(fm.T.AB, dense.transpose(-1, -2))
    assert repr(fm) == "FactoredMatrix(shape=[3, 10, 9], mdim=4)"


def test_svd_follows_torch_linalg_and_V_is_transformerlens_third_value(fm_dense) -> None:
    fm, dense = fm_dense
    U, S, Vh = fm.svd()
    assert U.shape == (3, 10, 4) and S.shape == (3, 4) and Vh.shape == (3, 4, 9)
    assert_close(U @ torch.diag_embed(S) @ Vh, dense)
    assert_close(fm.U @ torch.diag_embed(fm.S) @ fm.V.mT, dense)  # TransformerLens: U @ S.diag() @ Vh.T
    assert_close(S, torch.linalg.svdvals(dense)[:, :4])
    assert_close(U.mT @ U, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    assert_close(Vh @ Vh.mT, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    even = fm.make_even()
    assert_close(even.AB, dense)
    assert_close(even.A.mT @ even.A, torch.diag_embed(S))  # each factor carries sqrt(S)
    assert_close(even.B @ even.B.mT, torch.diag_embed(S))
    assert_close(U @ fm.collapse_l(), dense)
    assert_close(fm.collapse_r() @ Vh, dense)
    assert fm.collapse_l().shape == (3, 4, 9) and fm.collapse_r().shape == (3, 10, 4)


def test_eigenvalues_are_the_nonzero_ones_of_the_product() -> None:
    g = torch.Generator().manual_seed(1)
    fm = FactoredMatrix(torch.randn(2, 8, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, generator=g))
    fm = FactoredMatrix(fm.A, fm.B.double())
    dense_eig = torch.linalg.eigvals(fm.AB)
    for i in range(2):
        top = dense_eig[i][dense_eig[i].abs().argsort(descending=True)[:3]]
        key = lambda z: torch.sort(z.real * 1e6 + z.imag).values  # noqa: E731
        assert_close(key(top), key(fm.eigenvalues[i]), atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match="square"):
        _ = FactoredMatrix(torch.ones(4, 2), torch.ones(2, 3)).BA


def test_indexing_leading_rows_and_columns(fm_dense) -> None:
    fm, dense = fm_dense
    assert_close(fm[1].AB, dense[1])
    assert_close(fm[1, 2:7].AB, dense[1, 2:7])
    assert_close(fm[1, 3].AB, dense[1, 3:4])  # an integer keeps the dimension: still a matrix
    assert_close(fm[0, 2:5, 1:8].AB, dense[0, 2:5, 1:8])
    assert_close(fm[:, -1, -1].AB, dense[:, -1:, -1:])
    rows, cols = torch.tensor([9, 0, 4]), torch.tensor([2, 2, 8, 1])
    assert_close(fm[2, rows, cols].AB, dense[2][rows][:, cols])
    assert_close(fm[torch.tensor([0, 2])].AB, dense[[0, 2]])
    assert_close(fm[1, torch.tensor(3)].AB, dense[1, 3:4])
    assert fm[1, 2:7].A.shape == (5, 4) and fm[1, 2:7].B.shape == (4, 9)  # only A is indexed by rows
    with pytest.raises(IndexError, match="too many"):
        fm[0, 0, 0, 0]
    with pytest.raises(IndexError, match="None and"):
        fm[..., 0]


def test_products_with_scalars_vectors_matrices(fm_dense) -> None:
    fm, dense = fm_dense
    g = torch.Generator().manual_seed(2)
    assert_close((fm * 2.5).AB, dense * 2.5)
    assert_close((-3 * fm).AB, dense * -3)
    assert_close((fm * torch.tensor(0.5, dtype=torch.float64)).AB, dense * 0.5)
    assert_close((torch.tensor([2.0], dtype=torch.float64) * fm).AB, dense * 2)
    assert_close((-fm).AB, -dense)
    with pytest.raises(ValueError, match="use @"):
        fm * torch.ones(2, dtype=torch.float64)
    right, left = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    out = fm @ right
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
    assert_close(out, dense @ right)
    out = left @ fm
    assert isinstance(out, torch.Tensor) and out.shape == (3, 9)
    assert_close(out, left @ dense)
    M = torch.randn(9, 5, generator=g, dtype=torch.float64)
    assert_close((fm @ M).AB, dense @ M)
    assert_close((M.T @ fm.T).AB, M.T @ dense.mT)
    other = FactoredMatrix(torch.randn(9, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    assert_close((fm @ other).AB, dense @ other.AB)
    assert (fm @ other).mdim == 2
    with pytest.raises(ValueError, match="inner dimensions"):
        FactoredMatrix(fm.A, fm.A)
    with pytest.raises(ValueError, match="do not broadcast"):
        FactoredMatrix(torch.ones(3, 2, 4), torch.ones(2, 4, 5))


def test_unsqueeze_and_get_corner(fm_dense) -> None:
    fm, dense = fm_dense
    assert_close(fm.unsqueeze(0).AB, dense.unsqueeze(0))
    assert_close(fm.unsqueeze(1).AB, dense.unsqueeze(1))
    assert_close(fm.unsqueeze(-3).AB, dense.unsqueeze(-3))
    with pytest.raises(IndexError, match="leading"):
        fm.unsqueeze(-1)
    assert_close(fm.get_corner(), dense[:3, :3, :3])
    assert_close(fm.get_corner(2), dense[:2, :2, :2])


def full_ov_top1_dense(full: FactoredMatrix) -> float:
    product = full.AB
    return (product.argmax(-1) == torch.arange(product.shape[0])).double().mean().item()


def full_ov_top1_batched(full: FactoredMatrix, batch_size: int = 100) -> float:
    """As in docs/concepts.md: row blocks of the d_vocab x d_vocab circuit, never the whole matrix."""
    hits = 0
    for start in range(0, full.ldim, batch_size):
        block = full[start : start + batch_size].AB
        hits += int((block.argmax(-1) == torch.arange(start, start + block.shape[0])).sum())
    return hits / full.ldim


def test_full_ov_circuit_top1_on_the_demo_model_batched_equals_dense() -> None:
    model, _ = attnlens.load_demo()
    w = attnlens.extract_weights(model)
    with torch.no_grad():
        W_E, W_U = w.W_E.double(), w.W_U.double()
        for layer, head in [(1, 0), (0, 2)]:
            ov = w.OV[layer, head]
            full = W_E @ FactoredMatrix(ov.A.double(), ov.B.double()) @ W_U
            assert full.shape == (w.d_vocab, w.d_vocab) and full.mdim == w.d_head
            dense = full_ov_top1_dense(full)
            assert full_ov_top1_batched(full, 100) == dense
            assert full_ov_top1_batched(full, 37) == dense
    # The number the docs quote for the induction head L1H0.
    ov = w.OV[1, 0]
    assert round(full_ov_top1_dense(W_E @ FactoredMatrix(ov.A.double(), ov.B.double()) @ W_U), 4) == 0.0088
