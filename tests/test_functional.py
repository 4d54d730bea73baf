"""attnlens.functional: hand-checked cases, agreement with torch's SDPA and with HF GPT-2, and invariants."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, assert_bitwise, make_gpt2, random_ids
from torch.testing import assert_close

from attnlens import extract_weights, functional
from attnlens.functional import (
    apply_rotary,
    attention,
    attention_scores,
    causal_mask,
    masked_softmax,
    padding_mask,
    rotary_cos_sin,
    scaled_dot_product_attention,
)
from attnlens.models import gpt2_attention

# Agreement with torch's SDPA at each dtype. Both sides round scores, pattern and output to the dtype; torch's CPU
# kernels accumulate some of it in float32 and fold the scale into q and k, so the differences are a few units in the
# last place of the dtype (unit roundoff: float64 1.1e-16, float32 6e-8, float16 4.9e-4, bfloat16 3.9e-3).
TOLERANCES: dict[torch.dtype, dict[str, Any]] = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
    torch.float32: {"atol": 2e-6, "rtol": 1e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
# Recomputing a GPT-2 attention module in float32 from per-head weights (einsum per head instead of one fused addmm).
GPT2_TOLERANCE: dict[str, Any] = {"atol": 1e-6, "rtol": 1e-5}
FP32 = TOLERANCES[torch.float32]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def random_mask(*shape: int, seed: int = 0, p: float = 0.6, device: str = "cpu") -> torch.Tensor:
    """A boolean mask with at least one allowed key per row (rows torch's kernels agree on)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < p
    mask[..., 0] |= ~mask.any(-1)
    return mask.to(device)


def torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    except RuntimeError as error:  # e.g. float16 on a CPU build without half kernels
        pytest.skip(f"torch's SDPA does not run this case here: {error}")


# --- cases checkable by hand -----------------------------------------------------------------------------------


def test_equal_scores_give_uniform_rows() -> None:
    q = torch.ones(1, 3, 4)
    k = torch.ones(1, 5, 4)
    v = randn(1, 5, 2)
    out, pattern = scaled_dot_product_attention(q, k, v, return_pattern=True)
    assert_close(pattern, torch.full((1, 3, 5), 0.2))
    assert_close(out, v.mean(dim=1, keepdim=True).expand(1, 3, 2))


def test_two_by_two_by_hand() -> None:
    # Scale 1; the query [1, 0] scores the keys [0, 0] and [1, 0] as 0 and 1, so its weights are [1, e] / (1 + e).
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    v = torch.eye(2, dtype=torch.float64)
    e = math.e
    expected = torch.tensor([[1.0, e], [1.0, e]], dtype=torch.float64) / (1 + e)
    out, pattern = scaled_dot_product_attention(q, k, v, scale=1.0, return_pattern=True)
    assert_close(pattern, expected, **TOLERANCES[torch.float64])
    assert_close(out, expected, **TOLERANCES[torch.float64])  # values are one-hot: output = pattern
    # Causal: the first query sees only the first key.
    out, pattern = scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True, return_pattern=True)
    assert_close(pattern, torch.tensor([[1.0, 0.0], [1.0, e]], dtype=torch.float64) / torch.tensor([[1.0], [1 + e]]))
    # The default scale is 1/sqrt(d_k) = 1/sqrt(2): weights [1, e^(1/sqrt 2)] / (1 + e^(1/sqrt 2)).
    w = math.exp(2**-0.5)
    _, pattern = scaled_dot_product_attention(q, k, v, return_pattern=True)
    assert_close(pattern[0], torch.tensor([1.0, w], dtype=torch.float64) / (1 + w))


def test_causal_mask_is_top_left() -> None:
    assert causal_mask(2, 3).tolist() == [[True, False, False], [True, True, False]]
    assert causal_mask(3, 2).tolist() == [[True, False], [True, True], [True, True]]
    assert causal_mask(2).dtype == torch.bool


def test_padding_mask_by_hand() -> None:
    mask = padding_mask(torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert mask.shape == (2, 1, 3, 3)
    f, t = False, True
    assert mask[0, 0].tolist() == [[f, f, f], [f, t, f], [f, t, t]]
    assert mask[1, 0].tolist() == [[t, f, f], [t, t, f], [t, t, f]]
    both = padding_mask(torch.tensor([[0, 1, 1]]), causal=False)
    assert both[0, 0].tolist() == [[f, t, t]] * 3
    assert padding_mask(torch.tensor([[1, 1, 1]]), q_len=1).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError, match="batch, pos"):
        padding_mask(torch.ones(3))


