"""Published Llama-family configs (tests/fixtures/hub_configs_llama, sources in its README) load, normalise and rotate.

Each fixture keeps its key set as published; only the sizes shrink: 2 layers, heads of 8 features, the published
query/key-value grouping (1 key/value head when a group is wider than 4: multi-query; else 2), ``hidden_size`` in the
published ratio to ``n_heads * head_dim`` (Mistral-Nemo's 160 per head against head_dim 128 stays 10 against 8), 64
positions, a 96-token vocabulary, the MLP width in proportion. Each is saved with seeded random weights (RMSNorm weights
and biases randomised too) and loaded back with from_pretrained, eager and sdpa, on the installed transformers.
The first checks need no adapter:

* ``attnlens.functional.rms_norm`` is bitwise each layer's ``input_layernorm`` and Qwen3's per-head ``q_norm`` /
  ``k_norm`` (the same operations in the same order and dtypes), and ``gated_mlp`` is bitwise the MLP;
* the default rope's ``position_embeddings`` are bitwise ``rotary_cos_sin``; for scaled variants (Llama 3's
  ``llama3``) the cos/sin are taken from the model as it ran, which is what the adapter will do;
* ``apply_rotary`` with those cos/sin is bitwise the model's own rotated q and k (captured from
  ``apply_rotary_pos_emb``), and ``repeat_kv`` is bitwise transformers' own, ``expand_kv`` a view of the same storage;
* the eager probabilities are softmax(scale q k^T + mask) with key heads repeated per query head, within a tolerance
  derived from the dtype's unit roundoff and d_head, and o_proj's input (each query head's z) is that pattern times
  the repeated values on both kernels, within the bound that tolerance implies; a published window
  (Mistral-7B-Instruct-v0.1's 4096) shrinks to 4 over 12 positions, and the tests switch one on for Mistral-Nemo and
  for Qwen2.5 (use_sliding_window).

Then through attnlens's Llama-family adapter, every fixture (and TinyLlama under each followed rope variant) on eager
and sdpa, float32 and bfloat16, with a left-padded batch and generate()'s position ids: extracted weights are views
(W_K per key/value head, the per-query-head view zero-copy), trace's patterns are bitwise an eager copy's
``output_attentions`` per query head under eager and within a derived bound under sdpa, a window blocks the keys that
left it, and verify passes every row. A fixture the installed release would misread is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from test_llama_config import refusal
from torch.testing import assert_close

import attnlens
from attnlens.functional import (
    apply_rotary,
    expand_kv,
    gated_mlp,
    masked_softmax,
    padding_mask,
    repeat_kv,
    rms_norm,
    rotary_cos_sin,
    sliding_window_mask,
)
from attnlens.models import llama_config

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs_llama"
NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))
N_LAYER, D_HEAD, N_POSITIONS, VOCAB, SEQ, WINDOW = 2, 8, 64, 96, 12, 4
U32 = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff, 2^-24
MODULES = {
    "llama": "modeling_llama",
    "mistral": "modeling_mistral",
    "qwen2": "modeling_qwen2",
    "qwen3": "modeling_qwen3",
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}  # fmt: skip


def shrink(raw: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The same keys with small sizes; the grouping, the head_dim ratio and every other setting as published."""
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    group = heads // kv_heads
    n_kv = 1 if group > 4 else 2
    n_heads = n_kv * group
    d_head = raw.get("head_dim") or raw["hidden_size"] // heads
    d_model = round(n_heads * D_HEAD * raw["hidden_size"] / (heads * d_head))
    sizes: dict[str, Any] = {
        "num_hidden_layers": N_LAYER,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": D_HEAD,
        "hidden_size": d_model,
        "intermediate_size": max(2, d_model * raw["intermediate_size"] // raw["hidden_size"]),
        "max_position_embeddings": N_POSITIONS,
        "vocab_size": VOCAB,
        "max_window_layers": min(raw.get("max_window_layers", N_LAYER), N_LAYER),
    }
    if active_window(raw):  # Mistral-7B's 4096 of 32768 positions: 4 of SEQ = 12 keeps the window biting
        sizes["sliding_window"] = WINDOW
    out = dict(raw)
    out.update({key: value for key, value in sizes.items() if key in raw})
    if raw.get("layer_types") is not None:
        out["layer_types"] = raw["layer_types"][:N_LAYER]
    out.update(overrides)
    assert out.keys() == raw.keys() | overrides.keys()
    assert "head_dim" in raw or out["hidden_size"] == n_heads * D_HEAD
    return out


def active_window(raw: dict[str, Any]) -> bool:
    """Whether a published config attends through a sliding window (Mistral: any; Qwen: use_sliding_window)."""
    if raw.get("sliding_window") is None:
        return False
    return raw["model_type"] == "mistral" or bool(raw.get("use_sliding_window"))


def make_checkpoint(small: dict[str, Any], folder: Path) -> type:
    """Save seeded random weights for ``small`` in ``folder`` with the published keys as config.json; the class."""
    import transformers
    from transformers import CONFIG_MAPPING

    cls = getattr(transformers, CLASSES[small["model_type"]], None)
    if cls is None:
        pytest.skip(f"{CLASSES[small['model_type']]} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    model = cls(CONFIG_MAPPING[small["model_type"]].from_dict(small))
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: random ones make every path observable
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.1, 0.3)
            elif "norm" in name:
                param.normal_(1.0, 0.3)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(small, indent=2))  # the published keys, not save_pretrained's
    return cls


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    return ids, mask


