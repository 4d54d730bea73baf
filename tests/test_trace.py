from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import warnings
from typing import Any

import pytest
import torch
import transformers
from conftest import assert_bitwise, eager_reference, make_gpt2, random_ids

import attnlens
from attnlens import AttentionTrace
from attnlens.trace import STORE_NAMES

V4 = int(transformers.__version__.split(".")[0]) < 5

CONFIGS = {
    "default": {},
    "inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
    "reorder_and_upcast": {"reorder_and_upcast_attn": True},
    "unscaled": {"scale_attn_weights": False},
    # d_head 16: a power-of-two scale (1/4), which takes functional.attention_scores' scale-q-first path.
    "d_head_16": {"n_embd": 64, "n_head": 4},
    "d_head_16_inverse": {"n_embd": 64, "n_head": 4, "scale_attn_by_inverse_layer_idx": True},
}


def padded(model: Any, padding: str, batch: int = 3, pos: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(model, batch, pos)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -3:] = 0
        mask[2, -1:] = 0
    return ids, mask


def config_twin_patterns(config: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, n_layer: int = 3) -> list:
    """output_attentions of a model built from defaults plus ``config``: a deliberately different model.

    For the model's own numbers use ``eager_reference(model, ...)``; this twin shows what the config alone describes.
    """
    return eager_reference(make_gpt2(n_layer=n_layer, attn_implementation="eager", **config), ids, mask)


def valid_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()[:, None, :, None]


# ------------------------------------------------------------------------------------------------ fidelity ---


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_eager_model_patterns_are_bitwise_its_own(config: dict[str, Any], padding: str) -> None:
    model = make_gpt2(n_layer=3, attn_implementation="eager", **config)
    ids, mask = padded(model, padding)
    expected = eager_reference(model, ids, mask)
    tr = attnlens.trace(model, ids, mask)
    rows = valid_rows(mask)
    for layer in range(3):
        got = tr.pattern(layer)
        assert got.shape == expected[layer].shape
        assert_bitwise(
            got * rows, expected[layer] * rows, "copy", what=f"layer {layer}"
        )  # the eager kernel's own probabilities


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_sdpa_model_patterns_match_eager_output_attentions(config: dict[str, Any], padding: str) -> None:
    model = make_gpt2(n_layer=3, attn_implementation="sdpa", **config)
    if attnlens.models.adapt(model).kernel_departure is not None:
        pytest.skip("transformers 4.x runs SDPA without this config's scale (tested below)")
    ids, mask = padded(model, padding)
    expected = eager_reference(model, ids, mask)
    tr = attnlens.trace(model, ids, mask)
    assert model.config._attn_implementation == "sdpa"
    rows = valid_rows(mask)
    for layer in range(3):
        torch.testing.assert_close(tr.pattern(layer) * rows, expected[layer] * rows, atol=1e-6, rtol=0)


# The configs whose eager arithmetic differs (issue 12): plain, inverse-layer scaling, the float32 reordered path.
KERNEL_CONFIGS = {name: CONFIGS[name] for name in ("default", "inverse_layer_idx", "reorder_and_upcast", "d_head_16")}


def count_score_computations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the tap's recomputations of a layer's scores (the work an eager kernel's own pattern saves)."""
    module = sys.modules["attnlens.patterns"]
    real, calls = module.masked_scores, [0]

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "masked_scores", counted)
    return calls


