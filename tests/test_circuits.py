"""Composition scores against a dense computation, and their random baseline against random weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, nontrivial_ln, optional
from torch.testing import assert_close

import attnlens
from attnlens import circuits


def dense_scores(w: attnlens.ModelWeights, kind: str) -> torch.Tensor:
    """The definition, pair by pair, with every d_model x d_model circuit formed in float64."""
    W_Q, W_K, W_V, W_O = (w.stacked(name).detach().double() for name in ("W_Q", "W_K", "W_V", "W_O"))
    OV, QK = W_V @ W_O, W_Q @ W_K.mT
    right = {"Q": QK, "K": QK.mT, "V": OV}[kind]
    L, H = w.n_layers, w.n_heads
    out = torch.full((L, H, L, H), math.nan, dtype=torch.float64)
    for l1 in range(L):
        for l2 in range(l1 + 1, L):
            for h1 in range(H):
                for h2 in range(H):
                    a, b = OV[l1, h1], right[l2, h2]
                    out[l1, h1, l2, h2] = (a @ b).norm() / (a.norm() * b.norm())
    return out


def valid_mask(L: int, H: int) -> torch.Tensor:
    layer = torch.arange(L)
    return (layer[:, None] < layer[None, :])[:, None, :, None].expand(L, H, L, H)


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_scores_equal_the_dense_definition(kind) -> None:
    model = make_gpt2(n_layer=3, n_head=4, n_embd=32).double()
    w = attnlens.extract_weights(model)
    scores = circuits.composition_scores(w, kind)
    assert scores.shape == (3, 4, 3, 4) and scores.dtype == torch.float64
    valid = valid_mask(3, 4)
    assert torch.isnan(scores[~valid]).all() and not torch.isnan(scores[valid]).any()
    assert_close(scores[valid], dense_scores(w, kind)[valid], atol=1e-14, rtol=1e-12)
    assert scores[valid].min() > 0 and scores[valid].max() < 1


def test_kinds_differ_so_the_dense_test_can_tell_them_apart() -> None:
    w = attnlens.extract_weights(make_gpt2(n_layer=2).double())
    q, k, v = (circuits.composition_scores(w, kind)[0, :, 1, :] for kind in "QKV")
    assert (q - k).abs().min() > 1e-4 and (q - v).abs().min() > 1e-4 and (k - v).abs().min() > 1e-4


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_float32_computation_is_within_its_stated_error(kind) -> None:
    w = attnlens.extract_weights(make_gpt2(n_layer=3))
    scores = circuits.composition_scores(w, kind, dtype=torch.float32)
    assert scores.dtype == torch.float32
    valid = valid_mask(3, 4)
    # The docstring states "about 1e-6 absolute error on a score" for float32.
    assert_close(scores[valid].double(), dense_scores(w, kind)[valid], atol=1e-6, rtol=0)


@pytest.mark.parametrize("center_writing_weights", [False, True])
@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_folding_equals_dense_scores_of_processed_weights(kind, center_writing_weights) -> None:
    model = make_gpt2(n_layer=3).double()
    nontrivial_ln(model)
    w = attnlens.extract_weights(model)
    folded = circuits.composition_scores(w, kind, fold_ln=True, center_writing_weights=center_writing_weights)
    p = w.processed(fold_ln=True, center_writing_weights=center_writing_weights, center_unembed=False)
    valid = valid_mask(3, 4)
    assert_close(folded[valid], dense_scores(p, kind)[valid], atol=1e-14, rtol=1e-12)
    assert (folded[valid] - circuits.composition_scores(w, kind)[valid]).abs().max() > 1e-3  # folding is visible


def test_centring_the_writing_weights_alone() -> None:
    model = make_gpt2(n_layer=2).double()
    w = attnlens.extract_weights(model)
    scores = circuits.composition_scores(w, "V", center_writing_weights=True)
    p = w.processed(fold_ln=False, center_writing_weights=True, center_unembed=False)
    assert_close(scores[0, :, 1], dense_scores(p, "V")[0, :, 1], atol=1e-14, rtol=1e-12)


def test_bfloat16_weights_are_upcast_exactly() -> None:
    model = make_gpt2(n_layer=2).to(torch.bfloat16)
    w = attnlens.extract_weights(model)
    assert w.dtype == torch.bfloat16
    for kind in "QKV":
        scores = circuits.composition_scores(w, kind)
        assert scores.dtype == torch.float64
        # dense_scores upcasts the same bf16 values: the scores of the weights as stored, with no bf16 arithmetic.
        assert_close(scores[0, :, 1], dense_scores(w, kind)[0, :, 1], atol=1e-14, rtol=1e-12)
        folded = circuits.composition_scores(w, kind, fold_ln=True, dtype=torch.float32)
        assert folded.dtype == torch.float32 and torch.isfinite(folded[0, :, 1]).all()


def test_a_zero_head_scores_zero_and_the_model_is_untouched() -> None:
    model = make_gpt2(n_layer=2)
    w = attnlens.extract_weights(model)
    with torch.no_grad():
        w.layers[0].W_O[2].zero_()  # a view of the model's own parameter: head L0H2 now writes nothing
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scores = circuits.composition_scores(w, "K")
    assert not scores.requires_grad
    assert_bitwise(scores[0, 2, 1], torch.zeros_like(scores[0, 2, 1]), "exact")  # a zero W_O: products of zeros
    assert (scores[0, [0, 1, 3], 1] > 0).all()
    for name, p in model.named_parameters():
        assert_bitwise(p.detach(), before[name], "copy")
        assert p.requires_grad == flags[name]


def test_bad_arguments_are_refused_by_name() -> None:
    model = make_gpt2()
    w = attnlens.extract_weights(model)
    for kind in ("k", "QK", "", None):
        with pytest.raises(ValueError, match=r"kind must be 'Q', 'K' or 'V'"):
            circuits.composition_scores(w, kind)
        with pytest.raises(ValueError, match=r"kind must be 'Q', 'K' or 'V'"):
            circuits.composition_baseline(w, kind)
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32"):
        circuits.composition_scores(w, "K", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"attnlens.extract_weights\(model\)"):
        circuits.composition_scores(model, "K")
    for n in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="n_samples must be an integer >= 2"):
            circuits.composition_baseline(w, "K", n_samples=n)


def test_demo_induction_head_reads_the_previous_token_head_through_its_keys() -> None:
    model, _ = attnlens.load_demo()
    w = attnlens.extract_weights(model)
    k = circuits.composition_scores(w, "K")
    assert k.shape == (2, 4, 2, 4)
    baseline = circuits.composition_baseline(w, "K")
    # L1H0 is the demo's induction head, L0H0 its previous-token head (docs/demo-model.md).
    partners = k[0, :, 1, 0]
    assert partners.argmax() == 0
    assert partners[0] > 3 * baseline.mean
    assert partners[0] > 2 * partners[1:].max()


def test_baseline_is_seeded_and_its_rms_is_exact() -> None:
    w = attnlens.extract_weights(make_gpt2(n_embd=32, n_head=4))
    a, b = circuits.composition_baseline(w, "K", seed=1), circuits.composition_baseline(w, "K", seed=1)
    assert a == b
    c = circuits.composition_baseline(w, "K", seed=2)
    assert c.mean != a.mean and abs(c.mean - a.mean) < 5 * math.hypot(a.stderr, c.stderr)
    assert (a.d_model, a.d_head, a.n_samples, a.seed, a.kind) == (32, 8, 200, 1, "K")
    assert a.rms == 1 / math.sqrt(32)
    assert a.mean < a.rms  # Jensen: E[s] <= sqrt(E[s^2])


def test_baseline_matches_the_scores_of_randomly_initialised_models() -> None:
    """Freshly initialised GPT-2 weights are Gaussian: their composition scores are draws of the baseline.

    Pairs (L0Hi, L1Hi) share no weights, so within and across models they are independent samples. The empirical
    mean must agree with the baseline within 4 standard errors of the difference (both means' errors combined); the
    empirical mean square must agree with the exact 1/d_model within 4 of its standard errors.
    """
    d_model, n_head = 32, 8  # d_head 4: low rank, where the mean sits furthest below the rms
    per_kind: dict[str, list[torch.Tensor]] = {"Q": [], "K": [], "V": []}
    for seed in range(40):
        w = attnlens.extract_weights(make_gpt2(seed=seed, n_layer=2, n_embd=d_model, n_head=n_head))
        for kind, samples in per_kind.items():
            samples.append(circuits.composition_scores(w, kind)[0, :, 1, :].diagonal())
    for kind, samples in per_kind.items():
        s = torch.cat(samples)  # 320 independent scores
        baseline = circuits.composition_baseline(w, kind, n_samples=4000)
        mean, stderr = s.mean().item(), s.std().item() / math.sqrt(len(s))
        tolerance = 4 * math.hypot(stderr, baseline.stderr)
        assert tolerance < 0.05 * baseline.mean  # a baseline 5% off would fail
        assert abs(mean - baseline.mean) < tolerance, (kind, mean, baseline)
        sq_stderr = s.square().std().item() / math.sqrt(len(s))
        assert abs(s.square().mean().item() - 1 / d_model) < 4 * sq_stderr, kind
        # At d_head 4 the baseline's mean sits measurably below the rms (Jensen), as the docstring says.
        assert baseline.rms - baseline.mean > 4 * baseline.stderr


def test_nan_pairs_are_never_ranked_and_rank_last_in_head_slices() -> None:
    model = make_gpt2(n_layer=3)
    w = attnlens.extract_weights(model)
    scores = circuits.composition_scores(w, "K")
    assert scores.isnan().sum() == 6 * 4 * 4  # (l1, l2) with l1 >= l2: 6 of the 9 layer pairs
    for largest in (True, False):
        ranked = circuits.top_pairs(scores, 1000, largest=largest)
        assert len(ranked) == 3 * 16 and all(l1 < l2 for l1, _, l2, _, _ in ranked)
        values = [score for *_, score in ranked]
        assert values == sorted(values, reverse=largest) and not any(math.isnan(v) for v in values)
        l1, h1, l2, h2, best = ranked[0]
        assert best == float(scores[l1, h1, l2, h2])
    assert circuits.top_pairs(scores, 2) == circuits.top_pairs(scores, 1000)[:2]
    # One earlier head against every head: a [layer, head] slice with NaN rows, as top_heads and figures take it.
    row = scores[1, 2]
    assert row[:2].isnan().all() and not row[2].isnan().any()
    for largest in (True, False):
        ranked = attnlens.metrics.top_heads(row, 12, largest=largest)
        assert [layer for layer, _, _ in ranked[:4]] == [2, 2, 2, 2]  # numbers first, NaN last both ways
        assert all(math.isnan(score) for _, _, score in ranked[4:])
    with pytest.raises(ValueError, match=r"\[layer, head, layer, head\]"):
        circuits.top_pairs(row)


def test_composition_rows_with_nan_draw_as_blank_cells() -> None:
    optional("matplotlib", "pip install 'attnlens[viz]'").use("Agg")
    from attnlens import viz

    w = attnlens.extract_weights(make_gpt2(n_layer=3))
    row = circuits.composition_scores(w, "V")[0, 1]  # layer 0 cannot be composed into: NaN
    fig = viz.plot_head_scores(row)
    ax = fig.axes[0]
    assert len(ax.texts) == 2 * 4  # only the finite cells are written
    assert ax.images[0].get_array().mask[0].all() and not ax.images[0].get_array().mask[1:].any()
    lo, hi = ax.images[0].get_clim()
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi


def test_composition_rows_with_nan_through_scan_result_top_and_the_views_score_table() -> None:
    from attnlens.scan_result import ScanResult
    from attnlens.viz._packing import score_table

    w = attnlens.extract_weights(make_gpt2(n_layer=3))
    row = circuits.composition_scores(w, "Q")[0, 3]  # [layer, head]; layer 0 is NaN
    as_scan = ScanResult(
        scores=("q_composition",),
        layers=(0, 1, 2),
        heads=(0, 1, 2, 3),
        mean={"q_composition": row},
        stderr={"q_composition": torch.zeros_like(row)},
        count={"q_composition": torch.ones(3, 4, dtype=torch.int64)},
        n_tokens=0,
        n_windows=0,
    )
    for largest in (True, False):
        ranked = as_scan.top("q_composition", 12, largest=largest)
        assert all(layer > 0 and not math.isnan(score) for layer, _, score in ranked[:8])
        assert all(layer == 0 and math.isnan(score) for layer, _, score in ranked[8:])
    table = score_table({"q": row}, [0, 1, 2], range(4))["q"]
    assert table[0] == [None] * 4 and all(isinstance(v, float) for v in table[1] + table[2])  # NaN written as null
