"""verify on float64 GPT-NeoX and Llama-family models, whose eager kernel soft-maxes in float32 (attnlens.verify).

Their eager kernel computes ``softmax(scores, dtype=torch.float32).to(query.dtype)`` also in a float64 model, so its
z, attention output, hidden state and logits carry float32's rounding: verify allows for it there (derived in
attnlens.tolerances.softmax_rounding and verify._layer_rows) and nowhere else. The models are the shrunk published
configs of tests/test_llama.py and tests/test_hub_configs_neox.py with seeded random weights.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_gpt2, random_ids
from test_hub_configs_llama import inputs, left_padded
from test_llama import load

import attnlens
from attnlens.verify import derived_tolerances

FAMILIES = ["gpt_neox", "llama", "qwen3", "mistral"]
CORRUPTION = 1e-4  # relative size of the corruptions that must be detected (as in tests/test_verify.py)
LATER = ("z", "attn_out", "hidden", "logits")  # the rows that see the model's own softmax


@pytest.fixture(params=FAMILIES)
def folder(request: pytest.FixtureRequest, saved: Callable[[str], Path]) -> Path:
    return saved(request.param)


def float64(folder: Path, kernel: str) -> Any:
    return load(folder, kernel).to(torch.float64)


def base_tolerances(model: Any, n_pos: int) -> dict[str, float]:
    weights = attnlens.extract_weights(model)
    return derived_tolerances(weights.dtype, weights.d_model, weights.d_head, weights.n_layers, n_pos)


def transformer(model: Any) -> Any:
    return model.gpt_neox if hasattr(model, "gpt_neox") else model.model


@pytest.mark.parametrize("padding", ["none", "right"])
def test_float64_eager_verifies(folder: Path, padding: str) -> None:
    # Before: z, attn_out, hidden and logits failed at every layer (relative errors 3e-9 to 1.7e-7 against float64
    # tolerances of 6e-15 to 6e-14); the float32 softmax's rounding is the model's own.
    model = float64(folder, "eager")
    ids, mask = inputs()
    report = attnlens.verify(model, ids, mask if padding == "right" else None)
    assert report.ok, str(report)
    base = base_tolerances(model, ids.shape[1])
    for quantity in ("attn_out", "hidden", "logits"):  # an allowance was added, and only a float32-sized one
        assert base[quantity] < report.tolerances[quantity] < 1e-4
    assert report.tolerances["z"] < 1e-5
    assert all(row.max_abs_error == 0 for row in report.rows if row.quantity == "pattern_hf_order")


def test_own_dtype_softmax_keeps_its_tolerances(saved: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The float32-softmax allowance of z, attn_out, hidden and logits is never computed for a model whose pass
    # soft-maxes in its own dtype: GPT-2 in float64 (eager), the families in float64 under SDPA and in float32 under
    # eager; the pattern rows' allowance is computed only where the eager kernel soft-maxes in a coarser dtype (the
    # float64 families, also under SDPA: their patterns come from an eager pass). attn_out, hidden and logits keep
    # exactly the dims-only tolerances.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a float32-softmax allowance was computed")

    module = sys.modules["attnlens.verify"]  # the module (attnlens.verify is also the function's name)
    monkeypatch.setattr(module, "value_output_extent", refuse)
    ids, mask = inputs()
    gpt2 = make_gpt2(n_layer=3).to(torch.float64)
    models = [
        (gpt2, random_ids(gpt2), None, False),
        (float64(saved("llama"), "sdpa"), ids, mask, True),
        (float64(saved("gpt_neox"), "sdpa"), ids, mask, True),
        (load(saved("qwen3"), "eager"), ids, mask, False),
    ]
    for model, model_ids, model_mask, coarse_patterns in models:
        with monkeypatch.context() as patch:
            if not coarse_patterns:
                patch.setattr(module, "softmax_rounding", refuse)
            report = attnlens.verify(model, model_ids, model_mask)
        assert report.ok, str(report)
        base = base_tolerances(model, model_ids.shape[1])
        for quantity in ("attn_out", "hidden", "logits"):
            assert all(row.tolerance == base[quantity] for row in report.rows if row.quantity == quantity)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_corruptions_are_caught_on_float64_eager(saved: Callable[[str], Path], family: str) -> None:
    model = float64(saved(family), "eager")
    ids, mask = inputs()
    # A hook scaling layer 1's attention output by 1 + 1e-4: attn_out at layer 1 fails, nothing per layer elsewhere.
    attention = transformer(model).layers[1].attention if family == "gpt_neox" else model.model.layers[1].self_attn
    handle = attention.register_forward_hook(lambda module, args, output: (output[0] * (1 + CORRUPTION), *output[1:]))
    try:
        report = attnlens.verify(model, ids, mask)
    finally:
        handle.remove()
    out = report.row("attn_out", 1)
    assert not out.ok and 0.9 * CORRUPTION < out.max_rel_error < 1.1 * CORRUPTION
    assert out.tolerance < CORRUPTION / 100  # far from the corruption, not just below it
    assert {(row.layer, row.quantity) for row in report.failures} <= {
        (1, "attn_out"),
        (None, "hidden"),
        (None, "logits"),
    }
    # One head's W_V scaled by 1 + 1e-4 in a copy of the weights: that head's v fails, at float64's tolerance.
    weights = attnlens.extract_weights(model)
    W_V = weights.layers[0].W_V.clone()
    W_V[0] *= 1 + CORRUPTION
    layers = (dataclasses.replace(weights.layers[0], W_V=W_V), *weights.layers[1:])
    corrupted = dataclasses.replace(weights, layers=layers)
    report = attnlens.verify(model, ids, mask, weights=corrupted)
    assert not report.row("v", 0, 0).ok
    assert all(row.layer in (0, None) for row in report.failures)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_float64_left_padding_nan_is_named(saved: Callable[[str], Path], kernel: str) -> None:
    # transformers' eager kernel adds the float64 mask minimum and soft-maxes in float32, where it is -inf: the
    # left-padded first position's row is all -inf, NaN after softmax, and the NaN reaches the real tokens through
    # the next layer's keys and values (both transformers releases). verify names that cause.
    for family in ("llama", "gpt_neox"):
        ids, mask, positions = left_padded()
        model = float64(saved(family), kernel)
        if kernel == "eager":
            with torch.no_grad():
                logits = model(ids, attention_mask=mask, position_ids=positions).logits
            assert logits[mask.bool()].isnan().any()  # on real tokens: the model's own numbers
        report = attnlens.verify(model, ids, mask, position_ids=positions)
        assert not report.ok
        nan_rows = {row.quantity for row in report.failures}
        assert "pattern" in nan_rows  # every pattern comes from the eager kernel
        assert (nan_rows & set(LATER)) if kernel == "eager" else not nan_rows & set(LATER)
        assert any("soft-maxes to NaN" in note and "float32" in note for note in report.notes), report.notes
        plain = attnlens.verify(model, ids)  # no padding: no NaN, no note
        assert plain.ok and not any("soft-maxes to NaN" in note for note in plain.notes)