def recompute_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make trace treat the model's kernel as one that hands out no pattern: every layer's is recomputed."""
    adapter = attnlens.models.gpt2.GPT2Adapter
    real = adapter.from_model
    monkeypatch.setattr(
        adapter, "from_model", lambda model: dataclasses.replace(real(model), kernel_returns_pattern=False)
    )


def no_key_rows(mask: torch.Tensor) -> torch.Tensor:
    return ~attnlens.functional.padding_mask(mask).any(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", KERNEL_CONFIGS.values(), ids=KERNEL_CONFIGS.keys())
@pytest.mark.parametrize("padding", ["left", "right"])
def test_eager_kernel_patterns_are_bitwise_the_recomputed_ones_and_the_models_own(
    config: dict[str, Any], padding: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_gpt2(n_layer=3, attn_implementation="eager", initializer_range=0.2, **config).to(dtype)
    ids, mask = padded(model, padding)
    calls = count_score_computations(monkeypatch)
    kernel = attnlens.trace(model, ids, mask)  # layers 0 and 1 from the kernel; the forward stops at layer 2's q/k/v
    assert calls[0] == 1
    kernel_z = attnlens.trace(model, ids, mask, store=("pattern", "z"))  # every layer from the kernel
    assert calls[0] == 1
    recompute_everywhere(monkeypatch)
    recomputed = attnlens.trace(model, ids, mask)
    assert calls[0] == 4
    assert kernel.patterns.dtype == kernel_z.patterns.dtype == recomputed.patterns.dtype == dtype
    # The recomputation runs HF's eager arithmetic: the same kernels on the same shapes in the same order.
    assert_bitwise(kernel.patterns, recomputed.patterns, "same kernel")
    assert_bitwise(kernel_z.patterns, recomputed.patterns, "same kernel")
    # The model's own output_attentions, on every row; rows of queries with no key to attend to are 0 in a trace,
    # whatever the kernel left there.
    expected = eager_reference(model, ids, mask)
    dead = no_key_rows(mask)
    assert bool(dead.any()) == (padding == "left")
    for layer in range(3):
        assert_bitwise(kernel.pattern(layer), expected[layer].masked_fill(dead, 0.0), "copy", what=f"layer {layer}")


@pytest.mark.parametrize("handed_out", [None, torch.zeros(3, 4, 10, 1)], ids=["none", "wrong_shape"])
def test_eager_kernel_without_a_pattern_falls_back_to_recomputing(
    handed_out: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_gpt2(n_layer=3, attn_implementation="eager", initializer_range=0.2)
    ids, mask = padded(model, "left")
    store = ("pattern", "z")
    expected = attnlens.trace(model, ids, mask, heads=[3, 1], store=store)
    calls = count_score_computations(monkeypatch)
    monkeypatch.setattr(attnlens.models.gpt2, "kernel_pattern", lambda output: handed_out)
    got = attnlens.trace(model, ids, mask, heads=[3, 1], store=store)
    assert calls[0] == 3
    assert_bitwise(got.patterns, expected.patterns, "same kernel")  # recomputed in HF's order against the kernel's
    assert_bitwise(got["z"], expected["z"], "copy")  # z is the model's own in both


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sites_say_which_kernels_hand_out_their_pattern(implementation: str) -> None:
    model = make_gpt2(n_layer=1, attn_implementation=implementation)
    adapter = attnlens.models.adapt(model)
    sites = adapter.sites
    assert adapter.kernel_returns_pattern is (implementation == "eager")
    seen: list[Any] = []
    handle = sites.layers[0].attn.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(random_ids(model))
    finally:
        handle.remove()
    pattern = attnlens.models.gpt2.kernel_pattern(seen[0])
    assert (pattern is not None) is (implementation == "eager")
    if pattern is not None:
        assert pattern.shape == (2, 4, 12, 12)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 12))
    assert attnlens.models.gpt2.kernel_pattern(seen[0][0]) is None  # a bare tensor carries no pattern


def test_eager_kernel_patterns_keep_heads_and_ignore_training_dropout() -> None:
    model = make_gpt2(n_layer=3, attn_implementation="eager", attn_pdrop=0.5, initializer_range=0.2)
    ids, mask = padded(model, "left")
    full = attnlens.trace(model, ids, mask, store=("pattern", "z"))
    model.train()
    torch.manual_seed(0)
    tr = attnlens.trace(model, ids, mask, heads=[3, 1], store=("pattern", "z"))
    assert model.training and model.transformer.h[0].attn.attn_dropout.training
    assert_bitwise(tr.patterns, full.patterns[:, :, [3, 1]], "copy")  # the kernel's own, before dropout
    # The kernel's tensor is copied into the trace's own stack, never kept.
    seen: list[torch.Tensor] = []
    handle = model.transformer.h[0].attn.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        again = attnlens.trace(model.eval(), ids, mask, store=("pattern", "z"))
    finally:
        handle.remove()
    assert len(seen) == 1
    assert_bitwise(again.pattern(0), seen[0].masked_fill(no_key_rows(mask), 0.0), "copy")
    assert again.patterns.untyped_storage().data_ptr() != seen[0].untyped_storage().data_ptr()


@pytest.mark.skipif(not V4, reason="transformers 5.x passes the scale to every kernel")
def test_v4_sdpa_ignoring_scale_flags_is_traced_as_run_and_warned() -> None:
    model = make_gpt2(n_layer=2, attn_implementation="sdpa", scale_attn_weights=False, initializer_range=0.3)
    ids = random_ids(model)
    with pytest.warns(UserWarning, match="without the scale"):
        tr = attnlens.trace(model, ids)
    # What the kernel really ran is the default 1/sqrt(d_head) scaling: the eager twin with scaling on.
    expected = config_twin_patterns({"initializer_range": 0.3}, ids, torch.ones_like(ids), n_layer=2)
    for layer in range(2):
        torch.testing.assert_close(tr.pattern(layer), expected[layer], atol=1e-5, rtol=0)


def test_padding_rows_are_zero_and_real_rows_sum_to_one() -> None:
    model = make_gpt2()
    ids, mask = padded(model, "left")
    tr = attnlens.trace(model, ids, mask)
    sums = tr.patterns.sum(-1)  # [layer, batch, head, q_pos]
    real = mask.bool()[None, :, None, :].expand_as(sums)
    torch.testing.assert_close(sums[real], torch.ones_like(sums[real]))
    assert_bitwise(sums[~real], torch.zeros_like(sums[~real]), "exact")  # sums of zeros
    # no probability on padding keys
    assert float((tr.patterns * (~mask.bool())[None, :, None, None, :]).abs().max()) == 0.0


def test_without_mask_the_mask_is_all_ones_and_1d_ids_work() -> None:
    model = make_gpt2()
    ids = random_ids(model, 1, 7)[0]
    tr = attnlens.trace(model, ids)
    assert tr.pattern(0).shape == (1, 4, 7, 7)
    assert torch.equal(tr.attention_mask, torch.ones(1, 7, dtype=tr.attention_mask.dtype))
    assert torch.equal(tr.input_ids, ids[None])


def test_half_precision_pattern_keeps_model_dtype_and_is_close() -> None:
    model = make_gpt2(n_layer=1)
    ids = random_ids(model)
    full = attnlens.trace(model, ids).pattern(0)
    half = attnlens.trace(model.to(torch.bfloat16), ids).pattern(0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------- selection ---


def test_layers_order_negative_and_subset_match_the_full_trace() -> None:
    model = make_gpt2(n_layer=3)
    ids = random_ids(model)
    full = attnlens.trace(model, ids)
    tr = attnlens.trace(model, ids, layers=[-1, 0])
    assert tr.layers == (2, 0)
    assert tr.patterns.shape == (2, 2, 4, 12, 12)
    assert_bitwise(tr.patterns[0], full.pattern(2), "same call")
    assert_bitwise(tr.pattern(0), full.pattern(0), "same call")
    assert tr.patterns is tr.patterns  # built once
    with pytest.raises(ValueError, match="layer 1 was not traced"):
        tr.pattern(1)


def test_heads_restrict_every_per_head_tensor() -> None:
    model = make_gpt2(n_layer=2)
    ids = random_ids(model)
    store = ("pattern", "scores", "q", "k", "v", "z", "result")
    full = attnlens.trace(model, ids, store=store)
    tr = attnlens.trace(model, ids, heads=[3, 1], store=store)
    assert tr.heads == (3, 1)
    for name in ("pattern", "scores"):
        torch.testing.assert_close(tr[name, 1], full[name, 1][:, [3, 1]], atol=1e-7, rtol=0)
    for name in ("q", "k", "v", "z", "result"):  # [batch, pos, head, ...]
        torch.testing.assert_close(tr[name, 1], full[name, 1][:, :, [3, 1]], atol=1e-7, rtol=0)
    assert "all 4" not in repr(tr) and "[3, 1]" in repr(tr)


def capture_attention_io(model: Any, layer: int, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """The fused qkv, c_proj input and c_proj output of one layer, captured by plain hooks."""
    attn = model.transformer.h[layer].attn
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attn.c_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out.detach().clone())),
        attn.c_proj.register_forward_hook(
            lambda m, a, out: seen.update(z_in=a[0].detach().clone(), out=out.detach().clone())
        ),
    ]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_stored_tensors_are_the_models_own() -> None:
    model = make_gpt2(n_layer=2)
    ids, mask = padded(model, "right")
    tr = attnlens.trace(model, ids, mask, store=STORE_NAMES)
    assert tr.stored == STORE_NAMES
    io = capture_attention_io(model, 1, ids, mask)
    q, k, v = attnlens.models.gpt2.split_qkv(io["qkv"], 4)  # [batch, head, pos, d_head]
    assert_bitwise(tr["q", 1], q.transpose(1, 2), "copy")
    assert_bitwise(tr["k", 1], k.transpose(1, 2), "copy")
    assert_bitwise(tr["v", 1], v.transpose(1, 2), "copy")
    assert tr["q", 1].shape == tr["z", 1].shape == (3, 10, 4, 8)  # [batch, pos, head, d_head], as z
    # the order of c_attn's own output: q of position p, head h is its columns h * d_head ... (h + 1) * d_head
    assert_bitwise(tr["q", 1], io["qkv"][..., :32].view(3, 10, 4, 8), "copy")
    assert_bitwise(tr["z", 1], io["z_in"].view(3, 10, 4, 8), "copy")
    # per-head results add up to the attention output (plus the bias, which belongs to no head)
    b_O = model.transformer.h[1].attn.c_proj.bias
    torch.testing.assert_close(tr["result", 1].sum(2) + b_O, io["out"], atol=1e-6, rtol=0)
    # scores: -inf exactly where masked, and their softmax is the pattern on real rows
    scores = tr["scores", 1]
    allowed = attnlens.functional.padding_mask(mask)
    assert bool(torch.isinf(scores[~allowed.expand_as(scores)]).all())
    assert bool(torch.isfinite(scores[allowed.expand_as(scores)]).all())
    rows = valid_rows(mask)
    torch.testing.assert_close(torch.softmax(scores, -1).nan_to_num() * rows, tr.pattern(1) * rows)


def test_memory_holds_only_what_was_asked() -> None:
    model = make_gpt2(n_layer=2)
    tr = attnlens.trace(model, random_ids(model), store=["q"])
    assert tr.stored == ("q",)
    assert set(tr.numpy()) == {"q", "input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="'pattern' was not stored"):
        _ = tr.patterns
    assert tr["q"].is_contiguous() and tr["q"].untyped_storage().nbytes() == tr["q"].numel() * 4


# ----------------------------------------------------------------------------------------- cost and state ---


def count_calls(modules: list[torch.nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)

    def make(i: int) -> Any:
        def hook(*args: Any) -> None:
            counts[i] += 1

        return hook

    handles = [m.register_forward_pre_hook(make(i)) for i, m in enumerate(modules)]
    return counts, handles


@pytest.mark.parametrize(("store", "last_run"), [(("pattern",), "c_attn"), (("pattern", "z"), "c_proj")])
def test_forward_stops_after_the_last_traced_layer(store: tuple[str, ...], last_run: str) -> None:
    model = make_gpt2(n_layer=3)
    h = model.transformer.h
    watched = [h[1].attn.c_attn, h[1].attn.c_proj, h[1].mlp, h[2].attn.c_attn, model.lm_head]
    counts, handles = count_calls(watched)
    try:
        tr = attnlens.trace(model, random_ids(model), layers=[1, 0], store=store)
    finally:
        for handle in handles:
            handle.remove()
    # c_proj is entered only when z is asked for (and stopped at its input); nothing after runs
    assert counts == [1, 1 if last_run == "c_proj" else 0, 0, 0, 0]
    assert tr.stored == store


def test_model_is_left_as_found_and_keeps_its_kernel() -> None:
    model = make_gpt2(n_layer=2, attn_implementation="sdpa").train()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)

    def hooks() -> dict[str, tuple[list, list]]:
        return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}

    before = hooks()
    seen = []
    handle = model.transformer.h[1].register_forward_pre_hook(
        lambda m, a: seen.append((model.config._attn_implementation, m.training, torch.is_grad_enabled()))
    )
    try:
        attnlens.trace(model, random_ids(model), store=("pattern", "z"))
    finally:
        handle.remove()
    assert seen == [("sdpa", False, False)]  # ran with its own kernel, in eval mode, without grad
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert not model.transformer.h[0].attn.c_attn.weight.requires_grad
    assert model.transformer.h[1].attn.c_attn.weight.requires_grad
    assert torch.is_grad_enabled()
    assert hooks() == before


def test_model_is_left_as_found_on_error() -> None:
    model = make_gpt2(n_layer=2).train()

    def boom(*args: Any) -> None:
        raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attnlens.trace(model, random_ids(model), store=("pattern", "result"))
    finally:
        handle.remove()
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------- errors ---


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [0, 2]}, "layers 2 is out of range"),
        ({"layers": [0, 0]}, r"layers \[0\] given more than once"),
        ({"layers": [1, -1]}, r"layers \[1\] given more than once"),
        ({"layers": []}, "layers is empty"),
        ({"layers": ["0"]}, "must be integers"),
        ({"heads": [4]}, "heads 4 is out of range"),
        ({"heads": [-5]}, "heads -5 is out of range"),
        ({"store": ("pattern", "attn")}, r"unknown store name\(s\) \['attn'\]"),
        ({"store": ()}, "store is empty"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs: dict[str, Any], message: str) -> None:
    model = make_gpt2(n_layer=2)
    with pytest.raises(ValueError, match=message):
        attnlens.trace(model, random_ids(model), **kwargs)
    assert all(not m._forward_hooks for m in model.modules())


def test_text_needs_a_tokenizer() -> None:
    model = make_gpt2()
    with pytest.raises(ValueError, match="pass tokenizer="):
        attnlens.trace(model, "the cat sat")
    with pytest.raises(ValueError, match="pass tokenizer="):
        attnlens.trace(model, ["the cat", "a dog"])


def test_bad_inputs_are_refused_by_check_inputs() -> None:
    model = make_gpt2()
    with pytest.raises(ValueError, match="d_vocab"):
        attnlens.trace(model, torch.tensor([[1, 200]]))
    with pytest.raises(attnlens.UnsupportedModelError):
        attnlens.trace(torch.nn.Linear(2, 2), torch.tensor([[1]]))


# -------------------------------------------------------------------------------------------------- text ---


def word_tokenizer(padding_side: str = "right") -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", padding_side=padding_side
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_texts_are_tokenized_padded_and_kept_for_display(side: str) -> None:
    model = make_gpt2()
    tr = attnlens.trace(model, ["the cat sat on the mat", "a dog"], tokenizer=word_tokenizer(side))
    assert tr.input_ids.shape == (2, 6)
    expected_row = [6, 7, 0, 0, 0, 0] if side == "right" else [0, 0, 0, 0, 6, 7]
    assert tr.input_ids[1].tolist() == expected_row
    assert tr.attention_mask[1].tolist() == [int(i != 0) for i in expected_row]
    assert tr.tokens is not None and tr.tokens[0] == ["the", "cat", "sat", "on", "the", "mat"]
    # the same ids traced directly give the same patterns
    direct = attnlens.trace(model, tr.input_ids, tr.attention_mask)
    assert_bitwise(direct.patterns, tr.patterns, "same call")
    assert direct.tokens is None


def test_single_text_and_mask_with_text() -> None:
    model = make_gpt2()
    tok = word_tokenizer()
    tr = attnlens.trace(model, "the cat", tokenizer=tok)
    assert tr.tokens == [["the", "cat"]]
    with pytest.raises(ValueError, match="attention_mask comes from the tokenizer"):
        attnlens.trace(model, "the cat", torch.ones(1, 2), tokenizer=tok)


# ----------------------------------------------------------------------------------------- save and show ---


def test_save_and_load_round_trip(tmp_path: Any) -> None:
    model = make_gpt2(n_layer=2)
    tr = attnlens.trace(
        model, ["the cat sat", "a dog"], tokenizer=word_tokenizer(), layers=[1], heads=[0, 2], store=STORE_NAMES
    )
    path = tmp_path / "trace.safetensors"
    tr.save(path)
    back = AttentionTrace.load(path)
    assert (back.layers, back.heads, back.n_heads, back.stored) == (tr.layers, tr.heads, tr.n_heads, tr.stored)
    assert back.tokens == tr.tokens and back.provenance == tr.provenance
    for name in STORE_NAMES:
        assert_bitwise(back[name], tr[name], "copy")  # saved and loaded
    assert torch.equal(back.input_ids, tr.input_ids) and torch.equal(back.attention_mask, tr.attention_mask)
    assert path.read_bytes()[:2] != b"\x80\x04"  # not a pickle

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a valid attnlens trace: a safetensors file without attnlens metadata"):
        AttentionTrace.load(other)


def test_numpy_export() -> None:
    model = make_gpt2(n_layer=2)
    tr = attnlens.trace(model, random_ids(model), store=("pattern", "v"))
    arrays = tr.numpy()
    assert set(arrays) == {"pattern", "v", "input_ids", "attention_mask"}
    assert arrays["pattern"].shape == (2, 2, 4, 12, 12)
    assert_bitwise(torch.from_numpy(arrays["pattern"]), tr.patterns, "copy")


def test_provenance_and_repr() -> None:
    model = make_gpt2(n_layer=2, attn_implementation="sdpa")
    tr = attnlens.trace(model, random_ids(model))
    p = tr.provenance
    assert p["attn_implementation"] == "sdpa" and p["dtype"] == "float32" and p["device"] == "cpu"
    assert p["transformers"] == transformers.__version__ and p["torch"] == torch.__version__
    assert p["attnlens"] == attnlens.__version__ and len(p["config_sha256"]) == 64
    same = attnlens.trace(make_gpt2(n_layer=2, attn_implementation="eager", seed=5), random_ids(model))
    other = attnlens.trace(make_gpt2(n_layer=3), random_ids(model))
    assert same.provenance["config_sha256"] == p["config_sha256"] != other.provenance["config_sha256"]
    assert repr(tr) == (
        "AttentionTrace(model='GPT2LMHeadModel', layers=[0, 1], heads=all 4, batch=2, pos=12, "
        "stored=('pattern',), dtype=float32, device=cpu)"
    )


def test_repr_html_calls_viz_with_one_sequence_without_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("attnlens.viz")
    fake.pattern_html = lambda patterns, tokens=None, **kw: calls.append((patterns, tokens, kw)) or "<div>ok</div>"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "attnlens.viz", fake)
    model = make_gpt2(n_layer=2)
    tr = attnlens.trace(model, ["a dog", "the cat sat"], tokenizer=word_tokenizer("left"), layers=[1, 0])
    assert tr._repr_html_() == "<div>ok</div>"
    # The view is handed the trace itself: it reads the first row without padding one head at a time
    # (tests/test_views_long.py checks what it stores), never a copy of every pattern.
    patterns, tokens, kw = calls[0]
    assert patterns is tr and tokens is None and set(kw) == {"title"}
    monkeypatch.undo()
    from attnlens.viz._source import resolve

    source = resolve(tr, None, None, None, None, square=False)
    assert source.texts == ["a", "dog"] and source.layers == [1, 0] and source.shape == (2, 4, 2, 2)
    assert_bitwise(torch.from_numpy(source.head(1, 3)), tr.patterns[1, 0, 3, 1:, 1:], "copy")
    no_pattern = attnlens.trace(model, random_ids(model), store=("q",))
    assert no_pattern._repr_html_() is None


def test_from_patterns_checks_shapes() -> None:
    p = torch.rand(2, 1, 3, 4, 4)
    tr = AttentionTrace.from_patterns(p)
    assert tr.layers == (0, 1) and tr.heads == (0, 1, 2)
    assert_bitwise(tr.pattern(1), p[1], "copy")
    with pytest.raises(ValueError, match="layer, batch, head, q_pos, k_pos"):
        AttentionTrace.from_patterns(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        AttentionTrace.from_patterns(p, attention_mask=torch.ones(1, 3))


# ------------------------------------------------------------------------------ bad files, bad save targets ---


@pytest.fixture
def saved(tmp_path: Any) -> Any:
    model = make_gpt2(n_layer=2)
    tr = attnlens.trace(model, random_ids(model), store=("pattern", "q", "z"))
    path = tmp_path / "good.safetensors"
    tr.save(path)
    return path


def test_save_to_a_bad_place_is_an_os_error_naming_it(saved: Any, tmp_path: Any) -> None:
    tr = AttentionTrace.load(saved)
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        tr.save(tmp_path / "nope" / "x.safetensors")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        tr.save(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root writes anywhere, but nobody writes a file into /proc
        writable = os.access(locked, os.W_OK)
        target = "/proc/attnlens-trace.safetensors" if writable else str(locked / "x.safetensors")
        with pytest.raises(OSError, match=re.escape(repr(target))):
            tr.save(target)
    finally:
        locked.chmod(0o700)


def _tamper(path: Any, out: Any, meta: Any = None, **tensors: Any) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    stored = load_file(str(path))
    stored.update(tensors)
    stored = {k: v for k, v in stored.items() if v is not None}
    text = header["attnlens.trace"] if meta is None else meta if isinstance(meta, str) else json.dumps(meta)
    save_file(stored, str(out), metadata={"attnlens.trace": text})
    return out


def test_load_refuses_anything_but_a_valid_trace(saved: Any, tmp_path: Any) -> None:
    import pickle

    from safetensors import safe_open

    raw = saved.read_bytes()
    with safe_open(str(saved), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlens.trace"])
    q = AttentionTrace.load(saved)["q"]
    bad = tmp_path / "bad.safetensors"
    cases: list[tuple[Any, str]] = [
        (lambda: bad.write_bytes(raw[: len(raw) // 2]), "not a readable safetensors file"),
        (lambda: bad.write_bytes(pickle.dumps({"pattern": torch.zeros(2)})), "not a readable safetensors file"),
        (lambda: bad.write_text("layer,head\n0,1\n"), "not a readable safetensors file"),
        (lambda: bad.write_bytes(b""), "not a readable safetensors file"),
        (lambda: _tamper(saved, bad, "{not json"), "metadata is not JSON"),
        (lambda: _tamper(saved, bad, "[1, 2]"), "not a JSON object"),
        (lambda: _tamper(saved, bad, {"format": 1}), "metadata lacks layers, heads"),
        (lambda: _tamper(saved, bad, {**meta, "layers": [0]}), r"'pattern' is torch.float32 of shape \(2, "),
        (lambda: _tamper(saved, bad, {**meta, "layers": [0, 0]}), "'layers' repeats"),
        (lambda: _tamper(saved, bad, {**meta, "layers": "01"}), "'layers' must be a non-empty list"),
        (lambda: _tamper(saved, bad, {**meta, "heads": [0, 1]}), "needs floats of shape"),
        (lambda: _tamper(saved, bad, {**meta, "n_heads": 2}), "'n_heads' must be an integer above"),
        (lambda: _tamper(saved, bad, {**meta, "stored": ["pattern", "q"]}), r"unexpected \['z'\]"),
        (lambda: _tamper(saved, bad, {**meta, "stored": ["pattern", "q", "zz"]}), "'stored' must be"),
        (lambda: _tamper(saved, bad, {**meta, "tokens": [["a"]]}), "'tokens' must be null or 2 lists"),
        (lambda: _tamper(saved, bad, {**meta, "provenance": [1]}), "'provenance' must be an object"),
        (lambda: _tamper(saved, bad, input_ids=torch.zeros(2, 12)), "input_ids must be an integer"),
        (lambda: _tamper(saved, bad, attention_mask=torch.ones(2, 11, dtype=torch.long)), "attention_mask must"),
        (lambda: _tamper(saved, bad, q=q.to(torch.int32)), "'q' is torch.int32"),
        (lambda: _tamper(saved, bad, z=None), r"missing \['z'\]"),
    ]
    for make, words in cases:
        make()
        with pytest.raises(ValueError, match="is not a valid attnlens trace: .*" + words):
            AttentionTrace.load(bad)
    with pytest.raises(FileNotFoundError):
        AttentionTrace.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        AttentionTrace.load(tmp_path)


def test_load_never_unpickles(tmp_path: Any) -> None:
    import pickle

    class Boom:
        def __reduce__(self) -> Any:
            return (os.remove, (str(tmp_path / "canary"),))

    (tmp_path / "canary").write_text("alive")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a valid attnlens trace"):
        AttentionTrace.load(tmp_path / "evil.pt")
    assert (tmp_path / "canary").read_text() == "alive"


# ------------------------------------------------------------- configs that disagree with what the model runs ---


def model_state(model: Any) -> dict[str, Any]:
    """What trace and verify may touch and must leave as found, hooks and transformers' recording mark included."""
    return {
        "impl": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "hooks": [(list(m._forward_hooks.items()), list(m._forward_pre_hooks.items())) for m in model.modules()],
        "flags": [m.__dict__.get("_output_capturing_hooks_installed") for m in model.modules()],
        "grad": torch.is_grad_enabled(),
    }


