"""trace(..., queries=...): chosen query rows from q, k and each row's log-sum-exp, against the full trace's rows.

The full trace is the reference: on an eager-run model it is bitwise the model's own ``output_attentions``
(tests/test_trace.py), on an SDPA-run one HF's eager arithmetic on the same q and k. The rows are computed by a
different matmul shape (the rows against every key, in chunks) and a log-sum-exp instead of a softmax, so they are
compared within a bound derived from the sizes and the dtype's unit roundoff (:func:`row_bound`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, assert_within, make_gpt2, two_sums_bound, unit_roundoff
from test_hub_configs_neox import inputs, make_checkpoint

import attnlens
from attnlens import _rows, functional
from attnlens.models import AttentionSpec

U32 = unit_roundoff(torch.float32)


def padded(batch: int = 3, pos: int = 10, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids with a left-padded, a right-padded and a full sequence."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, pos), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, pos - 4 :] = 0
    return ids, mask


def full_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, h, rows[b, r], :]`` of a full ``[batch, head, q_pos, k_pos]`` tensor."""
    return x.gather(2, rows[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1]))


def row_bound(full: attnlens.AttentionTrace, layer: int, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Bound on |rows - full rows| for one layer, from the layer's q and k (stored by the full trace).

    Each score is one dot product of d_head terms and a scaling, rounded in the model's dtype: two computations of it
    differ by at most delta = two_sums_bound(scale sum_d |q k|, d_head + 1). A row's log-sum-exp then moves by at
    most the row's largest delta, and exp(s - lse) by a factor exp(delta_ij + max delta + (k_pos + 4) u32) (the
    float32 exp, log and sum of k_pos terms); both sides finally round once to the pattern's dtype.
    """
    q, k = full["q", layer].double(), full["k", layer].double()
    dtype = full["q", layer].dtype
    magnitude = scale * torch.einsum("bihd,bjhd->bhij", q.abs(), k.abs())
    delta = full_rows(two_sums_bound(magnitude, q.shape[-1] + 1, dtype), rows)
    n_keys = k.shape[1]  # [batch, pos, head, d_head]
    worst = delta.amax(dim=-1, keepdim=True)
    relative = torch.expm1(delta + worst + (n_keys + 4) * U32)
    expected = full_rows(full.pattern(layer).double(), rows)
    u_out = unit_roundoff(full.patterns.dtype)
    return expected * ((1 + relative) * (1 + 2 * u_out) - 1)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queries", ["last", [0, -1, 4], slice(2, None, 3)], ids=["last", "list", "slice"])
def test_rows_are_the_full_traces_rows_within_a_derived_bound(kernel: str, dtype: torch.dtype, queries: Any) -> None:
    model = make_gpt2(attn_implementation=kernel, n_layer=3).to(dtype)
    ids, mask = padded()
    full = attnlens.trace(model, ids, mask, store=("pattern", "scores", "q", "k"))
    tr = attnlens.trace(model, ids, mask, queries=queries, store=("pattern", "scores"))
    rows = tr.queries
    assert rows is not None and rows.shape[0] == 3
    scale = 1 / math.sqrt(8)  # d_head 8
    for layer in range(3):
        got = tr.rows(layer)
        assert got.dtype == dtype and got.shape == (3, 4, rows.shape[1], 10)
        expected = full_rows(full.pattern(layer), rows)
        assert_within(got, expected, row_bound(full, layer, rows, scale), f"{kernel} {dtype} layer {layer}")
        if kernel == "eager" and layer < 2:  # the eager kernel's own pattern, its rows copied
            assert_bitwise(got, expected, "copy", what=f"layer {layer}")
        # Scores: the same dot products, rounded by another matmul shape; -inf in the same places.
        scores, expected_scores = tr["scores", layer], full_rows(full["scores", layer], rows)
        assert torch.equal(torch.isinf(scores), torch.isinf(expected_scores))
        finite = ~torch.isinf(expected_scores)
        q_abs, k_abs = full["q", layer].double().abs(), full["k", layer].double().abs()
        magnitude = scale * torch.einsum("bihd,bjhd->bhij", q_abs, k_abs)
        bound = full_rows(two_sums_bound(magnitude, 9, dtype), rows)  # 8 products and the scaling
        assert_within(scores[finite], expected_scores[finite], bound[finite], f"scores layer {layer}")


def test_last_is_each_sequences_last_real_token_and_positions_are_checked() -> None:
    _, mask = padded()
    last = _rows.query_positions("last", mask)
    assert last.tolist() == [[9], [5], [9]]  # left padded, right padded, full
    assert _rows.query_positions([-1, 0], mask).tolist() == [[9, 0]] * 3
    assert _rows.query_positions(torch.tensor([3, 1]), mask).tolist() == [[3, 1]] * 3
    assert _rows.query_positions(slice(None, None, 4), mask).tolist() == [[0, 4, 8]] * 3
    assert _rows.query_positions(7, mask).tolist() == [[7]] * 3
    for bad, match in [
        ([10], "out of range"),
        ([1, -9], "repeat"),
        ([], "empty"),
        (slice(20, None), "selects no position"),
        ("first", "'last'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _rows.query_positions(bad, mask)
    for bad in (torch.tensor([0.5]), 1.5, [None]):
        with pytest.raises(TypeError, match="positions"):
            _rows.query_positions(bad, mask)
    with pytest.raises(ValueError, match="no real token"):
        _rows.query_positions("last", torch.zeros_like(mask))


def test_allowed_keys_are_the_full_masks_rows_with_padding_and_window() -> None:
    _, mask = padded()
    rows = torch.tensor([[0, 3, 9]]).expand(3, -1)
    full = functional.padding_mask(mask)  # [batch, 1, q_pos, k_pos]
    assert torch.equal(_rows.allowed_keys(rows, mask, 10, None), full_rows(full, rows))
    index = torch.arange(10)
    windowed = full & (index[:, None] - index[None, :] < 3)
    assert torch.equal(_rows.allowed_keys(rows, mask, 10, 3), full_rows(windowed, rows))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_chunked_lse_is_the_logsumexp_of_the_masked_scores(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, generator=generator) * 3
    k = torch.randn(2, 3, 20, 16, generator=generator) * 3
    allowed = torch.rand(2, 1, 4, 20, generator=generator) > 0.3
    allowed[1, 0, 2] = False  # a row with no key: lse -inf, pattern 0
    spec = AttentionSpec(scale=0.25, n_heads=3, n_kv_heads=3)
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~allowed, float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    got = _rows.row_lse(q, k, spec, allowed, chunk)
    assert torch.isneginf(got[1, :, 2]).all() and torch.isneginf(expected[1, :, 2]).all()
    live = ~torch.isneginf(expected)
    # Scores: 16-term dot products in float32 (gamma_16 of sum |q k|); the log-sum-exp of 20 terms adds (20 + 4) u.
    magnitude = (q.double().abs() @ k.double().abs().transpose(-1, -2) * 0.25).amax(dim=-1)
    bound = two_sums_bound(magnitude, 16, torch.float32) + 24 * U32 * (expected.abs() + 1)
    assert_within(got[live], expected[live], bound[live], f"chunk {chunk}")
    out = torch.empty(2, 3, 4, 20)
    _rows.pattern_rows(q, k, spec, allowed, out, chunk)
    assert float(out[1, :, 2].abs().max()) == 0.0
    assert float(out.masked_select(~allowed.expand_as(out)).abs().max()) == 0.0
    sums = out.sum(-1)[live]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=0, rtol=64 * U32)  # 20 terms of rounded exp


def test_the_square_is_never_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every score block the tap computes for a rows trace is at most rows x chunk; no [q_pos, k_pos] mask either."""
    model = make_gpt2(attn_implementation="sdpa", n_layer=2)
    ids, mask = padded()
    shapes: list[tuple[int, ...]] = []
    real_scores = functional.attention_scores

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_scores(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    def no_square(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a [q_pos, k_pos] mask was built")

    monkeypatch.setattr(functional, "attention_scores", recorded)
    monkeypatch.setattr(functional, "padding_mask", no_square)
    monkeypatch.setattr(functional, "causal_mask", no_square)
    monkeypatch.setattr(_rows, "CHUNK", 4)
    tr = attnlens.trace(model, ids, mask, queries=[2, 9])
    assert shapes and all(shape[-2] == 2 and shape[-1] <= 4 for shape in shapes), shapes
    assert tr.rows(1).shape == (3, 4, 2, 10)


def test_a_rows_trace_says_what_it_holds_and_refuses_the_square_by_name() -> None:
    model = make_gpt2()
    ids, mask = padded()
    tr = attnlens.trace(model, ids, mask, queries="last")
    assert "queries=[9] (sequence 0; they differ per sequence)" in repr(tr)
    assert tr._repr_html_() is None
    for what, call in [
        ("pattern()", lambda: tr.pattern(0)),
        ("patterns", lambda: tr.patterns),
        ("pattern()", lambda: attnlens.metrics.entropy(tr)),
    ]:
        with pytest.raises(ValueError, match=rf"{what.replace('(', '[(]').replace(')', '[)]')} needs every query row"):
            call()
    assert_bitwise(tr["pattern", 0], tr.rows(0), "same call")
    full = attnlens.trace(model, ids, mask)
    assert full.queries is None
    assert_bitwise(full.rows(1), full.pattern(1), "same call")


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_gpt_neox_rows_with_rotary_and_right_padding(tmp_path: Path, kernel: str) -> None:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_checkpoint("EleutherAI__pythia-70m.saved-4.27.0.dev0.json", tmp_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=kernel).eval()
    ids, mask = inputs()
    full = attnlens.trace(model, ids, mask, store=("pattern", "q", "k"))
    tr = attnlens.trace(model, ids, mask, queries="last")
    assert tr.queries is not None and tr.queries.tolist() == [[11], [8]]
    scale = attnlens.models.adapt(model).specs[0].scale
    for layer in full.layers:
        expected = full_rows(full.pattern(layer), tr.queries)
        assert_within(tr.rows(layer), expected, row_bound(full, layer, tr.queries, scale), f"layer {layer}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", ["last", [0, -1, 4]], ids=["last", "list"])
def test_a_rows_trace_saves_and_loads_bit_for_bit(tmp_path: Path, dtype: torch.dtype, queries: Any) -> None:
    model = make_gpt2(n_layer=2).to(dtype)
    ids, mask = padded()  # left-padded (position 0 is padding: a row with no key), right-padded, full
    tr = attnlens.trace(model, ids, mask, queries=queries, heads=[3, 1], store=("pattern", "scores", "q", "z"))
    path = tmp_path / "rows.safetensors"
    tr.save(path)
    back = attnlens.AttentionTrace.load(path)
    assert tr.queries is not None and back.queries is not None
    assert back.queries.dtype == torch.int64 and torch.equal(back.queries, tr.queries)
    assert (back.layers, back.heads, back.stored) == (tr.layers, tr.heads, tr.stored)
    for name in tr.stored:
        assert back[name].dtype == dtype
        assert_bitwise(back[name], tr[name], "copy", what=name)
    assert torch.equal(back.input_ids, tr.input_ids) and torch.equal(back.attention_mask, tr.attention_mask)
    assert repr(back) == repr(tr)
    assert set(back.numpy()) == {"pattern", "scores", "q", "z", "input_ids", "attention_mask", "queries"}
    with pytest.raises(ValueError, match="needs every query row"):
        back.pattern(0)


def test_a_rows_trace_file_whose_queries_do_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from test_trace import _tamper

    model = make_gpt2(n_layer=2)
    ids, mask = padded()
    saved, bad = tmp_path / "rows.safetensors", tmp_path / "bad.safetensors"
    attnlens.trace(model, ids, mask, queries=[2, 9]).save(saved)
    with safe_open(str(saved), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlens.trace"])
    assert meta["format"] == 2 and meta["rows"] == 2
    cases: list[tuple[Any, str]] = [
        (lambda: _tamper(saved, bad, queries=torch.tensor([[2, 10]] * 3)), r"positions outside 0\.\.9"),
        (lambda: _tamper(saved, bad, queries=torch.tensor([[2, -1]] * 3)), r"positions outside 0\.\.9"),
        (lambda: _tamper(saved, bad, queries=torch.tensor([[2.0, 9.0]] * 3)), "integer positions"),
        (lambda: _tamper(saved, bad, queries=torch.tensor([[9, 9]] * 3)), "repeats a position"),
        (lambda: _tamper(saved, bad, queries=torch.tensor([[2, 9]] * 2)), r"queries has shape \(2, 2\)"),
        (lambda: _tamper(saved, bad, {**meta, "rows": 3}), r"\(3, 3\)"),
        (lambda: _tamper(saved, bad, {**meta, "rows": None}), r"unexpected \['queries'\]"),
        (lambda: _tamper(saved, bad, {**meta, "rows": "2"}), "'rows' must be null"),
        (lambda: _tamper(saved, bad, queries=None), r"missing \['queries'\]"),
        (lambda: _tamper(saved, bad, {k: v for k, v in meta.items() if k != "rows"}), "metadata lacks rows"),
    ]
    for make, words in cases:
        make()
        with pytest.raises(ValueError, match="is not a valid attnlens trace: .*" + words):
            attnlens.AttentionTrace.load(bad)
    # pattern rows that do not match the metadata's number of rows
    rows = attnlens.AttentionTrace.load(saved)["pattern"]
    _tamper(saved, bad, pattern=rows[:, :, :, :1].contiguous())
    with pytest.raises(ValueError, match="2 query rows\\) needs floats of shape \\(2, 3, 4, 2, 10\\)"):
        attnlens.AttentionTrace.load(bad)
