"""trace_generate on the Llama family: rows per query head and the per-kv_head cache against full eager traces.

The models are the shrunk published configs of tests/test_llama.py with seeded random weights: Llama-3.2-1B (8 query
heads on 2 key/value heads, llama3 rope scaling, tied embeddings), Qwen2.5-3B (q/k/v biases, multi-query: 8 query heads
on 1 key/value head), Qwen3-8B (per-head q_norm/k_norm, 8 on 2, untied) and Mistral-7B-Instruct-v0.1 (8 on 2, its
sliding window widened to 16 so that the 11-token sequences fit in it). Their cached keys are post-rotary and per
key/value head; check() compares them per kv_head with the full-sequence trace's.

Sliding windows that the sequence could outgrow are refused by name before generating: past the window both releases'
sliding cache layers drop keys (the last tests show what they keep).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise
from test_generation import PROMPTS, cached_key_edited, eager_twin, shift_positions_at_step, state
from test_hub_configs_llama import D_HEAD, N_LAYER
from test_llama import FIXTURE_NAMES, build, load

import attnlens
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models import adapt

STEPS, N_HEADS = 6, 8
N_KV = {"llama": 2, "mistral": 2, "qwen2": 1, "qwen3": 2}
WIDE = 16  # Mistral's window in the main tests: wider than prompt (5) + STEPS


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each family's checkpoint folder, saved once per module on first use."""
    saved: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in saved:
            saved[name] = tmp_path_factory.mktemp(f"{name}-gen")
            wide = {"sliding_window": WIDE} if name == "mistral" else {}
            build(FIXTURE_NAMES[name], saved[name], bos_token_id=1, eos_token_id=2, **wide)
        return saved[name]

    return folder


@pytest.fixture(scope="module", params=sorted(FIXTURE_NAMES))
def family(request: pytest.FixtureRequest, folders: Callable[[str], Path]) -> tuple[str, Path]:
    return request.param, folders(request.param)


