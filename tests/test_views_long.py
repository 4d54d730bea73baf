"""Figures and HTML views of long inputs: block reduction, budgets, and memory and size at n_ctx (GPT-2 small).

The n_ctx tests build a [layer, head, pos, pos] stack of GPT-2 small's shape (12 x 12 heads, 1024 positions, 604 MB
in float32) in a fresh process, draw or write one view, and read that process's peak resident memory: before these
views read one head at a time, a 300-token plot_pattern took 6.9 GB and a 1024-token overview needed a 1.1 GiB float64
copy of the stack before drawing anything.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import optional

import attnlens
from attnlens import viz
from attnlens.cli import main
from attnlens.viz._source import block_reduce

# The base64 budget of a view's weights is 4 MB; labels and script add little, the page must stay under 5 MB.
PAGE_LIMIT = 5_000_000
STEP = 0.5 / 254  # the largest error of a weight stored in one byte


def causal(n_layer: int, n_head: int, n_pos: int, seed: int = 0, sharpness: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layer, n_head, n_pos, n_pos, generator=generator) * sharpness
    future = ~torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def view_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="[\w-]+-data">(.*?)</script>', html, re.S)
    assert match is not None
    return json.loads(match.group(1))


def decoded(packed: dict[str, Any]) -> np.ndarray:
    """The stored weights as dense ``[count, q_pos, k_pos]``, decoded as the page decodes them."""
    codes = np.frombuffer(zlib.decompress(base64.b64decode(packed["blob"])), dtype=np.uint8)
    values = np.where(codes == 255, np.nan, codes / packed["levels"])
    q_pos, k_pos, count = packed["q_pos"], packed["k_pos"], packed["count"]
    if not packed["tri"]:
        return values.reshape(count, q_pos, k_pos)
    out = np.zeros((count, q_pos, k_pos))
    rows, cols = np.tril_indices(q_pos)
    out[:, rows, cols] = values.reshape(count, -1)
    return out


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


# ---------------------------------------------------------------------------------------------------------------
# Block reduction


def test_block_reduce_is_the_max_or_mean_of_each_block_edges_included() -> None:
    weights = np.random.default_rng(0).random((7, 10))
    weights[5, 9] = np.nan
    for how, reduce in (("max", np.max), ("mean", np.mean)):
        out = block_reduce(weights, 3, 4, how)
        assert out.shape == (3, 3)
        for i in range(3):
            for j in range(3):
                block = weights[3 * i : 3 * i + 3, 4 * j : 4 * j + 4]  # the last block of each axis is shorter
                if how == "max":  # a max is exact
                    np.testing.assert_array_equal(out[i, j], reduce(block))
                else:  # a sum of n weights in [0, 1], another order: at most n u (sum of n) / n apart, u = eps / 2
                    np.testing.assert_allclose(out[i, j], reduce(block), rtol=0, atol=block.size * np.finfo(float).eps)
    assert np.isnan(block_reduce(weights, 3, 4)[1, 2])  # a NaN shows as NaN, never hidden
    assert block_reduce(weights, 1, 1) is weights
    with pytest.raises(ValueError, match="reduce must be one of"):
        block_reduce(weights, 2, 2, "median")


# ---------------------------------------------------------------------------------------------------------------
# Figures


def test_plot_pattern_short_inputs_as_before_long_inputs_fixed_and_reduced() -> None:
    optional("matplotlib")
    short = viz.plot_pattern(causal(1, 1, 20)[0, 0], [f"t{i}" for i in range(20)])
    assert tuple(short.get_size_inches()) == pytest.approx((0.28 * 20 + 3.0, 0.28 * 20 + 2.0))
    assert len(short.axes[0].get_xticklabels()) == 20
    # 128 tokens: every token labelled, the figure no larger than 17 x 16 inches.
    labelled = viz.plot_pattern(causal(1, 1, 128)[0, 0], [f"t{i}" for i in range(128)])
    assert tuple(labelled.get_size_inches()) == pytest.approx((17.0, 16.0))
    assert len(labelled.axes[0].get_yticklabels()) == 128

    pattern = causal(1, 1, 1100)[0, 0]
    tokens = [f" w{i}" for i in range(1100)]
    fig = viz.plot_pattern(pattern, tokens, title="L0H0")
    ax = fig.axes[0]
    assert tuple(fig.get_size_inches()) == pytest.approx((11.5, 10.0))
    assert ax.get_title() == "L0H0 (1100 tokens: max of 3 x 3 blocks)"
    assert ax.get_xlabel() == "key position (blocks of 3)"
    image = ax.get_images()[0].get_array()
    assert image.shape == (367, 367)  # ceil(1100 / 3) <= 512
    np.testing.assert_array_equal(np.asarray(image), block_reduce(pattern.double().numpy(), 3, 3, "max"))
    ticks = ax.get_xticklabels()
    assert 20 <= len(ticks) <= 40 and ticks[1].get_text() == "35 ␣w35"  # thinned: position and token
    mean = viz.plot_pattern(pattern, reduce="mean", max_cells=100).axes[0]
    assert mean.get_title() == "1100 tokens: mean of 11 x 11 blocks"
    # Each band of 11 query rows carries 11 of weight over 121-cell blocks: its cells sum to 1/11.
    bands = np.asarray(mean.get_images()[0].get_array()).sum(1)
    np.testing.assert_allclose(bands, 1 / 11, rtol=1e-6)  # float32 weights summed: their rounding, 1100 terms
    with pytest.raises(ValueError, match="max_cells must be at least 1"):
        viz.plot_pattern(pattern, max_cells=0)
    with pytest.raises(ValueError, match="reduce must be 'max' or 'mean'"):
        viz.plot_overview(pattern[None, None], reduce="sum")
    # Fewer queries than keys: the y axis counts the last positions.
    rows = viz.plot_pattern(pattern[-3:], tokens).axes[0]
    assert rows.get_images()[0].get_array().shape == (3, 367)
    assert rows.get_ylim() == pytest.approx((1099.5, 1096.5))


def test_plot_overview_reduces_long_panels_and_says_so() -> None:
    optional("matplotlib")
    patterns = causal(2, 2, 300)
    fig = viz.plot_overview(patterns)
    assert fig.get_suptitle() == "300 tokens: each cell the max of a block of 3 x 3 weights"
    first = np.asarray(fig.axes[0].get_images()[0].get_array())
    np.testing.assert_array_equal(first, block_reduce(patterns[0, 0].double().numpy(), 3, 3))
    assert viz.plot_overview(patterns[..., :100, :100]).get_suptitle() == ""  # short: every weight, as before
    np.testing.assert_array_equal(
        np.asarray(viz.plot_overview(patterns[..., :100, :100]).axes[3].get_images()[0].get_array()),
        patterns[1, 1, :100, :100].double().numpy(),
    )


def test_plot_head_scores_of_a_very_large_model_is_capped() -> None:
    optional("matplotlib")
    assert tuple(viz.plot_head_scores(np.zeros((12, 12))).get_size_inches()) == pytest.approx((9.2, 6.9))  # as before
    fig = viz.plot_head_scores(np.random.default_rng(0).random((80, 64)))  # Llama-70B's 80 layers x 64 heads
    assert tuple(fig.get_size_inches()) == pytest.approx((30.0, 30.0))


def test_inspect_png_of_a_long_text_stays_within_its_pixel_budget(tmp_path: Path) -> None:
    optional("matplotlib")
    ids = [str(i % 250 + 10) for i in range(250)]  # the demo model's 256 positions, nearly all
    head, overview = tmp_path / "head.png", tmp_path / "overview.png"
    assert main(["inspect", "--ids", *ids, "--layer", "1", "--out", str(head)]) == 0
    assert main(["inspect", "--ids", *ids, "--view", "overview", "--out", str(overview)]) == 0
    width, height = png_size(head)
    assert width <= 2000 and height <= 2000, (width, height)  # 11.5 x 10 inches at 150 dpi, trimmed
    assert max(png_size(overview)) <= 2000


# ---------------------------------------------------------------------------------------------------------------
# HTML views within their budget


def test_overview_stores_block_maxima_when_every_weight_does_not_fit() -> None:
    patterns = causal(2, 3, 40)
    full = view_data(viz.overview_html(patterns))
    assert full["block"] == 1 and full["packed"]["count"] == 6
    np.testing.assert_allclose(decoded(full["packed"]), patterns.reshape(6, 40, 40).numpy(), atol=STEP + 1e-12)
    html = viz.overview_html(patterns, [f"t{i}" for i in range(40)], max_bytes=2_000)
    data = view_data(html)
    block = data["block"]
    assert block > 1 and data["n_pos"] == -(-40 // block) and data["n_tokens"] == 40
    assert data["labels"][:2] == [f"0-{block - 1}", f"{block}-{2 * block - 1}"]
    maxima = np.stack([block_reduce(h.double().numpy(), block, block) for h in patterns.reshape(6, 40, 40)])
    np.testing.assert_allclose(decoded(data["packed"]), maxima, atol=STEP + 1e-12)
    assert "the largest weight in a block of" in html


def test_text_view_keeps_the_selected_heads_first_and_lists_what_it_holds() -> None:
    patterns = causal(3, 2, 60, sharpness=1.0)
    data = view_data(viz.text_html(patterns, heads=[(2, 1), (0, 1)], max_bytes=3_000))
    stored = data["stored"]
    assert stored[:2] == [5, 1] and 2 <= len(stored) < 6  # the selected heads, then others while they fit
    assert len(stored) == data["packed"]["count"]
    flat = patterns.reshape(6, 60, 60).numpy()
    np.testing.assert_allclose(decoded(data["packed"]), flat[stored], atol=STEP + 1e-12)
    every = view_data(viz.text_html(patterns))
    assert every["stored"] == [0, 1, 2, 3, 4, 5]


def test_head_view_of_a_long_input_packs_bytes_then_block_maxima(monkeypatch: pytest.MonkeyPatch) -> None:
    import attnlens.viz.html as html_module

    patterns = causal(2, 2, 50)
    assert "patterns" in view_data(viz.pattern_html(patterns))  # short: 4-decimal JSON, as before
    monkeypatch.setattr(html_module, "_JSON_CELLS", 100)
    data = view_data(viz.pattern_html(patterns))
    assert "patterns" not in data and data["packed"]["count"] == 4 and data["note"] == ""
    np.testing.assert_allclose(decoded(data["packed"]), patterns.reshape(4, 50, 50).numpy(), atol=STEP + 1e-12)
    html = viz.pattern_html(patterns, max_bytes=1_500)
    data = view_data(html)
    block = data["block_q"]
    assert block > 1 and data["block_k"] == block and data["q_pos"] == -(-50 // block)
    maxima = np.stack([block_reduce(h.double().numpy(), block, block) for h in patterns.reshape(4, 50, 50)])
    np.testing.assert_allclose(decoded(data["packed"]), maxima, atol=STEP + 1e-12)
    assert "long input (50 tokens)" in data["note"]
    # Fewer queries than keys: whole rows, block labels counted from the first query's position.
    rows = view_data(viz.pattern_html(patterns[..., -20:, :], max_bytes=800))
    assert rows["packed"]["tri"] is False and rows["q_labels"][0].startswith("30-")


def test_notebook_view_of_a_trace_reads_the_trace() -> None:
    patterns = causal(2, 2, 6)[:, None]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    trace = attnlens.AttentionTrace.from_patterns(patterns, attention_mask=mask, tokens=[list("abcdef")])
    data = view_data(trace._repr_html_())
    assert data["k_labels"] == list("bcdef")  # padding removed
    stored = np.array(data["patterns"][1][0][4] + [0] * (5 - len(data["patterns"][1][0][4]))) / data["scale"]
    np.testing.assert_allclose(stored, patterns[1, 0, 0, 5, 1:].numpy(), atol=0.5e-4 + 1e-7)


def test_lines_view_stores_only_the_chosen_rows_large_weights() -> None:
    patterns = causal(2, 3, 300)
    tokens = [f" w{i}" for i in range(300)]
    html = viz.lines_html(patterns, tokens, layer=1, head=2, queries=[-1, 150, 7], min_weight=0.05)
    data = view_data(html)
    assert [row["q"] for row in data["rows"]] == [299, 150, 7]
    for row in data["rows"]:
        weights = patterns[1, 2, row["q"]].double().numpy()
        keys = np.flatnonzero(weights >= 0.05)
        assert row["keys"] == keys.tolist()
        np.testing.assert_allclose(np.array(row["w"]) / data["scale"], weights[keys], atol=0.5e-4 + 1e-12)
        assert row["drawn"] == pytest.approx(weights[keys].sum(), abs=1e-4)
    assert len(html) < 20_000  # three rows, whatever the length
    assert view_data(viz.lines_html(patterns, tokens))["rows"][0]["q"] == 299  # default: the last token
    assert [r["q"] for r in view_data(viz.lines_html(patterns, queries=slice(-3, None)))["rows"]] == [297, 298, 299]
    rows = viz.lines_html(patterns[..., -10:, :], queries=295)  # the queries are the last 10 positions
    assert view_data(rows)["rows"][0]["keys"] == np.flatnonzero(patterns[0, 0, 295].numpy() >= 0.02).tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queries": 300}, "query position 300 is out of range"),
        ({"queries": "first"}, "queries must be positions"),
        ({"queries": []}, "select no position"),
        ({"layer": 4}, "layer 4 is not among"),
        ({"head": 3}, "head 3 is not among"),
        ({"min_weight": 0.0}, "min_weight must lie in"),
    ],
)
def test_lines_view_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        viz.lines_html(causal(2, 3, 300), **kwargs)
    with pytest.raises(ValueError, match="has no row"):
        viz.lines_html(causal(1, 1, 30)[..., -5:, :], queries=3)


# ---------------------------------------------------------------------------------------------------------------
# n_ctx, GPT-2 small's shape, in a fresh process: peak memory, pixels and page size

_CHILD = r"""
import sys, json
from pathlib import Path
import torch
from attnlens import viz
import attnlens
import matplotlib.figure, matplotlib.backends.backend_agg  # loaded before measuring: not the view's memory