def test_errors_name_the_problem() -> None:
    q, k, v = randn(2, 4), randn(3, 4), randn(3, 5)
    with pytest.raises(ValueError, match="d_k"):
        scaled_dot_product_attention(q, randn(3, 5), v)
    with pytest.raises(ValueError, match="k_pos"):
        scaled_dot_product_attention(q, k, randn(2, 5))
    with pytest.raises(ValueError, match="either"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 3, dtype=torch.bool), is_causal=True)


# --- agreement with torch.nn.functional.scaled_dot_product_attention ----------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = {  # (leading dims, q_pos, k_pos, d_k, d_v)
    "square": ((2, 3), 5, 5, 8, 8),
    "more_keys": ((2, 3), 3, 7, 8, 8),
    "more_queries": ((1, 2), 7, 4, 8, 8),
    "d_v_differs": ((2, 2), 5, 6, 8, 3),
    "extra_batch_dims": ((2, 2, 3), 4, 4, 4, 6),
}
MASKS = ["none", "bool", "float", "causal"]


def make_case(shape: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    lead, q_pos, k_pos, d_k, d_v = SHAPES[shape]
    q = randn(*lead, q_pos, d_k, seed=seed, dtype=dtype, device=device)
    k = randn(*lead, k_pos, d_k, seed=seed + 1, dtype=dtype, device=device)
    v = randn(*lead, k_pos, d_v, seed=seed + 2, dtype=dtype, device=device)
    return q, k, v


def mask_kwargs(kind: str, q: torch.Tensor, k: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    q_pos, k_pos = q.shape[-2], k.shape[-2]
    if kind == "bool":
        return {"attn_mask": random_mask(q_pos, k_pos, seed=seed, device=str(q.device))}
    if kind == "float":
        bias = randn(q_pos, k_pos, seed=seed, dtype=q.dtype, device=str(q.device))
        allowed = random_mask(q_pos, k_pos, seed=seed, device=str(q.device))
        return {"attn_mask": bias.masked_fill(~allowed, float("-inf"))}
    if kind == "causal":
        return {"is_causal": True}
    return {}


def check_against_torch(shape: str, dtype: torch.dtype, kind: str, scale: float | None, device: str = "cpu") -> None:
    q, k, v = make_case(shape, dtype, device)
    kwargs = mask_kwargs(kind, q, k)
    expected = torch_sdpa(q, k, v, scale=scale, **kwargs)
    out, pattern = scaled_dot_product_attention(q, k, v, scale=scale, return_pattern=True, **kwargs)
    assert out.dtype == dtype and out.shape == expected.shape and pattern.dtype == dtype
    assert_close(out, expected, **TOLERANCES[dtype])
    # The pattern is the one behind the output, and each row sums to 1.
    assert_close(torch.matmul(pattern, v), out, **TOLERANCES[dtype])
    sums = pattern.double().sum(-1)
    assert_close(sums, torch.ones_like(sums), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_agrees_with_torch(shape: str, kind: str, dtype: torch.dtype) -> None:
    check_against_torch(shape, dtype, kind, None)


@pytest.mark.parametrize("scale", [None, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("kind", MASKS)
def test_agrees_with_torch_explicit_scale(kind: str, scale: float | None) -> None:
    check_against_torch("more_keys", torch.float32, kind, scale)


def test_half_inputs_are_soft_maxed_in_float32() -> None:
    scores = randn(3, 4, dtype=torch.float16) * 8
    pattern = masked_softmax(scores)
    assert pattern.dtype == torch.float32
    assert_bitwise(pattern, torch.softmax(scores.float(), -1), "same kernel")


# --- the arithmetic orders of attention_scores -------------------------------------------------------------------


def test_attention_scores_orders() -> None:
    q, k = randn(2, 3, 5, 8, seed=1), randn(2, 3, 6, 8, seed=2)
    raw = torch.matmul(q, k.transpose(-1, -2))
    assert_bitwise(attention_scores(q, k, 0.125), raw * 0.125, "exact")  # q * 2**-3 first: the same bits
    assert_bitwise(attention_scores(q, k), raw * 8**-0.5, "same kernel")
    # transformers 4.x eager: divide by a 0-dim tensor sqrt(d_head), then by the layer number; scale is ignored.
    legacy = raw / torch.full([], 8**0.5, dtype=raw.dtype) / 3.0
    assert_bitwise(attention_scores(q, k, 123.0, divisors=(8**0.5, 3.0)), legacy, "same kernel")
    # reorder_and_upcast_attn: a float32 baddbmm with the scale as alpha.
    half_q, half_k = q.half(), k.half()
    upcast = attention_scores(half_q, half_k, 0.25, upcast=True)
    empty = torch.empty(6, 5, 6)
    reference = torch.baddbmm(
        empty, half_q.reshape(6, 5, 8).float(), half_k.transpose(-1, -2).reshape(6, 8, 6).float(), beta=0, alpha=0.25
    )
    assert_bitwise(upcast, reference.reshape(2, 3, 5, 6), "same kernel")
    # All orders are the same numbers up to rounding.
    assert_close(attention_scores(q, k, 1 / 8**0.5 / 3, divisors=None), legacy, **FP32)
    assert_close(attention_scores(q, k, 0.25, upcast=True), raw * 0.25, **FP32)


# --- attention() against HF's own GPT2Attention ----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "config", [{}, {"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True}], ids=str
)
def test_attention_matches_gpt2_attention(impl: str, config: dict[str, Any]) -> None:
    model = make_gpt2(attn_implementation=impl, **config)
    if impl == "sdpa" and config.get("scale_attn_by_inverse_layer_idx") and gpt2_attention.transformers_major() < 5:
        pytest.skip("transformers 4.x's SDPA path ignores scale_attn_by_inverse_layer_idx (verify reports it)")
    ids = random_ids(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.ln_1.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o)))
        handles.append(block.attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0])))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    weights = extract_weights(model)
    valid = mask.bool()
    with torch.no_grad():
        for i, layer in enumerate(weights.layers):
            result = attention(inputs[i], layer, padding_mask(mask), return_result=True)
            assert_close(result.output[valid], outputs[i][valid], **GPT2_TOLERANCE)
            # Per-head contributions add up to the output; scores are -inf exactly where the pattern is masked.
            assert result.result is not None
            assert_close(result.result.sum(-2) + layer.b_O, result.output, **GPT2_TOLERANCE)
            assert ((result.scores == float("-inf")) == (result.pattern == 0) | ~padding_mask(mask)).all()
            assert result.z.shape == (2, 12, 4, 8) and result.q.shape == (2, 4, 12, 8)


