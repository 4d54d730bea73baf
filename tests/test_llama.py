"""Llama-family models through ablation, attribution, circuits, windows and refusals (beyond load/trace/verify).

The models are shrunk published configs of tests/test_hub_configs_llama.py, saved with seeded random weights:
Llama-3.2-1B (grouped by 4, llama3 rope, tied embeddings), Qwen2.5-3B (q/k/v biases, grouped by 8: multi-query
after shrinking), Qwen3-8B (q_norm/k_norm, grouped by 4, untied) and Mistral-7B-Instruct-v0.1 (a sliding window of 4
over 12 positions).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, optional
from test_hub_configs_llama import (
    D_HEAD,
    FIXTURES,
    N_LAYER,
    SEQ,
    VOCAB,
    WINDOW,
    eager_patterns,
    left_padded,
    make_checkpoint,
    pattern_bound,
    shrink,
)
from test_scan import pack, reference_rows, token_docs
from torch.testing import assert_close

import attnlens
from attnlens import metrics
from attnlens.attribution import decompose
from attnlens.circuits import composition_scores
from attnlens.models import adapt

FIXTURE_NAMES = {
    "llama": "meta-llama__Llama-3.2-1B.json",
    "qwen2": "Qwen__Qwen2.5-3B.copied.json",
    "qwen3": "Qwen__Qwen3-8B.copied.json",
    "mistral": "mistralai__Mistral-7B-Instruct-v0.1.printed-4.40.0.dev0.json",
}


def build(name: str, folder: Path, kernel: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    raw = json.loads((FIXTURES / name).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = make_checkpoint(shrink(raw, **overrides), folder)
        return cls.from_pretrained(folder, attn_implementation=kernel, dtype=dtype).eval()


@pytest.fixture(scope="module", params=sorted(FIXTURE_NAMES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param)
    # Token ids inside the shrunk vocabulary: scan separates documents with the config's eos_token_id.
    build(FIXTURE_NAMES[request.param], path, bos_token_id=1, eos_token_id=2)
    return request.param, path


def load(folder: Path, kernel: str, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0]) if config.get("architectures") else None
    assert cls is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, attn_implementation=kernel, dtype=dtype).eval()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_ablating_one_query_head_is_zeroing_its_z_before_o_proj(family: tuple[str, Path], kernel: str) -> None:
    _, folder = family
    model = load(folder, kernel)
    adapter = adapt(model)
    ids, mask, positions = left_padded()
    # The last query head of the first key/value group: its siblings share its keys and values, never its ablation.
    head = adapter.n_heads // adapter.n_kv_heads - 1
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with attnlens.ablate(model, [(1, head)]):
            ablated = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with attnlens.ablate(model, [(1, 0 if head else 1)]):
            sibling = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.equal(clean, ablated) and not torch.equal(ablated, sibling)

    def zero_head(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = args[0].clone()  # [batch, pos, (head d_head)], query heads in order
        z[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return (z,)

    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            by_hand = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    finally:
        handle.remove()
    # The same o_proj on the same zeroed input, the rest of the forward pass unchanged.
    assert_bitwise(ablated, by_hand, "same kernel")
    importance = attnlens.head_importance(model, ids, mask)
    assert importance.shape == (N_LAYER, adapter.n_heads) and bool(importance.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decompose_sums_to_the_residual_and_the_logits(family: tuple[str, Path], dtype: torch.dtype) -> None:
    _, folder = family
    model = load(folder, "sdpa", dtype)
    ids, mask, positions = left_padded()
    d = decompose(model, ids, mask, positions=None, position_ids=positions)
    d.check()  # raises DecompositionError above the derived tolerance
    assert not bool(d.contributions[d.index("pos_embed")].any())  # rotary: positions enter no residual term
    targets = ids.roll(-1, dims=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.to(torch.float64)
    total = d.logit_attribution(targets).sum(0).double() + d.logit_bias(targets).double()
    expected = logits.gather(-1, targets[..., None])[..., 0]
    valid = mask.bool()
    # The derived bound per entry (Decomposition.logit_bound: roundings of every term, RMSNorm frozen at the real
    # residual's scale, nothing centred).
    bound = d.logit_bound(targets).double()
    assert bool(((total - expected).abs() <= bound)[valid].all()), float((total - expected).abs()[valid].max())


def test_qk_circuits_are_refused_and_ov_is_per_query_head(family: tuple[str, Path]) -> None:
    _, folder = family
    w = attnlens.extract_weights(load(folder, "sdpa"))
    with pytest.raises(attnlens.PositionDependentCircuitError, match="no position-free QK circuit"):
        composition_scores(w, "K")
    layer = w.layers[0]
    group = layer.n_heads // layer.n_kv_heads
    # Each query head's OV circuit reads its key/value head's W_V: grouped() is that view, no copy.
    per_head = layer.grouped("W_V").flatten(0, 1)
    for head in range(layer.n_heads):
        assert_bitwise(per_head[head], layer.W_V[head // group], "copy")
    with pytest.raises(ValueError, match="RMSNorm"):
        w.processed()


@pytest.mark.parametrize("fold_ln", [False, True])
def test_v_composition_per_query_head_equals_the_dense_definition(family: tuple[str, Path], fold_ln: bool) -> None:
    # V composition reads no QK, so rotary does not stand in its way. Folding an RMSNorm scales W_V by ln_1's weight
    # and centres nothing (an RMSNorm reads the mean); centring W_O would change what the next RMSNorm reads.
    _, folder = family
    w = attnlens.extract_weights(load(folder, "sdpa"))
    scores = composition_scores(w, "V", fold_ln=fold_ln)
    OV = []
    for layer in w.layers:
        W_V = layer.grouped("W_V").flatten(0, 1).detach().double()
        if fold_ln:
            W_V = layer.ln_1.w.detach().double()[:, None] * W_V
        OV.append(W_V @ layer.W_O.detach().double())
    n_heads = w.n_heads
    for l2 in range(1, w.n_layers):
        for l1 in range(l2):
            for h1 in range(n_heads):
                for h2 in range(n_heads):
                    a, b = OV[l1][h1], OV[l2][h2]
                    want = float((a @ b).norm() / (a.norm() * b.norm()))
                    # float64 throughout, products of a few d_model x d_head factors: rounding near 1e-15.
                    assert abs(float(scores[l1, h1, l2, h2]) - want) <= 1e-12, (l1, h1, l2, h2)
    assert bool(scores[1, :, 0].isnan().all())
    with pytest.raises(ValueError, match="RMSNorm"):
        composition_scores(w, "V", center_writing_weights=True)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_qwen2_layer_types_window_one_layer_and_not_the_other(kernel: str, tmp_path: Path) -> None:
    # Qwen2.5's keys with use_sliding_window on from layer 1 (max_window_layers 1): layer 0 full, layer 1 a window
    # of 4 over 12 positions.
    model = build(FIXTURE_NAMES["qwen2"], tmp_path, kernel, use_sliding_window=True, sliding_window=WINDOW)
    model.config.max_window_layers = 1
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["max_window_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load(tmp_path, kernel)
    adapter = adapt(model)
    assert [spec.window for spec in adapter.specs] == [None, WINDOW]
    ids, mask, positions = left_padded()
    trace = attnlens.trace(model, ids, attention_mask=mask, position_ids=positions, store=["pattern", "q", "k"])
    reference = eager_patterns(model, ids, mask, positions)
    rows = mask.bool()[:, None, :, None]
    full, windowed = trace.pattern(0), trace.pattern(1)
    assert bool((full[0, :, -1, : SEQ - WINDOW] > 0).all())  # full causal: the last query sees the first keys
    assert not bool(windowed[..., WINDOW:, 0].any())  # windowed: they left it
    if kernel == "eager":
        for index in range(N_LAYER):
            assert_bitwise(trace.pattern(index) * rows, reference[index] * rows, "same call", f"layer {index}")
    else:
        for index in range(N_LAYER):  # the same q and k, scores rounded in two kernels' orders
            bound = pattern_bound(trace["q", index], trace["k", index], torch.float32)
            assert_close(trace.pattern(index) * rows, reference[index] * rows, atol=bound, rtol=0.0)
    assert attnlens.verify(model, ids, attention_mask=mask, position_ids=positions).ok


def test_dynamic_rope_and_other_kernels_are_refused_by_name(tmp_path: Path) -> None:
    model = build(FIXTURE_NAMES["llama"], tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(attnlens.UnsupportedModelError, match="dynamic"):
        attnlens.extract_weights(model)


def test_an_edited_config_is_refused_against_the_modules(tmp_path: Path) -> None:
    model = build(FIXTURE_NAMES["mistral"], tmp_path)
    model.config.sliding_window = WINDOW + 1  # the mask would follow the config, the spec must not disagree
    assert adapt(model).specs[0].window == WINDOW + 1
    model.config.num_key_value_heads = 1
    with pytest.raises(attnlens.UnsupportedModelError, match="edited after the model was built"):
        adapt(model)


def llama_device_map(offload_to: str) -> dict[str, str]:
    optional("accelerate")  # transformers loads with a device_map through it
    names = ("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.norm", "lm_head")
    return {**dict.fromkeys(names, "cpu"), "model.layers.1": offload_to}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_every_layer_mapped_by_device_map_verifies_in_half(dtype: torch.dtype, tmp_path: Path) -> None:
    import transformers

    build(FIXTURE_NAMES["qwen3"], tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map=llama_device_map("cpu"), dtype=dtype, attn_implementation="sdpa"
    ).eval()
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == dtype
    ids, mask, positions = left_padded()
    report = attnlens.verify(model, ids, attention_mask=mask, position_ids=positions)
    assert report.ok, str(report)


def test_a_layer_offloaded_to_disk_is_refused_by_name(tmp_path: Path) -> None:
    import transformers

    build(FIXTURE_NAMES["llama"], tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=llama_device_map("disk"), offload_folder=tmp_path / "offload"
    )
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    with pytest.raises(
        attnlens.UnsupportedModelError, match=r"meta device, offloaded by accelerate.*model\.layers\.1\."
    ):
        attnlens.extract_weights(model)


def test_cli_verify_and_weights_on_a_saved_folder(family: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from attnlens.cli import main

    _, folder = family
    ids = [str(i) for i in left_padded()[0][0].tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["verify", str(folder), "--ids", *ids]) == 0
        assert "OK" in capsys.readouterr().out
        assert main(["weights", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "per key/value head" in out and "query head h reads key/value head" in out
        # The default --seq-len is the API's: 50 did not fit n_ctx = 64, nor Mistral's window of 4.
        assert main(["heads", str(folder), "--ids", *ids, "--json", "--top", "100"]) == 0
    table = json.loads(capsys.readouterr().out)
    model = load(folder, "sdpa")
    expected = {
        "previous_token (highest)": metrics.head_scores(attnlens.trace(model, left_padded()[0][:1])).top(
            "previous_token", 100
        ),
        "induction on repeated random tokens": metrics.top_heads(metrics.induction_scores(model, batch=8, seed=0), 100),
    }
    for name, rows in expected.items():
        assert table[name] == [list(row) for row in rows]


def test_cli_weights_states_a_head_dim_that_is_not_d_model_over_heads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Qwen3-4B's head_dim is 128 where hidden_size / heads is 80 (shrunk: 8 of 40 / 8 = 5); the command printed
    # "d_head = 40 / 8 = 8".
    from attnlens.cli import main

    model = build("Qwen__Qwen3-4B.copied-4.51.2.json", tmp_path)
    w = attnlens.extract_weights(model)
    assert (w.d_model, w.n_heads, w.d_head, w.n_kv_heads) == (40, 8, D_HEAD, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["weights", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "heads: 8 per layer (2 key/value heads, each read by 4), d_head = 8 (its own setting: d_model / heads" in out
    assert "40 / 8 = 8" not in out


def test_decompose_and_ablate_where_the_heads_are_wider_than_d_model(tmp_path: Path) -> None:
    # Qwen3-4B: 8 heads of 8 features read a 40-wide residual. The heads' z (64 wide) was gathered at the chosen
    # positions with a d_model-wide index (decompose failed in an einsum), and zero ablation replaced it by a
    # d_model-wide zero (a broadcast error).
    model = build("Qwen__Qwen3-4B.copied-4.51.2.json", tmp_path)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        with attnlens.ablate(model, [(1, 3)]):
            ablated = model(input_ids=ids, attention_mask=mask).logits

        def zero_head(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0].index_fill(-1, torch.arange(3 * D_HEAD, 4 * D_HEAD), 0.0),)

        handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_head)
        try:
            by_hand = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
    assert_bitwise(ablated, by_hand, "same kernel")  # the same o_proj on the same zeroed z
    assert bool(attnlens.head_importance(model, ids, mask).isfinite().all())
    d = decompose(model, ids, mask, positions=[0, -1], position_ids=positions)
    d.check()
    # Its tolerance counts the o_proj's 64 products per output, not the residual's 40.
    _, tolerance = d.errors()
    _, cancellation = attnlens.attribution.residual_error(d.contributions, d.residual, d.valid)
    assert tolerance == attnlens.attribution.check_tolerance(torch.float32, N_LAYER, 40, cancellation, d_attn=64)
    targets = ids.gather(1, d.positions).roll(1, 0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
    expected = logits.gather(1, d.positions[..., None].expand(-1, -1, logits.shape[-1])).gather(-1, targets[..., None])
    total = d.logit_attribution(targets).sum(0).double() + d.logit_bias(targets).double()
    assert bool(((total - expected[..., 0]).abs() <= d.logit_bound(targets).double()).all())


def test_induction_on_repeated_tokens_stays_inside_the_sliding_window(tmp_path: Path) -> None:
    # Mistral's window of 4 keys: the default seq_len (min(50, 64 // 2) = 32) put every target 31 keys back, outside
    # every window, and every head scored exactly 0.
    model = build(FIXTURE_NAMES["mistral"], tmp_path, bos_token_id=1, eos_token_id=2)
    scores = metrics.induction_scores(model, batch=2, seed=3)
    half = torch.randint(0, VOCAB, (2, WINDOW), generator=torch.Generator().manual_seed(3))
    tr = attnlens.trace(model, torch.cat([half, half], -1))
    rows = torch.arange(WINDOW, 2 * WINDOW)
    by_hand = torch.stack([tr.pattern(layer)[:, :, rows, rows - WINDOW + 1].mean((0, 2)) for layer in tr.layers])
    assert_close(scores, by_hand)  # the same pattern entries, averaged over another index path
    assert bool((scores > 0).all())
    with pytest.raises(ValueError, match=r"outside the sliding window of layers \[0, 1\].*seq_len <= 4"):
        metrics.induction_scores(model, seq_len=WINDOW + 1)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_scan_equals_trace_and_metrics_on_the_same_windows(family: tuple[str, Path], kernel: str) -> None:
    # Every query head, grouped keys, and (Mistral) a sliding window of 4 in windows of 12: the statistics scan takes
    # from q, k and each row's log-sum-exp are those of the trace's pattern, which is the kernel's own (eager) or
    # within rounding of it (sdpa).
    _, folder = family
    model = load(folder, kernel)
    docs = token_docs(vocab=12)
    windows, _ = pack(docs, SEQ, eot=2)  # the fixture's eos_token_id
    result = attnlens.scan(model, docs, seq_len=SEQ, batch_size=3, progress=False)
    assert result.n_windows == windows.shape[0]
    tr = attnlens.trace(model, windows, attention_mask=torch.ones_like(windows))
    expected = {
        "previous_token": metrics.previous_token_scores(tr),
        "duplicate_token": metrics.duplicate_token_scores(tr),
        "induction": metrics.induction_scores(tr),
        "first_token": metrics.first_token_scores(tr),
        "entropy": metrics.entropy(tr),
    }
    for name in ("distance", "self"):
        values = []
        for layer in tr.layers:
            v, rows = reference_rows(tr.pattern(layer), name, windows)
            values.append(v.permute(1, 0, 2)[:, rows])  # [head, row]
        expected[name] = torch.stack(values).mean(-1)
    assert set(expected) == set(result.mean)
    for name, value in expected.items():  # as test_scan's GPT-2 check: float32 patterns, float64 sums
        assert result.mean[name].shape == (N_LAYER, adapt(model).n_heads), name
        assert_close(result.mean[name], value.double(), rtol=1e-6, atol=1e-6, msg=name)


def one_column_off(weights: Any, layer: int, head: int, name: str, factor: float) -> Any:
    """A copy of ``weights`` with one feature (column 0) of one head's ``name`` scaled: a direction changes, so even a
    per-head norm after the projection (Qwen3's q_norm / k_norm, which cancels a uniform scale) cannot hide it."""
    import dataclasses

    old = weights.layers[layer]
    tensor = getattr(old, name).detach().clone()
    tensor[head, :, 0] *= factor
    layers = list(weights.layers)
    layers[layer] = dataclasses.replace(old, **{name: tensor})
    return dataclasses.replace(weights, layers=tuple(layers))


@pytest.mark.parametrize(("name", "where"), [("W_Q", "q"), ("W_K", "k"), ("W_V", "v")])
def test_verify_names_the_corrupted_key_value_head_and_its_query_heads(
    family: tuple[str, Path], name: str, where: str
) -> None:
    # Under grouped-query attention a corrupted key/value head must show in its own row and in the rows of exactly the
    # query heads of its group (their patterns for W_K, their z for W_V), at that layer only.
    _, folder = family
    model = load(folder, "sdpa")
    ids, mask, positions = left_padded()
    weights = attnlens.extract_weights(model)
    group = weights.n_heads // weights.n_kv_heads
    head = 1 if name == "W_Q" else weights.n_kv_heads - 1  # the last key/value head (the only one under MQA)
    # 1% on one feature: large enough to reach the patterns and z downstream, not only the row where it is made.
    corrupt = one_column_off(weights, 1, head, name, 1.01)
    report = attnlens.verify(model, ids, mask, position_ids=positions, weights=corrupt)
    assert not report.ok
    failed = {(row.layer, row.quantity, row.head) for row in report.failures}
    assert (1, where, head) in failed
    readers = {head} if name == "W_Q" else set(range(head * group, (head + 1) * group))
    per_head = {(quantity, h) for layer, quantity, h in failed if h is not None}
    downstream = "z" if name == "W_V" else "pattern"
    assert {h for quantity, h in per_head if quantity == downstream}  # seen where it is read, not only where made
    assert {h for quantity, h in per_head if quantity in ("pattern", "z")} <= readers
    assert {h for quantity, h in per_head if quantity == where} == {head}
    assert all(layer in (1, None) for layer, _, _ in failed)


def test_verify_catches_a_rotation_that_is_not_the_captured_one(
    family: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model rotates with the wrong sign of sin: its patterns are no longer those of its cos/sin, at every layer.
    import importlib

    _, folder = family
    model = load(folder, "sdpa")
    ids, mask, positions = left_padded()
    module = importlib.import_module(type(model).__module__)
    rotate = module.apply_rotary_pos_emb
    monkeypatch.setattr(
        module, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: rotate(q, k, cos, -sin, *a, **kw)
    )
    report = attnlens.verify(model, ids, mask, position_ids=positions)
    assert not report.ok
    assert {row.layer for row in report.failures if row.quantity == "pattern"} == set(range(N_LAYER))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on 5.x
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["down_proj"]], ids=["attention", "mlp"])
def test_lora_states_as_users_leave_them(family: tuple[str, Path], targets: list[str]) -> None:
    # The usual Llama LoRA (q_proj, v_proj) and one on the MLP alone: active and unmerged is refused by name (the
    # weights would not be what runs); disabled, merged, and merge_and_unload() verify as the base model does.
    import copy

    peft = optional("peft")
    _, folder = family
    ids, mask, positions = left_padded()
    wrapped = peft.get_peft_model(
        load(folder, "sdpa"), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    )
    for holder in (wrapped, wrapped.get_base_model()):
        with pytest.raises(attnlens.UnsupportedModelError, match=r"active and unmerged.*merge_and_unload\(\)"):
            attnlens.trace(holder, ids, mask)
    with wrapped.disable_adapter():
        assert attnlens.verify(wrapped, ids, mask, position_ids=positions).ok
    merged = copy.deepcopy(wrapped).merge_and_unload()
    wrapped.merge_adapter()
    assert attnlens.verify(wrapped, ids, mask, position_ids=positions).ok
    assert type(merged).__name__.endswith("ForCausalLM")
    assert attnlens.verify(merged, ids, mask, position_ids=positions).ok


