"""The GPT-NeoX config policy: every published fixture passes silently, on what each release reads and writes;
scaled or ambiguously spelled rotary embeddings, odd rotary widths and the rest are refused by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

import attnlens
from attnlens.models import gpt_neox_config
from attnlens.models.gpt_neox_config import INERT_KEYS, MODELLED_KEYS, REFUSED_VALUES, check_config, rotary

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs_neox"
NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))
# What each fixture is expected to do beyond passing silently: the unknown keys it warns about, or why it is refused.
UNKNOWN = {"BreadAi__DiscordPy.finetune-4.26.1.json": ("line_by_line",)}
REFUSED = {"jionlyu__3B-test2.int8-4.31.0.json": "quantization_config"}


def _major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def config(raw: dict[str, Any]) -> Any:
    import transformers

    return transformers.GPTNeoXConfig.from_dict(raw)


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
    if name in REFUSED:
        with pytest.raises(attnlens.UnsupportedModelError, match=REFUSED[name]):
            check_config(loaded)
        return
    expected = UNKNOWN.get(name, ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_config(loaded) == expected
    assert [str(w.message).split(" have ")[0] for w in caught] == (
        [f"GPT-NeoX config key(s) {', '.join(expected)} of {loaded._name_or_path!r}"] if expected else []
    )
    loaded.save_pretrained(tmp_path)  # the keys this release writes (5.x: rope_parameters, dtype; 4.57: rope_scaling)
    written = json.loads((tmp_path / "config.json").read_text())
    assert gpt_neox_config.unknown_keys(config(written)) == expected
    assert rotary(config(written)) == rotary(loaded)


@pytest.mark.parametrize(
    ("name", "fraction", "base"),
    [
        ("EleutherAI__pythia-14m.json", 0.25, 10000.0),
        ("koshirowada__pythia_160m_dpo.finetune-4.46.2.json", 0.25, 10000.0),
        ("togethercomputer__RedPajama-INCITE-7B-Instruct.json", 1.0, 10000.0),
    ],
)
def test_rotary_reads_every_spelling(name: str, fraction: float, base: float) -> None:
    assert rotary(config(fixture(name))) == (fraction, base)


def test_a_5x_saved_full_rotary_config_is_refused_where_it_would_be_read_wrong() -> None:
    """What 5.x writes for RedPajama (rotary_pct 1.0): rope_parameters only. 4.57 ignores rope_parameters and falls
    back to rotary_pct 0.25, a different model: refused there, naming both values; read right by 5.x."""
    raw = fixture("togethercomputer__RedPajama-INCITE-7B-Instruct.json")
    del raw["rotary_pct"], raw["rotary_emb_base"]
    raw["rope_parameters"] = {"partial_rotary_factor": 1.0, "rope_theta": 10000, "rope_type": "default"}
    if _major() >= 5:
        assert check_config(config(raw)) == ()
        assert rotary(config(raw)) == (1.0, 10000.0)
    else:
        with pytest.raises(attnlens.UnsupportedModelError, match=r"rotary_pct=0.25.*partial_rotary_factor'\]=1.0"):
            check_config(config(raw))


def test_a_partial_rotary_factor_that_5x_ignores_is_refused() -> None:
    # 5.x builds rope_parameters from rotary_pct or its default 0.25 and ignores a lone top-level partial_rotary_factor.
    raw = fixture("EleutherAI__pythia-14m.json")
    del raw["rotary_pct"]
    raw["partial_rotary_factor"] = 0.5
    if _major() >= 5:
        with pytest.raises(attnlens.UnsupportedModelError, match="rotary fraction spelled with different values"):
            check_config(config(raw))
    else:  # 4.57 overwrites partial_rotary_factor with rotary_pct's default: one value everywhere, 0.25
        assert rotary(config(raw)) == (0.25, 10000.0)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "scaled rotary embedding"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "scaled rotary embedding"),
        ({"rotary_pct": 0.375, "hidden_size": 32, "num_attention_heads": 4}, r"int\(8 \* 0.375\) = 3"),
        ({"head_dim": 16, "hidden_size": 32, "num_attention_heads": 4}, "head_dim=16 differs"),
        ({"hidden_act": "swiglu"}, "hidden_act='swiglu'"),
        ({"add_cross_attention": True}, "cross-attention"),
        ({"pruned_heads": {0: [1]}}, "pruned heads"),
    ],
)
def test_refusals_name_the_key(edit: dict[str, Any], words: str) -> None:
    raw = {**fixture("EleutherAI__pythia-14m.json"), **edit}
    with pytest.raises(attnlens.UnsupportedModelError, match=words):
        check_config(config(raw))


def test_other_model_types_and_strict_mode() -> None:
    import transformers

    with pytest.raises(attnlens.UnsupportedModelError, match="GPT-NeoX checkpoints .*got 'gpt2'"):
        check_config(transformers.GPT2Config())
    unknown = config(fixture("BreadAi__DiscordPy.finetune-4.26.1.json"))
    with attnlens.strict_config(), pytest.raises(attnlens.UnsupportedModelError, match="line_by_line"):
        check_config(unknown)
