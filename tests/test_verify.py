"""verify(): recomputation from extracted weights against the model's own numbers, and the report."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from conftest import CUDA, assert_bitwise, make_gpt2, random_ids
from torch import nn

import attnlens
from attnlens import AttentionCaptureError, ModelWeights, UnsupportedModelError, functional
from attnlens.models import gpt2
from attnlens.verify import QUANTITIES, VerificationReport, bitwise_guaranteed, derived_tolerances

PER_HEAD = ("q", "k", "v", "pattern_hf_order", "pattern", "z")
RECOMPUTED = ("q", "k", "v", "pattern", "z", "attn_out")
RECOMPUTATION_TARGET = 1e-5  # per-head recomputation from extracted weights, fp32, relative
CORRUPTION = 1e-4  # relative size of the corruptions that must be detected
LEGACY = int(transformers.__version__.split(".")[0]) < 5


def left_padded(ids: torch.Tensor, n_pad: tuple[int, ...] = (3, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    for row, n in enumerate(n_pad):
        mask[row, :n] = 0
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


def right_padded(ids: torch.Tensor, n_pad: tuple[int, ...] = (0, 4)) -> torch.Tensor:
    mask = torch.ones_like(ids)
    for row, n in enumerate(n_pad):
        if n:
            mask[row, -n:] = 0
    return mask


def corrupted(weights: ModelWeights, layer: int, head: int, name: str = "W_Q", factor: float = 1 + CORRUPTION) -> Any:
    """A copy of ``weights`` with one head's ``name`` scaled by ``factor`` (the model's parameters stay untouched)."""
    old = weights.layers[layer]
    tensor = getattr(old, name).clone()
    tensor[head] *= factor
    layers = list(weights.layers)
    layers[layer] = dataclasses.replace(old, **{name: tensor})
    return dataclasses.replace(weights, layers=tuple(layers))


def state(model: Any) -> dict[str, Any]:
    """Everything verify may touch and must restore."""
    return {
        "impl": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "hooks": [
            (list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()), dict(m._forward_hooks_with_kwargs))
            for m in model.modules()
        ],
        "flags": [m.__dict__.get("_output_capturing_hooks_installed") for m in model.modules()],
        "grad": torch.is_grad_enabled(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_bitwise_and_close(report: VerificationReport, target: float = RECOMPUTATION_TARGET) -> None:
    assert report.ok, str(report)
    assert all(row.max_abs_error == 0.0 for row in report.rows if row.quantity == "pattern_hf_order")
    worst = max(row.max_rel_error for row in report.rows if row.quantity in RECOMPUTED)
    assert worst <= target, str(report)


# --- the model's own numbers, reproduced ------------------------------------------------------------------------


def test_tiny_model_hf_order_bitwise_and_recomputation_close() -> None:
    model = make_gpt2(n_layer=3)
    ids = random_ids(model)
    report = attnlens.verify(model, ids)
    assert_bitwise_and_close(report)
    assert report.layers == (0, 1, 2) and report.dtype == "float32" and report.device == "cpu"
    # One row per layer x head x per-head quantity, one per layer for attn_out, and hidden + logits.
    assert len(report.rows) == 3 * (4 * len(PER_HEAD) + 1) + 2
    assert {row.quantity for row in report.rows} == set(QUANTITIES)


CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "inverse_layer": {"scale_attn_by_inverse_layer_idx": True},
    "upcast": {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True},
    "unscaled": {"scale_attn_weights": False},
}


def sdpa_ignores_scale(impl: str, config: dict[str, Any]) -> bool:
    """transformers 4.57's SDPA path never passes GPT-2's scale on: it always scales by 1/sqrt(d_head)."""
    unusual = config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False
    return LEGACY and impl == "sdpa" and bool(unusual)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_and_kernels(impl: str, name: str) -> None:
    config = CONFIGS[name]
    model = make_gpt2(n_layer=3, attn_implementation=impl, **config)
    ids = random_ids(model)
    mask, position_ids = left_padded(ids)
    report = attnlens.verify(model, ids, mask, position_ids)
    assert report.attn_implementation == impl and report.pattern_implementation == "eager"
    # The HF-order pattern comes from the eager pass's own q and k: bitwise whatever kernel the model runs.
    assert all(row.max_abs_error == 0.0 for row in report.rows if row.quantity == "pattern_hf_order")
    assert any("ignores it" in note for note in report.notes) == (
        impl == "sdpa" and "reorder_and_upcast_attn" in config
    )
    assert any("without the config's attention scale" in note for note in report.notes) == sdpa_ignores_scale(
        impl, config
    )
    if sdpa_ignores_scale(impl, config):
        # What the model computes is not what its weights and config say: verify must say so, from layer 1 on
        # (layer 0 divides by 1) or at every layer for an unscaled model.
        assert not report.ok
        first = 0 if config.get("scale_attn_weights") is False else 1
        assert {row.layer for row in report.failures if row.quantity == "attn_out"} == set(range(first, 3))
        assert all(row.quantity in ("z", "attn_out", "hidden", "logits") for row in report.failures)
    else:
        assert_bitwise_and_close(report)


@pytest.mark.parametrize("name", list(functional.ACTIVATIONS))
def test_every_activation_verifies(name: str) -> None:
    # transformers builds the MLP from ACT2FN[name]; the rebuild (hidden, logits) uses attnlens's own formula.
    model = make_gpt2(n_layer=2, activation_function=name)
    ids = random_ids(model)
    mask = right_padded(ids)
    report = attnlens.verify(model, ids, mask)
    assert report.ok, str(report)
    assert {"hidden", "logits"} <= {row.quantity for row in report.rows}


def test_a_wrong_activation_is_caught() -> None:
    # The model runs gelu_fast while its config is made to say relu: the rebuilt hidden state must disagree.
    model = make_gpt2(n_layer=2, activation_function="gelu_fast")
    model.config.activation_function = "relu"
    ids = random_ids(model)
    report = attnlens.verify(model, ids)
    assert not report.ok
    assert {row.quantity for row in report.failures} <= {"hidden", "logits"}
    assert "hidden" in {row.quantity for row in report.failures}


@pytest.mark.parametrize("padding", ["left", "right", "left_default_positions"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_batches(padding: str, impl: str) -> None:
    model = make_gpt2(attn_implementation=impl)
    ids = random_ids(model, batch=3, pos=10)
    if padding == "right":
        mask, position_ids = right_padded(ids, (0, 4, 9)), None
    else:
        mask, position_ids = left_padded(ids, (0, 3, 9))
        if padding == "left_default_positions":
            position_ids = None
    report = attnlens.verify(model, ids, mask, position_ids)
    assert report.n_valid == int(mask.sum()) < 30
    assert_bitwise_and_close(report)


@pytest.mark.parametrize("where", ["padded", "valid"])
def test_padded_rows_never_count(where: str) -> None:
    """Garbage written to padded query rows of an attention output is ignored; on a valid row it fails."""
    model = make_gpt2()
    ids = random_ids(model, pos=10)
    mask = right_padded(ids, (0, 4))
    row = 8 if where == "padded" else 5

    def garbage(module: nn.Module, args: Any, output: Any) -> Any:
        out = output[0].clone()
        out[1, row] = 1e3
        return (out, *output[1:])

    handle = model.transformer.h[0].attn.register_forward_hook(garbage)
    try:
        report = attnlens.verify(model, ids, mask)
    finally:
        handle.remove()
    if where == "padded":
        assert_bitwise_and_close(report)
    else:
        assert report.row("attn_out", 0).ok is False
        assert report.row("hidden").ok is False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_pass_at_their_tolerance(dtype: torch.dtype) -> None:
    model = make_gpt2(attn_implementation="sdpa").to(dtype)
    ids = random_ids(model)
    mask, position_ids = left_padded(ids)
    report = attnlens.verify(model, ids, mask, position_ids)
    name = str(dtype).removeprefix("torch.")
    base = derived_tolerances(dtype, 32, 8, 2, 12)
    assert report.dtype == name and all(report.tolerances[q] == base[q] for q in ("q", "k", "v", "attn_out", "hidden"))
    assert report.ok, str(report)
    # Bitwise is guaranteed only in float32/float64; in half precision a derived tolerance applies (and shows).
    hf_order = [row for row in report.rows if row.quantity == "pattern_hf_order"]
    assert all((row.tolerance == 0.0) == (dtype == torch.float64) for row in hf_order)
    assert all(row.max_abs_error == 0.0 for row in hf_order)  # measured: same kernels on the same q and k


@pytest.mark.parametrize("cls_name", gpt2.SUPPORTED_CLASSES)
def test_every_class(cls_name: str) -> None:
    model = make_gpt2(cls_name)
    report = attnlens.verify(model, random_ids(model))
    assert report.ok, str(report)
    has_logits = any(row.quantity == "logits" for row in report.rows)
    assert has_logits == (cls_name in ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"))
    assert report.model.startswith(cls_name)


def test_layers_subset() -> None:
    model = make_gpt2(n_layer=3)
    report = attnlens.verify(model, random_ids(model), layers=[-1, 1])
    assert report.layers == (1, 2)
    assert {row.layer for row in report.rows} == {1, 2, None}
    assert report.ok


def test_model_from_a_local_folder(tmp_path: Any) -> None:
    model = make_gpt2()
    model.save_pretrained(tmp_path)
    report = attnlens.verify(str(tmp_path), random_ids(model))
    assert report.ok and report.model.startswith("GPT2LMHeadModel")


# --- corruption is detected where it happens ----------------------------------------------------------------------


def test_corrupted_head_weights_are_reported_at_that_layer_and_head() -> None:
    model = make_gpt2(n_layer=3)
    ids = random_ids(model)
    layer, head = 1, 2
    weights = corrupted(attnlens.extract_weights(model), layer, head, "W_Q")
    report = attnlens.verify(model, ids, weights=weights)
    assert not report.ok
    q = report.row("q", layer, head)
    assert not q.ok and 0.3 * CORRUPTION < q.max_rel_error < 1.1 * CORRUPTION
    assert all(row.layer in (layer, None) for row in report.failures)
    assert all(row.head in (head, None) for row in report.failures)
    # The model itself was not touched: its own weights still verify.
    assert attnlens.verify(model, ids).ok


@pytest.mark.parametrize("name", ["W_K", "W_V", "W_O"])
def test_other_corrupted_weights(name: str) -> None:
    model = make_gpt2()
    report = attnlens.verify(model, random_ids(model), weights=corrupted(attnlens.extract_weights(model), 0, 3, name))
    expected = {"W_K": ("k", 3), "W_V": ("v", 3), "W_O": ("attn_out", None)}[name]
    assert expected in {(row.quantity, row.head) for row in report.failures if row.layer == 0}
    assert all(row.layer in (0, None) for row in report.failures)


def scale_output(factor: float) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return (output[0] * factor, *output[1:])

    return hook


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_corrupted_attention_output_is_reported_at_that_layer(impl: str) -> None:
    model = make_gpt2(n_layer=3, attn_implementation=impl)
    handle = model.transformer.h[1].attn.register_forward_hook(scale_output(1 + CORRUPTION))
    try:
        report = attnlens.verify(model, random_ids(model))
        assert model.transformer.h[1].attn._forward_hooks  # the user's hook is still there
    finally:
        handle.remove()
    out = report.row("attn_out", 1)
    assert not out.ok and 0.9 * CORRUPTION < out.max_rel_error < 1.1 * CORRUPTION
    assert {(row.layer, row.quantity) for row in report.failures} <= {
        (1, "attn_out"),
        (None, "hidden"),
        (None, "logits"),
    }


# --- the report -------------------------------------------------------------------------------------------------


def test_report_table_dict_and_json() -> None:
    model = make_gpt2()
    report = attnlens.verify(model, random_ids(model))
    text = str(report)
    assert text.startswith("attnlens verification: OK")
    table = [line for line in text.splitlines() if line.strip() and line.split()[0] in ("0", "1", "final")]
    assert len(table) == 2 * 7 + 2  # one line per layer x quantity, and hidden, logits
    assert "float32 on cpu" in text and "transformers" in text
    # The tolerance bounds the relative error: its column says so and stands beside that error.
    assert "max rel err    rel tol  ok" in text and "tolerance" not in text
    data = report.to_dict()
    assert data["ok"] is True and len(data["rows"]) == len(report.rows)
    assert set(data["rows"][0]) == {"layer", "head", "quantity", "max_abs_error", "max_rel_error", "tolerance", "ok"}
    assert json.loads(report.to_json())["versions"]["torch"] == torch.__version__
    assert report.failures == ()
    with pytest.raises(KeyError):
        report.row("q", 5, 0)


def test_failing_report_lists_failing_rows_in_full() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    report = attnlens.verify(model, ids, weights=corrupted(attnlens.extract_weights(model), 0, 1, "W_V", 1.01))
    text = str(report)
    assert text.startswith("attnlens verification: FAILED")
    failing = text.split("failing rows:")[1].strip().splitlines()
    assert len(failing) == len(report.failures) > 0
    assert all(line.endswith("FAIL") for line in failing)
    assert report.worst("v", 0).head == 1


def test_non_finite_errors_are_failures_and_valid_json() -> None:
    model = make_gpt2()
    handle = model.transformer.h[0].attn.register_forward_hook(scale_output(float("nan")))
    try:
        report = attnlens.verify(model, random_ids(model))
    finally:
        handle.remove()
    assert not report.row("attn_out", 0).ok
    assert json.loads(report.to_json())["ok"] is False


def test_tolerance_overrides() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    weights = corrupted(attnlens.extract_weights(model), 0, 0, "W_Q")
    assert not attnlens.verify(model, ids, weights=weights).ok
    # A 1e-4 change of W_Q moves q and (by a derived bound tight enough to see it) the pattern of that head.
    loose = attnlens.verify(model, ids, weights=weights, tolerances={"q": 1e-3, "pattern": 1e-3})
    assert (
        loose.ok
        and loose.tolerances["q"] == 1e-3
        and loose.tolerances["k"] == derived_tolerances("float32", 32, 8, 2, 12)["k"]
    )
    by_dtype = attnlens.verify(
        model, ids, weights=weights, tolerances={"float32": {"q": 1e-3, "pattern": 1e-3}, "float16": {"q": 0}}
    )
    assert by_dtype.ok
    other_dtype = attnlens.verify(model, ids, weights=weights, tolerances={torch.float16: {"q": 1e-3}})
    assert not other_dtype.ok
    for bad in ({"nope": 1.0}, {"q": -1.0}, {"q": float("nan")}, {"float8": {"q": 1.0}}, {"q": 1.0, "float32": {}}):
        with pytest.raises(ValueError):
            attnlens.verify(model, ids, tolerances=bad)


# --- errors, and the model left exactly as found ----------------------------------------------------------------


def test_bad_inputs_raise_clear_errors_and_touch_nothing() -> None:
    model = make_gpt2()
    model.train()
    before = state(model)
    ids = random_ids(model)
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (ValueError, "d_vocab", {"input_ids": ids + 200}),
        (ValueError, "n_ctx", {"input_ids": torch.zeros(1, 33, dtype=torch.long)}),
        (ValueError, "attention_mask", {"input_ids": ids, "attention_mask": torch.ones(2, 5)}),
        (ValueError, "layers", {"input_ids": ids, "layers": [2]}),
        (ValueError, "layers", {"input_ids": ids, "layers": []}),
        (ValueError, "weights", {"input_ids": ids, "weights": attnlens.extract_weights(make_gpt2(n_layer=3))}),
        (ValueError, "float64", {"input_ids": ids, "weights": attnlens.extract_weights(make_gpt2().double())}),
    ]
    for error, words, kwargs in cases:
        with pytest.raises(error, match=words):
            attnlens.verify(model, **kwargs)
    with pytest.raises(UnsupportedModelError, match="GPT-2"):
        attnlens.verify(nn.Linear(3, 3), ids)
    assert state(model) == before


def test_model_left_exactly_as_found() -> None:
    model = make_gpt2(attn_implementation="sdpa")
    model.train()
    model.transformer.h[0].requires_grad_(False)
    user_hook = model.transformer.h[1].register_forward_hook(lambda module, args, output: None)
    try:
        before = state(model)
        report = attnlens.verify(model, random_ids(model))
        assert report.ok and report.attn_implementation == "sdpa"
        assert state(model) == before
        # transformers 5.x would have left output-recording hooks behind, and a mark that they are installed.
        assert not any("_output_capturing_hooks_installed" in vars(m) for m in model.modules())
        # ... and the model still returns attentions afterwards when asked in eager mode.
        model.set_attn_implementation("eager")
        with torch.no_grad():
            assert len(model(random_ids(model), output_attentions=True).attentions) == 2
    finally:
        user_hook.remove()


@pytest.mark.parametrize("during", ["own", "eager"])
def test_model_left_as_found_when_a_hook_raises(during: str) -> None:
    model = make_gpt2(attn_implementation="sdpa")
    model.train()

    class Boom(Exception):
        pass

    def explode(module: nn.Module, args: Any, output: Any) -> None:
        if model.config._attn_implementation == ("sdpa" if during == "own" else "eager"):
            raise Boom

    handle = model.transformer.h[1].attn.register_forward_hook(explode)
    try:
        before = state(model)
        with torch.enable_grad(), pytest.raises(Boom):
            attnlens.verify(model, random_ids(model))
        assert state(model) == before
        assert torch.is_grad_enabled()
    finally:
        handle.remove()


def attentions_become(change: str) -> Any:
    """A hook on an attention module that spoils the probabilities it returns beside its output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        out, weights = output
        if weights is None:  # a non-eager pass: nothing to spoil
            return output
        return out, {"none": None, "wrong_shape": weights[:, :, :-1]}[change]

    return hook


