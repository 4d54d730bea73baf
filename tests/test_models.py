"""adapt(): one validated, frozen Adapter per model, chosen by config.model_type through the registry."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
from conftest import assert_bitwise, make_gpt2
from torch import nn

import attnlens
from attnlens.models import REGISTRY, Adapter, adapt
from attnlens.models.gpt2 import GPT2Adapter


def test_adapt_gives_the_dimensions_specs_and_sites_of_a_gpt2_model() -> None:
    model = make_gpt2(n_layer=3, n_head=4, n_embd=32, scale_attn_by_inverse_layer_idx=True)
    adapter = adapt(model)
    assert isinstance(adapter, GPT2Adapter)
    dims = {d: getattr(adapter, d) for d in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "n_ctx")}
    config = model.config
    assert dims == {"n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "d_model": 32, "d_head": 8, "n_ctx": 32}
    assert adapter.d_vocab == config.vocab_size and adapter.n_ctx == config.n_positions
    assert [s.scale for s in adapter.specs] == pytest.approx([8**-0.5 / (layer + 1) for layer in range(3)])
    assert all(s.rotary_dim == 0 and s.window is None for s in adapter.specs)
    assert adapter.sites.layers[1].qkv == (model.transformer.h[1].attn.c_attn,)
    assert adapter.model is model and adapter.module is model
    assert adapt(adapter) is adapter  # passed down, never validated again
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.n_heads = 2  # type: ignore[misc]


def test_W_O_is_a_view_of_the_output_projection_per_head() -> None:
    model = make_gpt2(n_layer=2)
    adapter = adapt(model)
    weights = attnlens.extract_weights(model)
    for layer in range(2):
        W_O = adapter.W_O(layer)
        assert W_O.shape == (adapter.n_heads, adapter.d_head, adapter.d_model)
        assert W_O.data_ptr() == model.transformer.h[layer].attn.c_proj.weight.data_ptr()
        assert_bitwise(W_O, weights.layers[layer].W_O, "copy")
        assert adapter.b_O(layer) is model.transformer.h[layer].attn.c_proj.bias


def test_adapt_dispatches_on_the_config_model_type(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    @dataclasses.dataclass(frozen=True, eq=False)
    class Other(GPT2Adapter):
        model_type: ClassVar[str] = "other"

        @classmethod
        def owns(cls, model: object) -> bool:
            return getattr(getattr(model, "config", None), "model_type", None) == "other"

        @classmethod
        def from_model(cls, model: nn.Module) -> Adapter:
            built.append(type(model).__name__)
            return super().from_model(model)

    monkeypatch.setitem(REGISTRY, "other", Other)
    model = make_gpt2(n_layer=1)
    assert type(adapt(model)) is GPT2Adapter and not built
    model.config.model_type = "other"
    # The registered class is chosen; GPT-2's config policy (inside from_model) still refuses a non-GPT-2 config.
    with pytest.raises(attnlens.UnsupportedModelError, match="model_type 'gpt2'"):
        adapt(model)
    assert built == ["GPT2LMHeadModel"]


def test_anything_else_is_refused_naming_what_is_supported() -> None:
    with pytest.raises(
        attnlens.UnsupportedModelError, match=r"got torch\.nn\.modules\.linear\.Linear; supported: GPT2"
    ):
        adapt(nn.Linear(2, 2))
    model: Any = make_gpt2(n_layer=1)
    model.config.model_type = "llama"  # a GPT-2 class whose config says otherwise: its adapter refuses the config
    with pytest.raises(attnlens.UnsupportedModelError, match="model_type 'gpt2'.*'llama'"):
        adapt(model)


def test_a_task_model_and_its_transformer_share_one_lock() -> None:
    from attnlens.models import lock_key

    model = make_gpt2(n_layer=1)
    assert lock_key(model) is model.transformer is lock_key(model.transformer)
    other = nn.Linear(2, 2)
    assert lock_key(other) is other


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("gpt2", ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")),
        ("gpt_neox", ("GPTNeoXForCausalLM",)),
        ("llama", ("LlamaForCausalLM",)),
        ("mistral", ("MistralForCausalLM",)),
        ("qwen2", ("Qwen2ForCausalLM",)),
        ("qwen3", ("Qwen3ForCausalLM",)),
    ],
)
def test_lm_classes_are_the_familys_classes_with_logits_over_the_vocabulary(
    model_type: str, expected: tuple[str, ...]
) -> None:
    # What a refusal for want of a language-model head names (head_importance, logit_attribution): read from the
    # class's supported_classes alone, so the property is taken on the class.
    assert Adapter.lm_classes.fget(REGISTRY[model_type]) == expected
    assert set(REGISTRY) == {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}  # no family left out here


def test_lm_classes_of_an_adapter_are_its_class_ones() -> None:
    assert adapt(make_gpt2(n_layer=1)).lm_classes == ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")
