"""q, k and v in [batch, pos, head, d_head], the order of z: fresh traces, grouped-query models, saved files.

attnlens 0.1 handed q, k and v out head-major ([batch, head, pos, d_head]). The old order is left for one release
behind ``AttentionTrace.head_major`` (a FutureWarning), and trace files of format 1 (which hold the old order) are
permuted when they are loaded, never handed out as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, make_gpt2
from test_llama import FIXTURE_NAMES, build
from test_trace import capture_attention_io, padded

import attnlens
from attnlens import AttentionTrace
from attnlens.attention_trace import STORE_NAMES
from attnlens.models import adapt


def test_head_major_gives_the_old_order_as_a_view_and_warns_naming_the_release_and_the_new_spelling() -> None:
    model = make_gpt2(n_layer=2)
    ids, mask = padded(model, "left")
    tr = attnlens.trace(model, ids, mask, store=("q", "k", "v", "z"))
    io = capture_attention_io(model, 1, ids, mask)
    old = attnlens.models.gpt2.split_qkv(io["qkv"], 4)  # [batch, head, pos, d_head], as attnlens 0.1 stored them
    for name, expected in zip(("q", "k", "v"), old, strict=True):
        with pytest.warns(FutureWarning, match=rf"goes away in attnlens 0\.3\.0.*trace\[\"{name}\", layer\]"):
            got = tr.head_major(name, 1)
        assert got.shape == (3, 4, 10, 8)
        assert_bitwise(got, expected, "copy", what=name)
        assert got.data_ptr() == tr[name, 1].data_ptr()  # a view of the stored stack, no copy
        with pytest.warns(FutureWarning, match=r"\.transpose\(2, 3\)"):
            stack = tr.head_major(name)
        assert stack.shape == (2, 3, 4, 10, 8)
        assert_bitwise(stack[1], expected, "copy", what=f"{name} stack")
    for name in ("z", "pattern"):
        with pytest.raises(ValueError, match="only for 'q', 'k' and 'v'"):
            tr.head_major(name, 1)


def test_grouped_query_keys_and_values_are_per_query_head_in_the_order_of_z(tmp_path: Path) -> None:
    model = build(FIXTURE_NAMES["llama"], tmp_path)  # 4 query heads per key/value head
    adapter = adapt(model)
    group = adapter.n_heads // adapter.n_kv_heads
    assert group > 1
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    tr = attnlens.trace(model, ids, store=("q", "k", "v", "z"))
    kept = attnlens.trace(model, ids, heads=[5, 1], store=("k", "v"))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for layer in tr.layers:
        assert tr["k", layer].shape == tr["v", layer].shape == tr["z", layer].shape == (2, 9, adapter.n_heads, 8)
        keys, values = adapter.cached_kv(cache, layer)  # [batch, kv_head, pos, d_head], post-rotary
        for name, own in (("k", keys), ("v", values)):
            # query head h reads key/value head h // group: the same rotation and projection, in another forward
            expected = own.repeat_interleave(group, dim=1).transpose(1, 2)
            assert_bitwise(tr[name, layer], expected, "same kernel", what=f"{name} layer {layer}")
            assert_bitwise(kept[name, layer], expected[:, :, [5, 1]], "same kernel", what=f"{name} heads 5, 1")


def _write_format_1(tr: AttentionTrace, path: Path) -> None:
    """The file attnlens 0.1 wrote for this trace: q, k, v head-major ([layer, batch, head, pos, d_head])."""
    from safetensors.torch import save_file

    tensors = {name: tr[name].contiguous() for name in tr.stored}
    for name in {"q", "k", "v"} & set(tr.stored):
        tensors[name] = tr[name].transpose(2, 3).contiguous()
    tensors["input_ids"], tensors["attention_mask"] = tr.input_ids, tr.attention_mask
    meta = {
        "format": 1,
        "layers": list(tr.layers),
        "heads": list(tr.heads),
        "n_heads": tr.n_heads,
        "stored": list(tr.stored),
        "tokens": tr.tokens,
        "provenance": tr.provenance,
    }
    save_file(tensors, str(path), metadata={"attnlens.trace": json.dumps(meta)})


def test_a_format_1_file_is_permuted_to_the_new_order_on_load(tmp_path: Path) -> None:
    model = make_gpt2(n_layer=2)
    ids, mask = padded(model, "right")
    tr = attnlens.trace(model, ids, mask, heads=[3, 1], store=STORE_NAMES)
    path = tmp_path / "old.safetensors"
    _write_format_1(tr, path)
    back = AttentionTrace.load(path)
    for name in STORE_NAMES:
        assert_bitwise(back[name], tr[name], "copy", what=name)
        assert back[name].is_contiguous()  # as trace() stores them
    assert back.queries is None and back.heads == (3, 1)

    new = tmp_path / "new.safetensors"
    back.save(new)
    from safetensors import safe_open

    with safe_open(str(new), framework="pt") as f:
        assert json.loads(f.metadata()["attnlens.trace"])["format"] == 2
        assert tuple(f.get_tensor("q").shape) == (2, 3, 10, 2, 8)  # [layer, batch, pos, head, d_head]


def test_format_files_that_do_not_fit_their_version_are_refused_by_name(tmp_path: Path) -> None:
    from test_trace import _tamper

    model = make_gpt2(n_layer=2)
    ids, mask = padded(model, "right")  # 10 positions, 4 heads: the two orders have different shapes
    tr = attnlens.trace(model, ids, mask, store=("pattern", "q"))
    old, new, bad = tmp_path / "old.safetensors", tmp_path / "new.safetensors", tmp_path / "bad.safetensors"
    _write_format_1(tr, old)
    tr.save(new)
    from safetensors import safe_open

    with safe_open(str(new), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlens.trace"])
    cases: list[tuple[Any, str]] = [
        # a format-1 header over tensors in the new order, and the reverse: the shapes say so
        (lambda: _tamper(new, bad, {**meta, "format": 1}), r"'q' is .* needs floats of shape \(2, 3, 4, 10, 8\)"),
        (lambda: _tamper(old, bad, {**meta, "format": 2}), r"'q' is .* needs floats of shape \(2, 3, 10, 4, 8\)"),
        (lambda: _tamper(old, bad, queries=torch.zeros(3, 1, dtype=torch.long)), r"unexpected \['queries'\]"),
    ]
    for make, words in cases:
        make()
        with pytest.raises(ValueError, match="is not a valid attnlens trace: .*" + words):
            AttentionTrace.load(bad)
    for version in (3, "2", True, None):
        _tamper(new, bad, {**meta, "format": version})
        with pytest.raises(ValueError, match=rf"trace file format {version!r} is not supported .*reads formats 1, 2"):
            AttentionTrace.load(bad)
