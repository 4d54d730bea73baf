"""Published GPT-NeoX config.json files (tests/fixtures/hub_configs_neox, sources in its README) load and rotate.

Each fixture keeps its key set as published; only the sizes shrink (2 layers, 4 heads of 8, 32 positions, a
96-token vocabulary, the MLP width in proportion), so Pythia's rotary_pct 0.25 turns 2 features of each head and
RedPajama's 1.0 all 8. Every checkpoint is saved with seeded random weights and loaded back with from_pretrained,
eager and sdpa. The checks that need no adapter:

* the layout of the fused ``query_key_value`` output, ``[pos, head, (q k v), d_head]``, against the q and k the
  model rotates;
* ``attnlens.functional.apply_rotary`` with the ``position_embeddings`` the attention module receives reproduces the
  model's own rotated q and k bitwise (the same elementwise operations in the same order and dtype), and those cos/sin
  are bitwise ``rotary_cos_sin`` at the fraction and base the config policy reads;
* the eager kernel's probabilities are softmax(scale q_rot k_rot^T + mask) recomputed from the rotated q and k,
  within a tolerance derived from float32's unit roundoff and d_head.

And through attnlens's GPT-NeoX adapter, every fixture under eager and sdpa, in float32 and bfloat16: extraction
(per-head views of the model's parameters, no position embedding, QK refused), trace (q and k bitwise the model's
rotated ones; eager patterns bitwise ``output_attentions`` of an eager deep copy; sdpa patterns within the derived
tolerance of softmax(q_rot k_rot^T)), and verify (every row within its tolerance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bitwise
from test_gpt_neox_config import REFUSED, UNKNOWN
from torch.testing import assert_close

import attnlens
from attnlens.functional import apply_rotary, masked_softmax, padding_mask, rotary_cos_sin
from attnlens.models import gpt_neox_config

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs_neox"
NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))
N_LAYER, N_HEAD, D_HEAD, N_POSITIONS, VOCAB = 2, 4, 8, 32, 96
U32 = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff, 2^-24


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """The same keys with small sizes; the rotary fraction and every other setting as published."""
    out = dict(raw)
    d_model = N_HEAD * D_HEAD
    sizes = {
        "num_hidden_layers": N_LAYER,
        "hidden_size": d_model,
        "num_attention_heads": N_HEAD,
        "max_position_embeddings": N_POSITIONS,
        "vocab_size": VOCAB,
        "intermediate_size": d_model * raw.get("intermediate_size", 4 * raw["hidden_size"]) // raw["hidden_size"],
    }
    out.update({key: value for key, value in sizes.items() if key in raw})
    assert out.keys() == raw.keys()
    return out


def make_checkpoint(name: str, folder: Path) -> dict[str, Any]:
    """A folder holding the shrunk config.json (the published keys, written as such) and seeded random weights."""
    import transformers

    small = shrink(json.loads((FIXTURES / name).read_text()))
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig.from_dict(small))
    with torch.no_grad():  # default init leaves biases at 0 and LayerNorm at 1: random ones make every path observable
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "layernorm" in param_name or "layer_norm" in param_name:
                param.normal_(0.1, 0.3)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(small, indent=2))  # the published keys, not save_pretrained's
    return small


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    return ids, mask


@contextmanager
def rotations(model: Any) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per attention call: its fused qkv output, the position_embeddings it received, and the q and k it rotated."""
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    calls: list[dict[str, torch.Tensor]] = []
    own = hf.apply_rotary_pos_emb

    def recording(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kw: Any):
        q_rot, k_rot = own(q, k, cos, sin, *args, **kw)
        calls[-1].update(q=q, k=k, q_rot=q_rot, k_rot=k_rot)
        return q_rot, k_rot

    def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({"position_embeddings": kwargs["position_embeddings"]})

    def qkv_hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        calls[-1]["qkv"] = output

    handles = []
    for layer in model.gpt_neox.layers:
        handles.append(layer.attention.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.attention.query_key_value.register_forward_hook(qkv_hook))
    hf.apply_rotary_pos_emb = recording
    try:
        yield calls
    finally:
        hf.apply_rotary_pos_emb = own
        for handle in handles:
            handle.remove()


