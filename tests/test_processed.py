"""Processed weights (layer norms folded, writing weights and unembedding centred) reproduce the model's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, nontrivial_ln, random_ids
from torch.testing import assert_close

import attnlens
from attnlens.verify import _rebuild


def forward(w: attnlens.ModelWeights, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    allowed = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    hidden, logits = _rebuild(w, ids, pos, allowed)
    assert logits is not None
    return hidden, logits


@pytest.mark.parametrize(
    ("fold_ln", "center_writing_weights", "center_unembed"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, True)],
)
def test_processed_logits_are_the_models_up_to_the_documented_shift(fold_ln, center_writing_weights, center_unembed):
    model = make_gpt2().double()
    nontrivial_ln(model)
    ids = random_ids(model)
    with torch.no_grad():
        expected = model(ids).logits
    w = attnlens.extract_weights(model)
    p = w.processed(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed)
    with torch.no_grad():
        _, raw_logits = forward(w, ids)
        _, logits = forward(p, ids)
    assert_close(raw_logits, expected, atol=1e-12, rtol=1e-10)
    shifted = expected - expected.mean(-1, keepdim=True) if center_unembed else expected
    assert_close(logits, shifted, atol=1e-12, rtol=1e-10)
    if not center_unembed:
        assert (logits - expected).abs().max() < 1e-12
    else:
        assert (logits - expected).abs().max() > 1e-6  # the shift is real, so the test above can tell it apart


def test_what_processing_changes() -> None:
    model = make_gpt2().double()
    nontrivial_ln(model)
    w = attnlens.extract_weights(model)
    p = w.processed()
    assert p.b_U is not None and w.b_U is None
    assert torch.equal(p.layers[0].ln_1.w, torch.ones(w.d_model, dtype=torch.float64))
    assert torch.equal(p.ln_f.b, torch.zeros(w.d_model, dtype=torch.float64))
    for t in (p.W_E, p.W_pos, p.layers[1].W_O, p.layers[1].b_O, p.layers[0].mlp.W_out):
        assert t.mean(-1).abs().max() < 1e-14  # writing weights centred over d_model
    for t in (p.layers[0].W_Q, p.layers[1].mlp.W_in, p.W_U):
        assert t.mean(-2).abs().max() < 1e-14  # reading weights centred over d_model
    assert p.W_U.mean(-1).abs().max() < 1e-14 and p.b_U.mean().abs() < 1e-14
    assert not p.W_E.requires_grad and p.W_E.untyped_storage().data_ptr() != w.W_E.untyped_storage().data_ptr()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(2.0)  # (adding a constant would be centred away)
    assert not torch.equal(p.W_E, w.processed().W_E), "a processed copy is a snapshot"
    assert p.QK.shape == w.QK.shape and p.OV[1, 2].mdim == w.d_head
    # QK sees the folded layer norm: x_norm @ QK' @ x_norm^T equals the raw scores up to terms in b_ln.
    assert not torch.allclose(p.QK.AB, w.QK.AB)


def test_processed_half_model_keeps_dtype_and_matches_in_float32() -> None:
    model = make_gpt2()
    nontrivial_ln(model)
    ids = random_ids(model)
    p = attnlens.extract_weights(model.half()).processed(
        fold_ln=True, center_writing_weights=True, center_unembed=False
    )
    assert p.dtype == torch.float16 and p.W_U is not None and p.W_U.dtype == torch.float16
    p32 = attnlens.extract_weights(model.float()).processed(center_unembed=False)
    with torch.no_grad():
        expected = model(ids).logits
        _, logits = forward(p32, ids)
    assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_model_without_unembedding_keeps_ln_f() -> None:
    model = make_gpt2("GPT2Model")
    nontrivial_ln(model)
    w = attnlens.extract_weights(model)
    p = w.processed()
    assert p.W_U is None and p.b_U is None
    assert torch.equal(p.ln_f.w, w.ln_f.w)
