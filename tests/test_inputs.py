"""Every bad input gets a named attnlens error, never a raw traceback; every good one gives the model's own numbers.

Cases one by one (each once raised a bare torch/numpy/safetensors error or said the wrong thing);
tests/test_inputs_properties.py throws random valid and invalid inputs at trace and verify.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_bitwise, make_gpt2, random_ids

import attnlens
from attnlens import AttentionCaptureError, UnsupportedModelError

NAMED = (ValueError, TypeError, UnsupportedModelError, AttentionCaptureError)


# ------------------------------------------------------------------------------------------ one by one ---


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.int64])
def test_any_integer_dtype_gives_the_same_trace(dtype: torch.dtype) -> None:
    model = make_gpt2(vocab_size=97)
    ids = random_ids(model)
    reference = attnlens.trace(model, ids)
    for given_ids in (ids.to(dtype), ids.to(dtype).numpy(), ids.tolist()):
        tr = attnlens.trace(model, given_ids)
        assert tr.input_ids.dtype == torch.long and torch.equal(tr.input_ids, ids)
        assert_bitwise(tr.patterns, reference.patterns, "same call")
    assert attnlens.verify(model, ids.to(dtype)).ok


@pytest.mark.parametrize(
    ("input_ids", "error", "words"),
    [
        (torch.ones(1, 4, dtype=torch.bool), ValueError, "input_ids is a bool tensor"),
        (torch.ones(1, 4), ValueError, "must hold integers, got dtype torch.float32"),
        ([], ValueError, "input_ids is empty"),
        ([[]], ValueError, "input_ids is empty"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "input_ids is empty"),
        ([1, "a", 3], TypeError, "holds strings, but token ids are needed: text needs a tokenizer"),
        ([[1, 2], [3]], TypeError, "equally long lists of ints"),
        (None, TypeError, "got NoneType"),
        ([2**70], TypeError, "cannot read"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"must be \[batch, pos\]"),
    ],
)
def test_bad_token_ids_are_named(input_ids: Any, error: type[Exception], words: str) -> None:
    model = make_gpt2()
    for run in (attnlens.trace, attnlens.verify):
        with pytest.raises(error, match=words):
            run(model, input_ids)


def test_verify_given_text_says_it_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="input_ids is text; pass tokenizer="):
        attnlens.verify(make_gpt2(), ["a b", "c"])


def test_masks_and_positions_of_any_integer_dtype() -> None:
    model = make_gpt2()
    ids = random_ids(model, batch=2, pos=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    reference = attnlens.trace(model, ids, mask)
    for given_mask in (mask.bool(), mask.to(torch.uint8), mask.numpy()):
        assert_bitwise(attnlens.trace(model, ids, given_mask).patterns, reference.patterns, "same call")
    with pytest.raises(ValueError, match="position_ids is a bool tensor"):
        attnlens.trace(model, ids, position_ids=torch.ones(1, 6, dtype=torch.bool))


def test_numpy_and_tensor_layer_and_head_numbers() -> None:
    model = make_gpt2(n_layer=2, n_head=4)
    ids = random_ids(model)
    assert attnlens.trace(model, ids, layers=np.int64(1)).layers == (1,)
    tr = attnlens.trace(model, ids, layers=np.array([0, 1]), heads=torch.tensor([0, 2]))
    assert tr.layers == (0, 1) and tr.heads == (0, 2) and all(type(i) is int for i in tr.layers + tr.heads)
    assert_bitwise(tr.patterns, attnlens.trace(model, ids, layers=[0, 1], heads=[0, 2]).patterns, "same call")
    assert attnlens.trace(model, ids, layers=torch.tensor(-1)).layers == (1,)
    assert attnlens.verify(model, ids, layers=np.array([1])).layers == (1,)
    assert attnlens.verify(model, ids, layers=np.int64(0)).layers == (0,)
    for bad in (True, [0, True], np.array([True]), torch.tensor([0.0]), [1.5], "0"):
        with pytest.raises(ValueError, match="must be integers"):
            attnlens.trace(model, ids, layers=bad)
        with pytest.raises(ValueError, match="must be integers"):
            attnlens.verify(model, ids, layers=bad)


def test_store_none_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="store must be a name or a list of names"):
        attnlens.trace(make_gpt2(), [1, 2], store=None)  # type: ignore[arg-type]


def test_trace_and_verify_take_a_path_alike(tmp_path: Any) -> None:
    model = make_gpt2()
    model.save_pretrained(tmp_path / "tiny")
    loaded, _ = attnlens.load(tmp_path / "tiny")
    own = attnlens.trace(loaded, [1, 2, 3]).pattern(0)
    # The same checkpoint loaded the same way, the same call: the same numbers.
    assert torch.equal(attnlens.trace(str(tmp_path / "tiny"), [1, 2, 3]).pattern(0), own)
    assert torch.equal(attnlens.trace(tmp_path / "tiny", [1, 2, 3]).pattern(0), own)
    assert attnlens.verify(tmp_path / "tiny", [1, 2, 3]).ok
    with pytest.raises(OSError, match="could not read a config"):
        attnlens.trace(tmp_path / "nowhere", [1, 2, 3])


def test_return_dict_false_models_verify_and_stay_so() -> None:
    model = make_gpt2()
    model.config.return_dict = False
    ids = random_ids(model)
    assert attnlens.verify(model, ids).ok
    assert attnlens.verify(model, ids, layers=[1]).ok
    assert model.config.return_dict is False
    sdpa = make_gpt2(attn_implementation="sdpa")
    sdpa.config.return_dict = False
    assert attnlens.verify(sdpa, ids).ok and sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("value", ["abc", None, [1e-3], object()])
def test_a_tolerance_must_be_a_number(value: Any) -> None:
    with pytest.raises(ValueError, match="tolerance for 'pattern' must be a number >= 0, got"):
        attnlens.verify(make_gpt2(), [1, 2], tolerances={"pattern": value})
