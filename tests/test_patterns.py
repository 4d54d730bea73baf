"""The pattern tap beyond GPT-2's shape: several q/k/v modules, rotations, grouped-query heads, sliding windows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from conftest import assert_bitwise, make_gpt2, random_ids
from torch import Tensor

import attnlens
from attnlens import functional
from attnlens.models import QKV, Adapter, LayerSites, Rotation
from attnlens.models.gpt2 import GPT2Adapter
from attnlens.patterns import Sink, Tap, Wants, _with_query_heads


@dataclasses.dataclass(frozen=True, eq=False)
class _TwoModules(GPT2Adapter):
    """GPT-2 seen as an architecture with two q/k/v modules (``ln_1``, then ``c_attn``) and a rotation to catch."""

    seen: list[Any] = dataclasses.field(default_factory=list)

    def split_qkv(self, layer: int, outputs: Sequence[Tensor], rotation: Rotation | None = None) -> QKV:
        self.seen.append(("split", layer, tuple(x.shape[-1] for x in outputs), rotation))
        return super().split_qkv(layer, outputs[1:], rotation)

    def rotation(self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Rotation | None:
        self.seen.append(("rotation", layer))
        return Rotation(cos=torch.ones(1), sin=torch.zeros(1))


def two_modules(model: Any) -> _TwoModules:
    adapter = attnlens.models.adapt(model)
    layers = tuple(dataclasses.replace(s, qkv=(s.attn_input, *s.qkv)) for s in adapter.own_sites.layers)
    fields = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.name != "seen"}
    fields["own_sites"] = dataclasses.replace(adapter.own_sites, layers=layers)
    # A rotary dim makes the tap catch each layer's rotation from its attention module's arguments.
    fields["specs"] = tuple(dataclasses.replace(s, rotary_dim=2) for s in adapter.specs)
    return _TwoModules(**fields)


def test_a_layer_of_several_qkv_modules_is_split_once_all_have_run_with_its_rotation() -> None:
    model = make_gpt2(n_layer=3, attn_implementation="sdpa", initializer_range=0.2)
    ids = random_ids(model)
    adapter = two_modules(model)
    assert isinstance(adapter.own_sites.layers[0], LayerSites) and len(adapter.own_sites.layers[0].qkv) == 2
    got = attnlens.trace(adapter, ids, layers=[0, 2], store=("pattern", "q"))
    expected = attnlens.trace(model, ids, layers=[0, 2], store=("pattern", "q"))
    # The same recomputation from the same q and k (the rotation by cos 1, sin 0 is exact).
    assert_bitwise(got.patterns, expected.patterns, "same kernel")
    assert_bitwise(got["q"], expected["q"], "exact")
    # Per tapped layer: its rotation first, then one split of both outputs (ln_1's d_model, c_attn's 3 * d_model).
    d_model = adapter.d_model
    assert [entry[:3] for entry in adapter.seen] == [
        ("rotation", 0),
        ("split", 0, (d_model, 3 * d_model)),
        ("rotation", 2),
        ("split", 2, (d_model, 3 * d_model)),
    ]
    assert all(isinstance(entry[3], Rotation) for entry in adapter.seen if entry[0] == "split")


def test_grouped_query_keys_and_values_are_repeated_per_query_head() -> None:
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    _, k6, v6 = _with_query_heads(QKV(q, k, v), 6)
    # Query head h reads key/value head h // (n_heads // n_kv_heads), as transformers' repeat_kv gives it.
    for head in range(6):
        assert_bitwise(k6[:, head], k[:, head // 3], "copy")
        assert_bitwise(v6[:, head], v[:, head // 3], "copy")


class _Patterns(Sink):
    def __init__(self) -> None:
        self.patterns: dict[int, Tensor] = {}
        self.q: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}

    def pattern(self, layer: int, pattern: Tensor) -> None:
        self.patterns[layer] = pattern.clone()

    def qkv(self, layer: int, qkv: QKV) -> None:
        self.q[layer], self.k[layer] = qkv.q.clone(), qkv.k.clone()


def test_a_sliding_window_keeps_the_last_keys_only() -> None:
    model = make_gpt2(n_layer=2, attn_implementation="eager", initializer_range=0.2)
    adapter: Adapter = attnlens.models.adapt(model)
    window = 3
    specs = tuple(dataclasses.replace(s, window=window) for s in adapter.kernel_specs)
    ids = random_ids(model)
    n_pos = ids.shape[1]
    sink = _Patterns()
    # Every layer recomputed (an eager kernel's own pattern has no window).
    tap = Tap(dataclasses.replace(adapter, kernel_returns_pattern=False), [0, 1], None, sink, Wants(qkv=True), specs)
    with torch.no_grad(), tap.hooked():
        tap.run(ids)
    index = torch.arange(n_pos)
    allowed = functional.causal_mask(n_pos) & (index[:, None] - index[None, :] < window)
    for layer in (0, 1):
        pattern = sink.patterns[layer]
        assert bool((pattern.masked_select(~allowed) == 0).all())
        scores = functional.attention_scores(sink.q[layer], sink.k[layer], specs[layer].scale)
        expected = functional.masked_softmax(scores, allowed)
        # The same float32 scores, soft-maxed by two implementations: a few ulps of the probabilities (<= 1).
        torch.testing.assert_close(pattern, expected, atol=4 * torch.finfo(torch.float32).eps, rtol=0)
