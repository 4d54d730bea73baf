"""Processed weights (layer norms folded, writing weights and unembedding centred) reproduce the model's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, nontrivial_ln, random_ids
from torch.testing import assert_close

import attnlens
from attnlens._verify_recompute import rebuild


def forward(w: attnlens.ModelWeights, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    allowed = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    hidden, logits = rebuild(w, ids, pos, allowed)
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
    assert_bitwise(p.layers[0].ln_1.w, torch.ones(w.d_model, dtype=torch.float64), "exact")
    assert_bitwise(p.ln_f.b, torch.zeros(w.d_model, dtype=torch.float64), "exact")
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
    assert_bitwise(p.ln_f.w, w.ln_f.w, "copy")


def nontrivial_biases(model) -> None:
    """Seeded attention and MLP biases: GPT-2 initialises them to 0, where folding b_V into b_O tests nothing."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "ln_" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# float64 (unit roundoff 2^-53 = 1.1e-16): a logit of this 2-layer, d_model 32 model sums a few thousand O(1)
# products, also through an SVD (backward stable, ~d_model * u relative); 1e-12 absolute and 1e-10 relative leave
# a margin of 100x and more, while a lost bias term (0.3 * O(1)) is 1e11 times larger.
LOGIT_TOLERANCE = {"atol": 1e-12, "rtol": 1e-10}


@pytest.mark.parametrize(
    ("fold_ln", "center_reading_weights", "fold_value_biases", "refactor"),
    [
        (True, True, True, False),
        (True, False, True, False),
        (True, False, False, False),
        (False, True, True, False),
        (True, True, True, True),
        (True, True, False, True),
        (False, True, False, True),
    ],
)
def test_transformerlens_options_reproduce_the_models_logits(
    fold_ln, center_reading_weights, fold_value_biases, refactor
):
    model = make_gpt2().double()
    nontrivial_ln(model)
    nontrivial_biases(model)
    ids = random_ids(model)
    with torch.no_grad():
        expected = model(ids).logits
    w = attnlens.extract_weights(model)
    p = w.processed(
        fold_ln=fold_ln,
        center_reading_weights=center_reading_weights,
        center_unembed=False,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor,
    )
    with torch.no_grad():
        _, logits = forward(p, ids)
    assert_close(logits, expected, **LOGIT_TOLERANCE)
    if fold_ln and not center_reading_weights:
        assert p.layers[0].W_Q.mean(-2).abs().max() > 1e-3  # folded, not centred
    if fold_value_biases or refactor:
        assert_bitwise(p.b_V, torch.zeros_like(p.b_V), "exact")
    else:
        assert p.b_V.abs().max() > 1e-2


def test_fold_value_biases_moves_b_V_W_O_from_each_head_into_b_O() -> None:
    model = make_gpt2().double()
    nontrivial_ln(model)
    nontrivial_biases(model)
    w = attnlens.extract_weights(model)
    kept = w.processed(fold_value_biases=False)
    folded = w.processed(fold_value_biases=True)
    x = torch.randn(2, 7, w.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for before, after in zip(kept.layers, folded.layers):
        moved = torch.einsum("hd,hdm->hm", before.b_V, before.W_O)  # b_V[h] @ W_O[h]
        assert_close(after.b_O, before.b_O + moved.sum(0), atol=1e-14, rtol=1e-13)  # one sum of 4 x 8 products
        assert_bitwise(after.W_O, before.W_O, "same call")
        assert_bitwise(after.W_V, before.W_V, "same call")
        a = attnlens.functional.attention(x, before, return_result=True)
        b = attnlens.functional.attention(x, after, return_result=True)
        assert a.result is not None and b.result is not None
        # Each head's output loses exactly its constant b_V[h] @ W_O[h] (pattern rows sum to 1); the layer's does not.
        assert_close(a.result - b.result, moved.expand_as(a.result), atol=1e-13, rtol=1e-12)
        assert_close(a.output, b.output, atol=1e-13, rtol=1e-12)
        assert moved.abs().max() > 1e-2


def test_refactored_factors_are_balanced_and_keep_patterns_and_head_outputs() -> None:
    model = make_gpt2().double()
    nontrivial_ln(model)
    nontrivial_biases(model)
    w = attnlens.extract_weights(model)
    plain = w.processed()
    refactored = w.processed(refactor_factored_attn_matrices=True)
    x = torch.randn(2, 7, w.d_model, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    eye = torch.eye(w.d_head, dtype=torch.float64).expand(w.n_heads, -1, -1)
    for before, after in zip(plain.layers, refactored.layers):
        assert_close(after.W_O @ after.W_O.mT, eye)  # W_O has orthonormal rows: a rotation into d_model
        q_eff = torch.cat([after.W_Q, after.b_Q[:, None]], 1)
        k_eff = torch.cat([after.W_K, after.b_K[:, None]], 1)
        assert_close(q_eff.norm(dim=1), k_eff.norm(dim=1))  # each direction's norm shared by queries and keys
        a = attnlens.functional.attention(x, before, return_result=True)
        b = attnlens.functional.attention(x, after, return_result=True)
        assert_close(b.scores, a.scores, atol=1e-12, rtol=1e-10)
        assert_close(b.result, a.result, atol=1e-12, rtol=1e-10)
        assert_close(b.output, a.output, atol=1e-12, rtol=1e-10)
        assert not torch.allclose(b.q, a.q)  # the factors did change


@pytest.mark.parametrize(
    "name", ["EleutherAI__pythia-14m.json", "togethercomputer__RedPajama-INCITE-7B-Instruct.json"]
)  # a parallel residual and rotary on a quarter of each head; a sequential one and rotary on all of it
def test_processed_gpt_neox_weights_give_the_raw_weights_logits(name: str, tmp_path) -> None:
    from test_hub_configs_neox import load, make_checkpoint

    make_checkpoint(name, tmp_path)  # random layer norms and biases, so every fold moves something
    model = load(tmp_path, "eager", torch.float64)
    adapter = attnlens.models.adapt(model)
    w = attnlens.extract_weights(model)
    ids = random_ids(model)
    n_pos = ids.shape[1]
    pos = torch.arange(n_pos).expand(ids.shape[0], -1)
    allowed = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    # Any rotation will do, the same on both sides: folding and centring act before and after it, never across.
    rotation = attnlens.functional.rotary_cos_sin(pos, rotary_dim=w.layers[0].rotary_dim, base=1e4, dtype=torch.float64)
    rotations = dict.fromkeys(range(w.n_layers), rotation)
    with torch.no_grad():
        _, expected = rebuild(w, ids, pos, allowed, parallel_residual=adapter.parallel_residual, rotations=rotations)
        for p in (w.processed(center_unembed=False), w.processed(center_unembed=False, fold_value_biases=False)):
            _, logits = rebuild(p, ids, pos, allowed, parallel_residual=adapter.parallel_residual, rotations=rotations)
            assert logits is not None and expected is not None
            assert_close(logits, expected, **LOGIT_TOLERANCE)
    assert w.layers[0].rotary_dim > 0 and not torch.allclose(w.processed().layers[0].W_Q, w.layers[0].W_Q)
