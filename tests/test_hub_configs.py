"""Published GPT-2 config.json files (tests/fixtures/hub_configs, sources in its README) load, trace and verify.

Each fixture keeps its key set as published; only the sizes shrink (layers, width, heads, positions, vocabulary,
MLP width), so a checkpoint of any size runs in milliseconds with seeded random weights saved next to its config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise

import attnlens
from attnlens.models import gpt2
from attnlens.models.gpt2_config import unknown_keys

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs"
NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))

# What each fixture is expected to do beyond loading silently: the unknown keys it warns about, or why it is refused.
UNKNOWN = {"penomovu__Unveil.distilgpt2-placeholder.json": ("download_date", "downloaded_from", "placeholder")}
REFUSED = {"itsnsreehari__KV260-Accelerated-Platform.gpt2-gptq.json": "quantization_config"}

N_LAYER, N_HEAD, D_HEAD, N_POSITIONS, VOCAB = 3, 4, 8, 32, 96


def _major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """The same keys with small sizes: 3 layers (so the inverse-layer scale differs per layer), 4 heads of 8."""
    out = dict(raw)
    d_model = N_HEAD * D_HEAD
    n_positions = raw.get("n_positions", 1024)
    sizes = {
        "n_layer": N_LAYER,
        "num_hidden_layers": N_LAYER,
        "n_embd": d_model,
        "hidden_size": d_model,
        "n_head": N_HEAD,
        "num_attention_heads": N_HEAD,
        "n_positions": N_POSITIONS,
        "max_position_embeddings": N_POSITIONS,
        # n_ctx keeps its ratio to n_positions (old checkpoints may differ)
        "n_ctx": max(1, round(N_POSITIONS * raw.get("n_ctx", n_positions) / n_positions)),
        "vocab_size": VOCAB,
    }
    out.update({key: value for key, value in sizes.items() if key in raw})
    if raw.get("n_inner") is not None:  # keep the MLP ratio
        out["n_inner"] = d_model * raw["n_inner"] // raw.get("n_embd", 768)
    assert out.keys() == raw.keys()
    return out


def _cls_name(raw: dict[str, Any]) -> str:
    names = [name for name in raw.get("architectures") or [] if name in gpt2.SUPPORTED_CLASSES]
    return names[0] if names else "GPT2LMHeadModel"


def make_checkpoint(name: str, folder: Path) -> dict[str, Any]:
    """A folder holding the shrunk config.json (the published keys, written as such) and seeded random weights."""
    import transformers

    raw = json.loads((FIXTURES / name).read_text())
    small = shrink(raw)
    torch.manual_seed(0)
    model = getattr(transformers, _cls_name(raw))(transformers.GPT2Config.from_dict(small))
    with torch.no_grad():  # default init leaves biases at 0: random ones make every bias path observable
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(small, indent=2))  # the published keys, not save_pretrained's
    return small


def load(folder: Path, small: dict[str, Any], attn_implementation: str) -> Any:
    """Through attnlens's loader; a config without model_type is readable by transformers 4 only (by folder name)."""
    if "model_type" not in small and _major() >= 5:
        # transformers 5's AutoConfig refuses a config.json without model_type; the class itself still loads it.
        with pytest.raises(OSError, match="model_type"):
            gpt2.load(str(folder))
        import transformers

        model = getattr(transformers, _cls_name(small)).from_pretrained(folder, attn_implementation=attn_implementation)
        return model.eval()
    return gpt2.load(str(folder), attn_implementation=attn_implementation)


