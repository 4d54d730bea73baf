"""Shared fixtures: seeded tiny GPT-2 models built from a GPT2Config (no hub, no download)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# Tiny models gain nothing from intra-op threads, and on a busy machine their synchronisation costs 10-100x the work.
torch.set_num_threads(1)


def make_gpt2(
    cls_name: str = "GPT2LMHeadModel",
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    vocab_size: int = 97,
    n_positions: int = 32,
    attn_implementation: str = "eager",
    **config: Any,
) -> Any:
    """A seeded tiny GPT-2 of any supported class, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **config,
    )
    cfg._attn_implementation = attn_implementation
    model = getattr(transformers, cls_name)(cfg)
    # Default init leaves biases at zero; random biases make the bias paths observable in every test.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "ln_" not in name:
                param.normal_(0.0, 0.02)
    return model.eval()


@pytest.fixture
def gpt2_factory() -> Callable[..., Any]:
    return make_gpt2


@pytest.fixture
def tiny_gpt2() -> Any:
    return make_gpt2()


def random_ids(model: Any, batch: int = 2, pos: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, pos), generator=g)


def nontrivial_ln(model: Any) -> None:
    """Seeded layer-norm weights and biases: default init leaves w = 1, b = 0, where folding them tests nothing."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
