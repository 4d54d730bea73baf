"""GPT-NeoX and the Llama family in the states users leave them (tests/test_checkpoints.py does GPT-2): each is exact
or refused by name, and the model is left exactly as found (hooks, kernel, training flags, requires_grad, grads,
config).

Exact means: ``verify`` is ok, and trace's patterns, q, k and z and decompose's contributions are those of the same
checkpoint loaded plainly, bit for bit (the same kernels on the same shapes: attnlens runs the uncompiled modules in
eval mode whatever state the model is in). The models are the shrunk published configs of tests/test_llama.py and
tests/test_gpt_neox.py with seeded random weights: Pythia-70m (fused query_key_value, parallel residual, untied),
Llama-3.2-1B (grouped by 4, tied embeddings, no biases) and Qwen3-8B (q/k norms, untied).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CUDA, assert_bitwise, optional
from test_checkpoints import assert_same_state, dynamo_frames, state
from test_hub_configs_llama import left_padded
from test_llama import load
from test_weights_live import assert_current, tensors

import attnlens
from attnlens import UnsupportedModelError
from attnlens.attribution import decompose

# Warnings of the libraries themselves, not of attnlens: peft asks transformers 5 for a renamed property, the first
# import of torch._dynamo touches a deprecated torch.jit name, and gradient checkpointing turns the cache off.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

FAMILIES = ["gpt_neox", "llama", "qwen3"]


@pytest.fixture(params=FAMILIES)
def folder(request: pytest.FixtureRequest, saved: Callable[[str], Path]) -> Path:
    return saved(request.param)


def base(model: Any) -> Any:
    """The transformer inside a causal LM (the module that attnlens runs)."""
    return model.gpt_neox if hasattr(model, "gpt_neox") else model.model


def observe(model: Any) -> dict[str, torch.Tensor]:
    ids, mask, positions = left_padded()
    tr = attnlens.trace(model, ids, mask, position_ids=positions, store=["pattern", "q", "k", "z"])
    seen = {f"{name} {layer}": tr[name, layer] for layer in tr.layers for name in ("pattern", "q", "k", "z")}
    seen["contributions"] = decompose(model, ids, mask, positions=None, position_ids=positions).contributions
    return seen


def assert_exact(model: Any, plain: Any) -> None:
    """verify is ok and what trace and decompose see is ``plain``'s; the model is left as found."""
    ids, mask, positions = left_padded()
    before = state(model)
    report = attnlens.verify(model, ids, mask, position_ids=positions)
    assert report.ok, str(report)
    got = observe(model)
    assert_same_state(before, state(model))
    for name, expected in observe(plain).items():
        assert_bitwise(got[name], expected, "same kernel", what=name)  # the same weights through the same kernels


def assert_refused(model: Any, match: str) -> None:
    """extract_weights, trace, verify, decompose and ablate all raise UnsupportedModelError; nothing changes."""
    ids, mask, _ = left_padded()
    before = state(model)

    def ablate() -> None:
        with attnlens.ablate(model, [(1, 0)]):
            pass

    for call in (
        lambda: attnlens.extract_weights(model),
        lambda: attnlens.trace(model, ids, mask),
        lambda: attnlens.verify(model, ids, mask),
        lambda: decompose(model, ids, mask),
        ablate,
    ):
        with pytest.raises(UnsupportedModelError, match=match):
            call()
    assert_same_state(before, state(model))


# ------------------------------------------------------------------------------------------ torch.compile ---


@pytest.mark.parametrize("how", ["whole", "transformer", "transformer_in_place"])
def test_compiled_model_is_seen_through_and_ablate_is_refused(folder: Path, how: str) -> None:
    model = load(folder, "sdpa")
    if how == "whole":
        model = torch.compile(model)
    elif how == "transformer":
        name = "gpt_neox" if hasattr(model, "gpt_neox") else "model"
        setattr(model, name, torch.compile(base(model)))
    else:
        base(model).compile()  # Module.compile(): __call__ now goes to compiled code
    frames = dynamo_frames()
    assert_exact(model, load(folder, "sdpa"))
    assert dynamo_frames() == frames  # attnlens ran the uncompiled modules: nothing was compiled
    with (
        pytest.raises(UnsupportedModelError, match=r"need not run hooks.*in place with \.compile\(\)"),
        attnlens.ablate(model, []),
    ):
        pass


@pytest.mark.parametrize("what", ["layers.1", "layers.1.attention", "rotary_emb"])
def test_a_module_compiled_on_its_own_is_refused(folder: Path, what: str) -> None:
    model = load(folder, "sdpa")
    if what.endswith("attention") and not hasattr(base(model).layers[1], "attention"):
        what = "layers.1.self_attn"  # the Llama family's name
    base(model).get_submodule(what).compile()
    assert_refused(model, rf"module '{re.escape(what)}' is compiled on its own.*torch\.compile\(model\) instead")


