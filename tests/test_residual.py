"""attnlens.residual: the residual entering every layer is the model's own, and its parts sum to it at every layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, assert_within, make_gpt2, random_ids
from test_attribution import padded
from test_hub_configs_llama import left_padded as llama_inputs
from test_hub_configs_neox import inputs
from test_hub_configs_neox import load as load_neox
from test_hub_configs_neox import make_checkpoint as make_neox
from test_llama import FIXTURE_NAMES as LLAMA_FAMILY
from test_llama import build as build_llama

import attnlens
from attnlens import residual
from attnlens.attribution import DecompositionError, decompose
from attnlens.models import adapt
from attnlens.tolerances import logit_tolerance

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NEOX = ("EleutherAI__pythia-70m.saved-4.27.0.dev0.json", "togethercomputer__RedPajama-INCITE-7B-Instruct.json")


def at(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[b, columns[b]] for b in range(x.shape[0])])


def assert_every_layer(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Every entry is the model's own residual, sums at every layer, and reads the model's logits at the end."""
    stack = residual.accumulated_resid(model, ids, mask, positions=None)
    n_layers = adapt(model).n_layers
    assert stack.names == (*(f"L{i}.resid_pre" for i in range(n_layers)), "final")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    real = mask.bool()
    for layer in range(n_layers):  # hidden_states[l] is the residual entering block l, for every architecture here
        assert_bitwise(stack.resid[layer], at(out.hidden_states[layer], stack.positions), "copy", f"layer {layer}")
    # The final entry is the residual decompose hands out: the same call on the same inputs.
    assert_bitwise(stack.resid[-1], decompose(model, ids, mask, positions=None).residual, "same call")
    errors = list(stack.check())
    sites = adapt(model).sites
    targets = ids.roll(-1, dims=1)
    lens = stack.logit_lens(targets)
    assert lens.shape == (n_layers + 1, *ids.shape)
    for layer in range(n_layers + 1):
        d = stack.at(layer)
        assert d.n_layers == layer and len(d.names) == 2 + layer * (adapt(model).n_heads + 2)
        assert_bitwise(d.residual, stack.resid[layer], "copy")
        assert_bitwise(d.contributions, stack.decomposition.contributions[: len(d.names)], "copy")
        with torch.no_grad():  # the model's own final norm and head on the model's own residual: the logit lens
            want = sites.unembed(sites.final_norm(stack.resid[layer])).double().gather(2, targets[..., None])[..., 0]
        bound = d.logit_bound(targets).double()
        assert_within(lens[layer][real], want[real], bound[real], f"logit lens at layer {layer}")
        # The final norm applied to the stack of parts, plus beta, is the norm's output on their sum. The bound is
        # logit_tolerance's, relative to the largest term of an output entry (no d_model sum here: looser).
        parts = residual.apply_ln_to_stack(d.contributions, d).double().sum(dim=0)
        norm = adapt(model).final_norm()
        with torch.no_grad():
            normed = sites.final_norm(d.residual).double()
        beta = 0.0 if norm.b is None else norm.b.double()
        x = d.residual.double()
        spread = x.square().mean(dim=-1) if norm.rms else x.var(dim=-1, unbiased=False)  # RMSNorm: no centring
        sigma = torch.sqrt(spread + norm.eps)
        _, cancellation = attnlens.attribution.residual_error(d.contributions, d.residual, d.valid)
        size = x.abs().amax(dim=-1) / sigma * norm.w.double().abs().max() + (
            norm.b.double().abs().max() if norm.b is not None else 0
        )
        tol = logit_tolerance(d.residual.dtype, layer, x.shape[-1], cancellation) * size
        assert_within((parts + beta)[real], normed[real], tol[real][:, None], f"apply_ln_to_stack at layer {layer}")
    # logit_attrs of the decomposition is its logit_attribution: the same function on the same tensors.
    d = stack.decomposition
    assert_bitwise(residual.logit_attrs(d.contributions, d, targets), d.logit_attribution(targets), "same call")
    # TransformerLens's accumulated attribution (final scale): entry l is the sum of what was written before l.
    accumulated = residual.logit_attrs(stack.resid, d, targets).double()
    parts = d.logit_attribution(targets).double()
    for layer in range(n_layers + 1):
        written = parts[: len(stack.at(layer).names)].sum(dim=0)
        assert_within(accumulated[layer][real], written[real], d.logit_bound(targets).double()[real], "accumulated")
    return errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt2_every_layer_in_every_dtype(dtype: torch.dtype) -> None:
    model = make_gpt2().to(dtype)
    ids, mask = padded(model)
    errors = assert_every_layer(model, ids, mask)
    if dtype == torch.float32:
        assert max(errors) <= 1e-6  # measured at most 2.2e-7 here: "to float32 rounding", with margin


