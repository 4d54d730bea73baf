"""Shared fixtures: seeded tiny GPT-2 models built from a GPT2Config (no hub, no download)."""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
import torch

# CI installs every optional test dependency and sets this, so that a test skipped for a missing one fails there.
REQUIRE_OPTIONAL = os.environ.get("ATTNLENS_REQUIRE_OPTIONAL", "") not in ("", "0")


def pytest_report_header() -> str:
    """The kernels this run rounds with: a bitwise assertion must hold on every one of them."""
    cbwr = os.environ.get("MKL_CBWR", "unset")
    return (
        f"attnlens: torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"MKL_CBWR {cbwr}, {torch.get_num_threads()} intra-op thread(s), optional dependencies "
        f"{'required' if REQUIRE_OPTIONAL else 'skipped where missing'}"
    )


def missing(what: str) -> NoReturn:
    """Skip for a missing optional test dependency, naming it; fail instead where CI requires every one."""
    if REQUIRE_OPTIONAL:
        pytest.fail(f"{what}, and ATTNLENS_REQUIRE_OPTIONAL is set (CI installs every optional test dependency)")
    pytest.skip(what, allow_module_level=True)


def optional(name: str, install: str = "pip install -e '.[dev]'") -> ModuleType:
    """Import an optional test dependency (peft, accelerate, hypothesis, playwright, ...), or skip naming it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed ({install})")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# Tiny models gain nothing from intra-op threads, and on a busy machine their synchronisation costs 10-100x the work.
# CI runs the quick suite once more with ATTNLENS_TEST_THREADS=2: the tests must hold at any thread count.
torch.set_num_threads(int(os.environ.get("ATTNLENS_TEST_THREADS", "1")))


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


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder of one saved tiny checkpoint per family ("gpt_neox": Pythia-70m's config; a key of test_llama's
    FIXTURE_NAMES), seeded, made on first use."""
    from test_hub_configs_neox import make_checkpoint
    from test_llama import FIXTURE_NAMES, build

    folders: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in folders:
            path = tmp_path_factory.mktemp(family)
            if family == "gpt_neox":
                make_checkpoint("EleutherAI__pythia-70m.saved-4.27.0.dev0.json", path)
            else:  # token ids inside the shrunk vocabulary
                build(FIXTURE_NAMES[family], path, bos_token_id=1, eos_token_id=2)
            folders[family] = path
        return folders[family]

    return folder


def eager_reference(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The model's own attention probabilities: ``output_attentions`` of an eager deep copy.

    A copy, not a twin built from defaults: every config switch (``use_cache``, ``return_dict``, scale flags, dtype)
    stays as the model has it, so the eager kernel runs the same arithmetic on the same shapes as the model would, the
    condition under which a bitwise comparison is a contract. The model itself is not touched (transformers 5.x keeps
    recording hooks on a model once asked for its attentions).
    """
    twin = copy.deepcopy(model).eval()
    twin.set_attn_implementation("eager")
    twin.config.return_dict = True  # an output switch only; 5.x's task heads break with it off in the config
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert out is not None and len(out) == twin.config.n_layer, "the reference returned no attentions"
    return list(out)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def two_sums_bound(magnitude: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on the difference of two roundings of the same sums of ``n`` products.

    Each computation of ``sum_i x_i y_i`` in floating point is within ``gamma_n * sum_i |x_i y_i|`` of the exact
    value, ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability, 3.1), whatever order or blocking a kernel
    chooses; two such computations (say, one matmul shape against another) differ by at most twice that.
    ``magnitude`` is ``sum_i |x_i y_i|`` (computed in float64, so its own rounding is negligible).
    """
    u = unit_roundoff(dtype)
    gamma = n * u / (1 - n * u)
    return 2 * gamma * magnitude


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """``|actual - expected| <= bound`` elementwise (bound broadcast), with the worst excess in the message."""
    diff = (actual.double() - expected.double()).abs()
    excess = diff - bound.double()
    assert bool((excess <= 0).all()), f"{what}: difference above its bound by {float(excess.max()):.3g}"


CONTRACTS: dict[str, str] = {
    "copy": "one side is a copy or view of the other's numbers: the model's parameters, the eager kernel's "
    "probabilities, a hook's tensor, a saved and loaded file, a selection of rows or heads",
    "same call": "both sides are the same call on the same inputs (the same model or function, the same "
    "arguments, run twice): determinism",
    "same kernel": "the same kernels run on the same shapes in the same order, as in the HF-order recomputation, "
    "or the same elementwise operations in the same order",
    "exact": "the arithmetic is exact: integers, zeros, sums with one nonzero term, 0/1 weights, scaling by a power "
    "of two",
}
"""The reasons a bitwise assertion may stand (CONTRIBUTING.md, "Bitwise or a derived tolerance"); anything else is
two different computations and takes a derived tolerance (:func:`two_sums_bound`, :func:`assert_within`)."""

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise(actual: Any, expected: Any, why: str, what: str = "") -> None:
    """``actual`` and ``expected`` are one tensor: same dtype, same shape, same bits (NaN payloads and signed zeros
    included), for the contract named by ``why`` (a key of :data:`CONTRACTS`).

    Floating-point tensors are compared through integer views of the same width, so NaN equals NaN bit for bit and
    ``-0.0`` differs from ``0.0``; the message names the largest difference and where it is (and ``what``).
    """
    label = f"{what}: {why}" if what else why
    assert why in CONTRACTS, f"assert_bitwise: unknown contract {why!r}; one of {sorted(CONTRACTS)} (see CONTRACTS)"
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), (
        f"assert_bitwise compares tensors, got {type(actual).__name__} and {type(expected).__name__}"
    )
    assert actual.dtype == expected.dtype, f"[{label}] dtypes differ: {actual.dtype} and {expected.dtype}"
    assert actual.shape == expected.shape, f"[{label}] shapes differ: {tuple(actual.shape)} and {tuple(expected.shape)}"
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point() or a.is_complex():
        width = _SAME_WIDTH_INT[a.element_size() // (2 if a.is_complex() else 1)]
        bits_a = (torch.view_as_real(a) if a.is_complex() else a).view(width)
        bits_b = (torch.view_as_real(b) if b.is_complex() else b).view(width)
        same = bits_a == bits_b
        if a.is_complex():
            same = same.all(dim=-1)
    else:
        same = a == b
    if bool(same.all()):
        return
    differ = ~same
    first = tuple(int(i) for i in differ.nonzero()[0])
    if a.is_floating_point():
        diff = (a.double() - b.double()).abs()
        diff = torch.where(a.isnan() & b.isnan(), 0.0, diff.nan_to_num(nan=float("inf")))
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else first
        largest = f"largest difference {float(diff.max()):.3g} at {worst} ({float(a[worst])!r} vs {float(b[worst])!r})"
        if float(diff.max()) == 0:
            largest += "; the values are equal but the bits are not (signed zeros or NaN payloads)"
    else:
        largest = f"first difference at {first} ({a[first].item()!r} vs {b[first].item()!r})"
    raise AssertionError(
        f"[{label}: {CONTRACTS[why]}] not bitwise equal: {int(differ.sum())} of {differ.numel()} elements differ, "
        f"{largest}"
    )


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