EDITS = {
    "inverse_on": ({}, {"scale_attn_by_inverse_layer_idx": True}),
    "inverse_off": ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_by_inverse_layer_idx": False}),
    "unscaled": ({}, {"scale_attn_weights": False}),
    "upcast_on": ({}, {"reorder_and_upcast_attn": True}),
    "upcast_off": ({"reorder_and_upcast_attn": True}, {"reorder_and_upcast_attn": False}),
}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("built", "edit"), EDITS.values(), ids=EDITS.keys())
def test_config_edited_after_building_traces_what_the_modules_run(
    built: dict[str, Any], edit: dict[str, Any], implementation: str
) -> None:
    model = make_gpt2(n_layer=3, attn_implementation=implementation, initializer_range=0.2, **built)
    for key, value in edit.items():
        setattr(model.config, key, value)
    ids, mask = padded(model, "left")
    rows = valid_rows(mask)
    # 4.x runs SDPA at 1/sqrt(d_head) whatever the modules' flags say (tested above): then that is the truth.
    ignored = attnlens.models.adapt(model).kernel_departure is not None
    assert ignored == (V4 and implementation == "sdpa" and bool(built.get("scale_attn_by_inverse_layer_idx")))
    if ignored:
        expected = config_twin_patterns({"initializer_range": 0.2}, ids, mask)
    else:  # the model's own patterns: its eager kernel (the one that returns them), with the modules as built
        with torch.no_grad():
            model.set_attn_implementation("eager")
            expected = list(model(ids, attention_mask=mask, output_attentions=True).attentions)
            model.set_attn_implementation(implementation)
        assert len(expected) == 3
    if "reorder_and_upcast_attn" not in edit and not ignored:
        # The edit changes the maths the config describes: reading the config would be measurably wrong.
        twin = config_twin_patterns({"initializer_range": 0.2, **built, **edit}, ids, mask)
        assert max(float(((twin[i] - expected[i]) * rows).abs().max()) for i in range(3)) > 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = attnlens.trace(model, ids, mask)
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(ignored) and all("without the scale" in m for m in messages), messages
    for layer in range(3):
        if implementation == "eager":
            assert_bitwise(tr.pattern(layer) * rows, expected[layer] * rows, "copy", what=f"layer {layer}")
        else:
            torch.testing.assert_close(tr.pattern(layer) * rows, expected[layer] * rows, atol=1e-6, rtol=0)
    report = attnlens.verify(model, ids, mask)
    assert report.worst("pattern_hf_order").max_abs_error == 0.0
    if ignored:  # verify compares the modules' maths with what the kernel ran, and says why they differ
        assert not report.ok and any("without the config's attention scale" in note for note in report.notes)
    else:
        assert report.ok, str(report)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: setattr(m.config, "n_head", 8), r"num_heads.: 4.*the config says.*num_heads.: 8"),
        (lambda m: setattr(m.transformer.h[1].attn, "layer_idx", 0), r"layer 1's attention module has layer_idx=0"),
        (lambda m: setattr(m.transformer.h[0].attn, "is_cross_attention", True), "cross-attention module"),
    ],
    ids=["n_head", "layer_idx", "cross_attention"],
)
def test_modules_that_disagree_with_the_config_are_refused(edit: Any, message: str) -> None:
    model = make_gpt2(n_layer=2).train()
    edit(model)
    before = model_state(model)
    for call in (attnlens.trace, attnlens.verify):
        with pytest.raises(attnlens.UnsupportedModelError, match=message):
            call(model, random_ids(model))
        assert model_state(model) == before