def generate(model: Any, batch: int, **options: Any) -> Any:
    ids, mask = PROMPTS[batch]
    options = {"max_new_tokens": STEPS, "do_sample": False, "eos_token_id": None, **options}
    return attnlens.trace_generate(model, ids, mask, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_match_a_full_sequence_eager_trace(
    family: tuple[str, Path], kernel: str, dtype: torch.dtype, batch: int
) -> None:
    name, folder = family
    model = load(folder, kernel, dtype)
    adapter = adapt(model)
    assert (adapter.n_heads, adapter.n_kv_heads) == (N_HEADS, N_KV[name])
    if name == "mistral":
        assert [spec.window for spec in adapter.specs] == [WIDE] * N_LAYER  # a window, never reached here
    g = generate(model, batch)
    assert g.sequences.shape == (batch, 5 + STEPS)
    # Rows per query head; the cache per key/value head, as the model keeps it.
    assert g.rows.shape == (N_LAYER, batch, N_HEADS, STEPS, 5 + STEPS - 1) and g.kv_group == N_HEADS // N_KV[name]
    assert g.cache_keys.shape == (N_LAYER, batch, N_KV[name], 5 + STEPS - 1, D_HEAD)
    expected = torch.tensor([[2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9]])[2 - batch :]  # the mask's (row 0: 2 padding)
    assert g.positions is not None and torch.equal(g.positions, expected)
    unit = torch.finfo(dtype).eps / 2
    for step in range(g.n_steps):
        row = g.row(step, N_LAYER - 1)
        # A distribution over at most 10 keys: its sum is 1 within 10 roundings of the stored dtype.
        torch.testing.assert_close(row.float().sum(-1), torch.ones(batch, N_HEADS), rtol=0, atol=10 * unit)
        if batch == 2:
            assert not row[0, :, :2].any()  # left padding gets nothing
    # Query heads that share a key/value head still have rows of their own (their queries differ).
    assert not torch.equal(g.row(STEPS - 1, 0)[:, 0], g.row(STEPS - 1, 0)[:, 1])
    # Each step's rows and the per-kv_head post-rotary cache against one full-sequence trace by an eager copy; the
    # tolerances are derived (generation_trace.py) and check() raises past them.
    report = g.check(eager_twin(model))
    assert report.ok and set(report.largest) == {"rows", "keys", "values"}
    assert max(report.largest.values()) < 1


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_cached_keys_are_the_models_own_per_kv_head(family: tuple[str, Path], kernel: str) -> None:
    """The kept cache is a copy of what a plain generate leaves in its cache, bit for bit (the same forward passes)."""
    _, folder = family
    model = load(folder, kernel)
    ids, mask = PROMPTS[2]
    g = generate(model, 2)
    out = copy.deepcopy(model).generate(
        ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, g.sequences)
    adapter = adapt(model)
    for layer in range(N_LAYER):
        k, v = adapter.cached_kv(out.past_key_values, layer)
        assert_bitwise(g.cache_keys[layer], k[:, :, : 5 + STEPS - 1], "copy", f"keys, layer {layer}")
        assert_bitwise(g.cache_values[layer], v[:, :, : 5 + STEPS - 1], "copy", f"values, layer {layer}")


def test_eager_rows_are_the_kernels_own_per_query_head(family: tuple[str, Path]) -> None:
    """Under eager the rows are copies of generate's own output_attentions, query head by query head."""
    _, folder = family
    model = load(folder, "eager")
    ids, mask = PROMPTS[2]
    g = generate(model, 2, max_new_tokens=4)
    out = copy.deepcopy(model).generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=None,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, g.sequences)
    for step, layers in enumerate(out.attentions):
        for layer, pattern in enumerate(layers):
            assert pattern.shape[1] == N_HEADS
            assert_bitwise(g.row(step, layer), pattern[:, :, -1, : 5 + step], "copy", f"step {step}, layer {layer}")
    # A subset of heads from both key/value groups: the same copies; check() still compares every kv_head's cache.
    some = generate(model, 2, max_new_tokens=4, heads=[1, 6], layers=[1])
    assert_bitwise(some.row(3, 1), g.row(3, 1)[:, [1, 6]], "copy")
    assert some.cache_keys.shape[2] == adapt(model).n_kv_heads and some.check().ok


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_check_catches_a_position_offset_at_its_step(folders: Callable[[str], Path], name: str) -> None:
    model = load(folders(name), "sdpa")
    calls = shift_positions_at_step(model, 3)  # step 3 rotates its query and its new key one position too far
    g = generate(model, 2)
    assert len(calls) == STEPS
    report = g.check(raise_error=False)
    assert report.mismatches[0].startswith("step 3, sequence 0: the query ran at position 6, the mask puts it at 5")
    assert not any(line.startswith(("step 0,", "step 1,", "step 2,")) for line in report.mismatches)
    # Without the recorded positions the rotation itself names it: step 3's rows and the key it wrote, from layer 0.
    from dataclasses import replace

    report = replace(g, positions=None).check(raise_error=False)
    assert report.mismatches[0].startswith("step 3, layer 0, head ")
    assert not any(line.startswith(("step 0,", "step 1,", "step 2,")) for line in report.mismatches)
    # Layer 0's keys depend on the token and its position only: just the key step 3 wrote (position prompt_len - 1 +
    # 3 = 7) is off, in both kv_heads. Deeper layers' later keys may follow from step 3's changed output.
    keys = [line for line in report.mismatches if "cached keys" in line]
    layer_0 = [line for line in keys if ", layer 0," in line]
    assert layer_0 and all("position 7 " in line for line in layer_0)
    assert {line.split(",")[2].split(" (")[0] for line in layer_0} == {" kv_head 0", " kv_head 1"}
    assert any(", layer 1," in line and "position 7 " in line for line in keys)
    assert all(int(line.split("position ")[1].split(" ")[0]) >= 7 for line in keys)
    with pytest.raises(AttentionCaptureError, match="step 3"):
        g.check()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_an_edited_cache_entry_is_named_at_its_step_layer_and_kv_head(
    folders: Callable[[str], Path], name: str, kernel: str
) -> None:
    model = load(folders(name), kernel)
    with cached_key_edited(model, step=4, layer=1, position=3, kv_heads=1):  # kv_head 1, before layer 1 reads it
        g = generate(model, 2)
    report = g.check(raise_error=False)
    rows = [line for line in report.mismatches if "row differs" in line]
    keys = [line for line in report.mismatches if "cached keys" in line]
    assert rows and rows[0].startswith("step 4, layer 1, head ")
    # Only query heads 4-7 read kv_head 1: their rows, never those of heads 0-3.
    assert {int(line.split("head ")[1].split(":")[0]) for line in rows if "layer 1," in line} <= {4, 5, 6, 7}
    assert keys and all("layer 1, kv_head 1 (query heads 4-7): cached keys at position 3 " in line for line in keys)
    assert not any("layer 0," in line or "values" in line for line in report.mismatches)
    assert not any(line.startswith(("step 1,", "step 2,", "step 3,")) for line in rows)


def test_sampling_return_sequences_and_static_cache(family: tuple[str, Path]) -> None:
    _, folder = family
    model = load(folder, "sdpa")
    ids, mask = PROMPTS[2]
    options = {"max_new_tokens": 4, "do_sample": True, "num_return_sequences": 2, "eos_token_id": None}
    torch.manual_seed(3)
    plain = copy.deepcopy(model).generate(ids, attention_mask=mask, **options)
    before = state(model)
    torch.manual_seed(3)
    g = attnlens.trace_generate(model, ids, mask, **options)
    assert torch.equal(g.sequences, plain) and g.check().ok  # the hooks draw no random numbers
    assert torch.equal(g.prompt_mask, mask.repeat_interleave(2, dim=0))
    dynamic = generate(model, 2)
    static = generate(model, 2, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences) and static.check().ok
    assert static.cache_keys.shape == dynamic.cache_keys.shape
    assert state(model) == before