def test_attention_default_mask_is_causal_and_result_optional() -> None:
    weights = extract_weights(make_gpt2())
    x = randn(1, 6, 32, seed=3)
    default = attention(x, weights.layers[0])
    explicit = attention(x, weights.layers[0], causal_mask(6).expand(1, 1, 6, 6))
    assert_bitwise(default.output, explicit.output, "same kernel")
    assert default.result is None
    assert (default.pattern.triu(1) == 0).all()


def test_activations_match_transformers() -> None:
    from transformers.activations import ACT2FN

    x = randn(1000, seed=4) * 4
    for name, fn in functional.ACTIVATIONS.items():
        # the same elementwise operations in the same order
        assert_bitwise(fn(x), ACT2FN[name](x), "same kernel", what=name)


# --- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@CUDA
def test_cuda_agrees_with_torch_and_cpu() -> None:  # pragma: no cover - needs a CUDA device
    for dtype in DTYPES:
        for kind in MASKS:
            for shape in SHAPES:
                check_against_torch(shape, dtype, kind, None, device="cuda")
    q, k, v = make_case("more_keys", torch.float32, "cuda")
    mask = random_mask(3, 7, device="cuda")
    mask[1] = False  # a dead row: zeros, never NaN, on CUDA too
    out, pattern = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_pattern=True)
    assert not out.isnan().any() and (pattern[..., 1, :] == 0).all()
    cpu = scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu())
    assert_close(out.cpu(), cpu, **FP32)