# ------------------------------------------------------------------------------------ unknown attention kernels ---


@pytest.fixture
def custom_kernel() -> Any:
    """A kernel registered with transformers as "mine": SDPA with another scale (0.5); unregistered after."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def mine(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        kwargs["scaling"] = 0.5
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mine", mine)
    try:
        yield "mine"
    finally:
        AttentionInterface._global_mapping.pop("mine", None)


def test_unknown_kernel_is_refused_by_name_and_verify_reports_it(custom_kernel: str) -> None:
    model = make_gpt2(n_layer=2, initializer_range=0.2)
    model.set_attn_implementation(custom_kernel)
    ids = random_ids(model)
    with torch.no_grad():  # the kernel really computes something else than eager
        own = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
        model.set_attn_implementation(custom_kernel)
    assert float((own - eager).abs().max()) > 1e-3
    before = model_state(model)
    with pytest.raises(attnlens.UnsupportedModelError, match=r"kernel 'mine'.*attn_implementation='eager' or 'sdpa'"):
        attnlens.trace(model, ids)
    assert model_state(model) == before
    report = attnlens.verify(model, ids)
    assert not report.ok
    assert {row.quantity for row in report.failures} >= {"z", "attn_out"}
    assert all(report.worst(q).ok for q in ("q", "k", "v", "pattern"))
    assert any("'mine' kernel is not one attnlens has been shown to reproduce" in note for note in report.notes)
    assert model_state(model) == before


def test_a_kernel_is_refused_even_when_it_computes_sdpa(custom_kernel: str) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("mine", sdpa_attention_forward)  # the fixture unregisters it
    model = make_gpt2(n_layer=2)
    model.set_attn_implementation("mine")
    with pytest.raises(attnlens.UnsupportedModelError, match="'mine'"):
        attnlens.trace(model, random_ids(model))


# ---------------------------------------------------------------------------- the config's output switches ---

OUTPUT_SWITCHES = {
    "output_attentions": {"output_attentions": True},
    "output_hidden_states": {"output_hidden_states": True},
    "use_cache_off": {"use_cache": False},
    "use_cache_on": {"use_cache": True},
    "return_dict_off": {"return_dict": False},
    "all": {"output_hidden_states": True, "use_cache": False, "return_dict": False},
}


@pytest.mark.parametrize(
    ("switches", "implementation"),
    [
        pytest.param(switches, implementation, id=f"{name}-{implementation}")
        for name, switches in OUTPUT_SWITCHES.items()
        for implementation in ("eager", "sdpa")
        if not (implementation == "sdpa" and "output_attentions" in switches)  # transformers refuses that config
    ],
)
def test_config_output_switches_change_nothing(switches: dict[str, Any], implementation: str) -> None:
    model = make_gpt2(n_layer=2, attn_implementation=implementation)
    for key, value in switches.items():
        setattr(model.config, key, value)
    ids, mask = padded(model, "right")
    expected = eager_reference(model, ids, mask)
    before = model_state(model)
    tr = attnlens.trace(model, ids, mask, store=("pattern", "z"))
    assert model_state(model) == before  # no hooks of transformers' left, nor its mark
    rows = valid_rows(mask)
    for layer in range(2):
        torch.testing.assert_close(tr.pattern(layer) * rows, expected[layer] * rows, atol=1e-6, rtol=0)
        if implementation == "eager":  # the kernel's own pattern, against a copy run with the same switches
            assert_bitwise(tr.pattern(layer) * rows, expected[layer] * rows, "copy")
    report = attnlens.verify(model, ids, mask)
    assert report.ok, str(report)
    assert model_state(model) == before
    for key, value in switches.items():
        assert getattr(model.config, key) == value


# ------------------------------------------------------------------------------------------- prepend_bos ---


def bos_tokenizer(padding_side: str = "right", **special: str) -> Any:
    """The word tokenizer plus a ``<bos>`` word (id 8), with the special tokens given (e.g. bos_token="<bos>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "<bos>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", padding_side=padding_side, **special
    )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("special", [{"bos_token": "<bos>"}, {"eos_token": "<bos>"}], ids=["bos", "eos_fallback"])