# ---------------------------------------------------------------------------------------------- sliding windows ---

WINDOWED = {
    # Mistral: every layer; Qwen2: use_sliding_window from max_window_layers on (layer 1); Qwen3: per layer_types.
    "mistral": ({"sliding_window": 8}, [0, 1]),
    "qwen2": ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, [1]),
    "qwen3": (
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        [0],
    ),
}


def windowed(name: str, folder: Path, kernel: str = "sdpa") -> Any:
    overrides, layers = WINDOWED[name]
    model = build(FIXTURE_NAMES[name], folder, kernel, bos_token_id=1, eos_token_id=2, **overrides)
    assert [layer for layer, spec in enumerate(adapt(model).specs) if spec.window == 8] == layers
    return model


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_a_sequence_that_fits_in_the_window_is_traced_exactly(
    name: str, kernel: str, cache: str | None, tmp_path: Path
) -> None:
    model = windowed(name, tmp_path, kernel)
    g = generate(model, 2, max_new_tokens=3, cache_implementation=cache)  # 5 + 3 = 8 tokens: the window's size
    assert g.n_steps == 3 and g.cache_keys.shape[3] == 7
    assert bool((g.row(2, 0)[1] > 0).all())  # the last query sees all 7 keys of the unpadded row
    report = g.check(eager_twin(model))
    assert report.ok and max(report.largest.values()) < 1


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_a_window_the_sequence_could_outgrow_is_refused_before_generating(name: str, tmp_path: Path) -> None:
    model = windowed(name, tmp_path)
    _, layers = WINDOWED[name]
    before = state(model)
    calls: list[int] = []
    model.prepare_inputs_for_generation = lambda *a, **k: calls.append(1)  # generate must never get that far
    names = ", ".join(map(str, layers))
    named = rf"sliding-window attention .* layer\(s\) {names} attend to at most 8 keys"
    with pytest.raises(UnsupportedModelError, match=named):
        generate(model, 2, max_new_tokens=4)  # 9 tokens
    with pytest.raises(UnsupportedModelError, match=r"may run 20 tokens \(prompt 5 \+ up to 15 new\)"):
        generate(model, 2, max_new_tokens=None, max_length=20)  # generate's own length rule
    del model.prepare_inputs_for_generation
    assert not calls and state(model) == before
    others = [layer for layer in range(N_LAYER) if layer not in layers]
    if others:
        # The named remedy: the layers without a window are traced exactly past the other layers' window.
        with pytest.raises(UnsupportedModelError, match=re.escape(f"trace only the other layers (layers={others})")):
            generate(model, 2)
        g = generate(model, 2, layers=others)
        assert g.n_steps == STEPS and g.check(eager_twin(model)).ok


@pytest.mark.parametrize("cache", [None, "static"])
def test_why_past_the_window_sliding_caches_drop_keys(cache: str | None, tmp_path: Path) -> None:
    """What a plain generate leaves past the window (this release): the sliding layer's cache is shorter than the
    sequence (window - 1 keys in DynamicSlidingWindowLayer, window slots rolled in StaticSlidingWindowLayer), the full
    layer's is not. The rows of the steps past the window could not be recomputed from it."""
    model = windowed("qwen2", tmp_path)
    ids, mask = PROMPTS[2]
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        eos_token_id=None,
        return_dict_in_generate=True,
        cache_implementation=cache,
    )
    adapter = adapt(model)
    full, sliding = (adapter.cached_kv(out.past_key_values, layer)[0].shape[2] for layer in range(N_LAYER))
    assert full >= 5 + STEPS - 1
    assert sliding == (7 if cache is None else 8) < 5 + STEPS - 1


def test_save_load_keeps_the_kv_layout(family: tuple[str, Path], tmp_path: Path) -> None:
    name, folder = family
    model = load(folder, "sdpa")
    g = generate(model, 2, max_new_tokens=3)
    path = tmp_path / "g.safetensors"
    g.save(path)
    loaded = attnlens.GenerationTrace.load(path)
    assert loaded.kv_group == N_HEADS // N_KV[name]
    assert_bitwise(loaded.cache_keys, g.cache_keys, "copy")
    assert loaded.check(model).ok
    assert json.loads(g.to_json())["n_steps"] == 3


def test_tracing_generation_around_the_users_own_sampled_generate(family: tuple[str, Path]) -> None:
    _, folder = family
    model = load(folder, "sdpa")
    ids, mask = PROMPTS[2]
    options = {"max_new_tokens": 4, "do_sample": True, "num_return_sequences": 2, "eos_token_id": None}
    torch.manual_seed(5)
    plain = copy.deepcopy(model).generate(ids, attention_mask=mask, **options)
    before = state(model)
    torch.manual_seed(5)
    with attnlens.tracing_generation(model) as gen:
        out = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(out, plain) and torch.equal(gen.trace.sequences, plain)
    assert gen.trace.rows.shape == (N_LAYER, 4, N_HEADS, 4, 5 + 3) and gen.trace.check().ok
    assert state(model) == before
