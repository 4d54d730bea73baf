"""Invariants of attnlens.functional on random shapes, masks and dtypes (hypothesis, an optional test dependency)."""

from __future__ import annotations

import torch
from conftest import assert_bitwise, optional
from test_functional import TOLERANCES, randn
from torch.testing import assert_close

from attnlens.functional import merge_heads, scaled_dot_product_attention, split_heads

optional("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

dims = st.integers(1, 6)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    q_pos=dims,
    k_pos=dims,
    d_k=dims,
    d_v=dims,
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    float_mask=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_rows_sum_to_one_masked_entries_zero_dead_rows_zero(
    batch: int, q_pos: int, k_pos: int, d_k: int, d_v: int, p: float, seed: int, float_mask: bool, dtype: torch.dtype
) -> None:
    q = randn(batch, q_pos, d_k, seed=seed, dtype=dtype) * 4
    k = randn(batch, k_pos, d_k, seed=seed + 1, dtype=dtype) * 4
    v = randn(batch, k_pos, d_v, seed=seed + 2, dtype=dtype)
    allowed = torch.rand(batch, q_pos, k_pos, generator=torch.Generator().manual_seed(seed)) < p
    mask: torch.Tensor = allowed
    if float_mask:
        mask = randn(batch, q_pos, k_pos, seed=seed + 3, dtype=dtype).masked_fill(~allowed, float("-inf"))
    out, pattern = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_pattern=True)
    assert not pattern.isnan().any() and not out.isnan().any()
    assert (pattern[~allowed] == 0).all()
    live = allowed.any(-1)
    sums = pattern.double().sum(-1)
    assert_close(sums[live], torch.ones_like(sums[live]), **TOLERANCES[dtype])
    assert (pattern[~live] == 0).all() and (out[~live] == 0).all()


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), pos=dims, heads=dims, d_head=dims)
def test_split_and_merge_heads_round_trip(lead: list[int], pos: int, heads: int, d_head: int) -> None:
    x = randn(*lead, pos, heads * d_head)
    split = split_heads(x, heads)
    assert split.shape == (*lead, heads, pos, d_head)
    # Head h holds columns h*d_head .. (h+1)*d_head - 1 (the layout of GPT-2's fused projections).
    assert_bitwise(split[..., heads - 1, :, :], x[..., (heads - 1) * d_head :], "copy")
    assert_bitwise(merge_heads(split), x, "copy")
