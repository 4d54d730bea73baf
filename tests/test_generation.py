"""trace_generate: every step's rows against a full-sequence eager trace, the cache check, refusals, state, files."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, make_gpt2

import attnlens
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models import adapt

PROMPTS = {
    1: (torch.tensor([[5, 6, 7, 8, 9]]), None),
    2: (torch.tensor([[3, 3, 5, 6, 7], [11, 12, 13, 14, 15]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),
}


def eager_twin(model: Any) -> Any:
    """A deep copy run by the eager kernel: the full-sequence reference the rows are checked against."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def state(model: Any) -> dict[str, Any]:
    """What trace_generate must leave as it found: attributes, generation config, hooks, kernel, training flags."""
    return {
        "attributes": {k: id(v) for k, v in vars(model).items()},
        "generation_config": model.generation_config.to_dict(),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "kernel": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "use_cache": model.config.use_cache,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_match_a_full_sequence_eager_trace(kernel: str, dtype: torch.dtype, batch: int) -> None:
    model = make_gpt2(attn_implementation=kernel, n_layer=3).to(dtype)
    ids, mask = PROMPTS[batch]
    g = attnlens.trace_generate(model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert g.sequences.shape == (batch, 11) and g.rows.shape == (3, batch, 4, 6, 10)
    for step in range(g.n_steps):
        row = g.row(step, 2)
        assert row.shape == (batch, 4, 5 + step)
        # Each row is a distribution over real keys only (padding keys get nothing).
        torch.testing.assert_close(row.float().sum(-1), torch.ones(batch, 4), rtol=0, atol=8 * 2.0**-8)
        if mask is not None:
            assert not row[0, :, :2].any()
    report = g.check(eager_twin(model))  # raises on a mismatch; the tolerances are derived (generation_trace.py)
    assert report.ok and max(report.largest.values()) < 1


def test_eager_rows_are_the_kernels_own_bitwise() -> None:
    """Under eager the stored rows are copies of the probabilities generate's own output_attentions returns."""
    model = make_gpt2()
    ids, mask = PROMPTS[2]
    g = attnlens.trace_generate(model, ids, mask, max_new_tokens=4, eos_token_id=None)
    twin = copy.deepcopy(model)
    out = twin.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        eos_token_id=None,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, g.sequences)
    for step, layers in enumerate(out.attentions):
        for layer, pattern in enumerate(layers):
            assert_bitwise(g.row(step, layer), pattern[:, :, -1, : 5 + step], "copy", f"step {step}, layer {layer}")


def shift_positions_at_step(model: Any, step: int) -> list[int]:
    """Make generate run step ``step``'s query (and the key it writes) one position too far; the calls, counted."""
    prepare = model.prepare_inputs_for_generation
    calls: list[int] = []

    def shifted(*args: Any, **kwargs: Any) -> Any:
        inputs = prepare(*args, **kwargs)
        calls.append(1)
        if len(calls) == step + 1:
            inputs["position_ids"] = inputs["position_ids"] + 1
        return inputs

    model.prepare_inputs_for_generation = shifted
    return calls


def test_check_catches_a_position_offset_at_its_step() -> None:
    model = make_gpt2(n_layer=3)
    ids, mask = PROMPTS[2]
    shift_positions_at_step(model, 3)
    g = attnlens.trace_generate(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    report = g.check(raise_error=False)
    assert not report.ok
    assert report.mismatches[0].startswith("step 3, sequence 0: the query ran at position 6, the mask puts it at 5")
    # Without the recorded positions (a rotary model has none) the cache and rows name it: step 3, layer 0.
    from dataclasses import replace

    blind = replace(g, positions=None).check(raise_error=False)
    assert blind.mismatches[0].startswith("step 3, layer 0, head ")
    assert not any(line.startswith(("step 0", "step 1", "step 2")) for line in blind.mismatches)
    with pytest.raises(AttentionCaptureError, match="step 3"):
        g.check()


@contextlib.contextmanager
def cached_key_edited(
    model: Any, *, step: int, layer: int, position: int, kv_heads: Any = slice(None)
) -> Iterator[None]:
    """Within the block, generate's cache gets 0.5 added to ``layer``'s keys at ``position`` (of ``kv_heads``) just
    before that layer reads them at step ``step``: one edited entry, found by check() there and nowhere earlier."""
    adapter = adapt(model)
    seen: dict[str, Any] = {"step": -1}

    def on_base(module: Any, args: Any, kwargs: Any) -> None:
        seen["step"] += 1
        seen["cache"] = adapter.step_cache(kwargs)

    def on_attn(module: Any, args: Any, kwargs: Any) -> None:
        if seen["step"] == step:
            adapter.cached_kv(seen["cache"], layer)[0][:, kv_heads, position] += 0.5

    handles = [
        adapter.sites.base.register_forward_pre_hook(on_base, with_kwargs=True),
        adapter.sites.layers[layer].attn.register_forward_pre_hook(on_attn, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_check_catches_an_edited_cache_entry_at_its_step_and_layer(kernel: str) -> None:
    model = make_gpt2(attn_implementation=kernel, n_layer=3)
    ids, mask = PROMPTS[2]
    with cached_key_edited(model, step=4, layer=1, position=3):  # before layer 1 reads it at step 4
        g = attnlens.trace_generate(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    report = g.check(raise_error=False)
    rows = [line for line in report.mismatches if "row differs" in line]
    keys = [line for line in report.mismatches if "cached keys" in line]
    assert rows and rows[0].startswith("step 4, layer 1, head ")
    # The edited entry is the only layer-1 key off; what differs in layer 2 follows from step 4's changed output.
    layer_1 = [line for line in keys if "layer 1," in line]
    assert layer_1 and all("position 3 " in line for line in layer_1)
    assert all("position 3 " in line or "layer 2," in line for line in keys)
    assert not any("layer 0," in line for line in report.mismatches)
    assert not any(line.startswith(("step 1,", "step 2,", "step 3,")) for line in rows)


def test_sampling_with_return_sequences_is_generates_own() -> None:
    model = make_gpt2()
    ids, mask = PROMPTS[2]
    options = {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 3, "eos_token_id": None}
    torch.manual_seed(7)
    plain = copy.deepcopy(model).generate(ids, attention_mask=mask, **options)
    torch.manual_seed(7)
    g = attnlens.trace_generate(model, ids, mask, **options)
    assert torch.equal(g.sequences, plain)  # the hooks draw no random numbers
    assert g.rows.shape[1] == 6 and torch.equal(g.prompt_mask, mask.repeat_interleave(3, dim=0))
    assert g.check().ok


def test_early_stop_on_eos_is_marked_per_row() -> None:
    model = make_gpt2()
    ids, mask = PROMPTS[2]
    greedy = copy.deepcopy(model).generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    eos = int(greedy[0, 5 + 2])  # sequence 0 picks this token at step 2 (or earlier)
    first = [row.tolist().index(eos) if eos in row.tolist() else 6 for row in greedy[:, 5:]]
    g = attnlens.trace_generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    assert g.finished_at.tolist() == first and first[0] <= 2
    assert (g.sequences[0, 5 + first[0] + 1 :] == 1).all()  # after eos: the pad token, as generate writes it
    assert g.check().ok  # rows after eos are the model's own computation on the pad token


def test_static_cache_matches_dynamic() -> None:
    model = make_gpt2()
    ids, mask = PROMPTS[2]
    dynamic = attnlens.trace_generate(model, ids, mask, max_new_tokens=5, eos_token_id=None)
    before = state(model)
    static = attnlens.trace_generate(
        model, ids, mask, max_new_tokens=5, eos_token_id=None, cache_implementation="static"
    )
    assert state(model) == before  # generate's remembered static-cache length is undone
    assert torch.equal(static.sequences, dynamic.sequences)
    assert static.check().ok
    assert static.cache_keys.shape == dynamic.cache_keys.shape


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_beams": 2}, "beam search"),
        ({"prompt_lookup_num_tokens": 2}, "assisted decoding"),
        ({"use_cache": False}, "use_cache=False"),
        ({"cache_implementation": "offloaded"}, "'offloaded'"),
        ({"disable_compile": False}, "disable_compile=False"),
    ],
)
def test_refused_by_name(options: dict[str, Any], named: str) -> None:
    model = make_gpt2()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=named):
        attnlens.trace_generate(model, PROMPTS[1][0], max_new_tokens=2, **options)
    assert state(model) == before


def test_refuses_assistant_model_right_padding_and_headless_models() -> None:
    model = make_gpt2()
    with pytest.raises(UnsupportedModelError, match="assisted decoding"):
        attnlens.trace_generate(model, PROMPTS[1][0], max_new_tokens=2, assistant_model=make_gpt2())
    with pytest.raises(ValueError, match="pad on the left"):
        attnlens.trace_generate(model, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        attnlens.trace_generate(make_gpt2("GPT2Model"), PROMPTS[1][0], max_new_tokens=2)


def test_model_left_as_found_when_generation_raises() -> None:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Boom(LogitsProcessor):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return scores

    model = make_gpt2(attn_implementation="sdpa")
    model.train()
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        attnlens.trace_generate(
            model,
            PROMPTS[1][0],
            max_new_tokens=5,
            logits_processor=LogitsProcessorList([Boom()]),
            cache_implementation="static",
        )
    assert state(model) == before


def test_layers_heads_save_load_and_views(tmp_path: Any) -> None:
    model = make_gpt2(n_layer=3)
    ids, mask = PROMPTS[2]
    g = attnlens.trace_generate(model, ids, mask, layers=[2, 0], heads=[1, 3], max_new_tokens=4, eos_token_id=None)
    full = attnlens.trace_generate(model, ids, mask, max_new_tokens=4, eos_token_id=None)
    assert_bitwise(g.row(3, 0), full.row(3, 0)[:, [1, 3]], "copy")  # the same copies of the kernel's rows
    path = tmp_path / "g.safetensors"
    g.save(path)
    loaded = attnlens.GenerationTrace.load(path)
    assert loaded.layers == (2, 0) and loaded.heads == (1, 3) and loaded.provenance == g.provenance
    for name in ("sequences", "rows", "cache_keys", "cache_values", "finished_at", "positions"):
        assert_bitwise(getattr(loaded, name), getattr(g, name), "copy", name)
    with pytest.raises(ValueError, match="pass the model"):
        loaded.check()
    assert loaded.check(model).ok
    square = g.to_trace()
    assert square.pattern(2).shape == (2, 2, 8, 8)
    html = str(g.view(1, heads=[(2, 1)]))
    assert "attnlens-text" in html


def test_demo_model_and_cli(tmp_path: Any) -> None:
    from attnlens.cli import main

    model, tokenizer = attnlens.load_demo()
    text = "The cat sat on the"
    g = attnlens.trace_generate(eager_twin(model), text, max_new_tokens=6, tokenizer=tokenizer, eos_token_id=None)
    assert torch.equal(g.sequences[:, : g.prompt_len], tokenizer(text, return_tensors="pt")["input_ids"])
    assert len(g.step_tokens()) == 6 and g.tokens is not None and g.tokens[0][0] == "The"
    assert g.check(model).ok  # eager steps against the demo's own (sdpa) full-sequence trace
    out = tmp_path / "view.html"
    assert main(["generate", "--prompt", "The cat sat on the", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert "attnlens-text" in out.read_text()


def test_a_window_the_sequence_could_outgrow_is_refused_before_generating() -> None:
    """A traced layer's window must hold the whole sequence: within it the rows are complete, past it named."""
    from dataclasses import replace

    model = make_gpt2(attn_implementation="sdpa")
    adapter = adapt(model)
    windowed = replace(adapter, kernel_specs=tuple(replace(spec, window=7) for spec in adapter.kernel_specs))
    g = attnlens.trace_generate(windowed, PROMPTS[1][0], max_new_tokens=2, eos_token_id=None)  # 5 + 2 = 7 tokens
    assert g.check().ok and bool((g.row(1, 1) > 0).all())  # the last query sees all 6 keys: the window never bit
    before = state(model)
    named = r"sliding-window attention .* layer\(s\) 0, 1 .*\(max_new_tokens=2 or fewer\)"
    with pytest.raises(UnsupportedModelError, match=named):
        attnlens.trace_generate(windowed, PROMPTS[1][0], max_new_tokens=3, eos_token_id=None)
    assert state(model) == before


def test_concurrent_calls_on_one_model_are_each_their_own() -> None:
    import threading

    model = make_gpt2(attn_implementation="sdpa")
    ids, mask = PROMPTS[2]
    alone = attnlens.trace_generate(model, ids, mask, max_new_tokens=4, eos_token_id=None)
    results: list[Any] = [None] * 4

    def run(i: int) -> None:
        results[i] = attnlens.trace_generate(model, ids, mask, max_new_tokens=4, eos_token_id=None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for g in results:
        assert torch.equal(g.sequences, alone.sequences)
        assert_bitwise(g.rows, alone.rows, "same call")


def test_tracing_generation_records_the_users_own_generate_calls() -> None:
    model = make_gpt2(attn_implementation="sdpa", n_layer=3)
    ids, mask = PROMPTS[2]
    options = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None}
    plain = copy.deepcopy(model).generate(ids, attention_mask=mask, **options)
    alone = attnlens.trace_generate(model, ids, mask, layers=[2, 0], heads=[1, 3], **options)
    before = state(model)
    with attnlens.tracing_generation(model, layers=[2, 0], heads=[1, 3]) as gen:
        with pytest.raises(ValueError, match="no generate"):
            gen.trace  # noqa: B018 - the property raises before any call
        out = model.generate(ids, attention_mask=mask, **options)  # what generate returns: the sequences
        assert torch.equal(out, plain)
        full = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **options)
        assert torch.equal(full.sequences, plain) and full.past_key_values is not None
        with pytest.raises(ValueError, match="already traced"), attnlens.tracing_generation(model):
            pass  # pragma: no cover
    assert state(model) == before and "generate" not in vars(model)
    assert len(gen.traces) == 2 and gen.trace is gen.traces[1]
    for g in gen.traces:  # the same code as trace_generate: the same rows, bit for bit
        assert g.layers == (2, 0) and g.heads == (1, 3)
        assert_bitwise(g.rows, alone.rows, "same call")
        assert g.check().ok


def test_tracing_generation_refuses_and_restores_on_error() -> None:
    model = make_gpt2()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="beam search"), attnlens.tracing_generation(model):
        model.generate(PROMPTS[1][0], max_new_tokens=2, num_beams=2)
    assert state(model) == before and "generate" not in vars(model)
    with pytest.raises(TypeError, match="by keyword"), attnlens.tracing_generation(model):
        model.generate(PROMPTS[1][0], None)
    with pytest.raises(ValueError, match="layers"), attnlens.tracing_generation(model, layers=[7]):
        pass  # pragma: no cover
    assert state(model) == before