@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("change", ["none", "wrong_shape"])
def test_bad_attentions_raise_attention_capture_error(change: str, layer: int) -> None:
    model = make_gpt2()
    handle = model.transformer.h[layer].attn.register_forward_hook(attentions_become(change))
    try:
        before = state(model)
        with pytest.raises(AttentionCaptureError, match=r"returned no attention|attention probabilities of shape"):
            attnlens.verify(model, random_ids(model))
        assert state(model) == before
    finally:
        handle.remove()


@pytest.mark.cuda
@CUDA
def test_cuda() -> None:  # pragma: no cover - needs a CUDA device
    model = make_gpt2(attn_implementation="sdpa").cuda()
    ids = random_ids(model).cuda()
    mask, position_ids = left_padded(ids)
    report = attnlens.verify(model, ids, mask, position_ids)
    assert report.device.startswith("cuda") and report.ok, str(report)


# --- GPT-2-small-shaped models ----------------------------------------------------------------------------------


def gpt2_small(sharpness: float = 1.0) -> Any:
    """GPT2Config() defaults, seeded, random biases; q/k weights scaled by ``sharpness`` (scores by its square)."""
    model = make_gpt2(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, attn_implementation="eager"
    )
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * 768] *= sharpness
    return model


@pytest.fixture(scope="module", params=[1.0, 6.0], ids=["random", "sharp"])
def small(request: pytest.FixtureRequest) -> Iterator[tuple[Any, torch.Tensor]]:
    model = gpt2_small(request.param)
    ids = random_ids(model, batch=2, pos=32)
    if request.param > 1:
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        assert torch.stack(attentions).amax(-1).mean() > 0.8  # sharp: mean row maximum
    yield model, ids