def hf_module(model_type: str) -> Any:
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.{MODULES[model_type]}")


@contextmanager
def recording(model: Any, model_type: str) -> Iterator[list[dict[str, Any]]]:
    """Per attention call: position_embeddings, the q/k it rotated and their rotations, q_proj/k_proj and norm I/O."""
    hf = hf_module(model_type)
    calls: list[dict[str, Any]] = []
    own = hf.apply_rotary_pos_emb

    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kw: Any) -> Any:
        q_rot, k_rot = own(q, k, cos, sin, *args, **kw)
        calls[-1].update(q=q, k=k, q_rot=q_rot, k_rot=k_rot)
        return q_rot, k_rot

    def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({"position_embeddings": kwargs["position_embeddings"]})

    def keep(key: str, both: bool = False) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            calls[-1][key] = (args[0], output) if both else output

        return hook

    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        handles.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(attn.q_proj.register_forward_hook(keep("q_proj")))
        handles.append(attn.k_proj.register_forward_hook(keep("k_proj")))
        handles.append(attn.v_proj.register_forward_hook(keep("v_proj")))
        handles.append(attn.o_proj.register_forward_pre_hook(lambda module, args: calls[-1].update(z=args[0])))
        handles.append(layer.mlp.register_forward_hook(keep("mlp", both=True)))
        if hasattr(attn, "q_norm"):
            handles.append(attn.q_norm.register_forward_hook(keep("q_norm", both=True)))
            handles.append(attn.k_norm.register_forward_hook(keep("k_norm", both=True)))
    first_norm: dict[str, Any] = {}

    def norm_hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        first_norm["input_layernorm"] = (args[0], output)

    handles.append(model.model.layers[0].input_layernorm.register_forward_hook(norm_hook))
    hf.apply_rotary_pos_emb = rotary
    try:
        yield calls
    finally:
        hf.apply_rotary_pos_emb = own
        for handle in handles:
            handle.remove()
        calls.append(first_norm)  # last: the first layer's input_layernorm input and output


