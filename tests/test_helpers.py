"""conftest's assert_bitwise: a named contract, dtype, shape and bits (NaN-safe, signed zeros told apart)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONTRACTS, assert_bitwise


def test_every_contract_has_its_meaning_and_an_unknown_name_fails() -> None:
    assert set(CONTRACTS) == {"copy", "same call", "same kernel", "exact"}
    assert all(len(meaning) > 20 for meaning in CONTRACTS.values())
    x = torch.arange(4.0)
    with pytest.raises(AssertionError, match="unknown contract 'close enough'"):
        assert_bitwise(x, x.clone(), "close enough")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_same_bits_pass_and_one_ulp_fails_with_the_largest_difference(dtype: torch.dtype) -> None:
    x = torch.linspace(-3, 3, 12, dtype=dtype).reshape(3, 4)
    assert_bitwise(x, x.clone(), "copy")
    assert_bitwise(x.t(), x.clone().t(), "copy")  # strided views compare too
    y = x.clone()
    y[1, 2] = torch.nextafter(y[1, 2], torch.tensor(float("inf"), dtype=dtype))
    y[2, 0] = y[2, 0] + 1
    with pytest.raises(AssertionError, match=r"2 of 12 elements differ, largest difference 1 at \(2, 0\)"):
        assert_bitwise(y, x, "same kernel")


def test_nan_equals_the_same_nan_and_signed_zeros_differ() -> None:
    x = torch.tensor([0.5, float("nan"), 2.0])
    assert_bitwise(x, x.clone(), "same call")  # torch.equal would fail here
    with pytest.raises(AssertionError, match="largest difference inf"):
        assert_bitwise(x, torch.tensor([0.5, 1.0, 2.0]), "same call")
    with pytest.raises(AssertionError, match="the values are equal but the bits are not"):
        assert_bitwise(torch.tensor([0.0]), torch.tensor([-0.0]), "exact")  # torch.equal would pass here


def test_dtype_and_shape_must_match() -> None:
    x = torch.ones(2, 3)
    with pytest.raises(AssertionError, match="dtypes differ: torch.float32 and torch.float64"):
        assert_bitwise(x, x.double(), "copy")
    with pytest.raises(AssertionError, match=r"shapes differ: \(2, 3\) and \(3, 2\)"):
        assert_bitwise(x, x.reshape(3, 2), "copy")
    with pytest.raises(AssertionError, match="first difference at"):
        assert_bitwise(torch.tensor([1, 2]), torch.tensor([1, 3]), "exact")
    with pytest.raises(AssertionError, match="row 4"):
        assert_bitwise(torch.zeros(1), torch.ones(1), "exact", what="row 4")