what, out = sys.argv[1], Path(sys.argv[2])
n_layer, n_head, n = 12, 12, 1024
generator = torch.Generator().manual_seed(0)
future = ~torch.ones(n, n, dtype=torch.bool).tril()
stack = torch.empty(n_layer, n_head, n, n)
for l in range(n_layer):
    for h in range(n_head):  # one head at a time: the stack is the only large allocation
        stack[l, h] = (torch.randn(n, n, generator=generator) * 3).masked_fill(future, float("-inf")).softmax(-1)
tokens = [f" w{i}" for i in range(n)]

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

# The peak of this process's own memory (VmHWM), reset here: getrusage's ru_maxrss also counts the parent pytest
# process this one was forked from (Linux keeps it across exec), which is large late in a whole-suite run.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
size = 0
if what == "plot_pattern":
    viz.save_figure(viz.plot_pattern(stack[5, 1], tokens, title="L5H1"), out)
elif what == "plot_overview":
    viz.save_figure(viz.plot_overview(stack), out)
else:
    if what == "notebook":
        trace = attnlens.AttentionTrace.from_patterns(stack[:, None], tokens=[tokens])
        html = trace._repr_html_()
    elif what == "lines_html":
        html = viz.lines_html(stack, tokens, layer=5, head=1, queries=slice(None, None, 16))
    else:
        html = getattr(viz, what)(stack, tokens)
    size = len(html)
peak = status("VmHWM")
print(json.dumps({"growth": peak - before, "size": size}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "what", ["plot_pattern", "plot_overview", "notebook", "pattern_html", "overview_html", "text_html", "lines_html"]
)
def test_views_at_n_ctx_stay_within_memory_pixels_and_page_size(what: str, tmp_path: Path) -> None:
    if what.startswith("plot"):
        optional("matplotlib")
    out = tmp_path / "figure.png"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, what, str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{what}: peak growth {result['growth'] / 2**20:.0f} MB, page {result['size']} characters")
    # Growth over the resident size just before the call (the 604 MB stack and the libraries are already there).
    assert result["growth"] < 300 * 2**20, f"{what}: peak grew by {result['growth'] / 2**20:.0f} MB"
    if what.startswith("plot"):
        width, height = png_size(out)
        assert width <= 2200 and height <= 2200, (width, height)  # within a 2200 px square at 150 dpi
    else:
        assert 0 < result["size"] < PAGE_LIMIT, f"{what}: {result['size']} characters"
