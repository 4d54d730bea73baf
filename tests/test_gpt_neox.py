"""GPT-NeoX (Pythia) through everything that works on GPT-2: metrics, views, attribution, ablation, CLI, scan, refusals.

The models are the shrunk published configs of tests/test_hub_configs_neox.py, saved with seeded random weights:
Pythia-70m (parallel residual, 2 of 8 features rotated) and RedPajama-INCITE-7B (sequential residual, all rotated).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_circuits import dense_scores
from test_hub_configs_neox import N_HEAD, N_LAYER, VOCAB, check_eager_pattern, inputs, load, make_checkpoint

import attnlens
from attnlens import functional
from attnlens.attribution import decompose
from attnlens.circuits import composition_scores
from attnlens.cli import main
from attnlens.models import adapt

PARALLEL = "EleutherAI__pythia-70m.saved-4.27.0.dev0.json"
SEQUENTIAL = "togethercomputer__RedPajama-INCITE-7B-Instruct.json"
ROOT = Path(attnlens.__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=[PARALLEL, SEQUENTIAL], ids=["parallel", "sequential"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_checkpoint(request.param, path)
    return path


@pytest.fixture(scope="module")
def pythia_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pythia")
    make_checkpoint(PARALLEL, path)
    return path


def state(model: Any) -> tuple[Any, ...]:
    """What attnlens must leave as it found: kernel, training flag, hooks, parameters' bits."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return (model.config._attn_implementation, model.training, hooks, [p.clone() for p in model.parameters()])


def same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3], b[3], strict=True))


def test_metrics_and_views(folder: Path) -> None:
    model = load(folder, "sdpa", torch.float32)
    ids, mask = inputs()
    tr = attnlens.trace(model, ids, mask)
    scores = attnlens.metrics.head_scores(tr)
    induction = attnlens.metrics.induction_scores(model, seq_len=8, batch=2)
    assert induction.shape == (N_LAYER, N_HEAD) and bool(((induction >= 0) & (induction <= 1 + 1e-6)).all())
    previous = attnlens.metrics.previous_token_scores(tr)
    assert previous.shape == (N_LAYER, N_HEAD) and bool(previous.isfinite().all())
    assert scores is not None
    view = attnlens.viz.overview_html(tr, [str(i) for i in ids[0].tolist()])
    assert isinstance(view, attnlens.viz.HTMLView) and "attnlens-overview" in view


def test_decompose_sums_to_the_residual_with_no_position_term(folder: Path) -> None:
    model = load(folder, "eager", torch.float32)
    ids, mask = inputs()
    d = decompose(model, ids, mask, positions=None)
    error = d.check()  # raises DecompositionError above the derived tolerance
    assert error < 1e-5
    assert not bool(d.contributions[d.index("pos_embed")].any())  # rotary: positions enter no residual term
    # The embedding is the residual stream's first term: the model's own embed_in output.
    assert torch.equal(d.contributions[d.index("embed")][0], model.gpt_neox.embed_in(ids)[0])
    attribution = d.logit_attribution(ids[:, :1].expand_as(ids))
    assert bool(attribution.isfinite().all())


def test_qk_circuits_and_composition_are_refused_by_name(folder: Path) -> None:
    w = attnlens.extract_weights(load(folder, "eager", torch.float32))
    for kind in ("Q", "K"):
        with pytest.raises(attnlens.PositionDependentCircuitError, match="no position-free QK circuit"):
            composition_scores(w, kind)
    # V composition reads OV circuits only: offered, and folding the layer norms is what processed() does to them
    # (in float64 here, so that both sides round alike: as test_circuits' GPT-2 check).
    w64 = attnlens.extract_weights(load(folder, "eager", torch.float64))
    v = composition_scores(w64, "V", fold_ln=True, center_writing_weights=True)
    want = dense_scores(w64.processed(fold_value_biases=False), "V")
    valid = ~want.isnan()
    assert bool(valid.any()) and bool(v.isnan().eq(~valid).all())
    torch.testing.assert_close(v[valid], want[valid], atol=1e-14, rtol=1e-12)
    with pytest.raises(attnlens.PositionDependentCircuitError):
        _ = w.layers[0].QK
    assert w.OV.AB.shape == (N_LAYER, N_HEAD, *w.layers[0].W_Q.shape[1:2] * 2)  # OV is position-free: kept
    processed = w.processed()
    assert processed.W_pos is None and [layer.rotary_dim for layer in processed.layers] == [
        layer.rotary_dim for layer in w.layers
    ]
    # Refactoring mixes q/k features that the rotation turns afterwards: refused, never silently different scores.
    with pytest.raises(attnlens.PositionDependentCircuitError, match="refactor_factored_attn_matrices"):
        w.processed(refactor_factored_attn_matrices=True)