@pytest.mark.slow
def test_gpt2_small_verifies(small: tuple[Any, torch.Tensor]) -> None:
    model, ids = small
    report = attnlens.verify(model, ids)
    assert_bitwise_and_close(report)


@pytest.mark.slow
def test_gpt2_small_detects_corruptions(small: tuple[Any, torch.Tensor]) -> None:
    model, ids = small
    layer, head = 7, 5
    weights = corrupted(attnlens.extract_weights(model), layer, head, "W_K")
    report = attnlens.verify(model, ids, weights=weights, layers=[layer - 1, layer])
    k = report.row("k", layer, head)
    assert not k.ok and k.max_rel_error > 0.3 * CORRUPTION
    assert all(row.layer in (layer, None) and row.head in (head, None) for row in report.failures)
    handle = model.transformer.h[layer].attn.register_forward_hook(scale_output(1 + CORRUPTION))
    try:
        report = attnlens.verify(model, ids, layers=[layer - 1, layer])
    finally:
        handle.remove()
    assert not report.row("attn_out", layer).ok and report.row("attn_out", layer - 1).ok
    assert all(row.layer in (layer, None) for row in report.failures)


# --- derived tolerances: every dtype, no false alarms, guaranteed detection ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_demo_model_verifies_in_every_dtype(dtype: torch.dtype) -> None:
    model, tokenizer = attnlens.load_demo(dtype=dtype)
    ids = tokenizer(
        ["The cat sat on the mat, and the dog sat on the rug. The cat sat on the mat."] * 2, return_tensors="pt"
    )["input_ids"]
    mask, position_ids = left_padded(ids)
    for args in ((None, None), (mask, position_ids), (right_padded(ids), None)):
        report = attnlens.verify(model, ids, *args)
        assert report.ok, str(report)


