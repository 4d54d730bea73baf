"""attribution.decompose: the parts sum to the model's own residual, and the direct logit attributions to its logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, assert_within, make_gpt2, random_ids, two_sums_bound
from test_hub_configs import load, make_checkpoint

import attnlens
from attnlens import attribution
from attnlens.attribution import DecompositionError, decompose

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Published configs that differ in what the residual sees: plain GPT-2, the inverse-layer scale without caching
# (BioMedLM), the upcast-and-reorder flag (Merak), DistilGPT-2's 6 layers shrunk, and a base model without a head.
CONFIGS = (
    "openai-community__gpt2.saved-4.54.0.json",
    "stanford-crfm__BioMedLM.json",
    "HPDL-Group__Merak.gpt2-lora.json",
    "distilbert__distilgpt2.saved-4.50.3.json",
    "openai-community__gpt2.GPT2Model-saved-5.8.1.json",
)
# What the float32 sum reached on these models (at most 2e-7): "to float32 rounding", asserted with margin.
FP32_RESIDUAL = 1e-6


def padded(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: no padding, right padding, left padding."""
    ids = random_ids(model, batch=3, pos=12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    return ids, mask


def base_of(model: Any) -> Any:
    return getattr(model, "transformer", model)


def own_residual(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's residual entering its final layer norm, by a hook of the test's own."""
    seen: list[torch.Tensor] = []
    handle = base_of(model).ln_f.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            base_of(model)(input_ids=ids, attention_mask=mask, return_dict=True)
    finally:
        handle.remove()
    return seen[0]


def at(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``x[b, columns[b, i]]`` for ``x`` of ``[batch, pos, ...]``."""
    return torch.stack([x[b, columns[b]] for b in range(x.shape[0])])


def assert_sums(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """The decomposition of every position sums to the model's residual, and its logit attributions to its logits."""
    d = decompose(model, ids, mask, positions=None)
    dtype = next(model.parameters()).dtype
    assert d.contributions.dtype == dtype and d.residual.dtype == dtype
    # The residual is the model's own: bitwise what a hook of our own sees in a forward pass on the same inputs.
    assert_bitwise(d.residual, own_residual(model, ids, mask), "copy")
    error = d.check()
    _, tolerance = d.errors()
    assert error <= tolerance
    if dtype == torch.float32:
        assert error <= FP32_RESIDUAL
    if getattr(model, "lm_head", None) is None:
        with pytest.raises(attnlens.UnsupportedModelError, match=type(model).__name__):
            d.logit_attribution(0)
        return error
    with torch.no_grad():
        # Through the base and the head: some task heads break under return_dict=false in transformers 5.x.
        hidden = base_of(model)(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        logits = model.lm_head(hidden).double()
    real = mask.bool()
    targets = ids.roll(-1, dims=1)
    other = logits.gather(2, torch.tensor([3, 7, 11])[:, None, None].expand(-1, ids.shape[1], 1))[..., 0]
    for tokens, want in (
        (targets, logits.gather(2, targets[..., None])[..., 0]),
        (5, logits[..., 5]),
        ((targets, torch.tensor([3, 7, 11])), logits.gather(2, targets[..., None])[..., 0] - other),
    ):
        parts = d.logit_attribution(tokens)
        assert parts.shape == (len(d.names), *ids.shape)
        assert parts.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        total = parts.double().sum(dim=0) + d.logit_bias(tokens).double()
        gap = (total - want).abs()
        bound = d.logit_bound(tokens).double()
        assert bool((gap <= bound)[real].all()), f"largest gap/bound {float((gap / bound)[real].max()):.3g}"
    return error


@pytest.mark.parametrize("name", CONFIGS)
def test_fixture_models_sum_exactly_in_every_dtype_and_kernel(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    small = make_checkpoint(name, folder)
    for kernel in ("eager", "sdpa"):
        model = load(folder, small, kernel)
        ids, mask = padded(model)
        for dtype in DTYPES:
            model = model.to(dtype)
            if small.get("reorder_and_upcast_attn") and kernel == "eager" and dtype == torch.float64:
                # The model's own eager upcast path runs in float32 only; decompose passes its error on, hooks gone.
                with pytest.raises(RuntimeError, match="upcasting"):
                    decompose(model, ids, mask)
                assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
                continue
            assert_sums(model, ids, mask)


def test_names_shapes_and_chosen_positions_only() -> None:
    model = make_gpt2(n_layer=3)
    ids, mask = padded(model)
    d = decompose(model, ids, mask)
    assert d.names[:6] == ("embed", "pos_embed", "L0H0", "L0H1", "L0H2", "L0H3")
    assert d.names[6:8] == ("L0.b_O", "L0.mlp") and d.names[-1] == "L2.mlp"
    assert len(d.names) == 2 + 3 * (4 + 2) and d.index("L1H2") == 2 + 6 + 2
    assert d.contributions.shape == (len(d.names), 3, 1, 32) and d.residual.shape == (3, 1, 32)
    # positions=-1 is each row's last real token under the mask (right padding: 8, left padding: 11).
    assert d.positions.tolist() == [[11], [8], [11]] and bool(d.valid.all())
    everything = decompose(model, ids, mask, positions=None)
    heads = [i for i, name in enumerate(d.names) if "H" in name]
    copied = [i for i in range(len(d.names)) if i not in heads]
    # Each head's z @ W_O over d_head terms, at one position and at all: two matmul shapes, which may round
    # differently (they do on some CPUs). Bound: two roundings of the same d_head-term sums.
    z = attnlens.trace(model, ids, mask, store="z")
    W_O = attnlens.extract_weights(model).W_O.detach().double()  # [layer, head, d_head, d_model]
    magnitude = torch.stack(
        [torch.einsum("bphd,hdm->hbpm", z["z", layer].double().abs(), W_O[layer].abs()) for layer in range(3)]
    )  # [layer, head, batch, pos, d_model]
    bound = two_sums_bound(magnitude, W_O.shape[2], torch.float32)
    for row in range(3):
        column = int(d.positions[row, 0])
        # Embeddings, b_O and MLP outputs are the model's own numbers (copies): bitwise. So is the residual.
        assert_bitwise(d.contributions[copied, row, 0], everything.contributions[copied, row, column], "copy")
        assert_bitwise(d.residual[row, 0], everything.residual[row, column], "copy")
        assert_within(
            d.contributions[heads, row, 0],
            everything.contributions[heads, row, column],
            bound[:, :, row, column].reshape(len(heads), -1),
            "head results at one position against all",
        )
    assert repr(d) == "Decomposition(20 components, batch=3, pos=1, d_model=32, float32)"
    with pytest.raises(KeyError, match="L9H0"):
        d.index("L9H0")


def test_components_are_what_the_model_wrote() -> None:
    model = make_gpt2()
    ids = random_ids(model, batch=2, pos=8)
    d = decompose(model, ids, positions=[0, 3, -1])
    assert d.positions.tolist() == [[0, 3, 7], [0, 3, 7]]
    W_E, W_pos = model.transformer.wte.weight, model.transformer.wpe.weight
    assert_bitwise(d.contributions[d.index("embed")], W_E[at(ids, d.positions)].detach(), "copy")
    assert_bitwise(d.contributions[d.index("pos_embed")], W_pos[d.positions].detach(), "copy")
    assert_bitwise(d.contributions[d.index("L1.b_O")][0, 0], model.transformer.h[1].attn.c_proj.bias, "copy")
    # Per-head results are trace's, at the chosen positions.
    traced = attnlens.trace(model, ids, layers=[1], store="result")
    heads = d.contributions[d.index("L1H0") : d.index("L1H0") + 4]  # [head, batch, pos, d_model]
    want = at(traced["result", 1], d.positions).movedim(2, 0)
    torch.testing.assert_close(heads, want, rtol=0, atol=1e-6)


def test_padding_left_and_right_match_the_unpadded_rows() -> None:
    model = make_gpt2()
    ids, mask = padded(model)
    # Position ids that restart at each row's first real token make a left-padded row compute what it does alone.
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
    d = decompose(model, ids, mask, positions=[0, -1], position_ids=position_ids)
    assert d.positions.tolist() == [[0, 11], [0, 8], [4, 11]]
    for row, (start, stop) in enumerate(((0, 12), (0, 9), (4, 12))):
        alone = decompose(model, ids[row : row + 1, start:stop], positions=[0, -1])
        torch.testing.assert_close(d.contributions[:, row], alone.contributions[:, 0], rtol=0, atol=2e-6)
        torch.testing.assert_close(d.residual[row], alone.residual[0], rtol=0, atol=2e-6)


def test_positions_per_row_and_refusals() -> None:
    model = make_gpt2()
    ids, mask = padded(model)
    d = decompose(model, ids, mask, positions=[[1, 2], [0, -1], [-2, -1]])
    assert d.positions.tolist() == [[1, 2], [0, 8], [10, 11]]
    d.check()
    import numpy as np

    assert decompose(model, ids, mask, positions=np.array([1, -1])).positions.tolist() == [[1, 11], [1, 8], [5, 11]]
    bad = {
        "out of range for row 1, which has 9 real tokens": [0, 9],
        "out of range for row 2, which has 8 real tokens": -9,
        "must be integers": 1.5,
        "must be integers, got the bool": True,
        "is empty": [],
        r"\[batch, pos\] = \[3, n\]": [[0], [1]],
    }
    for message, positions in bad.items():
        with pytest.raises(ValueError, match=message):
            decompose(model, ids, mask, positions=positions)
    with pytest.raises(ValueError, match="must be integers"):
        decompose(model, ids, mask, positions=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="all padding"):
        decompose(model, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="d_vocab"):
        decompose(model, ids + 1000)
    with pytest.raises(OSError, match="could not read a config"):
        decompose("/nonexistent/attnlens-checkpoint", ids)
    with pytest.raises(attnlens.UnsupportedModelError, match="Linear"):
        decompose(torch.nn.Linear(2, 2), ids)


def test_token_refusals() -> None:
    model = make_gpt2()
    ids, mask = padded(model)
    d = decompose(model, ids, mask, positions=[0, -1])
    assert d.logit_attribution([1, 2, 3]).shape == (len(d.names), 3, 2)
    bad = {
        "lie in \\[0, 97\\)": 97,
        "values from -1": [[-1, 0]] * 3,
        "integer token ids, got dtype torch.float32": torch.tensor([1.0, 2.0, 3.0]),
        "got the bool": True,
        "tokens has shape \\(2,\\)": [1, 2],  # batch is 3
        "pair \\(a, b\\)": (1, 2, 3),
    }
    for message, tokens in bad.items():
        with pytest.raises(ValueError, match=message):
            d.logit_attribution(tokens)


def test_a_model_without_a_language_model_head_is_refused_by_name_for_logits() -> None:
    for cls_name in ("GPT2Model", "GPT2ForSequenceClassification"):
        model = make_gpt2(cls_name)
        d = decompose(model, random_ids(model))
        d.check()  # the residual decomposition stands
        for call in (d.logit_attribution, d.logit_bias, d.logit_bound):
            with pytest.raises(attnlens.UnsupportedModelError, match=f"{cls_name} has no language-model head"):
                call(1)


def test_check_fails_when_a_part_is_off() -> None:
    model = make_gpt2()
    d = decompose(model, random_ids(model), positions=[0, -1])
    error, tolerance = d.errors()
    assert d.check() == error <= tolerance
    # One entry of one head's result, off by 10 tolerances of the residual's scale: caught.
    nudged = d.contributions.clone()
    nudged[d.index("L1H2"), 1, 0, 5] += 10 * tolerance * d.residual[1, 0].abs().max()
    with pytest.raises(DecompositionError, match="more than rounding explains"):
        dataclasses.replace(d, contributions=nudged).check()
    broken = d.residual.clone()
    broken[0, 1, 3] = float("nan")
    with pytest.raises(DecompositionError, match="nan"):
        dataclasses.replace(d, residual=broken).check()
    # A logit attribution that leaves out one head no longer adds up to the logit.
    target = 4
    with torch.no_grad():
        logit = model(random_ids(model)).logits[:, :, target]
    parts = d.logit_attribution(target).double()
    total = parts.sum(0) + d.logit_bias(target).double()
    want = at(logit.double()[..., None], d.positions)[..., 0]
    assert bool(((total - want).abs() <= d.logit_bound(target)).all())
    assert not bool(((total - parts[d.index("L1H2")] - want).abs() <= d.logit_bound(target)).all())


def test_linearisation_by_hand() -> None:
    model = make_gpt2()
    ids = random_ids(model, batch=1, pos=6)
    d = decompose(model, ids)
    norm, W_U = model.transformer.ln_f, model.lm_head.weight
    x = d.residual[0, 0].double()
    sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
    c = d.contributions[d.index("L0.mlp"), 0, 0].double()
    want = ((c - c.mean()) / sigma) @ (norm.weight.double() * W_U[9].double())
    torch.testing.assert_close(d.logit_attribution(9)[d.index("L0.mlp"), 0, 0].double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d.logit_bias(9)[0, 0].double(), norm.bias.double() @ W_U[9].double())
    # A component that shifts every coordinate alike is removed by the norm's centring: its attribution is 0.
    flat = d.contributions.clone()
    flat[0] = 3.0
    assert float(dataclasses.replace(d, contributions=flat).logit_attribution(9)[0].abs().max()) == 0.0


def test_model_left_as_found_also_on_error() -> None:
    model = make_gpt2().train()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    before = (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        model.config._attn_implementation,
    )

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    ids = random_ids(model)
    assert torch.is_grad_enabled()
    d = decompose(model, ids)
    d.check()  # eval mode for the pass: no dropout in the parts
    assert hooks() == 0 and torch.is_grad_enabled()
    assert before == (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        model.config._attn_implementation,
    )

    def fail(module: Any, args: Any, output: Any) -> None:
        raise RuntimeError("boom in layer 1")

    handle = model.transformer.h[1].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom in layer 1"):
        decompose(model, ids)
    handle.remove()
    assert hooks() == 0 and [m.training for m in model.modules()] == before[0]


def test_stale_unembedding_is_refused() -> None:
    model = make_gpt2()
    d = decompose(model, random_ids(model))
    d.logit_attribution(1)
    with torch.no_grad():
        model.lm_head.weight[1] += 1.0
    with pytest.raises(attnlens.StaleWeightsError, match="decompose again"):
        d.logit_attribution(1)


def test_tolerances_grow_with_rounding() -> None:
    tols = [attribution.check_tolerance(dtype, 12, 768) for dtype in DTYPES]
    assert tols[1] < tols[0] < tols[3] < tols[2]
    assert attribution.check_tolerance(torch.float32, 12, 768, cancellation=3.0) == pytest.approx(3 * tols[0])
    # The projection's inner width counts, not the residual's (Qwen3-4B: 32 heads of 128 on d_model 2560).
    assert attribution.check_tolerance(torch.float32, 12, 768, d_attn=768) == tols[0]
    assert attribution.check_tolerance(torch.float32, 12, 2560, d_attn=4096) > attribution.check_tolerance(
        torch.float32, 12, 2560
    )
    with pytest.raises(ValueError, match="int8"):
        attribution.check_tolerance(torch.int8, 1, 8)
