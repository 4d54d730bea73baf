"""Random valid and invalid inputs to trace and verify on random small GPT-2 configs (hypothesis, optional).

Each time the answer is right or a named error, and the model is left exactly as found.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_bitwise, eager_reference, make_gpt2, optional
from test_inputs import NAMED

import attnlens

optional("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


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
                assert_bitwise(after["state"][name], t, "copy", what=name)  # the state as it was (a clone taken before)
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
    own = eager_reference(model, ids, mask)
    eager = model.config._attn_implementation == "eager"
    for layer in tr.layers:
        mine = tr.pattern(layer)
        theirs = own[layer][:, list(tr.heads)]
        assert mine.shape == theirs.shape
        rows = mine.sum(-1)[valid[:, None, :].expand_as(mine[..., 0])]
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-6)
        if eager:  # the eager kernel's probabilities, bit for bit
            assert_bitwise(mine[keep.expand_as(mine)], theirs[keep.expand_as(theirs)], "copy")
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