def test_upcast_scores_stay_float32_under_autocast() -> None:
    q, k = randn(2, 3, 5, 8, seed=5), randn(2, 3, 6, 8, seed=6)
    reference = attention_scores(q, k, 0.25, upcast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = attention_scores(q, k, 0.25, upcast=True)
    assert_bitwise(scores, reference, "same call")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_head", [16, 64, 256])
def test_power_of_two_scale_fast_path_is_bitwise(dtype: torch.dtype, d_head: int) -> None:
    # The fast path scales q instead of the product: it must give exactly the bits of matmul-then-scale (5.x order)
    # and of matmul-then-divide (4.x order), on values spanning many binades.
    g = torch.Generator().manual_seed(d_head)
    q = torch.randn(2, 3, 40, d_head, generator=g, dtype=dtype) * torch.logspace(-3, 3, d_head, dtype=dtype)
    k = torch.randn(2, 3, 50, d_head, generator=g, dtype=dtype)
    reference = torch.matmul(q, k.transpose(-1, -2))
    scale = d_head**-0.5
    assert_bitwise(functional.attention_scores(q, k, scale), reference * scale, "exact")
    divided = reference / torch.full([], d_head**0.5, dtype=dtype)
    assert_bitwise(functional.attention_scores(q, k, divisors=(d_head**0.5,)), divided, "exact")
    # Not a power of two: the general path, still in the requested order.
    assert_bitwise(functional.attention_scores(q, k, 0.3), reference * 0.3, "same kernel")
    three = functional.attention_scores(q, k, divisors=(d_head**0.5, 3.0))
    assert_bitwise(three, divided / torch.full([], 3.0, dtype=dtype), "same kernel")


@pytest.mark.parametrize(
    ("q", "k", "mask", "words"),
    [
        (
            (2, 3, 4),
            (2, 5, 4),
            (3, 3),
            r"attn_mask of shape \(3, 3\) does not broadcast to the scores' shape \(2, 3, 5\)",
        ),
        ((2, 3, 4), (2, 5, 4), (2, 2, 3, 5), r"attn_mask of shape \(2, 2, 3, 5\) does not broadcast"),
        ((2, 3, 4), (3, 5, 4), None, r"query \(2, 3, 4\), key \(3, 5, 4\) and value \(3, 5, 4\) do not broadcast"),
    ],
)
def test_sdpa_names_shapes_that_do_not_broadcast(q, k, mask, words) -> None:
    query, key = torch.rand(q), torch.rand(k)
    attn_mask = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=words):
        functional.scaled_dot_product_attention(query, key, key, attn_mask=attn_mask)


def test_sdpa_mask_broadcasts_like_torch_and_refuses_integer_masks() -> None:
    g = torch.Generator().manual_seed(0)
    query, key = torch.rand(2, 3, 4, 8, generator=g), torch.rand(2, 3, 6, 8, generator=g)
    mask = torch.rand(2, 1, 1, 6, generator=g) > 0.3
    mask[..., 0] = True
    out = functional.scaled_dot_product_attention(query, key, key, attn_mask=mask)
    assert_close(out, F.scaled_dot_product_attention(query, key, key, attn_mask=mask), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="bool .* or float"):
        functional.scaled_dot_product_attention(query, key, key, attn_mask=mask.long())


# Rotary position embeddings. Unit roundoff u: float64 1.1e-16, float32 6.0e-8, float16 4.9e-4, bfloat16 3.9e-3.
def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def test_rotary_quarter_turn_by_hand() -> None:
    # cos 0, sin 1 turns each pair (i, i + rotary_dim/2) by 90 degrees: (1, 0) -> (0, 1), (0, 1) -> (-1, 0).
    x = torch.tensor([[[[1.0, 0.0, 5.0, -7.0]], [[0.0, 1.0, 5.0, -7.0]]]])  # [batch 1, pos 2, head 1, d_head 4]
    out = apply_rotary(x, torch.zeros(1, 2, 2), torch.ones(1, 2, 2), rotary_dim=2)
    assert_bitwise(out, torch.tensor([[[[0.0, 1.0, 5.0, -7.0]], [[-1.0, 0.0, 5.0, -7.0]]]]), "exact")  # the rest passes
    # Feature 0 pairs with feature d/2 = 2 (rotate-half), not with its neighbour 1 (GPT-J's interleaved pairs).
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    assert_bitwise(
        apply_rotary(e0, torch.zeros(1, 4), torch.ones(1, 4)).flatten(), torch.tensor([0.0, 0, 1, 0]), "exact"
    )