# Smallest relative corruption of one head's weights that fails exactly that head's rows at every layer and head of
# a tiny model (measured by halving: docs/verify.md); the float32 case is CORRUPTION above.
GUARANTEED = {
    torch.float16: {"W_Q": 2**-7, "W_K": 2**-7, "W_V": 2**-7, "W_O": 2**-3},
    torch.bfloat16: {"W_Q": 2**-5, "W_K": 2**-5, "W_V": 2**-5},
}


@pytest.mark.parametrize(("dtype", "name"), [(dtype, name) for dtype, names in GUARANTEED.items() for name in names])
def test_half_precision_corruptions_are_caught(dtype: torch.dtype, name: str) -> None:
    model = make_gpt2(n_layer=3).to(dtype)
    ids = random_ids(model)
    weights = attnlens.extract_weights(model)
    expected = {"W_Q": "q", "W_K": "k", "W_V": "v", "W_O": "attn_out"}[name]
    for layer in range(3):
        for head in range(4):
            report = attnlens.verify(
                model, ids, weights=corrupted(weights, layer, head, name, 1 + GUARANTEED[dtype][name])
            )
            assert any(r.quantity == expected and r.layer == layer and r.head in (head, None) for r in report.failures)
            assert all(r.layer in (layer, None) and r.head in (head, None) for r in report.failures)


