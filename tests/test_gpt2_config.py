"""The GPT-2 config policy: inert keys pass silently, unknown keys warn (strict mode refuses them), flags refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_gpt2

import attnlens
from attnlens.cli import main
from attnlens.models import gpt2
from attnlens.models.gpt2_config import INERT_KEYS, MODELLED_KEYS, REFUSED_VALUES, unknown_keys

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])

# Legacy and bookkeeping keys of published configs (tests/fixtures/hub_configs), each with its value there.
LEGACY = {
    "n_special": 0,
    "predict_special_tokens": True,
    "output_past": True,
    "_num_labels": 1,
    "gradient_checkpointing": False,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "summary_type": "cls_index",
    "tokenizer_class": "BertTokenizer",
    "use_bfloat16": False,
    "torchscript": False,
}


def with_keys(**keys: object):
    model = make_gpt2()
    for key, value in keys.items():
        setattr(model.config, key, value)
    return model


def test_every_known_key_has_a_one_line_reason() -> None:
    for table in (MODELLED_KEYS, INERT_KEYS):
        for key, reason in table.items():
            assert reason.strip() and "\n" not in reason, key
    for key, (allowed, meaning) in REFUSED_VALUES.items():
        assert allowed and meaning.strip(), key
    assert not MODELLED_KEYS.keys() & INERT_KEYS.keys()
    assert not (MODELLED_KEYS.keys() | INERT_KEYS.keys()) & REFUSED_VALUES.keys()


@pytest.mark.parametrize(
    "cls_name",
    ["GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification"],
)
def test_default_configs_of_the_installed_release_have_no_unknown_keys(cls_name: str) -> None:
    # Whatever the installed transformers writes into a fresh config is known, so a re-saved checkpoint never warns.
    assert unknown_keys(make_gpt2(cls_name).config) == ()


def test_legacy_keys_pass_silently_and_verify(tmp_path) -> None:
    # pytest turns any warning into an error: these calls must not warn, also in strict mode.
    model = with_keys(**LEGACY)
    with attnlens.strict_config():
        weights = attnlens.extract_weights(model)
        traced = attnlens.trace(model, IDS)
        report = attnlens.verify(model, IDS)
    assert weights.n_layers == 2 and report.ok
    assert traced.provenance["unknown_config_keys"] == ""
    assert not any("unknown effect" in note for note in report.notes)
    make_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **LEGACY}))  # as in the published files
    with attnlens.strict_config():
        assert attnlens.verify(gpt2.load(str(tmp_path)), IDS).ok


def test_n_ctx_below_n_positions_is_inert() -> None:
    # Old configs carry n_ctx; no current GPT-2 module reads it, so sequences longer than n_ctx run and match.
    model = make_gpt2(n_ctx=4)
    assert model.config.n_ctx == 4 < IDS.shape[1] <= model.config.n_positions
    report = attnlens.verify(model, IDS)
    assert report.ok and report.pos == IDS.shape[1]


def test_unknown_key_warns_by_name_and_points_to_verify() -> None:
    model = with_keys(future_flag=True, another_flag=0)
    with pytest.warns(attnlens.UnknownConfigWarning, match="another_flag, future_flag") as record:
        weights = attnlens.extract_weights(model)
    assert weights.n_layers == 2
    message = str(record[0].message)
    assert "attnlens.verify" in message and "strict_config" in message
    assert issubclass(attnlens.UnknownConfigWarning, UserWarning)
    assert "UnknownConfigWarning" in attnlens.__all__ and "strict_config" in attnlens.__all__


def test_unknown_key_is_recorded_in_provenance_and_report(tmp_path) -> None:
    model = with_keys(future_flag=True)
    with pytest.warns(attnlens.UnknownConfigWarning, match="future_flag"):
        traced = attnlens.trace(model, IDS)
        report = attnlens.verify(model, IDS)
    assert traced.provenance["unknown_config_keys"] == "future_flag"
    traced.save(tmp_path / "trace.safetensors")
    assert (
        attnlens.AttentionTrace.load(tmp_path / "trace.safetensors").provenance["unknown_config_keys"] == "future_flag"
    )
    assert report.ok  # the flag does nothing here, and the report is the proof
    notes = [note for note in report.notes if "future_flag" in note]
    assert len(notes) == 1 and "unknown effect" in notes[0]
    assert f"note: {notes[0]}" in str(report)
    assert notes[0] in report.to_dict()["notes"]


def test_strict_mode_refuses_unknown_keys_by_name() -> None:
    model = with_keys(future_flag=True)
    before = dict(model.config.to_dict())
    with attnlens.strict_config():
        for call in (
            lambda: attnlens.extract_weights(model),
            lambda: attnlens.trace(model, IDS),
            lambda: attnlens.verify(model, IDS),
        ):
            with pytest.raises(attnlens.UnsupportedModelError, match="unknown effect future_flag.*strict_config"):
                call()
        with attnlens.strict_config(False), pytest.warns(attnlens.UnknownConfigWarning):
            attnlens.extract_weights(model)  # an inner block lifts strictness
        with pytest.raises(attnlens.UnsupportedModelError):
            attnlens.extract_weights(model)  # and the outer one is back after it
    assert model.config.to_dict() == before and not model.training


def test_strict_mode_ends_with_its_block_also_on_error() -> None:
    model = with_keys(future_flag=True)
    with pytest.raises(attnlens.UnsupportedModelError), attnlens.strict_config():
        attnlens.extract_weights(model)
    with pytest.warns(attnlens.UnknownConfigWarning):
        attnlens.extract_weights(model)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("add_cross_attention", True, "cross-attention blocks"),
        ("is_encoder_decoder", True, "is_encoder_decoder=True"),
        ("pruned_heads", {0: [1]}, "pruned heads"),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantized weights"),
        ("activation_function", "prelu", "activation_function='prelu'"),
    ],
)
def test_flags_that_change_the_maths_are_refused_outside_strict_mode(key, value, match) -> None:
    model = with_keys(**{key: value})
    with pytest.raises(attnlens.UnsupportedModelError, match=match):
        attnlens.extract_weights(model)


def test_refusals_and_unknown_keys_are_named_together() -> None:
    model = with_keys(add_cross_attention=True, future_flag=1)
    with attnlens.strict_config(), pytest.raises(attnlens.UnsupportedModelError, match="cross-attention.*future_flag"):
        attnlens.extract_weights(model)


def test_cli_strict_flag(tmp_path, capsys) -> None:
    model = with_keys(future_flag=True)
    model.save_pretrained(tmp_path / "tiny")
    path = str(tmp_path / "tiny")
    ids = ["--ids", *map(str, IDS[0].tolist())]
    with pytest.warns(attnlens.UnknownConfigWarning, match="future_flag"):
        assert main(["verify", path, *ids]) == 0
    out = capsys.readouterr().out
    assert "attnlens verification: OK" in out and "future_flag" in out
    assert main(["verify", path, "--strict", *ids]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlens: ") and "future_flag" in err and len(err.strip().splitlines()) == 1


def test_return_dict_false_is_inert() -> None:
    # A published config (HPDL-Group/Merak) saves return_dict=false: the base then returns a tuple unless asked.
    model = with_keys(return_dict=False)
    report = attnlens.verify(model, IDS)
    assert report.ok and report.pattern_implementation == "eager"
    assert model.config.return_dict is False


def test_warning_names_the_checkpoint_it_was_loaded_from(tmp_path) -> None:
    make_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "future_flag": True}))
    with pytest.warns(attnlens.UnknownConfigWarning, match=f"future_flag of '{tmp_path}'"):
        attnlens.extract_weights(tmp_path)