def test_rotary_cos_sin_by_hand() -> None:
    # rotary_dim 4, base 100: pairs turn by position * [1, 100 ** -0.5] = position * [1, 0.1].
    cos, sin = rotary_cos_sin(torch.tensor([[0, 3]]), rotary_dim=4, base=100.0)
    angles = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.3, 3.0, 0.3]], dtype=torch.float64)
    # Angles and their cosines are computed in float32: a few roundings of values of magnitude <= 3.
    tol = {"atol": 8 * _u(torch.float32) * 3, "rtol": 0.0}
    assert_close(cos[0].double(), angles.cos(), **tol)
    assert_close(sin[0].double(), angles.sin(), **tol)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    d_head, rotary_dim, n_pos = 8, 4, 24
    q, k = randn(d_head, dtype=torch.float64), randn(d_head, seed=1, dtype=torch.float64)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q_rot = apply_rotary(q.expand(1, n_pos, 1, d_head), cos, sin)[0, :, 0]
    k_rot = apply_rotary(k.expand(1, n_pos, 1, d_head), cos, sin)[0, :, 0]
    scores = q_rot @ k_rot.T  # [q_pos, k_pos]
    # float64 angles up to n_pos and a d_head-term dot product: a few roundings of each, relative to |q| |k|.
    tol = 8 * _u(torch.float64) * (n_pos + d_head) * float(q.norm() * k.norm())
    for shift in range(1, n_pos):
        assert_close(scores[shift:, shift:], scores[:-shift, :-shift], atol=tol, rtol=0.0)
    assert float(scores[:, 0].max() - scores[:, 0].min()) > 1e3 * tol  # and it does depend on the offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rotary_pct", [0.25, 0.5, 1.0])
def test_rotary_is_bitwise_transformers_gpt_neox(dtype: torch.dtype, rotary_pct: float) -> None:
    # The same two products and one sum per element, in the same dtype, as transformers' apply_rotary_pos_emb, and
    # cosines from the same float32 angles as GPTNeoXRotaryEmbedding: equal bits, whatever the axis order.
    import transformers
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    n_heads, d_head = 3, 16
    rotary_dim = int(d_head * rotary_pct)
    config = transformers.GPTNeoXConfig(
        hidden_size=n_heads * d_head, num_attention_heads=n_heads, rotary_pct=rotary_pct, rotary_emb_base=500
    )
    position_ids = torch.tensor([[0, 1, 2, 3, 7, 40], [5, 6, 7, 8, 9, 10]])
    q, k = randn(2, 6, n_heads, d_head, dtype=dtype), randn(2, 6, n_heads, d_head, seed=1, dtype=dtype)
    hf_cos, hf_sin = hf.GPTNeoXRotaryEmbedding(config)(q, position_ids)
    cos, sin = rotary_cos_sin(position_ids, rotary_dim=rotary_dim, base=500, dtype=dtype)
    assert_bitwise(cos, hf_cos, "same kernel")
    assert_bitwise(sin, hf_sin, "same kernel")
    hf_q, hf_k = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_bitwise(apply_rotary(q, cos, sin, rotary_dim=rotary_dim), hf_q.transpose(1, 2), "same kernel")
    assert_bitwise(apply_rotary(k, cos, sin), hf_k.transpose(1, 2), "same kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rotary_in_half_precision_is_within_roundoff(dtype: torch.dtype) -> None:
    x = randn(2, 9, 2, 8, dtype=dtype)
    cos, sin = rotary_cos_sin(torch.arange(9).expand(2, 9), rotary_dim=8, base=10000.0, dtype=dtype)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    exact = apply_rotary(x.double(), cos.double(), sin.double())  # the same half inputs, rotated in float64
    # Each output is x1 * cos + (-+x2) * sin: two rounded products and a rounded sum, each within u of its value.
    assert_close(out.double(), exact, atol=4 * _u(dtype) * float(x.abs().max()), rtol=0.0)


@pytest.mark.parametrize(
    ("cos_shape", "kwargs", "dtype", "words"),
    [
        ((1, 5, 4), {"rotary_dim": 2}, torch.float32, "rotary_dim=2 but cos and sin are 4 wide"),
        ((1, 5, 3), {}, torch.float32, "must be even and at most d_head=8, got 3"),
        ((1, 5, 10), {}, torch.float32, "at most d_head=8, got 10"),
        ((1, 6, 4), {}, torch.float32, "with the same pos"),
        ((1, 5, 4), {}, torch.float64, "must have x's dtype torch.float32"),
    ],
)
def test_rotary_errors_name_the_problem(cos_shape, kwargs, dtype, words) -> None:
    x = randn(1, 5, 2, 8)
    cos = torch.zeros(cos_shape, dtype=dtype)
    with pytest.raises((ValueError, TypeError), match=words):
        apply_rotary(x, cos, cos.clone(), **kwargs)


def test_rotary_shape_errors() -> None:
    with pytest.raises(ValueError, match="one shape"):
        apply_rotary(randn(1, 5, 2, 8), torch.zeros(1, 5, 4), torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="even and positive"):
        rotary_cos_sin(torch.zeros(1, 3, dtype=torch.long), rotary_dim=3, base=10000.0)