def test_pattern_hf_order_tolerance_where_bitwise_is_not_guaranteed() -> None:
    """A compiled model may reorder arithmetic: a few ulps pass the derived tolerance, a real corruption does not."""
    model = make_gpt2()
    with warnings.catch_warnings():  # importing torch's compiler stack warns about torch.jit on some versions
        warnings.simplefilter("ignore", DeprecationWarning)
        model.transformer.h[0].attn.compile()  # marks the model as compiled; never run here (compiling takes ~30 s)
    assert not bitwise_guaranteed(model, torch.float32, torch.device("cpu"))
    model = make_gpt2()
    ids = random_ids(model)

    def perturb(factor: float) -> Any:
        # verify reads the probabilities from each attention module's second output (what output_attentions collects)
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                return (output[0], output[1] * factor, *output[2:])
            return output

        return hook

    for factor, ok in ((1 + 4 * 2.0**-24, True), (1 + 1e-4, False)):
        handle = model.transformer.h[0].attn.register_forward_hook(perturb(factor))
        try:
            strict = attnlens.verify(model, ids)
            derived = attnlens.verify(model, ids, tolerances={"pattern_hf_order": 4 * 2.0**-24 + 1e-7})
        finally:
            handle.remove()
        assert not strict.row("pattern_hf_order", 0, 0).ok
        assert derived.row("pattern_hf_order", 0, 0).ok == ok


