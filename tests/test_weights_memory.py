"""Extracting the weights of a Llama-shaped model costs no memory beyond the model; stacking them costs one copy.

A fresh process builds a Llama-shaped model whose attention weights are large enough for a copy to show (d_model
2048, 32 query heads over 8 key/value heads of 64 features, 6 layers: 240 MiB of attention weights in float32, 528
MiB with the MLPs), reads its own peak resident memory (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` just before each step: getrusage's ``ru_maxrss`` would also count the forking pytest
process) and reports how far it grew:

* extraction, then every per-layer tensor touched (summed), the per-query-head K/V views
  (``LayerWeights.grouped``, ``expand`` with stride 0) included: nothing beyond a few zero biases for the bias-free
  projections, far below one copy of the attention weights; every per-layer weight that comes from a parameter lies
  inside that parameter's storage;
* the stacked forms ``ModelWeights.W_Q / W_K / W_V / W_O`` held together: ``torch.stack`` copies, so these grow by
  their own size (documented in :mod:`attnlens.weights` and docs/llama.md), and the test says so rather than
  pretend otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = r"""
import json

import torch
import transformers

import attnlens

D_MODEL, N_HEADS, N_KV, N_LAYERS, D_MLP, VOCAB = 2048, 32, 8, 6, 2048, 1024


def build(n_layers, d_model):
    config = transformers.LlamaConfig(
        hidden_size=d_model, num_attention_heads=N_HEADS, num_key_value_heads=N_KV, num_hidden_layers=n_layers,
        intermediate_size=D_MLP, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status("VmRSS")


def inside(tensor, param):
    # A view of the parameter: the same storage, and its first element within the parameter's bytes.
    start, size = param.data_ptr(), param.numel() * param.element_size()
    same = tensor.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    return same and start <= tensor.data_ptr() < start + size


attnlens.extract_weights(build(1, 64))  # imports every module extraction needs: their code is not the model's memory
model = build(N_LAYERS, D_MODEL)
attention = sum(
    p.numel() * p.element_size() for name, p in model.named_parameters() if ".self_attn." in name
)
with torch.no_grad():
    before = reset()
    weights = attnlens.extract_weights(model)
    touched = 0.0
    for layer in weights.layers:
        views = [layer.W_Q, layer.W_K, layer.W_V, layer.W_O, layer.b_Q, layer.b_K, layer.b_V, layer.b_O]
        views += [layer.grouped(name) for name in ("W_K", "W_V", "b_K", "b_V")]
        views += [layer.ln_1.w, layer.ln_2.w, layer.mlp.W_in, layer.mlp.W_out, layer.mlp.W_gate]
        touched += sum(float(view.sum()) for view in views)
    touched += float(weights.W_E.sum()) + float(weights.W_U.sum())
    extraction = status("VmHWM") - before

    outside = []
    for index, layer in enumerate(weights.layers):
        block = model.model.layers[index]
        attn, mlp = block.self_attn, block.mlp
        pairs = {
            "W_Q": (layer.W_Q, attn.q_proj.weight), "W_K": (layer.W_K, attn.k_proj.weight),
            "W_V": (layer.W_V, attn.v_proj.weight), "W_O": (layer.W_O, attn.o_proj.weight),
            "grouped W_K": (layer.grouped("W_K"), attn.k_proj.weight),
            "grouped W_V": (layer.grouped("W_V"), attn.v_proj.weight),
            "ln_1": (layer.ln_1.w, block.input_layernorm.weight),
            "ln_2": (layer.ln_2.w, block.post_attention_layernorm.weight),
            "W_in": (layer.mlp.W_in, mlp.up_proj.weight), "W_gate": (layer.mlp.W_gate, mlp.gate_proj.weight),
            "W_out": (layer.mlp.W_out, mlp.down_proj.weight),
        }
        outside += [f"layer {index} {name}" for name, (view, param) in pairs.items() if not inside(view, param)]
    if not inside(weights.W_E, model.model.embed_tokens.weight) or not inside(weights.W_U, model.lm_head.weight):
        outside.append("W_E or W_U")
    group_strides = [layer.grouped("W_K").stride(1) for layer in weights.layers]

    before = reset()
    stacks = [weights.W_Q, weights.W_K, weights.W_V, weights.W_O]  # held together: their peak is their sum
    stacking = status("VmHWM") - before
    stacked_bytes = sum(stack.numel() * stack.element_size() for stack in stacks)
    shares = any(stack.untyped_storage().data_ptr() == weights.layers[0].W_Q.untyped_storage().data_ptr()
                 for stack in stacks)

print(json.dumps({"attention": attention, "extraction": extraction, "stacking": stacking,
                  "stacked_bytes": stacked_bytes, "stacks_share_storage": shares, "outside": outside,
                  "group_strides": group_strides, "touched": touched}))
"""


@pytest.mark.slow
def test_extracting_llama_weights_costs_no_copy_and_stacking_costs_one() -> None:
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(
        f"attention weights {result['attention'] / mib:.0f} MiB; extraction and every view +"
        f"{result['extraction'] / mib:.2f} MiB; W_Q/W_K/W_V/W_O stacked +{result['stacking'] / mib:.0f} MiB"
        f" (their size {result['stacked_bytes'] / mib:.0f} MiB)"
    )
    assert result["attention"] == 6 * (2 * 2048 * 2048 + 2 * 2048 * 512) * 4  # 240 MiB: a copy would show
    assert result["outside"] == [], result["outside"]
    assert result["group_strides"] == [0] * 6  # the per-query-head K view repeats by stride, not by copy
    assert result["extraction"] < 0.05 * result["attention"], result
    # Stacking copies (torch.stack): the four stacks are exactly the attention weights, new storage, and the process
    # grows by about that much (allocator slack and page rounding on top).
    assert result["stacked_bytes"] == result["attention"] and not result["stacks_share_storage"]
    assert 0.9 * result["stacked_bytes"] <= result["stacking"] <= 1.2 * result["stacked_bytes"], result
