"""attnlens.load for the demo and saved folders of every registered architecture; names and paths at every entry point.

No hub: every checkpoint is the embedded demo or a seeded tiny model saved to a temporary folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlens
from attnlens import metrics
from attnlens.attribution import decompose
from attnlens.demo import DEMO_PATH
from attnlens.models import REGISTRY

TEXT = "The cat sat on the mat. The cat sat on the mat."

# Small dimensions per registered model_type, in that architecture's own config keys. A new adapter adds its line.
TINY: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 64},
    "gpt_neox": {
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
        "vocab_size": 64,
    },
    **{
        family: {
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
            "vocab_size": 64,
            **({"head_dim": 8} if family == "qwen3" else {}),
        }
        for family in ("llama", "mistral", "qwen2", "qwen3")
    },
}


def _save_tiny(model_type: str, folder: Path) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY:
        pytest.fail(f"REGISTRY has {model_type!r}: give it small dimensions in tests/test_loading.py's TINY")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY[model_type])).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", ["demo", None])
def test_demo_by_name(name: str | None) -> None:
    model, tokenizer = attnlens.load(name)
    own, own_tokenizer = attnlens.load_demo()
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert tokenizer is not None and tokenizer(TEXT)["input_ids"] == own_tokenizer(TEXT)["input_ids"]
    # The same file read twice: the parameters are copies of the stored numbers.
    for (key, a), (_, b) in zip(model.state_dict().items(), own.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_dtype_by_name_and_attn_implementation() -> None:
    model, _ = attnlens.load("demo", dtype="float64", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.float64
    assert attnlens.models.adapt(model).kernel == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        attnlens.load("demo", dtype="float77")


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_saved_folder_of_every_architecture(model_type: str, tmp_path: Path) -> None:
    saved = _save_tiny(model_type, tmp_path)
    model, tokenizer = attnlens.load(tmp_path)
    assert tokenizer is None  # weights only: no tokenizer files in the folder
    assert type(model) is type(saved) and not model.training
    assert attnlens.models.adapt(model).model_type == model_type
    for (key, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_folder_with_tokenizer_gives_it(tmp_path: Path) -> None:
    demo, tok = attnlens.load_demo()
    demo.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, tokenizer = attnlens.load(str(tmp_path))
    assert tokenizer is not None and tokenizer(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_unsupported_and_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(attnlens.UnsupportedModelError, match="'bert'"):
        attnlens.load(tmp_path)
    with pytest.raises(OSError, match="could not read a config"):
        attnlens.load(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="bytes"):
        attnlens.trace(b"demo", TEXT)  # type: ignore[arg-type]


def test_loading_is_quiet_and_restores_transformers_setting(capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    attnlens.load("demo")
    attnlens.load_demo()
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is left as found


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    return attnlens.load("demo")


def test_every_entry_point_takes_a_name_or_path_and_text(demo: tuple[Any, Any]) -> None:
    """The same call by name and with the loaded model gives the same numbers: the same kernels on the same inputs."""
    model, tok = demo
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    for source in ("demo", DEMO_PATH, str(DEMO_PATH)):
        by_name = attnlens.trace(source, TEXT)
        assert torch.equal(by_name.pattern(0), attnlens.trace(model, ids).pattern(0))
        assert by_name.tokens is not None  # the checkpoint's tokenizer came with it
    assert attnlens.verify("demo", TEXT, layers=[0]).ok
    by_text, by_ids = attnlens.verify(model, TEXT, tokenizer=tok), attnlens.verify(model, ids)
    assert [r.max_abs_error for r in by_text.rows] == [r.max_abs_error for r in by_ids.rows]
    assert torch.equal(decompose("demo", TEXT).contributions, decompose(model, ids).contributions)
    assert torch.equal(metrics.induction_scores("demo"), metrics.induction_scores(model))
    assert torch.equal(attnlens.head_importance("demo", TEXT), attnlens.head_importance(model, ids))
    corpus = [TEXT] * 4
    by_path = attnlens.scan(DEMO_PATH, corpus, seq_len=8, progress=False)
    own = attnlens.scan(model, corpus, tokenizer=tok, seq_len=8, progress=False)
    assert torch.equal(by_path.mean["previous_token"], own.mean["previous_token"])
    assert attnlens.extract_weights("demo").n_layers == 2


def test_heads_as_pairs(demo: tuple[Any, Any]) -> None:
    model, tok = attnlens.load("demo", attn_implementation="eager")
    full = attnlens.trace(model, TEXT, tokenizer=tok, store=("pattern", "scores"))
    tr = attnlens.trace(model, TEXT, tokenizer=tok, heads=[(1, 0), (0, 2), (-1, 3)])
    assert tr.layers == (1, 0) and tr.heads == (0, 2, 3)
    # Fewer heads may run the q.k products in another blocking (another rounding): each score moves by at most
    # d_head unit roundoffs of the largest score, and softmax moves a probability by at most twice that.
    scores = full["scores", 0], full["scores", 1]
    largest = max(float(x[x.isfinite()].abs().max()) for x in scores)
    bound = 4 * model.config.n_embd // model.config.n_head * 2.0**-24 * largest
    close = functools.partial(torch.testing.assert_close, rtol=0, atol=bound)
    close(tr.pattern(1), full.pattern(1)[:, [0, 2, 3]])
    close(tr.pattern(0), full.pattern(0)[:, [0, 2, 3]])
    close(attnlens.trace(model, TEXT, tokenizer=tok, heads=torch.tensor([[0, 1]])).pattern(0), full.pattern(0)[:, [1]])
    for heads, message in (
        ([(0, 1), 2], "mixes"),
        ([(0, 9)], "head 9 is out of range"),
        ([(5, 0)], "layer 5 is out of range"),
        ([(0, 1), (0, -3)], "given more than once"),
        ([(0, 1.5)], "must be integers"),
    ):
        with pytest.raises(ValueError, match=message):
            attnlens.trace(model, TEXT, tokenizer=tok, heads=heads)
    with pytest.raises(ValueError, match="leave layers=None"):
        attnlens.trace(model, TEXT, tokenizer=tok, heads=[(0, 1)], layers=[0])


def test_top_heads_of_a_score_to_a_trace_and_a_view(demo: tuple[Any, Any]) -> None:
    from attnlens import viz

    model, tok = attnlens.load("demo", attn_implementation="eager")
    scores = metrics.head_scores(attnlens.trace(model, TEXT, tokenizer=tok))
    top = scores.top("induction", 2)  # [(layer, head, score)], best first
    tr = attnlens.trace(model, TEXT, tokenizer=tok, heads=top)
    pairs = [(layer, head) for layer, head, _ in top]
    assert tr.layers == tuple(dict.fromkeys(layer for layer, _ in pairs))
    assert tr.heads == tuple(dict.fromkeys(head for _, head in pairs))
    view = viz.text_html(attnlens.trace(model, TEXT, tokenizer=tok), heads=top)
    selected = [layer * 4 + head for layer, head in pairs]  # the view numbers heads layer-major, 4 per layer
    assert f'"initial":{{"heads":{json.dumps(selected, separators=(",", ":"))}' in view
    with pytest.raises(ValueError, match="not in the data"):
        viz.text_html(attnlens.trace(model, TEXT, tokenizer=tok, layers=[0]), heads=[(1, 0, 0.5)])


def test_the_demo_is_named_demo_not_this_machines_folder() -> None:
    for model, tok in (attnlens.load("demo"), attnlens.load_demo()):
        report = str(attnlens.verify(model, TEXT, tokenizer=tok, layers=[0]))
        assert "GPT2LMHeadModel (demo)" in report and str(DEMO_PATH) not in report
        assert attnlens.trace(model, TEXT, tokenizer=tok).provenance["model"] == "demo"
        assert tok.name_or_path == "demo"
