"""Every bad input gets a named attnlens error, never a raw traceback; every good one gives the model's own numbers.

The first half pins down cases one by one (each once raised a bare torch/numpy/safetensors error or said the wrong
thing); the second half throws random valid and invalid inputs at :func:`attnlens.trace` and :func:`attnlens.verify`
on random small GPT-2 configs, and checks each time that the answer is right or a named error, and that the model is
left exactly as found.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_gpt2, random_ids
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

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
        assert torch.equal(tr.patterns, reference.patterns)
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
    with pytest.raises(TypeError, match="text needs a tokenizer"):
        attnlens.verify(make_gpt2(), ["a b", "c"])


def test_masks_and_positions_of_any_integer_dtype() -> None:
    model = make_gpt2()
    ids = random_ids(model, batch=2, pos=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    reference = attnlens.trace(model, ids, mask)
    for given_mask in (mask.bool(), mask.to(torch.uint8), mask.numpy()):
        assert torch.equal(attnlens.trace(model, ids, given_mask).patterns, reference.patterns)
    with pytest.raises(ValueError, match="position_ids is a bool tensor"):
        attnlens.trace(model, ids, position_ids=torch.ones(1, 6, dtype=torch.bool))


def test_numpy_and_tensor_layer_and_head_numbers() -> None:
    model = make_gpt2(n_layer=2, n_head=4)
    ids = random_ids(model)
    assert attnlens.trace(model, ids, layers=np.int64(1)).layers == (1,)
    tr = attnlens.trace(model, ids, layers=np.array([0, 1]), heads=torch.tensor([0, 2]))
    assert tr.layers == (0, 1) and tr.heads == (0, 2) and all(type(i) is int for i in tr.layers + tr.heads)
    assert torch.equal(tr.patterns, attnlens.trace(model, ids, layers=[0, 1], heads=[0, 2]).patterns)
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


def test_trace_of_a_path_says_to_load_it_and_verify_takes_one(tmp_path: Any) -> None:
    model = make_gpt2()
    model.save_pretrained(tmp_path / "tiny")
    with pytest.raises(TypeError, match="trace needs a loaded model, got the name or path .*load it first"):
        attnlens.trace(str(tmp_path / "tiny"), [1, 2, 3])
    with pytest.raises(TypeError, match="trace needs a loaded model"):
        attnlens.trace(tmp_path / "tiny", [1, 2, 3])
    assert attnlens.verify(tmp_path / "tiny", [1, 2, 3]).ok


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


# ------------------------------------------------------------------------------------------- properties ---


def snapshot(model: Any) -> dict[str, Any]:
    """Everything attnlens promises to leave as found."""
    return {
        "state": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attn": model.config._attn_implementation,
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "return_dict": model.config.return_dict,
    }


def assert_unchanged(model: Any, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key in before:
        if key == "state":
            assert before["state"].keys() == after["state"].keys()
            for name, t in before["state"].items():
                # bitwise: same dtype, same bits (NaN-safe)
                assert t.dtype == after["state"][name].dtype
                assert torch.equal(t.view(torch.uint8), after["state"][name].view(torch.uint8)), name
        else:
            assert after[key] == before[key], key


@st.composite
def models(draw: Any) -> Any:
    n_head = draw(st.integers(1, 4))
    model = make_gpt2(
        seed=draw(st.integers(0, 2**16)),
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_embd=n_head * draw(st.integers(1, 8)),
        vocab_size=draw(st.integers(3, 40)),
        n_positions=draw(st.integers(2, 12)),
        attn_implementation=draw(st.sampled_from(["eager", "sdpa"])),
    )
    # Start from states a user may leave the model in: training mode, frozen parameters, unusual output settings.
    if draw(st.booleans()):
        model.train()
    frozen = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    for param, freeze in zip(model.parameters(), frozen * 100, strict=False):
        param.requires_grad_(not freeze)
    model.config.return_dict = draw(st.booleans())
    return model


@st.composite
def inputs(draw: Any, model: Any) -> tuple[dict[str, Any], str | None]:
    """``(kwargs, problem)``: inputs for trace/verify and what is wrong with them (None when they are valid)."""
    config = model.config
    batch = draw(st.integers(1, 3))
    n_pos = draw(st.integers(1, config.n_positions))
    ids = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, config.vocab_size - 1), min_size=n_pos, max_size=n_pos), min_size=batch,
                      max_size=batch))
    )  # fmt: skip
    # A padding mask: left, right or none per row, each row keeping at least one token.
    mask = torch.ones(batch, n_pos, dtype=torch.long)
    for row in range(batch):
        pad = draw(st.integers(0, n_pos - 1))
        if pad and draw(st.booleans()):
            mask[row, :pad] = 0
        elif pad:
            mask[row, n_pos - pad :] = 0
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask if draw(st.booleans()) else None}
    problem = draw(
        st.sampled_from(
            [None] * 6 + ["id_high", "id_negative", "too_long", "float_ids", "bool_ids", "mask_value", "mask_row",
                          "mask_shape", "layer_range", "layer_repeat", "text", "empty"]
        )
    )  # fmt: skip
    if problem == "id_high":
        ids[0, -1] = config.vocab_size + draw(st.integers(0, 5))
    elif problem == "id_negative":
        ids[-1, 0] = -draw(st.integers(1, 5))
    elif problem == "too_long":
        kwargs["input_ids"] = torch.zeros(batch, config.n_positions + draw(st.integers(1, 3)), dtype=torch.long)
        kwargs["attention_mask"] = None
    elif problem == "float_ids":
        kwargs["input_ids"] = ids.float()
    elif problem == "bool_ids":
        kwargs["input_ids"] = ids > 0
    elif problem == "mask_value":
        kwargs["attention_mask"] = mask * 2
    elif problem == "mask_row":
        mask[draw(st.integers(0, batch - 1))] = 0
        kwargs["attention_mask"] = mask
    elif problem == "mask_shape":
        kwargs["attention_mask"] = torch.ones(batch, n_pos + 1, dtype=torch.long)
    elif problem == "layer_range":
        kwargs["layers"] = [draw(st.sampled_from([config.n_layer, -config.n_layer - 1, 99]))]
    elif problem == "layer_repeat":
        kwargs["layers"] = [0, -config.n_layer]
    elif problem == "text":
        kwargs["input_ids"] = draw(st.sampled_from(["some text", ["a", "b"], [[1, "x"]]]))
        kwargs["attention_mask"] = None
    elif problem == "empty":
        kwargs["input_ids"] = draw(st.sampled_from([[], torch.zeros(batch, 0, dtype=torch.long)]))
        kwargs["attention_mask"] = None
    return kwargs, problem


def reference_patterns(model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The model's own attention probabilities, from an eager copy (the model itself is not touched)."""
    twin = copy.deepcopy(model).eval()
    twin.config._attn_implementation = "eager"
    twin.config.return_dict = True
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, output_attentions=True)
    return out.attentions


