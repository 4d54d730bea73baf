"""Extraction of per-head weights from every GPT-2 class, their views, and the FactoredMatrix circuits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, random_ids
from torch.testing import assert_close

import attnlens
from attnlens.models import gpt2
from attnlens.weights import FactoredMatrix

CLASSES = gpt2.SUPPORTED_CLASSES


def shares_storage(view: torch.Tensor, param: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


@pytest.mark.parametrize("cls_name", CLASSES)
def test_every_class_extracts(cls_name: str) -> None:
    model = make_gpt2(cls_name)
    w = attnlens.extract_weights(model)
    assert (w.n_layers, w.n_heads, w.d_model, w.d_head, w.d_vocab, w.n_ctx, w.d_mlp) == (2, 4, 32, 8, 97, 32, 128)
    assert w.W_E.shape == (97, 32) and w.W_pos.shape == (32, 32)
    assert len(w.layers) == 2
    has_lm_head = cls_name in ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")
    assert (w.W_U is not None) == has_lm_head
    if has_lm_head:
        assert w.W_U.shape == (32, 97)
        assert shares_storage(w.W_U, model.lm_head.weight)


def test_head_slices_are_columns_of_c_attn_and_rows_of_c_proj(tiny_gpt2) -> None:
    w = attnlens.extract_weights(tiny_gpt2)
    d_model, d_head = w.d_model, w.d_head
    for layer, block in zip(w.layers, tiny_gpt2.transformer.h):
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        for h in range(w.n_heads):
            for part, (W_x, b_x) in enumerate(((layer.W_Q, layer.b_Q), (layer.W_K, layer.b_K), (layer.W_V, layer.b_V))):
                cols = slice(part * d_model + h * d_head, part * d_model + (h + 1) * d_head)
                assert_bitwise(W_x[h], W[:, cols], "copy")
                assert_bitwise(b_x[h], b[cols], "copy")
            assert_bitwise(layer.W_O[h], block.attn.c_proj.weight[h * d_head : (h + 1) * d_head, :], "copy")
        assert_bitwise(layer.b_O, block.attn.c_proj.bias, "copy")
        assert_bitwise(layer.mlp.W_in, block.mlp.c_fc.weight, "copy")
        assert layer.ln_1.eps == block.ln_1.eps


def test_qkv_from_extracted_weights_equal_model_c_attn(tiny_gpt2) -> None:
    w = attnlens.extract_weights(tiny_gpt2)
    x = torch.randn(3, 7, w.d_model, generator=torch.Generator().manual_seed(0))
    for layer, block in zip(w.layers, tiny_gpt2.transformer.h):
        with torch.no_grad():
            q_ref, k_ref, v_ref = gpt2.split_qkv(block.attn.c_attn(x), w.n_heads)
            q, k, v = attnlens.functional.qkv(x, layer)
        assert_close(q, q_ref, atol=1e-6, rtol=1e-5)
        assert_close(k, k_ref, atol=1e-6, rtol=1e-5)
        assert_close(v, v_ref, atol=1e-6, rtol=1e-5)


def test_extraction_copies_nothing_and_tracks_in_place_edits(tiny_gpt2) -> None:
    w = attnlens.extract_weights(tiny_gpt2)
    block = tiny_gpt2.transformer.h[1]
    layer = w.layers[1]
    for view in (layer.W_Q, layer.W_K, layer.W_V, layer.b_Q, layer.b_K, layer.b_V):
        assert shares_storage(view, block.attn.c_attn.weight if view.ndim == 3 else block.attn.c_attn.bias)
    assert shares_storage(layer.W_O, block.attn.c_proj.weight)
    assert shares_storage(w.W_E, tiny_gpt2.transformer.wte.weight)
    with torch.no_grad():
        block.attn.c_attn.weight[0, 0] += 1.0
    assert layer.W_Q[0, 0, 0] == block.attn.c_attn.weight[0, 0]
    assert_bitwise(w.W_Q[1], layer.W_Q, "copy")


def test_stacked_forms_shapes(tiny_gpt2) -> None:
    w = attnlens.extract_weights(tiny_gpt2)
    assert w.W_Q.shape == w.W_K.shape == w.W_V.shape == (2, 4, 32, 8)
    assert w.W_O.shape == (2, 4, 8, 32)
    assert w.b_Q.shape == (2, 4, 8) and w.b_O.shape == (2, 32)
    assert w.QK.shape == w.OV.shape == (2, 4, 32, 32)
    with pytest.raises(KeyError, match="no stacked weight"):
        w.stacked("W_X")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_extraction_keeps_dtype(dtype: torch.dtype) -> None:
    model = make_gpt2().to(dtype)
    w = attnlens.extract_weights(model)
    assert w.dtype == dtype and w.layers[0].W_Q.dtype == dtype and w.layers[0].W_O.dtype == dtype
    assert w.device == torch.device("cpu")


def test_attention_spec_variants() -> None:
    plain = attnlens.extract_weights(make_gpt2(n_layer=3))
    assert [layer.scale for layer in plain.layers] == pytest.approx([8**-0.5] * 3)
    inverse = attnlens.extract_weights(make_gpt2(n_layer=3, scale_attn_by_inverse_layer_idx=True))
    assert [layer.scale for layer in inverse.layers] == pytest.approx([8**-0.5 / (i + 1) for i in range(3)])
    unscaled = attnlens.extract_weights(make_gpt2(scale_attn_weights=False))
    assert all(layer.scale == 1.0 for layer in unscaled.layers)
    upcast = attnlens.extract_weights(make_gpt2(reorder_and_upcast_attn=True))
    assert all(layer.upcast for layer in upcast.layers)


def test_checkpoint_by_path_round_trip(tmp_path) -> None:
    model = make_gpt2()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    w = attnlens.extract_weights(tmp_path)
    ref = attnlens.extract_weights(model)
    for a, b in zip(w.layers, ref.layers):
        assert_bitwise(a.W_Q, b.W_Q, "copy")  # saved and loaded
        assert_bitwise(a.W_O, b.W_O, "copy")
        assert_bitwise(a.b_V, b.b_V, "copy")
    assert w.name == str(tmp_path)
    w16 = attnlens.extract_weights(str(tmp_path), dtype=torch.float16)
    assert w16.dtype == torch.float16


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(
        attnlens.UnsupportedModelError, match=r"got torch\.nn\.modules\.linear\.Linear.*GPT2LMHeadModel"
    ):
        attnlens.extract_weights(torch.nn.Linear(2, 2))
    assert issubclass(attnlens.UnsupportedModelError, ValueError)
    with pytest.raises(attnlens.UnsupportedModelError, match="cross-attention"):
        attnlens.extract_weights(make_gpt2(add_cross_attention=True))
    with pytest.raises(attnlens.UnsupportedModelError, match="activation_function='mystery'"):
        model = make_gpt2()
        model.config.activation_function = "mystery"
        attnlens.extract_weights(model)
    model = make_gpt2()
    model.config.future_flag = True
    with attnlens.strict_config(), pytest.raises(attnlens.UnsupportedModelError, match="unknown effect future_flag"):
        attnlens.extract_weights(model)
    with pytest.raises(OSError, match="could not read a config"):
        attnlens.extract_weights(tmp_path / "missing")
    with pytest.raises(ValueError, match="only when loading"):
        attnlens.extract_weights(make_gpt2(), dtype=torch.float16)


def test_non_gpt2_checkpoint_is_refused(tmp_path) -> None:
    import transformers

    cfg = transformers.GPTNeoConfig(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        vocab_size=11,
        max_position_embeddings=8,
    )
    transformers.GPTNeoForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(attnlens.UnsupportedModelError, match="'gpt_neo' checkpoint"):
        attnlens.extract_weights(tmp_path)
    with pytest.raises(attnlens.UnsupportedModelError, match="GPTNeoForCausalLM"):
        attnlens.extract_weights(transformers.GPTNeoForCausalLM(cfg))


def test_check_inputs_errors(tiny_gpt2) -> None:
    ids = random_ids(tiny_gpt2, batch=2, pos=5)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(ids + 200)
    with pytest.raises(ValueError, match="n_ctx=32"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="must match"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(ids, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="all padding"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(ids, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="integers"):
        attnlens.models.adapt(tiny_gpt2).check_inputs(ids.float())
    out, mask, pos = attnlens.models.adapt(tiny_gpt2).check_inputs(ids[0].tolist())
    assert out.shape == (1, 5) and mask is None and pos is None


def test_qk_ov_circuits_compute_scores_and_outputs(tiny_gpt2) -> None:
    w = attnlens.extract_weights(tiny_gpt2)
    layer = w.layers[0]
    x = torch.randn(5, w.d_model, dtype=torch.float32)
    with torch.no_grad():
        qk = layer.QK[2]
        q = x @ layer.W_Q[2]
        k = x @ layer.W_K[2]
        assert_close(x @ qk.AB @ x.T, q @ k.T, atol=1e-5, rtol=1e-5)
        assert_close(x @ layer.OV[2].AB, x @ layer.W_V[2] @ layer.W_O[2], atol=1e-5, rtol=1e-5)
        assert_close(w.QK[0, 2].AB, qk.AB)
    half = FactoredMatrix(layer.W_Q.detach().half(), layer.W_K.detach().half().transpose(-1, -2))
    assert half.S.dtype == torch.float32
