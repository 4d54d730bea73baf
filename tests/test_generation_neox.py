"""trace_generate on rotary GPT-NeoX models: rows against a full-sequence eager trace, the post-rotary cache check.

The models are the shrunk published configs of tests/test_hub_configs_neox.py with seeded random weights: Pythia-70m
(parallel residual, 2 of 8 features rotated) and RedPajama-INCITE-7B (sequential residual, all 8 rotated). Their
cached keys are post-rotary, so a step run at a wrong position leaves a key that the full-sequence trace (rotated at
the positions the mask gives) does not reproduce.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_generation import PROMPTS, cached_key_edited, shift_positions_at_step
from test_gpt_neox import PARALLEL, SEQUENTIAL
from test_hub_configs_neox import N_HEAD, N_LAYER, load, make_checkpoint

import attnlens
from attnlens.errors import AttentionCaptureError
from attnlens.models import adapt

STEPS = 6


@pytest.fixture(scope="module", params=[PARALLEL, SEQUENTIAL], ids=["parallel", "sequential"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neox-gen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_checkpoint(request.param, path)
    return path


def generate(model: Any, batch: int, **options: Any) -> Any:
    ids, mask = PROMPTS[batch]
    return attnlens.trace_generate(
        model, ids, mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, **options
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_match_a_full_sequence_eager_trace(folder: Path, kernel: str, dtype: torch.dtype, batch: int) -> None:
    model = load(folder, kernel, dtype)
    g = generate(model, batch)
    assert g.sequences.shape == (batch, 5 + STEPS)
    assert g.rows.shape == (N_LAYER, batch, N_HEAD, STEPS, 5 + STEPS - 1)
    # The positions generate gave the rotary model: the mask's (left padding shifts row 0 by 2).
    expected = torch.tensor([[2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9]])[2 - batch :]
    assert g.positions is not None and torch.equal(g.positions, expected)
    unit = torch.finfo(dtype).eps / 2
    for step in range(g.n_steps):
        row = g.row(step, N_LAYER - 1)
        # A distribution over at most 10 keys: its sum is 1 within 10 roundings of the stored dtype.
        torch.testing.assert_close(row.float().sum(-1), torch.ones(batch, N_HEAD), rtol=0, atol=10 * unit)
        if batch == 2:
            assert not row[0, :, :2].any()  # left padding gets nothing
    # Each step's rows and the post-rotary cache against one full-sequence trace by an eager copy, rotated at the
    # positions the mask gives; the tolerances are derived (generation_trace.py) and check() raises past them.
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    report = g.check(twin)
    assert report.ok and set(report.largest) == {"rows", "keys", "values"}
    assert max(report.largest.values()) < 1


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_cached_keys_are_the_models_own_post_rotary_keys(folder: Path, kernel: str) -> None:
    """The kept cache is a copy of what a plain generate leaves in its cache, bit for bit (the same forward passes)."""
    model = load(folder, kernel, torch.float32)
    ids, mask = PROMPTS[2]
    g = generate(model, 2)
    out = copy.deepcopy(model).generate(
        ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, g.sequences)
    adapter = adapt(model)
    for layer in range(N_LAYER):
        k, v = adapter.cached_kv(out.past_key_values, layer)
        assert torch.equal(g.cache_keys[layer], k[:, :, : 5 + STEPS - 1]), layer
        assert torch.equal(g.cache_values[layer], v[:, :, : 5 + STEPS - 1]), layer


def test_a_cache_rotated_at_the_wrong_positions_fails(folder: Path) -> None:
    """Keys rotated at positions that ignore the left padding (0, 1, ... for every row) are caught in row 0."""
    model = load(folder, "eager", torch.float32)
    g = generate(model, 2)
    assert g.check().ok
    adapter = adapt(model)
    spec = adapter.specs[0]
    assert spec.rotary_dim > 0
    # Re-rotate row 0's cached keys by -2 positions (the padding it has): what a cache ignoring the padding holds.
    from dataclasses import replace

    keys = g.cache_keys.clone()
    rotary = model.gpt_neox.rotary_emb
    x = torch.zeros(1, 1, 1)
    positions = torch.arange(keys.shape[3])[None]
    cos_right, sin_right = rotary(x, positions)
    cos_wrong, sin_wrong = rotary(x, positions - 2)
    d = spec.rotary_dim

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    # Undo the right rotation (rotate by -position), then rotate by position - 2.
    r = keys[:, 0, :, :, :d]
    unrotated = r * cos_right[0] - rotate_half(r) * sin_right[0]
    keys[:, 0, :, :, :d] = unrotated * cos_wrong[0] + rotate_half(unrotated) * sin_wrong[0]
    report = replace(g, cache_keys=keys).check(raise_error=False)
    assert not report.ok
    lines = [line for line in report.mismatches if "cached keys" in line]
    assert lines and {line.split(",")[1] for line in lines} == {" layer 0", " layer 1"}
    assert not any("values" in line or "row differs" in line for line in report.mismatches)


def test_check_catches_a_position_offset_at_its_step(folder: Path) -> None:
    model = load(folder, "sdpa", torch.float32)
    calls = shift_positions_at_step(model, 3)  # step 3 rotates its query and its new key one position too far
    g = generate(model, 2)
    assert len(calls) == STEPS
    report = g.check(raise_error=False)
    assert not report.ok
    assert report.mismatches[0].startswith("step 3, sequence 0: the query ran at position 6, the mask puts it at 5")
    assert not any(line.startswith(("step 0,", "step 1,", "step 2,")) for line in report.mismatches)
    # Without the recorded positions the rotation itself names it: step 3's rows and the key it wrote, from layer 0.
    from dataclasses import replace

    report = replace(g, positions=None).check(raise_error=False)
    assert report.mismatches[0].startswith("step 3, layer 0, head ")
    assert not any(line.startswith(("step 0,", "step 1,", "step 2,")) for line in report.mismatches)
    # The key step 3 wrote (position prompt_len - 1 + 3 = 7) is off in every layer; no other key is.
    keys = [line for line in report.mismatches if "cached keys" in line]
    assert keys and all("position 7 " in line for line in keys)
    assert {line.split(",")[1] for line in keys} == {" layer 0", " layer 1"}
    with pytest.raises(AttentionCaptureError, match="step 3"):
        g.check()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_check_catches_an_edited_cache_entry_at_its_step_and_layer(folder: Path, kernel: str) -> None:
    model = load(folder, kernel, torch.float32)
    with cached_key_edited(model, step=4, layer=1, position=3):  # before layer 1 reads it at step 4
        g = generate(model, 2)
    report = g.check(raise_error=False)
    rows = [line for line in report.mismatches if "row differs" in line]
    keys = [line for line in report.mismatches if "cached keys" in line]
    assert rows and rows[0].startswith("step 4, layer 1, head ")
    assert keys and all("layer 1," in line and "position 3 " in line for line in keys)
    assert not any("layer 0," in line for line in report.mismatches)
    assert not any(line.startswith(("step 1,", "step 2,", "step 3,")) for line in rows)


def test_sampling_static_cache_and_state(folder: Path) -> None:
    model = load(folder, "sdpa", torch.float32)
    ids, mask = PROMPTS[2]
    options = {"max_new_tokens": 4, "do_sample": True, "num_return_sequences": 2, "eos_token_id": None}
    torch.manual_seed(3)
    plain = copy.deepcopy(model).generate(ids, attention_mask=mask, **options)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    torch.manual_seed(3)
    g = attnlens.trace_generate(model, ids, mask, **options)
    assert torch.equal(g.sequences, plain) and g.check().ok
    dynamic = generate(model, 2)
    static = generate(model, 2, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences) and static.check().ok
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_repr_html_and_plain_data(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from attnlens import generation_trace

    model = load(folder, "sdpa", torch.float32)
    g = generate(model, 2)
    text = repr(g)
    assert text.startswith("GenerationTrace(") and "steps=6" in text and "dtype=float32" in text and len(text) < 200
    html = g._repr_html_()
    assert html.count("<tr>") == 1 + STEPS and "most attended" in html and "more steps" not in html
    data = json.loads(g.to_json())
    assert data["sequences"] == g.sequences.tolist() and data["n_steps"] == STEPS and "rows" not in data
    assert g.positions is not None and data["positions"] == g.positions.tolist()
    rows = g.to_dict(rows=True)["rows"]
    assert torch.equal(torch.tensor(rows, dtype=torch.float32), g.rows)  # float32 -> float64 -> float32 is exact
    # Bounded: past MAX_ROWS steps the table stops and counts the rest.
    monkeypatch.setattr(generation_trace, "MAX_ROWS", 4)
    html = g._repr_html_()
    assert html.count("<tr>") == 1 + 4 and "2 more steps" in html