def test_prepend_bos_puts_the_bos_id_first_behind_any_padding(side: str, special: dict[str, str]) -> None:
    model = make_gpt2()
    tok = bos_tokenizer(side, **special)
    tr = attnlens.trace(model, ["the cat sat", "a dog"], tokenizer=tok, prepend_bos=True)
    rows = [[8, 1, 2, 3], [8, 6, 7, 0]] if side == "right" else [[8, 1, 2, 3], [0, 8, 6, 7]]
    assert tr.input_ids.tolist() == rows
    assert tr.attention_mask.tolist() == [[int(i != 0) for i in row] for row in rows]
    assert tr.tokens is not None and tr.tokens[0] == ["<bos>", "the", "cat", "sat"]
    direct = attnlens.trace(model, tr.input_ids, tr.attention_mask)
    assert_bitwise(direct.patterns, tr.patterns, "same call")
    # the default is the text's own tokens, as before
    plain = attnlens.trace(model, ["the cat sat", "a dog"], tokenizer=tok)
    assert plain.input_ids[0].tolist() == [1, 2, 3]
    unprepended = attnlens.trace(model, ["the cat sat", "a dog"], tokenizer=tok, prepend_bos=False)
    assert_bitwise(unprepended.patterns, plain.patterns, "same call")


def test_prepend_bos_with_the_demo_tokenizer_uses_endoftext() -> None:
    model, tok = attnlens.load_demo()
    tr = attnlens.trace(model, "The cat sat", tokenizer=tok, prepend_bos=True, layers=[0])
    assert tok.bos_token_id == 0 and tr.input_ids[0, 0] == 0
    assert tr.tokens is not None and tr.tokens[0][0] == "<|endoftext|>"
    assert tr.input_ids[0, 1:].tolist() == tok("The cat sat")["input_ids"]


