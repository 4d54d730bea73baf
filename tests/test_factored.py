"""FactoredMatrix against the dense product, in float64: every operation TransformerLens users reach for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_bitwise, assert_within, two_sums_bound
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
    fm = FactoredMatrix(
        torch.randn(2, 8, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, generator=g).double()
    )
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
    assert_close(fm[..., 0].AB, dense[..., 0:1])  # ... as in a dense index; an integer column stays one wide


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


@pytest.mark.parametrize("shape", [(5, 8, 6), (6, 8, 5), (5, 3, 7), (7, 3, 5), (4, 4, 4), (2, 9, 2), (3, 1, 4)])
def test_thin_svd_and_make_even_in_every_shape_case(shape: tuple[int, int, int]) -> None:
    # ldim, mdim, rdim in every order: the inner dimension above, between and below the outer ones.
    ldim, mdim, rdim = shape
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, ldim, mdim, generator=g, dtype=torch.float64)
    B = torch.randn(2, mdim, rdim, generator=g, dtype=torch.float64)
    fm, dense, k = FactoredMatrix(A, B), A @ B, min(shape)
    U, S, Vh = fm.svd()
    assert U.shape == (2, ldim, k) and S.shape == (2, k) and Vh.shape == (2, k, rdim)
    assert_close(U @ torch.diag_embed(S) @ Vh, dense)
    assert_close(S, torch.linalg.svdvals(dense)[:, :k])
    assert_close(U.mT @ U, torch.eye(k, dtype=torch.float64).expand(2, k, k))
    assert_close(Vh @ Vh.mT, torch.eye(k, dtype=torch.float64).expand(2, k, k))
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    even = fm.make_even()
    assert even.mdim == k
    assert_close(even.AB, dense)
    assert_close(U @ fm.collapse_l(), dense)
    assert_close(fm.collapse_r() @ Vh, dense)


def test_svd_of_a_block_of_the_demo_ov_circuit() -> None:
    model, _ = attnlens.load_demo()
    block = attnlens.extract_weights(model).OV[1, 0][:5, :7]  # d_head 32 > 5, 7
    with torch.no_grad():
        U, S, Vh = block.svd()
        assert U.shape == (5, 5) and S.shape == (5,) and Vh.shape == (5, 7)
        # float32 factors through an inner dimension of 32: a few units of roundoff times the sizes.
        tol = 32 * 32 * torch.finfo(torch.float32).eps
        assert_close(U @ torch.diag(S) @ Vh, block.AB, atol=tol * block.AB.abs().max().item(), rtol=tol)
        assert_close(block.make_even().AB, block.AB, atol=tol * block.AB.abs().max().item(), rtol=tol)


def test_products_name_the_users_shapes_and_dtypes() -> None:
    g = torch.Generator().manual_seed(4)
    fm = FactoredMatrix(torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 6, generator=g))
    with pytest.raises(ValueError, match=r"\[3, 5, 6\] @ \[5, 3\]: .*6 columns.*5 rows"):
        fm @ torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"\[2, 4\] @ \[3, 5, 6\]: .*4 columns.*5 rows"):
        torch.randn(2, 4) @ fm
    with pytest.raises(ValueError, match=r"\[5, 6\] @ \[5, 3\]: .*6 columns.*5 rows"):
        fm[0] @ FactoredMatrix(torch.randn(5, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\[3, 5, 6\] @ \[5\]: .*6 columns.*vector of 5"):
        fm @ torch.randn(5)
    with pytest.raises(ValueError, match=r"\[4\] @ \[3, 5, 6\]: .*vector of 4.*5 rows"):
        torch.randn(4) @ fm
    with pytest.raises(ValueError, match=r"leading dimensions \[3\] and \[2\] do not broadcast"):
        fm @ torch.randn(2, 6, 4)
    with pytest.raises(
        TypeError, match=r"torch\.float32 @ torch\.float64\); convert one first, e\.g\. \.to\(torch\.float32\)"
    ):
        fm @ torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"\[4, 5\] @ \[3, 5, 6\]: .*\(torch\.float64 @ torch\.float32\)"):
        torch.randn(4, 5, dtype=torch.float64) @ fm
    with pytest.raises(TypeError, match=r"\(torch\.float32 @ torch\.float64\)"):
        fm @ FactoredMatrix(torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"A is torch\.float32 and B is torch\.float64.*same dtype"):
        FactoredMatrix(torch.randn(5, 2), torch.randn(2, 6, dtype=torch.float64))
    # The products that do fit still work, broadcasting over leading dimensions as torch.matmul does.
    M = torch.randn(2, 1, 6, 4, generator=g)
    assert_close((fm @ M).AB, fm.AB @ M)


def _dense(dense: torch.Tensor, index: tuple, n_lead: int) -> torch.Tensor:
    """What a FactoredMatrix index means on the dense product, in the fewest dense indexing steps.

    Integers on rows and columns keep their dimension (one-wide slices); tensors on both rows and columns select a
    block, so the columns are a second step (one dense step would pair them element by element).
    """
    items, seen = [], 0
    for i in index:
        if seen >= n_lead and isinstance(i, (int, np.integer, torch.Tensor)) and np.ndim(i) == 0:
            i = slice(int(i), int(i) + 1 if int(i) != -1 else None)
        items.append(i)
        seen += i.ndim if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
    if seen == n_lead + 2 and all(isinstance(i, (torch.Tensor, list, np.ndarray)) for i in items[-2:]):
        return dense[tuple(items[:-1])][..., items[-1]]
    return dense[tuple(items)]


def _indexing_forms() -> list[tuple]:
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    heads = torch.tensor([True, False, True, True])
    return [
        (1,),
        (np.int64(1),),
        (-1, -2),
        (np.int64(-1), np.int32(2), np.int64(3)),
        (0, 1, np.int64(3)),  # a numpy integer on a row keeps the row
        (0, 1, slice(None), np.int64(5)),
        (mask,),
        (mask, 3),
        (mask, slice(None), 5),
        (mask, slice(2, 6), -1),
        (mask, np.int64(-3), slice(1, None, 2)),
        (slice(None), heads),
        (slice(None), heads, 2, 3),
        (torch.tensor([True, False]), heads),
        (torch.tensor([1, 0, 1]), torch.tensor([3, 3, 0])),
        (torch.tensor([1, 0]), torch.tensor([3, 2]), slice(None), 4),
        (torch.tensor(1), torch.tensor(-1), torch.tensor(2)),
        (np.array([1, 0]),),
        (1, [3, 0]),
        (1, 2, [3, 0], np.array([7, 1])),
        (1, slice(None), torch.tensor([7, 0, -1])),
        (1, 2, torch.tensor([0, 7, 3]), slice(1, 3)),
        (0, 3, torch.tensor([True, False] * 4), torch.tensor([False, True] * 4 + [True])),
        (slice(None), slice(1, 3), slice(0, 8, 3), slice(5, None)),
    ]


@pytest.mark.parametrize("index", _indexing_forms(), ids=repr)
def test_indexing_matches_the_dense_product(index: tuple) -> None:
    # [layer, head, ldim, rdim] = [2, 4, 8, 9], the stacked shape of w.QK with small matrices.
    g = torch.Generator().manual_seed(5)
    fm = FactoredMatrix(torch.randn(2, 4, 8, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 9).double())
    dense = fm.AB
    got = fm[index]
    want = _dense(dense, index, 2)
    assert got.shape == want.shape
    assert_close(got.AB, want)


def test_indexing_the_demo_qk_with_a_head_mask_then_a_column() -> None:
    model, _ = attnlens.load_demo()
    w = attnlens.extract_weights(model)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    with torch.no_grad():
        block = w.QK[mask, :, 5]
        assert block.shape == (2, 128, 1)
        # A [128, 32] @ [32, 1] product against a column of [128, 32] @ [32, 128]: other kernel shapes, so the same
        # sums of d_head products rounded twice (bitwise only by luck of the kernel).
        magnitude = block.A.double().abs() @ block.B.double().abs()
        assert_within(block.AB, w.QK.AB[mask][:, :, 5:6], two_sums_bound(magnitude, w.d_head, torch.float32))
        assert_bitwise(w.QK[0, 0, np.int64(3)].AB, w.QK[0, 0, 3].AB, "same call")


def test_indexing_refuses_what_has_no_matrix_meaning() -> None:
    fm = FactoredMatrix(torch.randn(2, 4, 8, 3), torch.randn(2, 4, 3, 9))
    with pytest.raises(IndexError, match=r"row 8 is out of range for 8 rows"):
        fm[0, 0, 8]
    with pytest.raises(IndexError, match=r"column -10 is out of range for 9 columns"):
        fm[0, 0, :, -10]
    with pytest.raises(IndexError, match=r"boolean mask of shape \[4, 8\] covers .*leading dimensions"):
        fm[0, torch.ones(4, 8, dtype=torch.bool)]
    with pytest.raises(IndexError, match=r"index in two steps: the leading dimensions first"):
        fm[torch.tensor([0, 1]), 0, torch.tensor([1, 2])]
    with pytest.raises(IndexError, match=r"True/False"):
        fm[0, True]
    with pytest.raises(IndexError, match=r"integer or boolean"):
        fm[torch.tensor([0.0])]


# float64 products of sizes <= 9 differ from the dense product by a few units of roundoff (~1e-15 relative), far
# inside assert_close's float64 defaults (rtol 1e-7), and far outside any wrong entry of a standard normal product.
_SIZES = [(3, 3, 3), (1, 1, 1), (1, 2, 1), (1, 6, 5), (5, 2, 1), (3, 2, 4), (8, 6, 5), (7, 6, 3), (3, 4, 4)]


@pytest.mark.parametrize("left", _SIZES, ids=str)
@pytest.mark.parametrize("right_mdim", [1, 2, 7])
@pytest.mark.parametrize("leading", [((), ()), ((2,), ()), ((), (3,)), ((2, 3), (3,))], ids=str)
def test_product_keeps_the_smallest_inner_dimension(left, right_mdim, leading) -> None:
    ldim, mdim, rdim = left
    g = torch.Generator().manual_seed(6)
    a = FactoredMatrix(
        torch.randn(*leading[0], ldim, mdim, generator=g, dtype=torch.float64),
        torch.randn(*leading[0], mdim, rdim, generator=g, dtype=torch.float64),
    )
    b = FactoredMatrix(
        torch.randn(*leading[1], rdim, right_mdim, generator=g, dtype=torch.float64),
        torch.randn(*leading[1], right_mdim, 4, generator=g, dtype=torch.float64),
    )
    product = a @ b
    assert product.mdim == min(a.mdim, a.rdim, b.ldim, b.mdim)  # TransformerLens's rule
    assert_close(product.AB, a.AB @ b.AB)
    assert product.A.shape[:-2] == product.B.shape[:-2] == product.shape[:-2]
    M = torch.randn(*leading[1], rdim, 5, generator=g, dtype=torch.float64)
    by_matrix = a @ M
    assert by_matrix.mdim == min(a.mdim, a.rdim)
    assert_close(by_matrix.AB, a.AB @ M)
    N = torch.randn(*leading[1], 2, ldim, generator=g, dtype=torch.float64)
    from_left = N @ a
    assert from_left.mdim == min(a.mdim, a.ldim)
    assert_close(from_left.AB, N @ a.AB)
    chain, dense = a, a.AB
    for _ in range(3):
        before = chain.mdim
        chain, dense = chain @ chain.T, dense @ dense.mT
        assert chain.mdim <= before  # a chain of products never grows its inner dimension
    assert_close(chain.AB, dense)


def test_factors_carry_the_common_leading_shape_as_views() -> None:
    A, B = torch.ones(5, 3), torch.ones(2, 4, 3, 7)
    f = FactoredMatrix(A, B)
    assert f.A.shape == (2, 4, 5, 3) and f.B is B and f.has_leading_dims and f.shape == (2, 4, 5, 7)
    assert f.A.data_ptr() == A.data_ptr() and f.A.stride()[:2] == (0, 0)  # expanded, not copied
    g = FactoredMatrix(torch.ones(4, 5, 3), B)
    assert g.A.shape == (2, 4, 5, 3) and g.shape == (2, 4, 5, 7)
    plain = FactoredMatrix(torch.ones(5, 3), torch.ones(3, 7))
    assert not plain.has_leading_dims and plain.shape == (5, 7)
    with pytest.raises(ValueError, match=r"do not broadcast.*A is \(9, 5, 3\), B is \(2, 4, 3, 7\)") as caught:
        FactoredMatrix(torch.ones(9, 5, 3), B)
    assert isinstance(caught.value, RuntimeError)  # as torch's own broadcasting errors (and TransformerLens's)
    with pytest.raises(RuntimeError, match=r"\[2, 3, 6\] @ \[4, 6, 2\]: leading dimensions \[2\] and \[4\]"):
        FactoredMatrix(torch.ones(2, 3, 4), torch.ones(2, 4, 6)) @ FactoredMatrix(
            torch.ones(4, 6, 7), torch.ones(4, 7, 2)
        )


def _ellipsis_forms() -> list[tuple[tuple, tuple]]:
    """(index, what it means on the dense [2, 3, 5, 7] product): integers on rows and columns stay one wide."""
    mask = [[True, False, True], [False, True, False]]
    return [
        ((...,), (...,)),
        ((..., 1), (..., slice(1, 2))),
        ((..., -1, slice(None)), (..., slice(-1, None), slice(None))),
        ((..., slice(1, 4), slice(2, 6)), (..., slice(1, 4), slice(2, 6))),
        ((None, ..., slice(1, 4), slice(None)), (None, ..., slice(1, 4), slice(None))),
        ((0, None, ..., 2), (0, None, ..., slice(2, 3))),
        ((None, 1, None), (None, 1, None)),
        ((..., torch.tensor([1, 4])), (..., torch.tensor([1, 4]))),
        ((torch.tensor([1, 0]), ..., 1), (torch.tensor([1, 0]), ..., slice(1, 2))),
        ((1, ..., 2, 3), (1, ..., slice(2, 3), slice(3, 4))),
        ((mask, ...), (torch.tensor(mask), ...)),
        ((tuple(map(tuple, mask)), ..., 1), (torch.tensor(mask), ..., slice(1, 2))),
        ((np.array(mask), ..., 1, slice(None)), (torch.tensor(mask), ..., slice(1, 2), slice(None))),
        ((None, [True, False], ..., 1), (None, torch.tensor([True, False]), ..., slice(1, 2))),
        (([[1, 0], [0, 1]], ..., 1), (torch.tensor([[1, 0], [0, 1]]), ..., slice(1, 2))),
        (((1, 0), ..., 1), (torch.tensor([1, 0]), ..., slice(1, 2))),
    ]


@pytest.mark.parametrize(("index", "dense_index"), _ellipsis_forms(), ids=repr)
def test_ellipsis_none_and_sequences_index_as_the_dense_product(index: tuple, dense_index: tuple) -> None:
    g = torch.Generator().manual_seed(7)
    fm = FactoredMatrix(
        torch.randn(2, 3, 5, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 2, 7, generator=g, dtype=torch.float64),
    )
    got, want = fm[index], fm.AB[dense_index]
    assert got.shape == want.shape and got.mdim == 2
    assert_close(got.AB, want)


def test_uint8_masks_and_index_errors() -> None:
    fm = FactoredMatrix(torch.randn(2, 3, 5, 2), torch.randn(2, 3, 2, 7))
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    for given in (mask, mask.numpy()):
        with pytest.warns(UserWarning, match="uint8 .*boolean mask"):
            got = fm[given, ...]
        assert_close(got.AB, fm.AB[mask.bool()])
    with pytest.raises(IndexError, match="single ellipsis"):
        fm[..., ...]
    with pytest.raises(ValueError, match="too long an index") as caught:
        fm[..., 0, 0, 0, 0, 0]
    assert isinstance(caught.value, IndexError)  # as torch's own (and a ValueError, as TransformerLens's)
    with pytest.raises(IndexError, match="None goes before the row and column"):
        fm[..., 1, None]
    with pytest.raises(IndexError, match="None goes before"):
        fm[0, 0, 1, None, 2]


class _TensorLike:
    """A duck-typed tensor (not a torch.Tensor subclass): what TransformerLens accepts as an operand."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    ndim = property(lambda self: self.tensor.ndim)
    shape = property(lambda self: self.tensor.shape)

    def unsqueeze(self, dim: int) -> _TensorLike:
        return _TensorLike(self.tensor.unsqueeze(dim))

    def squeeze(self, dim: int) -> _TensorLike:
        return _TensorLike(self.tensor.squeeze(dim))

    def broadcast_to(self, shape: tuple[int, ...]) -> _TensorLike:
        return _TensorLike(self.tensor.broadcast_to(shape))

    def __matmul__(self, other: object) -> object:
        if isinstance(other, FactoredMatrix):
            return NotImplemented
        return _TensorLike(self.tensor @ (other.tensor if isinstance(other, _TensorLike) else other))

    def __rmatmul__(self, other: torch.Tensor) -> _TensorLike:
        return _TensorLike(other @ self.tensor)