def inputs(small: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, small.get("vocab_size", VOCAB), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    return ids, mask


def run_all(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"  # transformers 4 reads a config without model_type by the folder's name
    small = make_checkpoint(name, folder)
    ids, mask = inputs(small)
    for kernel in ("eager", "sdpa"):
        model = load(folder, small, kernel)
        assert model.config._attn_implementation == kernel
        weights = attnlens.extract_weights(model)
        assert (weights.n_layers, weights.n_heads, weights.d_head) == (N_LAYER, N_HEAD, D_HEAD)
        if attnlens.models.adapt(model).kernel_departure is not None:
            # transformers 4.x runs sdpa without the config's scale: trace warns and follows the kernel, and verify's
            # recomputation from the config's scale cannot match z and what follows (named in the report's notes).
            with pytest.warns(UserWarning, match="without the scale its attention modules ask for"):
                traced = attnlens.trace(model, ids, mask)
            report = attnlens.verify(model, ids, mask)
            assert not report.ok
            assert any("without the config's attention scale" in note for note in report.notes)
            failing = {row.quantity for row in report.failures}
            assert failing <= {"z", "attn_out", "hidden", "logits"} and "z" in failing
            assert report.worst("pattern_hf_order").max_abs_error == 0.0  # the patterns are still exact
        else:
            traced = attnlens.trace(model, ids, mask)
            report = attnlens.verify(model, ids, mask)
            assert report.ok, str(report)
        assert traced.provenance["unknown_config_keys"] == ""
        if kernel == "eager":
            # An eager-run trace is bitwise the model's own output_attentions on the real tokens.
            with torch.no_grad():
                base = attnlens.models.adapt(
                    model
                ).sites.base  # the base: some task heads break under return_dict=false in 5.x
                own = base(input_ids=ids, attention_mask=mask, output_attentions=True, return_dict=True).attentions
            keep = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
            for layer in range(N_LAYER):
                assert_bitwise(traced.pattern(layer) * keep, own[layer] * keep, "copy")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in UNKNOWN and n not in REFUSED])
def test_published_config_loads_traces_and_verifies(name: str, tmp_path: Path) -> None:
    run_all(name, tmp_path)


def test_the_corpus_is_what_the_readme_lists() -> None:
    readme = (FIXTURES / "README.md").read_text()
    assert len(NAMES) >= 20
    for name in NAMES:
        assert f"`{name}`" in readme, f"{name} has no source in tests/fixtures/hub_configs/README.md"
    assert set(UNKNOWN) | set(REFUSED) <= set(NAMES)


def test_legacy_keys_of_published_configs_are_inert() -> None:
    # Every key of every published config that loads is either modelled or inert: no warning for real checkpoints.
    import transformers

    for name in NAMES:
        if name in UNKNOWN or name in REFUSED:
            continue
        config = transformers.GPT2Config.from_dict(json.loads((FIXTURES / name).read_text()))
        assert unknown_keys(config) == (), name


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_published_config_with_unknown_keys_warns_and_verifies(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    small = make_checkpoint(name, folder)
    ids, mask = inputs(small)
    keys = UNKNOWN[name]
    with pytest.warns(attnlens.UnknownConfigWarning, match=", ".join(keys)):
        model = load(folder, small, "eager")
        report = attnlens.verify(model, ids, mask)
        traced = attnlens.trace(model, ids, mask)
    assert report.ok, str(report)
    assert any(", ".join(keys) in note for note in report.notes)
    assert traced.provenance["unknown_config_keys"] == ",".join(keys)
    with attnlens.strict_config(), pytest.raises(attnlens.UnsupportedModelError, match=", ".join(keys)):
        gpt2.load(str(folder))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_published_config_that_changes_the_maths_is_refused(name: str, tmp_path: Path) -> None:
    import transformers

    raw = json.loads((FIXTURES / name).read_text())
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(shrink(raw)))
    # Refused from the config alone, before any weights are read (there are none in the folder).
    with pytest.raises(attnlens.UnsupportedModelError, match=REFUSED[name]):
        gpt2.load(str(folder))
    config = transformers.GPT2Config.from_dict(shrink(raw))
    with pytest.raises(attnlens.UnsupportedModelError, match=REFUSED[name]):
        gpt2.check_config(config)


def test_shrink_keeps_keys_and_ratios() -> None:
    raw = json.loads((FIXTURES / "ResembleAI__chatterbox-turbo.GPT2_medium.json").read_text())
    small = shrink(raw)
    assert list(small) == list(raw)
    assert small["hidden_size"] == small["n_embd"] == N_HEAD * D_HEAD  # an alias of n_embd must follow it
    assert small["n_ctx"] == small["n_positions"] == N_POSITIONS
    assert small["n_special"] == 0 and small["predict_special_tokens"] is True
    biomed = shrink(json.loads((FIXTURES / "stanford-crfm__BioMedLM.json").read_text()))
    assert biomed["scale_attn_by_inverse_layer_idx"] is True and biomed["use_cache"] is False
