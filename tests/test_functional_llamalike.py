"""The Llama-family maths of attnlens.functional on hand-checkable cases (the hub-config tests check them against
transformers' own modules, bitwise)."""

from __future__ import annotations

import pytest
import torch

from attnlens.functional import causal_mask, expand_kv, gated_mlp, repeat_kv, rms_norm, sliding_window_mask


def test_rms_norm_upcasts_then_multiplies_in_the_input_dtype() -> None:
    x = torch.tensor([[3.0, 4.0]])
    weight = torch.tensor([1.0, 2.0])
    # mean(x^2) = 12.5, so x / sqrt(12.5) = [0.8485..., 1.1313...], times the weight.
    expected = torch.tensor([[3.0, 8.0]]) / 12.5**0.5
    torch.testing.assert_close(rms_norm(x, weight, 0.0), expected, rtol=2**-23, atol=0)
    half = rms_norm(x.bfloat16(), weight.bfloat16(), 0.0)
    # The product is rounded once in bfloat16 after the float32 normalisation, as LlamaRMSNorm does.
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, weight.bfloat16() * (x * torch.rsqrt(torch.tensor(12.5))).bfloat16())


def test_expand_kv_is_a_view_and_repeat_kv_pairs_query_head_h_with_kv_head_h_over_group() -> None:
    keys = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # [batch, kv_head, pos, d_head]
    view = expand_kv(keys, 2)
    assert view.shape == (2, 3, 2, 4, 5) and view.data_ptr() == keys.data_ptr() and view.stride(2) == 0
    repeated = repeat_kv(keys, 2)
    assert repeated.shape == (2, 6, 4, 5)
    for head in range(6):
        assert torch.equal(repeated[:, head], keys[:, head // 2])
    assert repeat_kv(keys, 1) is keys
    weights = torch.randn(3, 7, 5)  # [kv_head, d_model, d_head]
    assert torch.equal(repeat_kv(weights, 4, dim=0)[5], weights[1])
    with pytest.raises(ValueError, match="positive number of query heads"):
        expand_kv(keys, 0)


def test_sliding_window_mask_keeps_at_most_window_keys_itself_included() -> None:
    mask = sliding_window_mask(6, window=3)
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert torch.equal(sliding_window_mask(6, window=6), causal_mask(6))
    assert torch.equal(sliding_window_mask(4, window=1), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one key"):
        sliding_window_mask(4, window=0)


def test_gated_mlp_is_down_of_act_gate_times_up() -> None:
    x = torch.tensor([[1.0, -2.0]])
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    up = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    down = torch.tensor([[1.0, 1.0, 1.0]])
    hidden = torch.nn.functional.silu(torch.tensor([1.0, -2.0, -1.0])) * torch.tensor([2.0, -2.0, 0.0])
    assert torch.equal(gated_mlp(x, gate, up, down), hidden.sum().reshape(1, 1))
    with pytest.raises(ValueError, match="unknown activation 'made_up'"):
        gated_mlp(x, gate, up, down, act="made_up")
