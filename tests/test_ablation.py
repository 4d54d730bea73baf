"""attnlens.ablate and attnlens.head_importance: against a forward pass written out by hand, hooks always removed."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise, make_gpt2, random_ids
from einops import einsum

import attnlens
from attnlens import functional

KERNELS = ("eager", "sdpa")
# float32: the hand-written forward and the model's differ by rounding only (measured below 2e-6 on these models).
FORWARD_TOL = {"atol": 2e-5, "rtol": 1e-5}
# head_importance in batches against one head per forward pass, float32 losses near 4.6 (ln 97, one ulp 4.8e-7): a
# matrix product over more rows may round differently, by a few ulps of the loss (equal bits are not promised).
BATCHED_ATOL = 2e-6


def _hooks(model: Any) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _state(model: Any) -> tuple[Any, ...]:
    return (
        tuple(m.training for m in model.modules()),
        tuple(p.requires_grad for p in model.parameters()),
        model.config._attn_implementation,
        _hooks(model),
    )


def _reference_forward(
    model: Any, ids: torch.Tensor, replace: dict[int, Callable[[torch.Tensor], torch.Tensor]]
) -> Any:
    """GPT-2's forward pass from the extracted weights (no padding), each layer's z ``[batch, pos, head, d_head]``
    passed through ``replace[layer]`` before ``W_O``."""
    w = attnlens.extract_weights(model)

    def norm(x: torch.Tensor, ln: Any) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)

    x = w.W_E[ids] + w.W_pos[torch.arange(ids.shape[1])]
    for layer in w.layers:
        z = functional.attention(norm(x, layer.ln_1), layer).z
        z = replace.get(layer.layer, lambda t: t)(z)
        x = x + einsum(z, layer.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + layer.b_O
        mlp = layer.mlp
        x = x + functional.ACTIVATIONS[mlp.act](norm(x, layer.ln_2) @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
    assert w.W_U is not None
    return norm(x, w.ln_f) @ w.W_U


def _set(heads: list[int], value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def replace(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, :, heads] = value(z[:, :, heads])
        return z

    return replace


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_head_leaves_logits_bitwise_unchanged(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel)
    ids = random_ids(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        clean = model(ids, attention_mask=mask).logits
        before = _hooks(model)
        with attnlens.ablate(model, []):
            assert _hooks(model) == before
            ablated = model(ids, attention_mask=mask).logits
    assert_bitwise(ablated, clean, "same call")  # no head: no hook, the model's own forward pass again


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_every_head_of_a_layer_leaves_only_b_O(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel, n_layer=3)
    ids = random_ids(model)
    sites = attnlens.models.adapt(model).sites
    outputs: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            outputs[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [sites.layers[i].attn.register_forward_hook(keep(i)) for i in range(3)]
    try:
        with torch.no_grad():
            model(ids)
            clean = dict(outputs)
            with attnlens.ablate(model, [(1, h) for h in range(4)]):
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    b_O = attnlens.extract_weights(model).layers[1].b_O
    # z = 0 for every head: the output projection adds 0 products to b_O, which leaves b_O's bits.
    assert_bitwise(outputs[1], b_O.expand_as(outputs[1]), "exact")
    assert_bitwise(outputs[0], clean[0], "same call")  # an earlier layer is untouched
    assert not torch.equal(outputs[2], clean[2])  # a later layer sees the ablation


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_matches_the_forward_by_hand(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel)
    ids = random_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference_forward(model, ids, {}), **FORWARD_TOL)
        with attnlens.ablate(model, [(0, 2), (1, 0), (1, 3)]):
            ablated = model(ids).logits
        expected = _reference_forward(model, ids, {0: _set([2], torch.zeros_like), 1: _set([0, 3], torch.zeros_like)})
    torch.testing.assert_close(ablated, expected, **FORWARD_TOL)
    assert (ablated - model(ids).logits).abs().max() > 1e-3  # the ablation changed something


@pytest.mark.parametrize("kernel", KERNELS)
def test_mean_is_the_mean_over_the_references_real_tokens(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel)
    ids = random_ids(model)
    ref = random_ids(model, batch=3, pos=10, seed=5)
    ref_mask = torch.ones_like(ref)
    ref_mask[0, :4] = 0  # left padding
    ref_mask[2, 7:] = 0  # right padding
    real = ref_mask.bool()
    z_ref = attnlens.trace(model, ref, ref_mask, store="z")["z"].double()  # [layer, batch, pos, head, d_head]
    means = {layer: z_ref[layer][real].mean(dim=0) for layer in (0, 1)}  # [head, d_head]
    for reference in ((ref, ref_mask), {"input_ids": ref, "attention_mask": ref_mask}):
        with torch.no_grad(), attnlens.ablate(model, [(0, 1), (1, 2)], mode="mean", reference=reference):
            ablated = model(ids).logits
            inside = attnlens.trace(model, ids, store="z")["z"]
        for layer, head in ((0, 1), (1, 2)):
            got = inside[layer][:, :, head]
            torch.testing.assert_close(got.double(), means[layer][head].expand_as(got), atol=1e-7, rtol=1e-6)

        def mean_of(layer: int, head: int) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda z: means[layer][head].float().expand_as(z)

        with torch.no_grad():
            expected = _reference_forward(model, ids, {0: _set([1], mean_of(0, 1)), 1: _set([2], mean_of(1, 2))})
        torch.testing.assert_close(ablated, expected, **FORWARD_TOL)
    # The padding matters: the mean over every position, padding included, is another vector.
    everything = z_ref[0].flatten(0, 1).mean(dim=0)[1]
    assert (everything - means[0][1]).abs().max() > 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_resample_copies_the_references_z_position_by_position(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel)
    ids = random_ids(model)
    ref = random_ids(model, seed=9)
    z_ref = attnlens.trace(model, ref, store="z")["z"]
    for reference, rows in ((ref, slice(None)), (ref[1:], slice(1, 2))):
        with torch.no_grad(), attnlens.ablate(model, [(0, 0), (1, 3)], mode="resample", reference=reference):
            ablated = model(ids).logits
            inside = attnlens.trace(model, ids, layers=[1], store="z")["z", 1]
        expected_z = z_ref[1][rows, :, 3].expand_as(inside[:, :, 3])
        assert_bitwise(inside[:, :, 3], expected_z, "copy")

        def copy(layer: int, head: int, rows: slice = rows) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda z: z_ref[layer][rows, :, [head]].expand_as(z)

        with torch.no_grad():
            expected = _reference_forward(model, ids, {0: _set([0], copy(0, 0)), 1: _set([3], copy(1, 3))})
        torch.testing.assert_close(ablated, expected, **FORWARD_TOL)


def test_other_heads_and_earlier_layers_are_bitwise_untouched() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    clean = attnlens.trace(model, ids, store=("z", "pattern"))
    with attnlens.ablate(model, [(1, 2)]):
        inside = attnlens.trace(model, ids, store=("z", "pattern"))
    assert_bitwise(inside["z", 0], clean["z", 0], "same call")
    assert_bitwise(inside.pattern(1), clean.pattern(1), "same call")  # layer 1's pattern is computed before its z
    # The hook's torch.where copies the other heads' entries of the model's own z.
    assert_bitwise(inside["z", 1][:, :, [0, 1, 3]], clean["z", 1][:, :, [0, 1, 3]], "same call")
    assert_bitwise(inside["z", 1][:, :, 2], torch.zeros_like(inside["z", 1][:, :, 2]), "exact")
    assert bool(clean["z", 1][:, :, 2].abs().amax() > 0)


def test_hooks_removed_on_exit_and_on_error() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    before = _hooks(model)
    with attnlens.ablate(model, [(0, 0), (1, 1)]):
        assert _hooks(model) == before + 2
    assert _hooks(model) == before
    with pytest.raises(KeyError, match="user error"), attnlens.ablate(model, [(0, 0)]):
        raise KeyError("user error")
    assert _hooks(model) == before
    # An error raised by the hook itself, inside the model's forward pass.
    with (
        pytest.raises(ValueError, match="the positions must match"),
        attnlens.ablate(model, [(0, 0)], mode="resample", reference=ids),
    ):
        model(ids[:, :5])
    assert _hooks(model) == before
    with torch.no_grad():
        # The same seeded model, built again: the same parameters through the same forward pass.
        assert_bitwise(model(ids).logits, make_gpt2()(ids).logits, "same call")


def test_model_state_kept_and_gradients_flow() -> None:
    model = make_gpt2(attn_implementation="sdpa")
    model.train()
    model.transformer.h[0].eval()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    ids = random_ids(model)
    state = _state(model)
    with attnlens.ablate(model, [(0, 1)], mode="mean", reference=ids):
        assert model.training  # the user's passes run in the user's mode
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert _state(model) == state
    grad = attnlens.models.adapt(model).sites.layers[1].qkv[0].weight.grad
    assert grad is not None and bool(grad.abs().amax() > 0)
    importance = attnlens.head_importance(model, ids)
    assert _state(model) == state
    assert importance.shape == (2, 4) and bool(torch.isfinite(importance).all())


def test_other_threads_are_not_ablated() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    with torch.no_grad():
        clean = model(ids).logits
    seen: list[torch.Tensor] = []

    def run() -> None:
        with torch.no_grad():
            seen.append(model(ids).logits)

    with torch.no_grad(), attnlens.ablate(model, [(0, 0), (1, 0)]):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        here = model(ids).logits
    assert_bitwise(seen[0], clean, "same call")
    assert not torch.equal(here, clean)


def test_verify_refuses_inside_a_block_and_works_after() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    with attnlens.ablate(model, [(0, 0)]), pytest.raises(RuntimeError, match="inside an attnlens.ablate block"):
        attnlens.verify(model, ids)
    with attnlens.ablate(model, []):  # no head, no hook: nothing to refuse
        assert attnlens.verify(model, ids).ok
    assert attnlens.verify(model, ids).ok


def test_nested_blocks_compose() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    with torch.no_grad():
        with attnlens.ablate(model, [(0, 0), (1, 1)]):
            both = model(ids).logits
        with attnlens.ablate(model, [(0, 0)]), attnlens.ablate(model, [(1, 1)]):
            nested = model(ids).logits
    assert_bitwise(nested, both, "same kernel")  # the same two hooks replacing the same entries


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_head_importance_batched_equals_one_head_at_a_time(kernel: str, mode: str) -> None:
    model = make_gpt2(attn_implementation=kernel, n_layer=3)
    ids = random_ids(model, batch=3, pos=10)
    mask = torch.ones_like(ids)
    if mode != "resample":
        mask[1, 6:] = 0
    reference = random_ids(model, batch=3, pos=10, seed=4) if mode == "resample" else None
    batched = attnlens.head_importance(model, ids, mask, mode=mode, reference=reference)
    one = attnlens.head_importance(model, ids, mask, mode=mode, reference=reference, heads_per_pass=1)
    some = attnlens.head_importance(model, ids, mask, mode=mode, reference=reference, heads_per_pass=5)
    # The same numbers from ablate blocks and the model's own loss.
    keep = mask.bool()
    pairs = keep[:, :-1] & keep[:, 1:]

    def loss(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs]))

    loop = torch.zeros(3, 4, dtype=torch.float64)
    ablate_ref = (ids, mask) if mode == "mean" else reference
    with torch.no_grad():
        clean = loss(model(ids, attention_mask=mask).logits)
        for layer in range(3):
            for head in range(4):
                with attnlens.ablate(model, [(layer, head)], mode=mode, reference=ablate_ref):
                    loop[layer, head] = loss(model(ids, attention_mask=mask).logits) - clean
    for result in (batched, one, some):
        torch.testing.assert_close(result, loop, atol=BATCHED_ATOL, rtol=0)
    assert bool(loop.abs().amax() > 200 * BATCHED_ATOL)  # effects well above the tolerance


def test_head_importance_custom_metrics() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    target = 5

    def logit(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, target].mean()

    def masked(logits: torch.Tensor, attention_mask: torch.Tensor) -> float:
        last = attention_mask.sum(-1) - 1
        return float(logits[torch.arange(logits.shape[0]), last, target].mean())

    one = attnlens.head_importance(model, ids, metric=logit)
    two = attnlens.head_importance(model, ids, mask, metric=masked)
    with torch.no_grad():
        clean_one = float(logit(model(ids).logits))
        clean_two = masked(model(ids, attention_mask=mask).logits, mask)
        with attnlens.ablate(model, [(1, 2)]):
            one_12 = float(logit(model(ids).logits)) - clean_one
            two_12 = masked(model(ids, attention_mask=mask).logits, mask) - clean_two
    assert one[1, 2].item() == pytest.approx(one_12, abs=BATCHED_ATOL)
    assert two[1, 2].item() == pytest.approx(two_12, abs=BATCHED_ATOL)
    with pytest.raises(ValueError, match="must return a scalar"):
        attnlens.head_importance(model, ids, metric=lambda logits: logits[:, -1, 0])
    with pytest.raises(TypeError, match="metric must be a callable"):
        attnlens.head_importance(model, ids, metric="loss")


def test_validation_errors() -> None:
    model = make_gpt2()
    ids = random_ids(model)
    before = _state(model)
    cases: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
        ((0, 1), {}, TypeError, "for one head write"),
        ([(0, 1, 2)], {}, ValueError, "is a .layer, head. pair"),
        ([(2, 0)], {}, ValueError, "layer 2 is out of range"),
        ([(0, 4)], {}, ValueError, "head 4 is out of range"),
        ([(0, 1), (-2, 1)], {}, ValueError, r"heads \[\(0, 1\)\] given more than once"),
        ([(0.5, 1)], {}, ValueError, "must be integers"),
        ([(True, 1)], {}, ValueError, "bool"),
        ("L0H1", {}, TypeError, "list of .layer, head. pairs"),
        ([(0, 1)], {"mode": "mean"}, ValueError, "needs a reference"),
        ([(0, 1)], {"mode": "resample"}, ValueError, "needs a reference"),
        ([(0, 1)], {"mode": "zero", "reference": ids}, ValueError, "takes no reference"),
        ([(0, 1)], {"mode": "random"}, ValueError, "mode must be one of"),
        ([(0, 1)], {"mode": "mean", "reference": {"ids": ids}}, ValueError, "needs 'input_ids'"),
        ([(0, 1)], {"mode": "mean", "reference": ids + 1000}, ValueError, "input_ids must lie in"),
        (
            [(0, 1)],
            {"mode": "resample", "reference": (ids, torch.tensor([[1] * 12, [0] + [1] * 11]))},
            ValueError,
            "must have no padding",
        ),
    ]
    for heads, kwargs, error, message in cases:
        with pytest.raises(error, match=message), attnlens.ablate(model, heads, **kwargs):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's compiler warns of its own deprecations on import
        compiled = torch.compile(model)
    with pytest.raises(attnlens.UnsupportedModelError, match="compiled"), attnlens.ablate(compiled, []):
        pass
    inner = make_gpt2()
    inner.transformer = torch.compile(inner.transformer)
    with pytest.raises(attnlens.UnsupportedModelError, match="compiled"), attnlens.ablate(inner, []):
        pass
    with pytest.raises(attnlens.UnsupportedModelError), attnlens.ablate(torch.nn.Linear(2, 2), []):
        pass
    with pytest.raises(attnlens.UnsupportedModelError, match="no language-model head"):
        attnlens.head_importance(make_gpt2("GPT2Model"), ids)
    with pytest.raises(ValueError, match="heads_per_pass must be"):
        attnlens.head_importance(model, ids, heads_per_pass=0)
    with pytest.raises(ValueError, match="the positions must match"):
        attnlens.head_importance(model, ids, mode="resample", reference=ids[:, :4])
    with pytest.raises(ValueError, match="two consecutive real tokens"):
        attnlens.head_importance(model, ids[:, :1])
    assert _state(model) == before


def test_demo_previous_token_head_feeds_the_induction_head() -> None:
    model, _ = attnlens.load_demo()
    clean = attnlens.metrics.induction_scores(model, seq_len=20, batch=4)
    with attnlens.ablate(model, [(0, 0)]):  # L0H0: the previous-token head (docs/demo-model.md)
        ablated = attnlens.metrics.induction_scores(model, seq_len=20, batch=4)
    with attnlens.ablate(model, [(0, 1)]):  # another layer-0 head, for comparison
        other = attnlens.metrics.induction_scores(model, seq_len=20, batch=4)
    assert clean[1, 0] > 0.8
    assert ablated[1, 0] < 0.2 * clean[1, 0]
    assert other[1, 0] > 0.8 * clean[1, 0]