def test_tensor_like_operands() -> None:
    g = torch.Generator().manual_seed(8)
    fm = FactoredMatrix(torch.randn(3, 4, generator=g).double(), torch.randn(4, 6, generator=g).double())
    for side, rank in ((fm, 4), (fm.T, 3)):  # rdim above and below mdim: B @ M, or AB as the left factor
        M = torch.randn(side.rdim, 5, generator=g, dtype=torch.float64)
        right = side @ _TensorLike(M)
        assert isinstance(right, FactoredMatrix) and isinstance(right.AB, _TensorLike) and right.mdim == rank
        assert_close(right.AB.tensor, side.AB @ M)
    for shape, rank in (((5, 3), 3), ((2, 3), 3)):
        N = torch.randn(*shape, generator=g, dtype=torch.float64)
        left = _TensorLike(N) @ fm
        assert isinstance(left, FactoredMatrix) and left.mdim == rank
        assert_close(left.AB.tensor, N @ fm.AB)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    out = fm @ _TensorLike(v)
    assert isinstance(out, _TensorLike) and out.shape == (3,)
    assert_close(out.tensor, fm.AB @ v)
    with pytest.raises(ValueError, match=r"\[3, 6\] @ \[5, 2\]"):
        fm @ _TensorLike(torch.randn(5, 2))
    with pytest.raises(TypeError, match="factors must be tensors"):
        FactoredMatrix(np.ones((3, 4)), torch.ones(4, 2))  # type: ignore[arg-type]


def test_svd_unpacks_as_torch_linalg_and_names_transformerlens_v(fm_dense) -> None:
    fm, dense = fm_dense
    result = fm.svd()
    U, _, Vh = result
    assert isinstance(result, attnlens.factored.SVD) and result.Vh is Vh and result.U is U
    assert_bitwise(result.V, Vh.mT, "copy")
    assert_bitwise(fm.V, fm.Vh.mT, "same call")
    assert_close(result.U @ torch.diag_embed(result.S) @ result.V.mT, dense)  # TransformerLens's reconstruction
