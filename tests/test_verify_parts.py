"""verify's parts: the pattern alone and the fused output against functional.attention; how errors are measured."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, random_ids, unit_roundoff
from einops import rearrange

import attnlens
from attnlens import functional
from attnlens._verify_compare import MEASURED_SLACK, errors, magnitude, slack
from attnlens._verify_recompute import attention_output


def layer_and_input(variant: str) -> tuple[attnlens.LayerWeights, torch.Tensor]:
    """Layer 1 of a tiny GPT-2 with ``initializer_range=0.2`` (sharp enough to matter), and a normalised input."""
    model = make_gpt2(n_layer=2, initializer_range=0.2)
    layer = attnlens.extract_weights(model).layers[1]
    if variant == "window":
        layer = dataclasses.replace(layer, window=3)
    elif variant == "grouped":  # two key/value heads, each serving two query heads
        layer = dataclasses.replace(layer, W_K=layer.W_K[:2], b_K=layer.b_K[:2], W_V=layer.W_V[1:3], b_V=layer.b_V[1:3])
    x = torch.nn.functional.layer_norm(torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(2)), (32,))
    return layer, x


def masks(kind: str) -> torch.Tensor:
    if kind == "causal":
        return functional.causal_mask(12)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding: the first four query rows have no key at all
    valid[2, -5:] = False  # right padding
    return functional.padding_mask(valid)


@pytest.mark.parametrize("variant", ["plain", "window", "grouped"])
@pytest.mark.parametrize("kind", ["causal", "padded"])
@torch.no_grad()
def test_attention_pattern_is_attentions_pattern(variant: str, kind: str) -> None:
    layer, x = layer_and_input(variant)
    allowed = masks(kind)
    expected = functional.attention(x, layer, allowed).pattern
    assert_bitwise(functional.attention_pattern(x, layer, allowed), expected, "same kernel")


@pytest.mark.parametrize("kind", ["causal", "padded"])
@torch.no_grad()
def test_attention_pattern_is_attentions_pattern_with_qk_norms_and_a_rotation(kind: str) -> None:
    # Qwen3's layout: per-head RMSNorms on q and k, then a rotation of half of each head (the other argument paths).
    layer, x = layer_and_input("grouped")
    norm_w = torch.linspace(0.5, 1.5, layer.W_Q.shape[-1])
    layer = dataclasses.replace(
        layer,
        rotary_dim=4,
        q_norm=attnlens.LayerNormWeights(w=norm_w, b=torch.zeros_like(norm_w), eps=1e-6, rms=True),
        k_norm=attnlens.LayerNormWeights(w=norm_w.flip(0), b=torch.zeros_like(norm_w), eps=1e-6, rms=True),
    )
    rotation = functional.rotary_cos_sin(torch.arange(12)[None], rotary_dim=4, base=100.0)
    allowed = masks(kind)
    expected = functional.attention(x, layer, allowed, rotation=rotation).pattern
    assert_bitwise(functional.attention_pattern(x, layer, allowed, rotation=rotation), expected, "same kernel")
    # The rotation did act: the same layer unrotated gives another pattern.
    assert not torch.equal(expected, functional.attention(x, dataclasses.replace(layer, rotary_dim=0), allowed).pattern)


@pytest.mark.parametrize("variant", ["plain", "window", "grouped"])
@pytest.mark.parametrize("kind", ["causal", "padded"])
@torch.no_grad()
def test_fused_output_is_attentions_output_within_rounding(variant: str, kind: str) -> None:
    layer, x = layer_and_input(variant)
    allowed = masks(kind)
    full = functional.attention(x, layer, allowed)
    fused = attention_output(x, layer, allowed)
    # Both sides compute softmax(s q k^T) v @ W_O + b_O in float32, in other orders. A score is a length-d_head sum,
    # off by at most gamma_{d_head} s max|q| max|k| per side; softmax turns a score error d into a relative error of
    # at most 2d per probability (plus a few roundings of exp and the normaliser, 8u per side); z sums k_pos such
    # terms (gamma_{k_pos} per side); the output sums d_model products z W_O (two_sums_bound's 2 gamma_{d_model}).
    u, n_pos, d_head = unit_roundoff(torch.float32), x.shape[1], layer.W_Q.shape[-1]
    gamma = {n: n * u / (1 - n * u) for n in (d_head, n_pos, 32)}
    q, k, v = (t.double() for t in (full.q, full.k, full.v))
    score = 2 * gamma[d_head] * abs(layer.scale) * q.norm(dim=-1).amax() * k.norm(dim=-1).amax()
    dz = (4 * score + 16 * u + 2 * gamma[n_pos]) * v.abs().amax()
    W_O = rearrange(layer.W_O.double().abs(), "head d_head d_model -> (head d_head) d_model")
    z = rearrange(full.z.double().abs(), "batch pos head d_head -> batch pos (head d_head)")
    bound = dz * W_O.sum(0) + 2 * gamma[32] * (z @ W_O + layer.b_O.double().abs())
    excess = (fused.double() - full.output.double()).abs() - bound
    assert float(excess.max()) <= 0.0, f"fused output off by {float(excess.max()):.3g} beyond its bound"
    if kind == "padded":  # rows with no key: zeros through W_O, so b_O alone, as functional.attention gives
        assert_bitwise(fused[1, :4], layer.b_O.expand(4, -1), "exact")


def test_errors_in_float32_are_the_exact_errors_rounded() -> None:
    """Measured in float32, each head's largest error is the float64 one rounded to float32 (rounding is monotone)."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 4, 16, 8, generator=g) * torch.logspace(-30, 30, 8)
    recomputed = reference * (1 + torch.randn(reference.shape, generator=g) * 1e-6)
    recomputed[0, 1, 3] = -recomputed[0, 1, 3]  # entries of opposite sign: their difference rounds in float32
    keep = torch.ones(2, 1, 16, 1, dtype=torch.bool)
    keep[1, 0, 5:] = False
    recomputed[1, 2, 9] = float("nan")  # outside keep: never counts
    scale = magnitude(reference, keep, 1)
    measured = errors(reference, recomputed, keep, 1, scale)
    exact = errors(reference.double(), recomputed.double(), keep, 1, magnitude(reference.double(), keep, 1))
    for (err, rel), (err64, rel64) in zip(measured, exact):
        assert err == float(torch.tensor(err64).float())  # the exact error, correctly rounded to float32
        assert abs(err - err64) <= 2.0**-24 * err64
        assert rel * (1 + MEASURED_SLACK) >= rel64  # the slack makes the float32 decision never the more lenient
    assert slack(torch.float64) == 0.0 and slack(torch.float32) == slack(torch.bfloat16) == MEASURED_SLACK
    same = errors(reference, reference.clone(), None, 1, magnitude(reference, None, 1))
    assert all(err == 0.0 and rel == 0.0 for err, rel in same)  # equal tensors: exactly 0, as a zero tolerance needs