@pytest.mark.slow
# torch compiling transformers' mask code trips a torch deprecation (inside dynamo, not attnlens).
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_compiled_model_after_it_ran(family: str, saved: Callable[[str], Path]) -> None:
    # Compiling takes 9-18 s per model on 2 shared cores; afterwards attnlens still runs the uncompiled modules.
    plain = load(saved(family), "sdpa")
    compiled = torch.compile(load(saved(family), "sdpa"))
    ids, mask, positions = left_padded()
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        own = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()[..., None]
    torch.testing.assert_close(out * valid, own * valid)  # compiled code: the same function, up to rounding
    assert_exact(compiled, plain)


# ---------------------------------------------------------------------------------------------- PEFT ---


@pytest.mark.parametrize("targets", [["query_key_value"], ["dense"]])
def test_lora_on_gpt_neox(saved: Callable[[str], Path], targets: list[str]) -> None:
    # Pythia's fused query_key_value and its attention output dense (both nn.Linear): active and unmerged is refused by
    # name; disabled is the base model; merged (and merge_and_unload()) is the merged model; merged but disabled is
    # refused (peft would unmerge it on the next forward). Llama-family LoRA: tests/test_llama.py.
    peft = optional("peft")
    folder = saved("gpt_neox")
    wrapped = peft.get_peft_model(
        load(folder, "sdpa"), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    )
    for holder in (wrapped, wrapped.get_base_model()):
        assert_refused(
            holder,
            rf"{targets[0]} carries a PEFT adapter \(default\) that is active and unmerged.*merge_and_unload\(\)",
        )
    with wrapped.disable_adapter():
        assert_exact(wrapped, load(folder, "sdpa"))
        w = attnlens.extract_weights(wrapped)
        fused = wrapped.get_base_model().gpt_neox.layers[0].attention.query_key_value
        assert (
            w.layers[0].W_Q.untyped_storage().data_ptr()
            == attnlens.models.wrappers.plain(fused).weight.untyped_storage().data_ptr()
        )
    merged = copy.deepcopy(wrapped).merge_and_unload()
    assert type(merged).__name__ == "GPTNeoXForCausalLM"
    wrapped.merge_adapter()  # merged into the base weights, the adapter layers still in place
    assert_exact(wrapped, merged)
    assert_exact(merged, copy.deepcopy(merged))
    wrapped.base_model.disable_adapter_layers()
    assert_refused(wrapped, "merged but disabled")


# ------------------------------------------------------------------------------- loading and accelerate ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sharded_checkpoint_through_load(folder: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    source = load(folder, "sdpa", dtype)
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    model, _ = attnlens.load(str(tmp_path))
    assert model.dtype == dtype and not model.training  # the stored dtype, in eval mode
    for (name, p), (_, q) in zip(model.state_dict().items(), source.state_dict().items(), strict=True):
        assert_bitwise(p, q, "copy", what=name)  # saved and loaded
    assert_exact(model, source)


def test_device_map_cpu_is_exact_and_offloaded_or_empty_is_refused(folder: Path, tmp_path: Path) -> None:
    import transformers

    accelerate = optional("accelerate")  # transformers loads with a device_map through it
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    assert_exact(model, load(folder, "sdpa"))
    inner = "gpt_neox" if hasattr(model, "gpt_neox") else "model"
    device_map = {name: "cpu" for name, _ in model.named_children() if name != inner}
    device_map |= {f"{inner}.{name}": "cpu" for name, _ in base(model).named_children() if name != "layers"}
    device_map |= {f"{inner}.layers.0": "cpu", f"{inner}.layers.1": "disk"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float32
    )
    assert_refused(offloaded, rf"meta device, offloaded by accelerate.*{inner}\.layers\.1\.")
    with accelerate.init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(model.config)
    assert_refused(empty, "meta device, never loaded")


# ----------------------------------------------------------------------------- conversions and edits ---


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
def test_converted_after_extraction(folder: Path, dtype: torch.dtype) -> None:
    # Every tensor of weights extracted before model.to(dtype) follows it, the zeros standing in for absent biases and
    # RMSNorm shifts too (they stayed float32 beside float16 weights); trace, verify and decompose see the model as a
    # fresh copy converted the same way sees it (not as one loaded in that dtype: the conversion also rounds the rotary
    # inv_freq buffer, which loading keeps in float32).
    model = load(folder, "sdpa")
    w = attnlens.extract_weights(model)
    model.to(dtype)
    assert {t.dtype for _, t in tensors(w)} == {dtype}
    assert_current(w, model)
    assert_exact(model, load(folder, "sdpa").to(dtype))