@pytest.mark.parametrize("name", NEOX, ids=["parallel", "sequential"])
def test_gpt_neox_every_layer(name: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_neox(name, tmp_path)
    ids, mask = inputs()
    for dtype in (torch.float32, torch.float64):
        model = load_neox(tmp_path, "sdpa", dtype)
        errors = assert_every_layer(model, ids, mask)
        # No position embedding: the residual entering layer 0 is the token embedding alone, a sum of one term.
        assert adapt(model).sites.pos_embed is None and errors[0] == 0.0
        assert max(errors) <= (1e-6 if dtype == torch.float32 else 1e-14)  # measured: rounding, far below these


@pytest.mark.parametrize("name", sorted(LLAMA_FAMILY))
def test_llama_family_every_layer(name: str, tmp_path: Path) -> None:
    # RMSNorm: the stack's norm is not centred and has no beta; logit_attrs and the logit lens must say the same.
    model = build_llama(LLAMA_FAMILY[name], tmp_path, bos_token_id=1, eos_token_id=2)
    ids, mask, _ = llama_inputs()
    assert adapt(model).final_norm().rms
    errors = assert_every_layer(model, ids, mask)
    assert errors[0] == 0.0 and max(errors) <= 1e-6  # rounding of float32 sums, as for GPT-2


def test_positions_subset_and_layer_choice() -> None:
    model = make_gpt2()
    ids, mask = padded(model)
    full = residual.accumulated_resid(model, ids, mask, positions=None)
    some = residual.accumulated_resid(model, ids, mask, positions=[0, -1], layer=1)
    assert some.names == ("L0.resid_pre", "L1.resid_pre") and some.resid.shape == (2, 3, 2, 32)
    # A selection of the full pass's entries: the same forward on the same inputs, rows picked by position.
    assert_bitwise(some.resid, torch.stack([at(full.resid[i], some.positions) for i in range(2)]), "copy")
    one = residual.decompose_resid(model, ids, mask, layer=1, positions=[0, -1])
    assert one.n_layers == 1 and one.names[-1] == "L0.mlp"
    assert_bitwise(one.residual, some.resid[1], "same call")
    final = residual.decompose_resid(model, ids, mask, layer=-1)
    assert_bitwise(final.contributions, decompose(model, ids, mask).contributions, "same call")
    assert final.check() <= final.errors()[1]


def test_refusals_and_model_left_as_found() -> None:
    model = make_gpt2()
    ids, mask = padded(model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    stack = residual.accumulated_resid(model, ids, mask)
    for bad in (3, -4, True):
        with pytest.raises(ValueError, match="layer"):
            stack.at(bad)
        with pytest.raises(ValueError, match="layer"):
            residual.decompose_resid(model, ids, mask, layer=bad)
    d = stack.decomposition
    with pytest.raises(ValueError, match=r"\[batch, pos, d_model\]"):
        residual.apply_ln_to_stack(d.contributions[..., :4], d)
    with pytest.raises(TypeError, match="tensor"):
        residual.logit_attrs([1.0], d, 0)  # type: ignore[arg-type]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert not model.training
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(2.0)
    with pytest.raises(attnlens.StaleWeightsError):
        residual.apply_ln_to_stack(d.contributions, d)


def test_check_fails_at_the_layer_whose_part_is_off() -> None:
    model = make_gpt2()
    stack = residual.accumulated_resid(model, random_ids(model))
    stack.resid[1].add_(stack.resid[1].abs().amax() * 1e-3)
    assert stack.at(2).check() >= 0  # the final residual is untouched
    with pytest.raises(DecompositionError):
        stack.check()


def test_logit_lens_figure() -> None:
    from conftest import optional

    matplotlib = optional("matplotlib", "pip install 'attnlens[viz]'")
    matplotlib.use("Agg")
    from attnlens.viz.figures import plot_logit_lens

    model = make_gpt2()
    ids = random_ids(model, batch=1, pos=6)
    stack = residual.accumulated_resid(model, ids, positions=None)
    values = stack.logit_lens(ids.roll(-1, dims=1))[:, 0]
    fig = plot_logit_lens(values, stack.names, [f"t{i}" for i in range(6)], title="lens")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(stack.names)
    assert ax.get_title() == "lens"
    # The image holds the values as given (widened to float64 by numpy, which is exact).
    assert_bitwise(torch.from_numpy(ax.images[0].get_array().data.copy()), values.double(), "copy")
    with pytest.raises(ValueError, match="names"):
        plot_logit_lens(values, stack.names[:1])