def test_prepend_bos_is_refused_where_it_cannot_be_right() -> None:
    model = make_gpt2()
    with pytest.raises(ValueError, match="neither a bos nor an eos token"):
        attnlens.trace(model, "the cat", tokenizer=word_tokenizer(), prepend_bos=True)
    with pytest.raises(ValueError, match="prepend_bos applies to text"):
        attnlens.trace(model, torch.tensor([[1, 2]]), prepend_bos=True)
    with pytest.raises(TypeError, match="prepend_bos must be True or False"):
        attnlens.trace(model, "the cat", tokenizer=bos_tokenizer(bos_token="<bos>"), prepend_bos="yes")  # type: ignore[arg-type]
    doubled = bos_tokenizer(bos_token="<bos>")
    doubled.add_bos_token = True  # a tokenizer that puts the bos in front itself
    with pytest.raises(ValueError, match="already puts a bos token"):
        attnlens.trace(model, "the cat", tokenizer=doubled, prepend_bos=True)


def test_prepend_bos_is_refused_when_the_tokenizer_template_adds_the_bos() -> None:
    # Llama 3's tokenizer puts <|begin_of_text|> in front through its post-processor, with no add_bos_token flag
    # (False or absent): prepend_bos used to give every text two bos tokens.
    from tokenizers import processors

    model = make_gpt2()
    templated = bos_tokenizer(bos_token="<bos>")
    templated.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 8)]
    )
    assert templated("the cat")["input_ids"] == [8, 1, 2] and getattr(templated, "add_bos_token", False) is not True
    with pytest.raises(ValueError, match=r"text 0 already starts with the bos token \(id 8"):
        attnlens.trace(model, ["the cat", "a dog"], tokenizer=templated, prepend_bos=True)
    assert attnlens.trace(model, "the cat", tokenizer=templated).input_ids.tolist() == [[8, 1, 2]]


