"""Every way users load and hold a GPT-2: each works exactly (verify ok, trace = the eager twin's patterns) or is
refused by name, and the model is left exactly as found.

Exact means: ``verify(...).ok`` and trace's patterns equal to the ``output_attentions`` of the model's eager twin, bit
for bit when the model runs eager, within float rounding when it runs sdpa (:data:`SDPA_ATOL` by dtype).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import assert_bitwise, eager_reference, make_gpt2, optional, random_ids

import attnlens
from attnlens import UnsupportedModelError
from attnlens.models import gpt2

# Warnings of the libraries themselves, not of attnlens: peft asks transformers 5 for a renamed property, and the first
# import of torch._dynamo touches a deprecated torch.jit name.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

SDPA_ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEMO = Path(attnlens.__file__).parent / "demo" / "checkpoint"


def inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded: the padding paths are exercised everywhere."""
    ids = random_ids(model, 2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def state(model: Any) -> dict[str, Any]:
    """What attnlens must leave as found: flags, requires_grad, grads (values and identity), hooks, kernel, config."""
    inner = gpt2.unwrap(model)
    return {
        "config": inner.config.to_json_string(use_diff=False),
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "kernel": inner.config._attn_implementation,
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("training", "requires_grad", "hooks", "kernel", "config"):
        assert before[key] == after[key], key
    for (name, b), (_, a) in zip(before["grads"], after["grads"], strict=True):
        assert (b is None) == (a is None), name
        if b is not None:
            assert b[0] == a[0], f"grad of {name} replaced"
            assert_bitwise(a[1], b[1], "copy")  # the grad as it was (a clone taken before)


def assert_exact(model: Any, twin: Any, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> float:
    """verify is ok and trace's patterns are the eager twin's (bitwise under eager); the model is left as found.

    Returns the largest pattern difference over valid rows (printed for the record).
    """
    inner = gpt2.unwrap(model)
    if ids is None or mask is None:
        ids, mask = inputs(inner)
    before = state(model)
    report = attnlens.verify(model, ids, mask)
    assert report.ok, str(report)
    tr = attnlens.trace(model, ids, mask)
    assert_same_state(before, state(model))
    expected = eager_reference(twin, ids, mask)
    rows = mask.bool()[:, None, :, None]
    worst = 0.0
    for layer, reference in enumerate(expected):
        got = tr.pattern(layer)
        assert got.shape == reference.shape and got.dtype == reference.dtype
        if inner.config._attn_implementation == "eager":
            assert_bitwise(
                got * rows, reference * rows, "copy", what=f"layer {layer}"
            )  # the eager kernel's own probabilities
        else:
            torch.testing.assert_close(got * rows, reference * rows, atol=SDPA_ATOL[got.dtype], rtol=0)
        worst = max(worst, float((got.double() - reference.double()).mul(rows).abs().max()))
    print(f"{type(model).__name__} {inner.config._attn_implementation} {report.dtype}: max pattern diff {worst:.3g}")
    return worst


def assert_refused(model: Any, match: str) -> None:
    """extract_weights, trace and verify all raise UnsupportedModelError matching ``match``; nothing changes."""
    before = state(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    for call in (
        lambda: attnlens.extract_weights(model),
        lambda: attnlens.trace(model, ids),
        lambda: attnlens.verify(model, ids),
    ):
        with pytest.raises(UnsupportedModelError, match=match):
            call()
    assert_same_state(before, state(model))


@pytest.fixture
def source() -> Any:
    return make_gpt2(n_layer=2)


# ----------------------------------------------------------------------------------------- loading paths ---


def test_auto_model_for_causal_lm(source: Any, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert_exact(model, source)


def test_auto_model(source: Any, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(model) is transformers.GPT2Model
    assert_exact(model, source.transformer)


def test_pipeline_model(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO)
    source = make_gpt2(n_layer=2, vocab_size=len(tokenizer))
    source.save_pretrained(tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path), tokenizer=tokenizer, device="cpu")
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    assert_exact(pipe.model, source, ids, torch.ones_like(ids))
    tr = attnlens.trace(pipe.model, "the cat sat", tokenizer=tokenizer)
    assert tr.tokens is not None and "".join(tr.tokens[0]) == "the cat sat"


def test_sharded_safetensors(source: Any, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert_exact(gpt2.load(str(tmp_path)), source)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoint_loaded_with_dtype_auto(source: Any, tmp_path: Path, dtype: torch.dtype) -> None:
    twin = source.to(dtype)
    twin.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert model.dtype == dtype
    assert_exact(model, twin)
    assert gpt2.load(str(tmp_path)).dtype == dtype  # attnlens's own loader keeps the stored dtype too


def test_legacy_pytorch_model_bin(source: Any, tmp_path: Path) -> None:
    # transformers 5 writes safetensors even with safe_serialization=False: write the legacy file by hand.
    source.config.save_pretrained(tmp_path)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    assert not list(tmp_path.glob("*.safetensors"))
    assert_exact(gpt2.load(str(tmp_path)), source)


def test_old_checkpoint_with_attention_mask_buffers(source: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    n_pos = source.config.n_positions
    state_dict = {k: v.contiguous() for k, v in source.state_dict().items()}
    for i in range(source.config.n_layer):  # what GPT-2 checkpoints of transformers < 4.x era carry
        state_dict[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state_dict[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state_dict.pop("lm_head.weight", None)  # tied: old checkpoints store it once
    source.config.save_pretrained(tmp_path)
    save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_exact(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), source)


def test_resized_embeddings(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    source = make_gpt2(n_layer=2, vocab_size=len(tokenizer) - 1)
    source.resize_token_embeddings(len(tokenizer))
    source.save_pretrained(tmp_path)
    model = gpt2.load(str(tmp_path))
    weights = attnlens.extract_weights(model)
    assert weights.d_vocab == len(tokenizer) and weights.W_U is not None
    ids = torch.tensor([[5, 6, 7, tokenizer.pad_token_id], [8, 9, 10, 11]])
    assert_exact(model, source, ids, torch.ones_like(ids))


def test_untied_lm_head(tmp_path: Path) -> None:
    source = make_gpt2(n_layer=2, tie_word_embeddings=False)
    with torch.no_grad():
        source.lm_head.weight.normal_()
    source.save_pretrained(tmp_path)
    model = gpt2.load(str(tmp_path))
    weights = attnlens.extract_weights(model)
    assert weights.W_U is not None and weights.W_U.data_ptr() != weights.W_E.data_ptr()
    assert_bitwise(weights.W_U, source.lm_head.weight.T, "copy")  # saved and loaded
    assert_exact(model, source)
    assert attnlens.verify(model, torch.tensor([[1, 2, 3]])).row("logits").ok


def test_sequence_classification_with_pad_token(tmp_path: Path) -> None:
    source = make_gpt2("GPT2ForSequenceClassification", n_layer=2, num_labels=3)  # pad_token_id=0
    source.save_pretrained(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(model, transformers.GPT2ForSequenceClassification) and model.config.pad_token_id == 0
    assert_exact(model, source)


# ---------------------------------------------------------------------------------------------- PEFT ---


def lora(model: Any, **config: Any) -> Any:
    peft = optional("peft")

    settings = {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True, "init_lora_weights": False, **config}
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


@pytest.mark.parametrize("holder", ["peft_model", "inner_model"])
def test_active_lora_is_refused(holder: str) -> None:
    wrapped = lora(make_gpt2(n_layer=2))
    model = wrapped if holder == "peft_model" else wrapped.get_base_model()
    assert_refused(model, r"active and unmerged.*merge_and_unload\(\)")


def test_disabled_lora_adapter_is_the_base_model() -> None:
    base = make_gpt2(n_layer=2)
    twin = copy.deepcopy(base)
    wrapped = lora(base)
    with wrapped.disable_adapter():
        assert_exact(wrapped, twin)
        weights = attnlens.extract_weights(wrapped)
        c_attn = wrapped.get_base_model().transformer.h[0].attn.c_attn.get_base_layer()
        assert weights.layers[0].W_Q.untyped_storage().data_ptr() == c_attn.weight.untyped_storage().data_ptr()
    assert_refused(wrapped, "active and unmerged")  # enabled again: refused again


def test_merged_lora_adapter() -> None:
    wrapped = lora(make_gpt2(n_layer=2), target_modules=["c_attn", "c_proj", "c_fc"])
    merged_copy = copy.deepcopy(wrapped).merge_and_unload()
    wrapped.merge_adapter()  # merged into the base weights, adapter layers still in place
    assert_exact(wrapped, merged_copy)
    wrapped.base_model.disable_adapter_layers()  # merged and disabled: peft would unmerge on the next forward
    assert_refused(wrapped, "merged but disabled")


def test_merge_and_unload_is_a_plain_gpt2() -> None:
    merged = lora(make_gpt2(n_layer=2)).merge_and_unload()
    assert type(merged) is transformers.GPT2LMHeadModel
    assert_exact(merged, copy.deepcopy(merged))


class HandMadeLoRA(torch.nn.Module):
    """A LoRA-style wrapper written by hand (not PEFT's class): the base layer plus a low-rank update.

    It passes the base layer's ``weight`` and ``bias`` through, as such wrappers often do, so that code reading
    ``c_attn.weight`` finds the base weights while the model computes with base + update.
    """

    def __init__(self, base: torch.nn.Module, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        d_in, d_out = base.weight.shape  # Conv1D stores [in, out]
        g = torch.Generator().manual_seed(0)
        self.lora_A = torch.nn.Parameter(torch.randn(d_in, rank, generator=g) * 0.3)
        self.lora_B = torch.nn.Parameter(torch.randn(rank, d_out, generator=g) * 0.3)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x @ self.lora_A @ self.lora_B


class Conv1DSubclass(transformers.pytorch_utils.Conv1D):
    """A subclass of the projection's class: its forward may compute anything, so it is not recognised either."""


@pytest.mark.parametrize(
    ("path", "wrap"),
    [
        ("h.1.attn.c_attn", HandMadeLoRA),
        ("h.0.attn.c_proj", HandMadeLoRA),
        ("h.1.mlp.c_fc", HandMadeLoRA),
        ("h.0.mlp.c_proj", HandMadeLoRA),
        ("h.1.attn.c_attn", lambda m: Conv1DSubclass(m.weight.shape[1], m.weight.shape[0])),
    ],
)
def test_a_projection_module_not_recognised_exactly_is_refused(path: str, wrap: Any) -> None:
    model = make_gpt2(n_layer=2)
    parent, name = path.rsplit(".", 1)
    module = wrap(model.transformer.get_submodule(path))
    setattr(model.transformer.get_submodule(parent), name, module)
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    layer = path.split(".")[1]
    assert_refused(
        model,
        rf"layer {layer}'s {path.split('.', 2)[2]} \(transformer\.{re.escape(path)}\) is a {re.escape(kind)}, not "
        r"transformers' Conv1D.*PEFT",
    )


def test_a_hand_made_lm_head_wrapper_is_refused() -> None:
    model = make_gpt2(n_layer=2)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert_refused(model, r"lm_head is a torch\.nn\.modules\.container\.Sequential, not torch's nn\.Linear")


# ----------------------------------------------------------------------------------------- accelerate ---


def test_device_map_cpu(source: Any, tmp_path: Path) -> None:
    optional("accelerate")  # transformers loads with a device_map through it
    source.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert_exact(model, source)


def device_map(offload_to: str) -> dict[str, str]:
    optional("accelerate")  # transformers loads with a device_map through it
    names = ("transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.ln_f", "lm_head")
    return {**dict.fromkeys(names, "cpu"), "transformer.h.1": offload_to}


def test_block_offloaded_to_disk_is_refused(source: Any, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map("disk"), offload_folder=tmp_path / "offload"
    )
    assert model.transformer.h[1].attn.c_attn.weight.is_meta
    assert_refused(model, r"meta device, offloaded by accelerate.*transformer\.h\.1\.")


def test_block_mapped_to_meta_is_refused(source: Any, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map("meta"))
    assert_refused(model, "meta device")


@pytest.mark.parametrize("how", ["init_empty_weights", "torch_device_meta"])
def test_empty_model_is_refused(how: str) -> None:
    accelerate = optional("accelerate")

    config = make_gpt2(n_layer=2).config
    empty = accelerate.init_empty_weights() if how == "init_empty_weights" else torch.device("meta")
    with empty:
        model = transformers.GPT2LMHeadModel(config)
    assert_refused(model, r"meta device, never loaded")


# ------------------------------------------------------------------------------------------ torch.compile ---


def dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def test_compiled_model_is_seen_through(source: Any) -> None:
    compiled = torch.compile(copy.deepcopy(source))
    frames = dynamo_frames()
    assert attnlens.extract_weights(compiled).W_Q.shape == attnlens.extract_weights(source).W_Q.shape
    assert_exact(compiled, source)
    assert dynamo_frames() == frames  # attnlens ran the uncompiled model: nothing was compiled


def test_compiled_transformer_is_seen_through(source: Any) -> None:
    model = copy.deepcopy(source)
    model.transformer = torch.compile(model.transformer)
    frames = dynamo_frames()
    assert_exact(model, source)
    assert dynamo_frames() == frames


def test_transformer_compiled_in_place_is_seen_through(source: Any) -> None:
    model = copy.deepcopy(source)
    model.transformer.compile()  # Module.compile(): __call__ now goes to compiled code
    frames = dynamo_frames()
    assert_exact(model, source)
    assert dynamo_frames() == frames  # attnlens ran the transformer's plain path: nothing was compiled


@pytest.mark.parametrize("how", ["torch_compile", "module_compile"])
def test_block_compiled_on_its_own_is_refused(source: Any, how: str) -> None:
    model = copy.deepcopy(source)
    if how == "torch_compile":
        model.transformer.h[1] = torch.compile(model.transformer.h[1])
    else:
        model.transformer.h[1].compile()
    assert_refused(model, "compiled on its own")


@pytest.mark.slow
# torch 2.13 compiling transformers 4.57's mask code trips a torch deprecation (inside dynamo, not attnlens).
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
def test_compiled_model_after_it_ran(source: Any) -> None:
    compiled = torch.compile(copy.deepcopy(source))
    ids, mask = inputs(source)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).logits
        own = source(ids, attention_mask=mask).logits
    valid = mask.bool()[..., None]
    torch.testing.assert_close(out * valid, own * valid)  # compiled code: the same function, up to rounding
    assert_exact(compiled, source, ids, mask)


# ----------------------------------------------------------------------------------------- model states ---


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_checkpointing(source: Any, mode: str) -> None:
    model = copy.deepcopy(source)
    # transformers 5 renamed it (the old name warns); 4.57 has only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train(mode == "train")
    blocks = model.transformer.h
    assert all(block.gradient_checkpointing for block in blocks) or model.transformer.gradient_checkpointing
    assert_exact(model, source)
    assert all(block.gradient_checkpointing for block in blocks) or model.transformer.gradient_checkpointing
    assert model.training == (mode == "train")


def test_training_model_with_grads(source: Any) -> None:
    model = copy.deepcopy(source).train()
    model.transformer.wpe.weight.requires_grad_(False)
    ids = random_ids(model, 2, 8)
    model(ids, labels=ids).loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert_exact(model, source)  # also checks flags, requires_grad and grads are untouched
    assert model.training and not model.transformer.wpe.weight.requires_grad


def test_calls_under_inference_mode(source: Any) -> None:
    with torch.inference_mode():
        assert_exact(source, copy.deepcopy(source))


def test_model_created_under_inference_mode(source: Any) -> None:
    with torch.inference_mode():
        model = make_gpt2(n_layer=2)
    assert model.transformer.h[0].attn.c_attn.weight.is_inference()
    assert_exact(model, source)


# -------------------------------------------------------------------------------------- attention kernels ---


def kernel_names() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return sorted({"eager", *ALL_ATTENTION_FUNCTIONS.keys()})


@pytest.mark.parametrize("kernel", kernel_names())
def test_every_attention_kernel_is_exact_or_refused(source: Any, kernel: str) -> None:
    model = copy.deepcopy(source)
    try:
        model.set_attn_implementation(kernel)
    except (ImportError, ValueError) as error:  # transformers itself refuses it here (not installed, not for GPT-2)
        assert kernel not in gpt2.EXACT_KERNELS, f"{kernel} is listed exact but cannot be set: {error}"
        print(f"{kernel}: refused by transformers: {str(error)[:120]}")
        return
    if kernel in gpt2.EXACT_KERNELS:
        assert_exact(model, source)
    else:
        assert_refused_kernel(model, kernel)


def assert_refused_kernel(model: Any, kernel: str) -> None:
    ids, mask = inputs(model)
    before = state(model)
    for call in (lambda: attnlens.trace(model, ids, mask), lambda: attnlens.verify(model, ids, mask)):
        with pytest.raises(UnsupportedModelError, match=rf"attn_implementation='{kernel}'.*'eager' or 'sdpa'"):
            call()
    assert_same_state(before, state(model))
    print(f"{kernel}: refused by attnlens")


def test_sdpa_paged_really_computes_other_attention(source: Any) -> None:
    """Why the paged kernels are refused: where one runs on a plain forward, its output is not the model's."""
    if "sdpa_paged" not in kernel_names():
        pytest.skip(f"transformers {transformers.__version__} has no 'sdpa_paged' kernel")
    ids = random_ids(source, 1, 10)
    paged = copy.deepcopy(source)
    paged.set_attn_implementation("sdpa_paged")
    with torch.no_grad():
        out, own = paged(ids).logits, source(ids).logits
    assert (out - own).abs().max() > 1e-3