@torch.no_grad()  # the recomputations read parameters: no autograd graph
def check_model(small: dict[str, Any], tmp_path: Path, kernel: str, window: int | None = None) -> None:
    cls = make_checkpoint(small, tmp_path / "ckpt")
    model = cls.from_pretrained(tmp_path / "ckpt", attn_implementation=kernel).eval()
    assert model.config._attn_implementation == kernel
    llama_config.check_config(model.config)
    settings = llama_config.settings(model.config)
    assert settings.windows == (window,) * N_LAYER
    n_heads, n_kv = settings.n_heads, settings.n_kv_heads
    group = n_heads // n_kv
    ids, mask = inputs()
    with recording(model, small["model_type"]) as calls:
        out = model.model(input_ids=ids, attention_mask=mask, output_attentions=kernel == "eager", return_dict=True)
    norm_in, norm_out = calls.pop()["input_layernorm"]
    layer0 = model.model.layers[0]
    assert torch.equal(
        rms_norm(norm_in, layer0.input_layernorm.weight, layer0.input_layernorm.variance_epsilon), norm_out
    )
    assert len(calls) == N_LAYER
    positions = torch.arange(SEQ).expand(1, -1)
    for index, call in enumerate(calls):
        attn = model.model.layers[index].self_attn
        mlp = model.model.layers[index].mlp
        cos, sin = call["position_embeddings"]
        if settings.rope_type == "default":
            expected = rotary_cos_sin(positions, rotary_dim=D_HEAD, base=settings.rope_theta, dtype=model.dtype)
            assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
        # [batch, pos, (head d_head)] -> [batch, pos, head, d_head]: q_proj's features are head-major.
        q = call["q_proj"].view(*ids.shape, n_heads, D_HEAD)
        k = call["k_proj"].view(*ids.shape, n_kv, D_HEAD)
        if settings.qk_norm:
            assert torch.equal(call["q_norm"][0], q) and torch.equal(call["k_norm"][0], k)
            q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
            k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            assert torch.equal(q, call["q_norm"][1]) and torch.equal(k, call["k_norm"][1])
        assert torch.equal(q, call["q"].transpose(1, 2)) and torch.equal(k, call["k"].transpose(1, 2))
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        assert torch.equal(q_rot, call["q_rot"].transpose(1, 2)) and torch.equal(k_rot, call["k_rot"].transpose(1, 2))
        assert not torch.equal(q_rot[:, 1:], q[:, 1:])  # the rotation does turn
        mlp_in, mlp_out = call["mlp"]
        biases = [getattr(getattr(mlp, name), "bias", None) for name in ("gate_proj", "up_proj", "down_proj")]
        got = gated_mlp(mlp_in, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, act=small["hidden_act"],
                        gate_bias=biases[0], up_bias=biases[1], down_bias=biases[2])  # fmt: skip
        assert torch.equal(got, mlp_out)
        hf = hf_module(small["model_type"])
        keys = call["k_rot"]  # [batch, kv_head, pos, d_head] as the kernel receives it
        assert torch.equal(repeat_kv(keys, group), hf.repeat_kv(keys, group))
        view = expand_kv(keys, group)
        assert view.data_ptr() == keys.data_ptr() and view.shape == (2, n_kv, group, SEQ, D_HEAD)
        pattern, atol = reference_pattern(q_rot, repeat_kv(k_rot, group, dim=2), mask, window, model.dtype)
        if kernel == "eager":
            check_eager_pattern(out.attentions[index], pattern, atol, window)
        v = repeat_kv(call["v_proj"].view(*ids.shape, n_kv, D_HEAD), group, dim=2)
        check_z(call["z"], pattern, atol, v)