@pytest.mark.parametrize(
    "flags",
    [{}, {"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}, {"reorder_and_upcast_attn": True}],
)
def test_sites_carry_the_same_attention_spec_as_the_extracted_weights(flags: dict[str, Any]) -> None:
    model = make_gpt2(n_layer=3, **flags)
    specs = attnlens.models.adapt(model).specs
    weights = attnlens.extract_weights(model)
    assert [(s.scale, s.upcast, s.divisors) for s in specs] == [
        (w.scale, w.upcast, w.score_divisors) for w in weights.layers
    ]


def test_token_strings_keep_sentencepiece_spaces_and_show_byte_pieces_as_bytes() -> None:
    # Llama 2's and Mistral's tokenizers: "▁" marks a leading space, and the decoder strips the first space of what it
    # decodes, so each token decoded alone lost its space ("cat" for " cat"); byte fallback pieces read "<0xE6>".
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "▁The", "▁cat", "▁", "sat", "<0x0A>", "<0xE6>", "<0x97>", "<0xA5>", "▁▁"]
    sp = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", unk_token="<unk>")
    ids = [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert tok.decode([3]) == "cat" and tok.decode(ids) == "The cat sat\n日  "  # what decoding alone loses
    tr = attnlens.trace(make_gpt2(), torch.tensor([ids]), tokenizer=tok, layers=[0])
    assert tr.tokens == [[" The", " cat", " ", "sat", "\n", "\\xe6", "\\x97", "\\xa5", "  "]]


def test_token_strings_show_partial_characters_as_their_bytes() -> None:
    # The demo tokenizer cuts 日 into three byte tokens: each is shown as its byte, never as U+FFFD.
    model, tokenizer = attnlens.load_demo()
    tr = attnlens.trace(model, "a 日", tokenizer=tokenizer)
    assert tr.tokens is not None
    assert tr.tokens[0][-3:] == ["\\xe6", "\\x97", "\\xa5"]
    assert not any("\ufffd" in text for text in tr.tokens[0])
    assert "".join(tr.tokens[0][:-3]) == tokenizer.decode(tr.input_ids[0, :-3].tolist())
