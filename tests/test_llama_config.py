"""The Llama-family config policy: every published fixture passes silently, as each release reads and re-saves it;
the settings the adapter needs (heads, windows, biases, q/k norms, rope) are read per family; what attnlens does not
follow is refused by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

import attnlens
from attnlens.models import llama_config
from attnlens.models.llama_config import INERT_KEYS, MODELLED_KEYS, REFUSED_VALUES, check_config, settings

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs_llama"
NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))
# What each fixture is expected to do beyond passing silently: the unknown keys it warns about, or why it is refused.
UNKNOWN: dict[str, tuple[str, ...]] = {}
REFUSED: dict[str, str] = {}
# Refused on transformers 4.x only: written by 5.x (rope_parameters alone), which 4.57 does not read, so 4.57 would
# rotate with its default base 10000 instead of SmolLM2's 100000.
REFUSED_ON_4X = {"HuggingFaceTB__SmolLM2-135M.saved-5.17.0.json": "rotation depends on the release"}


def refusal(name: str) -> str | None:
    """Why the installed transformers release's reading of a fixture is refused, or None."""
    import transformers

    on_4x = transformers.__version__.startswith("4.")
    return REFUSED.get(name) or (REFUSED_ON_4X.get(name) if on_4x else None)


def config(raw: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def test_tables_are_disjoint_and_every_key_has_its_reason() -> None:
    for table in (MODELLED_KEYS, INERT_KEYS):
        assert all(isinstance(reason, str) and reason.strip() for reason in table.values())
    for allowed, meaning in REFUSED_VALUES.values():
        assert allowed and meaning
    assert not MODELLED_KEYS.keys() & INERT_KEYS.keys()
    assert not (MODELLED_KEYS.keys() | INERT_KEYS.keys()) & REFUSED_VALUES.keys()


@pytest.mark.parametrize("name", NAMES)
def test_published_config_and_its_resave_pass_the_policy(name: str, tmp_path: Path) -> None:
    """Each fixture as the installed release reads it, and as that release writes it back: no surprise."""
    loaded = config(fixture(name))
    if (why := refusal(name)) is not None:
        with pytest.raises(attnlens.UnsupportedModelError, match=why):
            check_config(loaded)
        return
    expected = UNKNOWN.get(name, ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_config(loaded) == expected
    assert not [w for w in caught if issubclass(w.category, attnlens.UnknownConfigWarning)] or expected
    # The keys this release writes (5.x: rope_parameters, dtype, layer_types; 4.57: rope_scaling, torch_dtype).
    loaded.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert llama_config.unknown_keys(config(written)) == expected
    assert settings(config(written)) == settings(loaded)


@pytest.mark.parametrize(
    ("name", "family", "heads", "kv_heads", "d_head", "rope_type", "theta", "qk_norm", "qkv_bias", "tied"),
    [
        ("meta-llama__Llama-2-7b-hf.printed-4.45.2.json", "Llama", 32, 32, 128, "default", 1e4, False, False, False),
        ("meta-llama__Llama-3.2-1B.json", "Llama", 32, 8, 64, "llama3", 500000.0, False, False, True),
        ("HuggingFaceTB__SmolLM2-135M.printed-4.48.0.json", "Llama", 9, 3, 64, "default", 100000.0, False, False, True),
        ("mistralai__Mistral-Nemo-Base-2407.printed-4.43.3.json", "Mistral", 32, 8, 128, "default", 1e6, False, False,
         False),
        ("Qwen__Qwen2.5-3B.copied.json", "Qwen2", 16, 2, 128, "default", 1e6, False, True, True),
        ("Qwen__Qwen3-8B.saved-4.57.1.json", "Qwen3", 32, 8, 128, "default", 1e6, True, False, False),
    ],
)  # fmt: skip
def test_settings_read_each_family(
    name: str, family: str, heads: int, kv_heads: int, d_head: int, rope_type: str, theta: float, qk_norm: bool,
    qkv_bias: bool, tied: bool,
) -> None:  # fmt: skip
    got = settings(config(fixture(name)))
    assert (got.family, got.n_heads, got.n_kv_heads, got.d_head) == (family, heads, kv_heads, d_head)
    assert (got.rope_type, got.rope_theta, got.qk_norm, got.qkv_bias, got.tied) == (
        rope_type, theta, qk_norm, qkv_bias, tied
    )  # fmt: skip
    assert got.windows == (None,) * fixture(name)["num_hidden_layers"]
    assert not got.o_bias and not got.mlp_bias


def test_mistral_v0_1_slides_every_layer_over_4096_keys() -> None:
    got = settings(config(fixture("mistralai__Mistral-7B-Instruct-v0.1.printed-4.40.0.dev0.json")))
    assert (got.family, got.n_heads, got.n_kv_heads, got.d_head) == ("Mistral", 32, 8, 128)
    assert got.windows == (4096,) * 32


def test_published_qwen_window_settings_are_off_as_both_releases_read_them() -> None:
    # Qwen2.5 publishes sliding_window 131072 beside use_sliding_window false: no layer attends through a window.
    raw = fixture("Qwen__Qwen2.5-7B.copied.json")
    assert raw["sliding_window"] == 131072 and raw["use_sliding_window"] is False
    assert settings(config(raw)).windows == (None,) * raw["num_hidden_layers"]


def test_windows_per_layer_for_each_family() -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    assert settings(MistralConfig(num_hidden_layers=3, sliding_window=5)).windows == (5, 5, 5)
    assert settings(MistralConfig(num_hidden_layers=2, sliding_window=None)).windows == (None, None)
    qwen2 = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert settings(qwen2).windows == (None, None, 3, 3)
    qwen3 = Qwen3Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert settings(qwen3).windows == (None, 4, 4) and settings(qwen3).qk_norm
    off = Qwen2Config(num_hidden_layers=2, use_sliding_window=False, sliding_window=3, max_window_layers=0)
    assert settings(off).windows == (None, None)
    assert settings(LlamaConfig(num_hidden_layers=2)).windows == (None, None)


def test_biases_per_family() -> None:
    from transformers import LlamaConfig, Qwen3Config

    llama = settings(LlamaConfig(attention_bias=True, mlp_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    qwen3 = settings(Qwen3Config(attention_bias=True))
    assert qwen3.qkv_bias and qwen3.o_bias and not qwen3.mlp_bias


@pytest.mark.parametrize("rope_type", ["linear", "llama3", "yarn"])
def test_position_only_rope_variants_are_followed(rope_type: str) -> None:
    from transformers import LlamaConfig

    extra = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    scaling = {"rope_type": rope_type, "factor": 2.0, **extra.get(rope_type, {})}
    assert settings(LlamaConfig(rope_scaling=scaling, max_position_embeddings=256)).rope_type == rope_type


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic': its frequencies"),
        ({"hidden_act": "swiglu_made_up"}, "hidden_act='swiglu_made_up'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "quantized weights"),
    ],
)
def test_refusals_name_the_key(changes: dict[str, Any], match: str) -> None:
    raw = {**fixture("TinyLlama__TinyLlama-1.1B-Chat-v1.0.saved-4.56.0.json"), **changes}
    with pytest.raises(attnlens.UnsupportedModelError, match=match):
        check_config(config(raw))


def test_unknown_keys_warn_and_strict_refuses() -> None:
    raw = {**fixture("TinyLlama__TinyLlama-1.1B-Chat-v1.0.saved-4.56.0.json"), "made_up_switch": 3}
    with pytest.warns(attnlens.UnknownConfigWarning, match="made_up_switch"):
        assert check_config(config(raw)) == ("made_up_switch",)
    with attnlens.strict_config(), pytest.raises(attnlens.UnsupportedModelError, match="made_up_switch"):
        check_config(config(raw))


def test_other_model_types_are_refused() -> None:
    from transformers import GPT2Config

    with pytest.raises(attnlens.UnsupportedModelError, match="'gpt2'"):
        check_config(GPT2Config())


def _written_by_5x(raw: dict[str, Any]) -> dict[str, Any]:
    """The rotary keys as transformers 5.x writes them on save: rope_parameters alone, no rope_theta or rope_scaling."""
    scaling = dict(raw.get("rope_scaling") or {})
    out = {key: value for key, value in raw.items() if key not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {
        **scaling,
        "rope_theta": raw["rope_theta"],
        "rope_type": scaling.get("rope_type", "default"),
    }
    return out


@pytest.mark.parametrize(
    ("name", "runs_as_published_on_4x"),
    [
        ("meta-llama__Llama-3.2-1B.json", False),  # 4.57 would run default rope at 10000, not llama3 at 500000
        ("Qwen__Qwen2.5-7B.copied.json", False),  # 4.57 would run base 10000, not 1e6
        ("mistralai__Mistral-7B-Instruct-v0.1.printed-4.40.0.dev0.json", True),  # base 10000 either way
    ],
)
def test_a_5x_saved_config_is_read_as_the_installed_release_runs_it(name: str, runs_as_published_on_4x: bool) -> None:
    import transformers

    published = settings(config(fixture(name)))
    loaded = config(_written_by_5x(fixture(name)))
    if transformers.__version__.startswith("4.") and not runs_as_published_on_4x:
        with pytest.raises(attnlens.UnsupportedModelError, match="rotation depends on the release"):
            check_config(loaded)
    else:
        assert check_config(loaded) == ()
        assert (settings(loaded).rope_type, settings(loaded).rope_theta) == (published.rope_type, published.rope_theta)