def reference_pattern(
    q_rot: torch.Tensor, k_rot: torch.Tensor, mask: torch.Tensor, window: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """softmax(scale q_rot k_rot^T + mask) in float64 ``[batch, head, q_pos, k_pos]``, and the model's error bound."""
    q = q_rot.transpose(1, 2).double()  # [batch, head, pos, d_head]
    k = k_rot.transpose(1, 2).double()
    scale = D_HEAD**-0.5
    allowed = padding_mask(mask)
    if window is not None:
        allowed = allowed & sliding_window_mask(SEQ, window=window)
    pattern = masked_softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale, allowed)
    # The model's scores: a d_head-term dot product accumulated in float32 (torch's CPU matmuls accumulate half
    # inputs in float32 too) errs by at most gamma_d sum|q||k| (gamma_d = d u / (1 - d u)); rounding it to the model's
    # dtype and multiplying by the scale add one rounding each (unit roundoff U of that dtype). An input error of
    # delta moves a softmax probability by at most 2 delta; the float32 softmax adds a few u and the cast back to the
    # model's dtype U.
    big_u = torch.finfo(dtype).eps / 2
    gamma = D_HEAD * U32 / (1 - D_HEAD * U32)
    delta = float(((q.abs() @ k.abs().transpose(-1, -2)) * scale * (gamma + 2 * big_u)).max())
    return pattern, 2 * delta + big_u + 8 * U32


def check_eager_pattern(own: torch.Tensor, pattern: torch.Tensor, atol: float, window: int | None) -> None:
    """The model's eager probabilities against the float64 recomputation."""
    assert_close(own.double(), pattern, atol=atol, rtol=0.0)
    if window is not None:  # never full causal: the keys out of the window get exactly nothing
        assert torch.equal(own[..., window:, 0], torch.zeros_like(own[..., window:, 0]))


def check_z(own: torch.Tensor, pattern: torch.Tensor, atol: float, v: torch.Tensor) -> None:
    """o_proj's input (each query head's z, any kernel) against pattern @ v with key/value heads repeated.

    Each probability errs by at most ``atol``, moving z by ``atol * sum_k |v_k|``; the weighted sum accumulates in
    float32 (gamma_pos max|v|, a few u more for a kernel that rescales blocks online) and rounds to the model's dtype.
    """
    values = v.transpose(1, 2).double()  # [batch, head, pos, d_head]
    expected = torch.einsum("bhqk,bhkd->bqhd", pattern, values).flatten(-2)
    big_u = torch.finfo(own.dtype).eps / 2
    gamma = SEQ * U32 / (1 - SEQ * U32)
    scale_v = float(values.abs().max())
    bound = atol * float(values.abs().sum(-2).max()) + (gamma + 8 * U32 + big_u) * scale_v
    assert_close(own.double(), expected, atol=bound, rtol=0.0)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_published_config_loads_normalises_and_rotates_as_the_model_does(
    name: str, kernel: str, tmp_path: Path
) -> None:
    raw = json.loads((FIXTURES / name).read_text())
    if (why := refusal(name)) is not None:  # this release would not run the published rotation: refused, by name
        cls = make_checkpoint(shrink(raw), tmp_path / "ckpt")
        model = cls.from_pretrained(tmp_path / "ckpt", attn_implementation=kernel)
        with pytest.raises(attnlens.UnsupportedModelError, match=why):
            llama_config.check_config(model.config)
        return
    check_model(shrink(raw), tmp_path, kernel, window=WINDOW if active_window(raw) else None)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_sliding_window_mistral_masks_beyond_the_window(kernel: str, tmp_path: Path) -> None:
    # Mistral-Nemo's published keys (head_dim apart from hidden_size / heads) with a window of 4 < SEQ = 12.
    raw = json.loads((FIXTURES / "mistralai__Mistral-Nemo-Base-2407.printed-4.43.3.json").read_text())
    check_model(shrink(raw, sliding_window=WINDOW), tmp_path, kernel, window=WINDOW)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_sliding_window_qwen2_on_every_layer_past_max_window_layers(kernel: str, tmp_path: Path) -> None:
    # Qwen2.5's published keys with use_sliding_window switched on (max_window_layers 0: every layer slides).
    raw = json.loads((FIXTURES / "Qwen__Qwen2.5-3B.copied.json").read_text())
    small = shrink(raw, use_sliding_window=True, sliding_window=WINDOW)
    small["max_window_layers"] = 0
    check_model(small, tmp_path, kernel, window=WINDOW)