@pytest.mark.parametrize("use_cache", [False, True])
def test_captured_q_and_k_are_laid_out_as_the_models_rotated_ones(family: tuple[str, Path], use_cache: bool) -> None:
    # The eager kernel multiplies the rotated q and k as they come (strided: rotated as [batch, pos, head, d_head],
    # then transposed). A contiguous copy's matmul rounds differently on MKL's conservative path (MKL_CBWR=COMPATIBLE
    # with torch's portable kernels): verify's pattern_hf_order missed SmolLM2-1.7B's eager pattern by one ulp there.
    from test_hub_configs_llama import recording

    from attnlens.capture import forward_hooks
    from attnlens.patterns import qkv_hooks

    family_name, folder = family
    model = load(folder, "eager")
    adapter = adapt(model)
    got: dict[int, Any] = {}
    on_qkv, rotations = qkv_hooks(adapter, list(range(N_LAYER)), lambda layer, qkv: got.__setitem__(layer, qkv))
    ids, mask, positions = left_padded()
    with (
        torch.no_grad(),
        recording(model, family_name) as calls,
        forward_hooks(rotations, pre=True, with_kwargs=True),
        forward_hooks(on_qkv),
    ):
        adapter.sites.run(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)

    def layout(x: torch.Tensor) -> list[tuple[int, int]]:  # a dimension of size 1 has no stride that matters
        return [(size, stride) for size, stride in zip(x.shape, x.stride(), strict=True) if size > 1]

    for layer in range(N_LAYER):
        q, k, _ = got[layer]
        for mine, own in ((q, calls[layer]["q_rot"]), (k, calls[layer]["k_rot"])):
            assert mine.shape == own.shape and layout(mine) == layout(own), (layer, mine.stride(), own.stride())
            assert_bitwise(mine, own, "same kernel", f"layer {layer}")