PROPERTY = settings(
    deadline=None, max_examples=80, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


@PROPERTY
@given(data=st.data())
def test_trace_is_right_or_a_named_error_and_leaves_the_model(data: Any) -> None:
    model = data.draw(models())
    kwargs, problem = data.draw(inputs(model))
    heads = data.draw(st.none() | st.lists(st.integers(0, model.config.n_head - 1), min_size=1, unique=True))
    event(f"problem: {problem}")
    before = snapshot(model)
    if problem is not None:
        with pytest.raises(NAMED):
            attnlens.trace(model, **kwargs, heads=heads)
        assert_unchanged(model, before)
        return
    tr = attnlens.trace(model, **kwargs, heads=heads)
    assert_unchanged(model, before)
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    keep = valid[:, None, :, None] & valid[:, None, None, :]
    own = reference_patterns(model, ids, mask)
    eager = model.config._attn_implementation == "eager"
    for layer in tr.layers:
        mine = tr.pattern(layer)
        theirs = own[layer][:, list(tr.heads)]
        assert mine.shape == theirs.shape
        rows = mine.sum(-1)[valid[:, None, :].expand_as(mine[..., 0])]
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-6)
        if eager:  # the eager kernel's probabilities, bit for bit
            assert torch.equal(mine[keep.expand_as(mine)], theirs[keep.expand_as(theirs)])
        else:  # SDPA's hidden states differ from eager's by float rounding
            torch.testing.assert_close(mine * keep, theirs * keep, rtol=1e-5, atol=1e-6)
        assert not bool(mine.isnan().any())


@PROPERTY
@given(data=st.data())
def test_verify_is_ok_or_a_named_error_and_leaves_the_model(data: Any) -> None:
    model = data.draw(models())
    kwargs, problem = data.draw(inputs(model))
    event(f"problem: {problem}")
    before = snapshot(model)
    if problem not in (None, "layer_repeat"):  # verify compares each layer named once, in order
        with pytest.raises(NAMED):
            attnlens.verify(model, **kwargs)
    else:
        report = attnlens.verify(model, **kwargs)
        assert report.ok, str(report)
        assert report.n_valid == int(
            kwargs["input_ids"].numel() if kwargs["attention_mask"] is None else kwargs["attention_mask"].sum()
        )
    assert_unchanged(model, before)
