"""Extracted weights are never stale: whatever happens to the model, every access returns its current values."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import CUDA, assert_bitwise, make_gpt2

import attnlens
from attnlens.weights import ModelWeights


def tensors(obj: Any, label: str = "w") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a weights dataclass, read as a user reads it (attribute access)."""
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            yield f"{label}.{f.name}", value
        elif dataclasses.is_dataclass(value):
            yield from tensors(value, f"{label}.{f.name}")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from tensors(item, f"{label}.{f.name}[{i}]")


def assert_current(w: ModelWeights, model: Any) -> None:
    """``w`` (kept from before) holds exactly what a fresh extraction of ``model`` holds now: values, dtype, device,
    autograd state and storage, for every tensor, the stacks and the circuits.

    A tensor that is no parameter's view is a stand-in for a parameter the architecture lacks (Llama's biases, an
    RMSNorm's shift): zeros, in the dtype and on the device of the parameters beside it.
    """
    fresh = attnlens.extract_weights(model)
    kept, now = dict(tensors(w)), dict(tensors(fresh))
    assert kept.keys() == now.keys()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for label, t in kept.items():
        ref = now[label]
        assert t.dtype == ref.dtype and t.device == ref.device, label
        assert t.requires_grad == ref.requires_grad, label
        if ref.untyped_storage().data_ptr() in storages:
            assert t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr(), f"{label} is not the model's"
            assert_bitwise(t, ref, "copy", what=label)
        else:
            assert not bool(ref.any()), f"{label}: a stand-in that is not zeros"
            assert_bitwise(t, ref, "exact", what=label)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert_bitwise(getattr(w, name), getattr(fresh, name), "copy", what=name)
    # The circuits of the same parameters, computed by the same calls (no QK circuit where q and k rotate).
    circuits = ("OV",) if w.rotary else ("QK", "OV")
    with torch.no_grad():
        for name in circuits:
            assert_bitwise(getattr(w, name).AB, getattr(fresh, name).AB, "same call")
        assert_bitwise(getattr(w.layers[0], circuits[0]).S, getattr(fresh.layers[0], circuits[0]).S, "same call")
        assert_bitwise(w.layers[1].OV.eigenvalues, fresh.layers[1].OV.eigenvalues, "same call")


def test_in_place_edit_under_no_grad_reaches_circuits_already_taken() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    layer = w.layers[0]
    with torch.no_grad():
        before = layer.QK.S.clone()
        model.transformer.h[0].attn.c_attn.weight.mul_(2.0)
    with torch.no_grad():
        assert torch.allclose(layer.QK.S, 4 * before, rtol=1e-5, atol=0)
    assert_current(w, model)


def test_edit_through_data_which_leaves_the_version_counter_alone() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    param = model.transformer.h[1].attn.c_attn.weight
    stack_before, version = w.W_Q.detach().clone(), param._version
    param.data[:, : w.d_model] *= 3
    assert param._version == version, "torch changed: .data edits now bump the version counter"
    assert_bitwise(w.W_Q[1], 3 * stack_before[1], "same kernel")  # one multiplication by 3, elementwise
    assert_bitwise(w.W_Q[0], stack_before[0], "copy")
    assert_current(w, model)


@pytest.mark.parametrize(("assign", "tied"), [(False, True), (True, False)])
def test_load_state_dict(assign: bool, tied: bool) -> None:
    model, other = make_gpt2(seed=0, tie_word_embeddings=tied), make_gpt2(seed=1, tie_word_embeddings=tied)
    w = attnlens.extract_weights(model)
    model.load_state_dict(other.state_dict(), assign=assign)
    assert_bitwise(w.layers[1].W_K, attnlens.extract_weights(other).layers[1].W_K, "copy")
    assert_bitwise(w.W_U, other.lm_head.weight.T, "copy")
    assert_current(w, model)


def test_load_state_dict_assign_unties_tied_embeddings_and_is_refused() -> None:
    model, other = make_gpt2(seed=0), make_gpt2(seed=1)
    w = attnlens.extract_weights(model)
    model.load_state_dict(other.state_dict(), assign=True)
    if model.lm_head.weight is model.transformer.wte.weight:  # this transformers release ties them again
        assert_current(w, model)
        return
    for read in (lambda: w.W_E, lambda: w.W_U):
        with pytest.raises(attnlens.StaleWeightsError, match=r"wte\.weight, lm_head\.weight.*extract"):
            read()
    assert_bitwise(w.layers[0].W_V, attnlens.extract_weights(other).layers[0].W_V, "copy")