@pytest.mark.slow
def test_compiled_demo_transformer_verifies() -> None:
    """The demo transformer compiled in place (Module.compile), after it ran compiled (~30 s on CPU).

    attnlens runs the transformer's plain path, so nothing is compiled for it and its numbers are the uncompiled
    maths; a compiled model is never held to bitwise, so pattern_hf_order gets the derived tolerance.
    """
    model, tokenizer = attnlens.load_demo(attn_implementation="eager")
    ids = tokenizer(["The cat sat on the mat, and the dog sat on the rug."], return_tensors="pt")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model.transformer.compile()
        with torch.no_grad():
            compiled = model(ids).logits  # compiles and runs the compiled transformer
        report = attnlens.verify(model, ids)
        with torch.no_grad():
            assert_bitwise(model(ids).logits, compiled, "same call")  # verify left the compiled model as it was
    assert report.ok, str(report)
    assert all(row.tolerance > 0 for row in report.rows if row.quantity == "pattern_hf_order")


def test_the_rebuild_adds_attention_and_mlp_to_one_residual_when_the_adapter_says_parallel() -> None:
    # GPT-NeoX's parallel residual: both read the block's input, both are added to it (verify's hidden/logits rows).
    from attnlens._verify_recompute import attention_output, layer_norm, mlp, rebuild

    model = make_gpt2(n_layer=2, initializer_range=0.2)
    assert attnlens.models.adapt(model).parallel_residual is False
    w = attnlens.extract_weights(model)
    ids = random_ids(model)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    allowed = functional.causal_mask(ids.shape[1])
    with torch.no_grad():
        parallel, _ = rebuild(w, ids, pos, allowed, parallel_residual=True)
        sequential, _ = rebuild(w, ids, pos, allowed)
        residual = w.W_E[ids] + w.W_pos[pos]
        for layer in w.layers:
            attn = attention_output(layer_norm(residual, layer.ln_1), layer, allowed)
            residual = residual + attn + mlp(layer_norm(residual, layer.ln_2), layer)
        # The same operations in the same order: the same bits.
        assert_bitwise(parallel, layer_norm(residual, w.ln_f), "same kernel")
        assert not torch.allclose(parallel, sequential)