def test_ablate_and_head_importance(folder: Path) -> None:
    model = load(folder, "sdpa", torch.float32)
    ids, mask = inputs()
    before = state(model)
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
        with attnlens.ablate(model, [(1, 2)]):
            ablated = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(clean, again) and not torch.equal(clean, ablated)
    # Zeroing head 2 of layer 1 by hand (its z columns before dense) is what the ablation computes.
    dense = model.gpt_neox.layers[1].attention.dense

    def zero_head(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = args[0].clone()
        z[..., 2 * 8 : 3 * 8] = 0
        return (z,)

    handle = dense.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            by_hand = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    assert torch.equal(ablated, by_hand)
    importance = attnlens.head_importance(model, ids, mask)
    assert importance.shape == (N_LAYER, N_HEAD) and bool(importance.isfinite().all())
    assert same_state(before, state(model))


def test_cli_verify_on_a_saved_folder(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [str(i) for i in inputs()[0][0].tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnlens.UnknownConfigWarning)
        assert main(["verify", str(folder), "--ids", *ids]) == 0
        out = capsys.readouterr().out
        assert "OK" in out and "GPTNeoXForCausalLM" in out
        assert main(["weights", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "W_pos (position embed.)  none" in out and "query_key_value" in out


def test_refusals_name_the_problem(folder: Path) -> None:
    model = load(folder, "eager", torch.float32)
    edited = copy.deepcopy(model)
    edited.config.num_attention_heads = 2  # edited after the modules were built: the modules say otherwise
    with pytest.raises(attnlens.UnsupportedModelError, match="config was edited after the model was built"):
        adapt(edited)
    paged = copy.deepcopy(model)
    paged.config._attn_implementation = "paged|eager"
    with pytest.raises(attnlens.UnsupportedModelError, match="paged cache"):
        attnlens.trace(paged, inputs()[0])
    with pytest.raises(ValueError, match="input_ids must lie in"):
        attnlens.trace(model, torch.tensor([[VOCAB]]))


def test_functional_attention_asks_for_a_rotation_exactly_when_rotary(folder: Path) -> None:
    w = attnlens.extract_weights(load(folder, "eager", torch.float32))
    layer = w.layers[0]
    x = torch.randn(1, 5, w.d_model)
    with pytest.raises(ValueError, match="pass rotation"):
        functional.attention(x, layer)
    cos, sin = functional.rotary_cos_sin(torch.arange(5)[None], rotary_dim=layer.rotary_dim, base=10000.0)
    out = functional.attention(x, layer, rotation=(cos, sin))
    # The rotation acts on q and k only: v, and hence nothing of the values, is rotated.
    assert torch.equal(out.v, functional.qkv(x, layer)[2])
    assert not torch.equal(out.q, functional.qkv(x, layer)[0])


def scan_child(folder: Path, out: Path) -> str:
    return f"""
import warnings, torch, attnlens, transformers
warnings.simplefilter("ignore")
model = transformers.GPTNeoXForCausalLM.from_pretrained({str(folder)!r}, attn_implementation="sdpa").eval()
g = torch.Generator().manual_seed(5)
docs = [torch.randint(1, {VOCAB}, (int(n),), generator=g).tolist() for n in torch.randint(5, 30, (24,), generator=g)]
result = attnlens.scan(model, docs, seq_len=16, batch_size=2, progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    open({str(out)!r}, "w").write(result.to_json())
"""


@pytest.mark.slow
def test_scan_is_bit_identical_across_process_counts(pythia_folder: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"scan{n}.json"
        script = tmp_path / f"child{n}.py"
        script.write_text(scan_child(pythia_folder, out))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(script),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[n] = out.read_bytes()
    assert outputs[1] == outputs[2]
    result = attnlens.ScanResult.load(tmp_path / "scan2.json")
    assert result.n_windows > 4


def test_verify_catches_a_wrong_rotation_and_a_wrong_weight(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The q/k rows compare the rotation with itself; the pattern and hidden rows hold it to the model's own output."""
    model = load(folder, "eager", torch.float32)
    ids, mask = inputs()
    w = copy.deepcopy(attnlens.extract_weights(model))  # values, not views
    with torch.no_grad():
        w.layers[1].W_Q[2] += 0.05
    failed = {(row.quantity, row.layer, row.head) for row in attnlens.verify(model, ids, mask, weights=w).failures}
    assert ("q", 1, 2) in failed and ("q", 1, 1) not in failed

    cls = type(adapt(model))
    own = cls.rotation

    def shifted(self: Any, layer: int, args: Any, kwargs: dict[str, Any]) -> Any:
        rotation = own(self, layer, args, kwargs)
        cos, sin = functional.rotary_cos_sin(
            2 * torch.arange(ids.shape[1])[None], rotary_dim=rotation.cos.shape[-1], base=10000.0
        )
        # Twice the angles: a plausible, wrong rotation. (A shift of every position by one would not do: rotary
        # scores depend on j - i only, so only pattern_hf_order, bitwise, sees that.)
        return type(rotation)(cos=cos, sin=sin)

    monkeypatch.setattr(cls, "rotation", shifted)
    report = attnlens.verify(model, ids, mask)
    assert {row.quantity for row in report.failures} >= {"pattern", "hidden"}


@pytest.mark.parametrize(
    "cls_name",
    [
        "GPTNeoXModel",
        "GPTNeoXForSequenceClassification",
        "GPTNeoXForTokenClassification",
        "GPTNeoXForQuestionAnswering",
    ],
)
def test_every_class_is_its_transformer_plus_a_head(pythia_folder: Path, cls_name: str) -> None:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the task heads are freshly initialised
        model = getattr(transformers, cls_name).from_pretrained(pythia_folder, attn_implementation="sdpa").eval()
    adapter = adapt(model)
    assert adapter.own_sites.unembed is None and adapter.lock_key(model) is (getattr(model, "gpt_neox", model))
    ids, mask = inputs()
    report = attnlens.verify(model, ids, mask)
    assert report.ok and "logits" not in {row.quantity for row in report.rows}
    assert attnlens.extract_weights(model).W_U is None
    # The refusals name the family's own class with an LM head (they named GPT-2's, or none at all).
    with pytest.raises(attnlens.UnsupportedModelError, match=r"has no language-model head; .*\(GPTNeoXForCausalLM\)$"):
        attnlens.head_importance(model, ids, mask)
    with pytest.raises(attnlens.UnsupportedModelError, match=r"for logits \(GPTNeoXForCausalLM\)$"):
        decompose(model, ids, mask).logit_attribution(0)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_left_padding_and_position_ids_rotate_per_row(pythia_folder: Path, kernel: str) -> None:
    """Per-row positions give per-row rotations ([batch, pos, rotary_dim]); trace and verify follow them."""
    model = load(pythia_folder, kernel, torch.float32)
    ids, _ = inputs()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    tr = attnlens.trace(model, ids, mask, position_ids=position_ids, store=["pattern", "q", "k"])
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    with torch.no_grad():
        expected = twin(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_attentions=True)
    valid = mask.bool()[:, None, :, None]
    for layer in range(N_LAYER):
        own, theirs = tr.pattern(layer) * valid, expected.attentions[layer] * valid
        if kernel == "eager" or layer == 0:  # layer 0 under sdpa: the same input, q and k, and eager's arithmetic
            assert torch.equal(own, theirs)
        else:  # later layers read inputs that sdpa rounded upstream: the pattern of its own rotated q and k
            check_eager_pattern(tr["q", layer], tr["k", layer], mask, tr.pattern(layer))  # [batch, pos, head, d_head]
    report = attnlens.verify(model, ids, mask, position_ids=position_ids)
    assert report.ok, str(report)


def test_no_attention_biases(tmp_path: Path) -> None:
    import json

    import transformers
    from test_hub_configs_neox import FIXTURES, shrink

    raw = shrink(json.loads((FIXTURES / PARALLEL).read_text()))
    config = transformers.GPTNeoXConfig.from_dict({**raw, "attention_bias": False})
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    w = attnlens.extract_weights(model)
    assert not bool(w.layers[0].b_Q.any()) and not bool(w.layers[1].b_O.any())
    ids, mask = inputs()
    assert attnlens.verify(model, ids, mask).ok
    model.half()  # the zeros follow the weights beside them (they stayed float32)
    assert w.layers[0].b_Q.dtype == w.layers[1].b_O.dtype == w.layers[1].W_Q.dtype == torch.float16