def check_rotations(name: str, tmp_path: Path, kernel: str) -> None:
    import transformers

    small = make_checkpoint(name, tmp_path / "neox")
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "neox", attn_implementation=kernel).eval()
    assert model.config._attn_implementation == kernel
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (small["num_hidden_layers"], N_HEAD * D_HEAD)
    assert gpt_neox_config.check_config(model.config) == UNKNOWN.get(name, ())
    fraction, base = gpt_neox_config.rotary(model.config)
    rotary_dim = int(D_HEAD * fraction)
    ids, mask = inputs()
    with rotations(model) as calls, torch.no_grad():
        out = model.gpt_neox(input_ids=ids, attention_mask=mask, output_attentions=kernel == "eager", return_dict=True)
    assert len(calls) == N_LAYER
    position_ids = torch.arange(ids.shape[1]).expand(1, -1)
    # transformers 5.x loads in the config's torch_dtype (float16, bfloat16 for many fixtures), 4.57 in float32.
    expected_cos, expected_sin = rotary_cos_sin(position_ids, rotary_dim=rotary_dim, base=base, dtype=model.dtype)
    for layer, call in enumerate(calls):
        cos, sin = call["position_embeddings"]
        assert_bitwise(cos, expected_cos, "same kernel")
        assert_bitwise(sin, expected_sin, "same kernel")
        # query_key_value's output features are [head, (q k v), d_head]: q of head h at h * 3 * d_head.
        q, k, _ = call["qkv"].view(*ids.shape, N_HEAD, 3 * D_HEAD).chunk(3, dim=-1)
        assert_bitwise(q, call["q"].transpose(1, 2), "copy")
        assert_bitwise(k, call["k"].transpose(1, 2), "copy")
        q_rot = apply_rotary(q, cos, sin, rotary_dim=rotary_dim)
        k_rot = apply_rotary(k, cos, sin, rotary_dim=rotary_dim)
        assert_bitwise(q_rot, call["q_rot"].transpose(1, 2), "same kernel")
        assert_bitwise(k_rot, call["k_rot"].transpose(1, 2), "same kernel")
        # the features past rotary_dim pass through
        assert_bitwise(q_rot[..., rotary_dim:], q[..., rotary_dim:], "copy")
        assert rotary_dim == D_HEAD or not torch.equal(q_rot[:, 1:], q[:, 1:])  # and the others do turn
        if kernel == "eager":
            check_eager_pattern(q_rot, k_rot, mask, out.attentions[layer])


def check_eager_pattern(q_rot: torch.Tensor, k_rot: torch.Tensor, mask: torch.Tensor, own: torch.Tensor) -> None:
    """The model's eager probabilities against softmax(scale q_rot k_rot^T + mask), recomputed in float64."""
    q = q_rot.transpose(1, 2).double()  # [batch, head, pos, d_head]
    k = k_rot.transpose(1, 2).double()
    scale = D_HEAD**-0.5
    pattern = masked_softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale, padding_mask(mask))
    # The model's scores: a d_head-term dot product accumulated in float32 (torch's CPU matmuls accumulate half
    # inputs in float32 too) errs by at most gamma_d sum|q||k| (gamma_d = d u / (1 - d u)); rounding it to the model's
    # dtype and multiplying by the scale add one rounding each (unit roundoff U of that dtype). An input error of
    # delta moves a softmax probability by at most 2 delta; the float32 softmax adds a few u and the cast back to the
    # model's dtype U.
    big_u = torch.finfo(own.dtype).eps / 2
    gamma = D_HEAD * U32 / (1 - D_HEAD * U32)
    delta = float(((q.abs() @ k.abs().transpose(-1, -2)) * scale * (gamma + 2 * big_u)).max())
    assert_close(own.double(), pattern, atol=2 * delta + big_u + 8 * U32, rtol=0.0)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in REFUSED])
def test_published_config_loads_and_rotates_as_the_model_does(name: str, kernel: str, tmp_path: Path) -> None:
    if name in UNKNOWN:
        with pytest.warns(UserWarning, match=UNKNOWN[name][0]):
            check_rotations(name, tmp_path, kernel)
    else:
        check_rotations(name, tmp_path, kernel)


def test_fixtures_cover_both_residual_forms_and_rotary_widths() -> None:
    raws = [json.loads((FIXTURES / name).read_text()) for name in NAMES]
    assert {raw.get("use_parallel_residual", True) for raw in raws} == {True, False}
    assert {raw.get("rotary_pct") for raw in raws} == {0.25, 1.0}
    assert {raw.get("hidden_act") for raw in raws} == {"gelu", "gelu_fast"}
    assert len(NAMES) == 24


def load(folder: Path, kernel: str, dtype: torch.dtype) -> Any:
    import transformers

    return transformers.GPTNeoXForCausalLM.from_pretrained(folder, attn_implementation=kernel, dtype=dtype).eval()