@pytest.mark.cuda
@CUDA
def test_device_move_follows(folder: Path) -> None:
    # The stand-in zeros move with the parameters beside them (they stayed on the CPU); verify runs on the device.
    model = load(folder, "sdpa")
    w = attnlens.extract_weights(model)
    model.to("cuda")
    assert {t.device.type for _, t in tensors(w)} == {"cuda"}
    assert_current(w, model)
    ids, mask, positions = left_padded()
    assert attnlens.verify(model, ids.cuda(), mask.cuda(), position_ids=positions.cuda()).ok


def test_in_place_edits_are_followed_and_replacements_refused(folder: Path) -> None:
    model = load(folder, "sdpa")
    w = attnlens.extract_weights(model)
    layer = base(model).layers[1]
    attention = getattr(layer, "attention", None) or layer.self_attn
    with torch.no_grad():
        for param in attention.parameters():
            param.mul_(2.0)
    assert_current(w, model)
    out = model.get_output_embeddings()
    tied = out.weight is model.get_input_embeddings().weight
    out.weight = torch.nn.Parameter(out.weight.detach().clone())  # untied (or replaced)
    if tied:
        with pytest.raises(attnlens.StaleWeightsError, match=r"lm_head\.weight.*extract the weights again"):
            _ = w.W_U
    else:
        assert w.W_U is not None and w.W_U.untyped_storage().data_ptr() == out.weight.untyped_storage().data_ptr()
    linear = getattr(attention, "query_key_value", None) or attention.k_proj
    linear.weight.data = torch.randn(linear.weight.shape[::-1]).T  # the same shape, other strides
    with pytest.raises(attnlens.StaleWeightsError, match=r"changed shape or layout.*extract"):
        _ = w.layers[1].W_K


# ------------------------------------------------------------------------------------------ training ---


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_training_with_dropout_is_traced_in_eval_mode_and_left_training(
    folder: Path, tmp_path: Path, kernel: str
) -> None:
    # attention_dropout 0.3 in the config, the model in train() with gradients and a frozen embedding: trace, verify
    # and decompose run it in eval mode (no dropout: the eager kernel's pattern is the plain model's, bit for bit) and
    # leave every module training, requires_grad and the gradients as they were.
    source = load(folder, kernel)
    source.config.attention_dropout = 0.3
    source.save_pretrained(tmp_path)
    model = load(tmp_path, kernel).train()
    ids, mask, positions = left_padded()
    runs = [model(input_ids=ids, attention_mask=mask, position_ids=positions).logits for _ in range(2)]
    assert not torch.equal(runs[0], runs[1])  # dropout bites in training mode
    model.get_input_embeddings().weight.requires_grad_(False)
    runs[0].sum().backward()
    assert_exact(model, load(folder, kernel))
    assert model.training and not model.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_checkpointing(folder: Path, mode: str) -> None:
    model = load(folder, "sdpa")
    # transformers 5 renamed it (the old name warns); 4.57 has only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train(mode == "train")
    assert all(block.gradient_checkpointing for block in base(model).layers)
    assert_exact(model, load(folder, "sdpa"))
    assert all(block.gradient_checkpointing for block in base(model).layers)
    assert model.training == (mode == "train")


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_float64_patterns_are_the_eager_kernels_float32_softmax(folder: Path, kernel: str) -> None:
    # GPT-NeoX's and the Llama family's eager kernel soft-maxes in float32 and casts back, also in a float64 model.
    # verify soft-maxed its HF-order pattern in float64 and held the pattern to float64's rounding: every float64 model
    # failed (pattern_hf_order off by 3e-8 where it is bitwise, pattern above its 1e-15 tolerance at every layer).
    # Right padding: with left padding transformers' own float64 eager pass gives NaN (the float64 mask's minimum
    # becomes -inf in float32, and a padding row of -inf is NaN after softmax), which verify reports and names.
    from test_hub_configs_llama import inputs

    model = load(folder, kernel).to(torch.float64)
    ids, mask = inputs()
    report = attnlens.verify(model, ids, mask)
    hf_order = [row for row in report.rows if row.quantity == "pattern_hf_order"]
    assert hf_order and all(row.max_abs_error == 0 for row in hf_order)  # the kernel's arithmetic, bit for bit
    assert all(row.ok for row in report.rows if row.quantity == "pattern")
    # Eager: z, attn_out, hidden and logits allow for the float32 softmax too (tests/test_verify_float64.py).
    assert report.ok, str(report)