def test_magnitude_is_exact_in_the_tensors_own_dtype() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    keep = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(4)) > 0.3
    expected = x.double().abs().masked_fill(~keep, 0.0).amax(dim=(0, 2))
    assert_bitwise(magnitude(x, keep, 1), expected, "exact")
    assert math.isnan(float(magnitude(torch.tensor([1.0, float("nan")]), None, None)))


def test_verify_measures_its_errors_as_documented() -> None:
    """verify's rows carry errors measured by errors(): the report of a tiny model, recomputed by hand for layer 0."""
    model = make_gpt2()
    ids = random_ids(model)
    report = attnlens.verify(model, ids)
    weights = attnlens.extract_weights(model)
    with torch.no_grad():
        hidden = model.transformer.h[0].ln_1(model.transformer.wte(ids) + model.transformer.wpe.weight[: ids.shape[1]])
        q = functional.attention(hidden, weights.layers[0]).q
        qkv = model.transformer.h[0].attn.c_attn(hidden)
    model_q = rearrange(qkv[..., :32], "batch pos (head d_head) -> batch head pos d_head", head=4)
    expected = errors(model_q, q, None, 1, magnitude(model_q, None, 1))
    assert [(r.max_abs_error, r.max_rel_error) for r in report.rows if r.quantity == "q" and r.layer == 0] == expected