def eager_attentions(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """``output_attentions`` of an eager deep copy: the model's own probabilities, the model left untouched."""
    import copy

    twin = copy.deepcopy(model).eval()
    twin.set_attn_implementation("eager")
    with torch.no_grad():
        return list(twin(input_ids=ids, attention_mask=mask, output_attentions=True, return_dict=True).attentions)


def check_adapter(name: str, folder: Path, kernel: str, dtype: torch.dtype) -> None:
    model = load(folder, kernel, dtype)
    adapter = attnlens.models.adapt(model)
    assert type(adapter).__name__ == "GPTNeoXAdapter" and adapter.rotary and adapter.kernel == kernel
    assert adapter.parallel_residual == bool(model.config.use_parallel_residual)
    fraction, _ = gpt_neox_config.rotary(model.config)
    assert {spec.rotary_dim for spec in adapter.specs} == {int(D_HEAD * fraction)}

    w = attnlens.extract_weights(model)
    fused = model.gpt_neox.layers[1].attention.query_key_value
    head = 2  # rows of head h are [h * 3 d_head, (h + 1) * 3 d_head): its q, then its k, then its v
    rows = slice(head * 3 * D_HEAD, (head + 1) * 3 * D_HEAD)
    assert torch.equal(w.layers[1].W_Q[head], fused.weight[rows][:D_HEAD].T)
    assert torch.equal(w.layers[1].W_V[head], fused.weight[rows][2 * D_HEAD :].T)
    assert torch.equal(w.layers[1].b_K[head], fused.bias[rows][D_HEAD : 2 * D_HEAD])
    assert w.layers[1].W_Q.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()  # a view
    dense = model.gpt_neox.layers[1].attention.dense.weight
    assert torch.equal(w.layers[1].W_O[head], dense[:, head * D_HEAD : (head + 1) * D_HEAD].T)
    assert (
        w.W_pos is None
        and w.rotary
        and w.W_U is not None
        and torch.equal(w.W_U, model.get_output_embeddings().weight.T)
    )
    with pytest.raises(attnlens.PositionDependentCircuitError, match="rotate their queries and keys"):
        _ = w.QK
    assert w.layers[0].OV.AB.shape == (N_HEAD, N_HEAD * D_HEAD, N_HEAD * D_HEAD)

    ids, mask = inputs()
    valid = mask.bool()[:, None, :, None]  # compare valid query rows only (padding rows are a convention)
    with rotations(model) as calls:
        tr = attnlens.trace(model, ids, mask, store=["pattern", "q", "k", "z"])  # z: every layer runs to its end
    assert model.config._attn_implementation == kernel
    assert len(calls) == N_LAYER
    for layer, call in enumerate(calls):
        q_rot, k_rot = call["q_rot"].transpose(1, 2), call["k_rot"].transpose(1, 2)  # [batch, pos, head, d_head]
        assert torch.equal(tr["q", layer], q_rot) and torch.equal(tr["k", layer], k_rot)
    if kernel == "eager":
        expected = eager_attentions(model, ids, mask)
        for layer in range(N_LAYER):
            assert torch.equal(tr.pattern(layer) * valid, expected[layer] * valid), f"layer {layer}"
    else:
        for layer in range(N_LAYER):
            # sdpa hands out no pattern: the tap's, from the model's own rotated q and k, within the derived bound.
            check_eager_pattern(tr["q", layer], tr["k", layer], mask, tr.pattern(layer))

    report = attnlens.verify(model, ids, mask)
    assert report.ok, str(report)
    assert {row.quantity for row in report.rows} == {
        "q",
        "k",
        "v",
        "pattern_hf_order",
        "pattern",
        "z",
        "attn_out",
        "hidden",
        "logits",
    }
    if dtype == torch.float32:  # the same q and k, soft-maxed in the eager kernel's order on the same CPU kernels
        assert all(row.max_abs_error == 0 for row in report.rows if row.quantity == "pattern_hf_order")
    assert model.config._attn_implementation == kernel and not model.training


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved checkpoint per fixture, made on first use and shared by the kernels and dtypes."""
    return {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in REFUSED])
def test_published_config_extracts_traces_and_verifies(
    name: str, kernel: str, dtype: torch.dtype, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnlens.UnknownConfigWarning)  # the unknown keys are tested above
        if name not in checkpoints:
            checkpoints[name] = tmp_path_factory.mktemp("neox")
            make_checkpoint(name, checkpoints[name])
        check_adapter(name, checkpoints[name], kernel, dtype)