def test_fixtures_cover_the_families_and_their_switches() -> None:
    raws = [json.loads((FIXTURES / name).read_text()) for name in NAMES]
    assert {raw["model_type"] for raw in raws} == {"llama", "mistral", "qwen2", "qwen3"}
    groups = {raw["num_attention_heads"] // raw.get("num_key_value_heads", raw["num_attention_heads"]) for raw in raws}
    assert {1, 3, 4, 8} <= groups  # multi-head, and grouped by 3, 4 and 8
    assert any((raw.get("rope_scaling") or {}).get("rope_type") == "llama3" for raw in raws)
    assert any(
        raw.get("head_dim", 0) * raw["num_attention_heads"] != raw["hidden_size"] for raw in raws if "head_dim" in raw
    )
    assert {raw.get("tie_word_embeddings") for raw in raws} == {True, False}
    assert any(active_window(raw) for raw in raws)  # Mistral-7B-Instruct-v0.1's sliding_window 4096
    assert len(NAMES) >= 15


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
                 "long_factor": [2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_scaled_rope_variants_are_followed_from_the_models_own_cos_sin(
    variant: str, kernel: str, tmp_path: Path
) -> None:
    # TinyLlama's published keys with a scaled rotary embedding: the cos/sin (scaling folded in, yarn's and longrope's
    # attention factor included) are taken as the model ran them, and apply_rotary with them is the model's rotation.
    raw = json.loads((FIXTURES / "TinyLlama__TinyLlama-1.1B-Chat-v1.0.saved-4.56.0.json").read_text())
    check_model(shrink(raw, rope_scaling=ROPE_VARIANTS[variant]), tmp_path, kernel)


# ------------------------------------------------------------------- through attnlens's Llama-family adapter ---

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def left_padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, a left-padded mask and the position ids generate() makes for it (cumsum - 1, padding at 1)."""
    ids, _ = inputs()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def eager_patterns(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """``output_attentions`` of an eager deep copy (conftest's eager_reference, with position ids)."""
    import copy

    twin = copy.deepcopy(model).eval()
    twin.set_attn_implementation("eager")
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    return list(out.attentions)


def pattern_bound(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two kernels' patterns of the same q ``[batch, pos, head, d_head]`` and k (repeated) can differ.

    Each score is a d_head-term dot product accumulated in float32 (within gamma_d sum|q||k|), rounded to the model's
    dtype and scaled (one rounding U each), on both sides; a score error delta moves a probability by at most 2 delta;
    the float32 softmax adds a few u and the cast back U.
    """
    big_u = torch.finfo(dtype).eps / 2
    gamma = D_HEAD * U32 / (1 - D_HEAD * U32)
    qd, kd = q.double().abs().transpose(1, 2), k.double().abs().transpose(1, 2)  # [batch, head, pos, d_head]
    delta = float((qd @ kd.transpose(-1, -2)).max()) * D_HEAD**-0.5 * (gamma + 2 * big_u)
    return 2 * (2 * delta) + 2 * big_u + 8 * U32


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_published_config_extracts_traces_and_verifies(name: str, kernel: str, dtype: str, tmp_path: Path) -> None:
    from conftest import assert_bitwise

    raw = json.loads((FIXTURES / name).read_text())
    small = shrink(raw)
    cls = make_checkpoint(small, tmp_path / "ckpt")
    model = cls.from_pretrained(tmp_path / "ckpt", attn_implementation=kernel, dtype=DTYPES[dtype]).eval()
    if (why := refusal(name)) is not None:  # refused by name, never misdescribed
        with pytest.raises(attnlens.UnsupportedModelError, match=why):
            attnlens.extract_weights(model)
        return
    n_heads, n_kv = small["num_attention_heads"], small.get("num_key_value_heads") or small["num_attention_heads"]
    group = n_heads // n_kv
    ids, mask, positions = left_padded()

    weights = attnlens.extract_weights(model)
    assert weights.n_kv_heads == n_kv and weights.W_pos is None
    for index, layer in enumerate(weights.layers):
        attn = model.model.layers[index].self_attn
        assert layer.W_Q.shape == (n_heads, small["hidden_size"], D_HEAD)
        assert layer.W_K.shape == layer.W_V.shape == (n_kv, small["hidden_size"], D_HEAD)
        assert layer.window == (WINDOW if active_window(raw) else None)
        view = layer.grouped("W_K")  # zero-copy per query head: [kv_head, group, d_model, d_head]
        assert view.shape == (n_kv, group, small["hidden_size"], D_HEAD)
        assert view.data_ptr() == attn.k_proj.weight.data_ptr() and (group == 1 or view.stride(1) == 0)
        for head in range(n_heads):
            assert_bitwise(layer.W_Q[head], attn.q_proj.weight[head * D_HEAD : (head + 1) * D_HEAD].T, "copy")
            kv = head // group
            assert_bitwise(view[kv, head % group], attn.k_proj.weight[kv * D_HEAD : (kv + 1) * D_HEAD].T, "copy")

    trace = attnlens.trace(model, ids, attention_mask=mask, position_ids=positions, store=["pattern", "q", "k"])
    reference = eager_patterns(model, ids, mask, positions)
    rows = mask.bool()[:, None, :, None]  # valid query rows (a padding row has no key: 0 here, HF's own elsewhere)
    for index in range(N_LAYER):
        own, expected = trace.pattern(index), reference[index]
        if kernel == "eager":  # the kernel's own probabilities, handed out; the twin is the same call
            assert_bitwise(own * rows, expected * rows, "same call", f"layer {index}")
        else:
            q, k = trace["q", index], trace["k", index]  # [batch, pos, head, d_head]: keys per query head
            assert q.shape == k.shape == (2, SEQ, n_heads, D_HEAD)
            bound = pattern_bound(q, k, DTYPES[dtype])
            assert_close((own * rows).double(), (expected * rows).double(), atol=bound, rtol=0.0)
        if active_window(raw):  # keys that left the window get exactly nothing, never full causal
            assert torch.equal(own[..., WINDOW + 3 :, :3], torch.zeros_like(own[..., WINDOW + 3 :, :3]))

    report = attnlens.verify(model, ids, attention_mask=mask, position_ids=positions)
    assert report.ok, str(report)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_scaled_rope_variants_trace_and_verify_through_the_adapter(variant: str, kernel: str, tmp_path: Path) -> None:
    from conftest import assert_bitwise

    raw = json.loads((FIXTURES / "TinyLlama__TinyLlama-1.1B-Chat-v1.0.saved-4.56.0.json").read_text())
    cls = make_checkpoint(shrink(raw, rope_scaling=ROPE_VARIANTS[variant]), tmp_path / "ckpt")
    model = cls.from_pretrained(tmp_path / "ckpt", attn_implementation=kernel, dtype=torch.float32).eval()
    ids, mask, positions = left_padded()
    trace = attnlens.trace(model, ids, attention_mask=mask, position_ids=positions, store=["pattern", "q", "k"])
    reference = eager_patterns(model, ids, mask, positions)
    rows = mask.bool()[:, None, :, None]
    for index in range(N_LAYER):
        if kernel == "eager":
            assert_bitwise(trace.pattern(index) * rows, reference[index] * rows, "same call", f"layer {index}")
        else:
            bound = pattern_bound(trace["q", index], trace["k", index], torch.float32)
            assert_close(trace.pattern(index) * rows, reference[index] * rows, atol=bound, rtol=0.0)
    assert attnlens.verify(model, ids, attention_mask=mask, position_ids=positions).ok