@pytest.mark.parametrize("convert", ["half", "to_float64", "bfloat16"])
def test_dtype_conversion_moves_every_tensor_together(convert: str) -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    {"half": model.half, "to_float64": lambda: model.to(torch.float64), "bfloat16": model.bfloat16}[convert]()
    assert {t.dtype for _, t in tensors(w)} == {model.transformer.wte.weight.dtype}
    assert w.W_Q.dtype == w.QK.A.dtype == w.dtype
    assert_current(w, model)


@CUDA
def test_device_move_follows() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    model.to("cuda")
    assert {t.device.type for _, t in tensors(w)} == {"cuda"}
    assert_current(w, model)
    model.to("cpu")
    assert {t.device.type for _, t in tensors(w)} == {"cpu"}
    assert_current(w, model)


def test_data_reassigned_to_a_new_tensor() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    attn = model.transformer.h[0].attn
    attn.c_proj.weight.data = torch.randn_like(attn.c_proj.weight)
    attn.c_attn.bias.data = torch.randn_like(attn.c_attn.bias)
    assert_bitwise(w.layers[0].W_O.reshape(w.d_model, w.d_model), attn.c_proj.weight, "copy")
    assert_current(w, model)
    attn.c_attn.weight.data = torch.randn(3 * w.d_model, w.d_model).T  # same shape, other strides
    with pytest.raises(attnlens.StaleWeightsError, match=r"c_attn\.weight changed shape or layout.*extract"):
        _ = w.layers[0].W_Q


def test_untying_a_shared_parameter_is_refused_by_name() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(attnlens.StaleWeightsError, match=r"lm_head\.weight.*extract the weights again"):
        _ = w.W_U


def test_requires_grad_toggled_after_extraction() -> None:
    model = make_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    w = attnlens.extract_weights(model)
    assert not w.layers[0].W_Q.requires_grad
    param = model.transformer.h[0].attn.c_attn.weight
    param.requires_grad_(True)
    assert w.layers[0].W_Q.requires_grad and not w.layers[0].W_O.requires_grad
    w.layers[0].W_Q[1].sum().backward()
    assert param.grad is not None
    dh = w.d_head
    expected = torch.zeros_like(param)
    expected[:, dh : 2 * dh] = 1.0
    assert_bitwise(param.grad, expected, "exact")  # the gradient of a sum: ones
    assert_current(w, model)


def test_gradients_reach_parameters_when_extracted_under_no_grad_and_after_edits() -> None:
    model = make_gpt2()
    with torch.no_grad():
        w = attnlens.extract_weights(model)
        model.transformer.h[1].attn.c_proj.weight.mul_(0.5)
    assert w.layers[1].W_O.requires_grad
    x = torch.randn(3, w.d_head, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    (x @ w.layers[1].W_O[2]).pow(2).sum().backward()
    param = model.transformer.h[1].attn.c_proj.weight
    ours = param.grad.clone()
    param.grad = None
    (x @ param[2 * w.d_head : 3 * w.d_head]).pow(2).sum().backward()
    assert_bitwise(ours, param.grad, "same kernel")  # the same matmul on the same rows of the parameter
    assert_current(w, model)


def test_copies_are_values() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    snapshot = copy.deepcopy(w)
    pickled = pickle.loads(pickle.dumps(w))
    replaced = dataclasses.replace(w, name="copy")
    before = w.layers[0].W_Q.detach().clone()
    model.half()
    for kept in (snapshot, pickled):
        assert kept.dtype == torch.float32
        assert_bitwise(kept.layers[0].W_Q, before, "copy")
    assert replaced.name == "copy" and replaced.W_E.dtype == torch.float16  # W_E is the parameter itself
    assert_current(w, model)


def test_access_is_cheap() -> None:
    import time

    model = make_gpt2()
    layer = attnlens.extract_weights(model).layers[0]
    _ = layer.W_Q
    start = time.perf_counter()
    for _ in range(2000):
        _ = layer.W_Q
    per_access = (time.perf_counter() - start) / 2000
    assert per_access < 50e-6, f"{per_access * 1e6:.1f} us per access"
