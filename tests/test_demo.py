"""The embedded demo checkpoint: it loads offline, is small, and has the heads its model card names."""

from __future__ import annotations

import torch

import attnlens
from attnlens import metrics
from attnlens.demo import DEMO_PATH, load_demo


def test_checkpoint_is_shipped_and_small() -> None:
    names = {path.name for path in DEMO_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= names
    size = sum(path.stat().st_size for path in DEMO_PATH.iterdir())
    assert size < 5 * 2**20, f"the demo checkpoint is {size / 2**20:.1f} MiB"


def test_load_demo_returns_model_and_tokenizer() -> None:
    model, tokenizer = load_demo()
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 128)
    ids = tokenizer("the old man saw a bird")["input_ids"]
    assert tokenizer.decode(ids) == "the old man saw a bird"
    assert max(ids) < model.config.vocab_size
    model64, _ = load_demo(dtype=torch.float64, attn_implementation="eager")
    assert model64.dtype == torch.float64 and model64.config._attn_implementation == "eager"


def test_demo_has_its_named_heads() -> None:
    # The model card names L0H0 (previous token) and L1H0 (induction); measured with attnlens's own metrics.
    model, _ = load_demo()
    induction = metrics.induction_scores(model, seq_len=50, batch=8, seed=0)
    assert induction[1, 0] > 0.5 and int(induction.argmax()) == 1 * 4 + 0
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (4, 100), generator=g)
    prev = metrics.previous_token_scores(attnlens.trace(model, ids))
    assert prev[0, 0] > 0.5 and int(prev.argmax()) == 0


def test_demo_verifies() -> None:
    model, tokenizer = load_demo()
    ids = tokenizer("the old man saw a small bird near the river .", return_tensors="pt")["input_ids"]
    report = attnlens.verify(model, ids)
    assert report.ok, str(report)
    assert report.worst("pattern_hf_order").max_abs_error == 0.0
