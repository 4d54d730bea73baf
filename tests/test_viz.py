"""Tests of attnlens.viz: matplotlib figures (Agg), the HTML view's structure, the HTML view in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import missing, optional

from attnlens import viz

HOSTILE = [
    "<img src=x onerror=\"document.title='PWNED'\">",
    "</script><script>document.title='PWNED'</script>",
    "<script>document.title='PWNED'</script>",
    "\" onmouseover=\"document.title='PWNED'",
    "&lt;b&gt; &amp;",
]
PLAIN = ["The", " cat", " sat", " on", " the", " mat", ".", "\n"]


def causal_patterns(n_layer: int, n_head: int, n_pos: int, seed: int = 0) -> torch.Tensor:
    """Softmax of random causal scores: [layer, head, q_pos, k_pos], rows summing to one."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layer, n_head, n_pos, n_pos, generator=generator)
    future = ~torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def decode(html: str) -> dict[str, Any]:
    """The JSON data block of a pattern_html view, and the view's id."""
    match = re.search(r'<script type="application/json" id="([\w-]+)-data">(.*?)</script>', html, re.S)
    assert match is not None, "no data block in the view"
    data = json.loads(match.group(2))
    data["id"] = match.group(1)
    return data


def dense(data: dict[str, Any]) -> np.ndarray:
    """The stored weights as a dense [layer, head, q_pos, k_pos] array (rows padded with the dropped zeros)."""
    out = np.zeros((len(data["layers"]), data["n_head"], data["q_pos"], data["k_pos"]))
    for li, heads in enumerate(data["patterns"]):
        for h, rows in enumerate(heads):
            for q, row in enumerate(rows):
                out[li, h, q, : len(row)] = [np.nan if v is None else v / data["scale"] for v in row]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Import weight


def test_import_and_html_do_not_load_matplotlib() -> None:
    code = (
        "import sys, torch, attnlens.viz as v\n"
        "assert 'matplotlib' not in sys.modules, 'import loaded matplotlib'\n"
        "v.pattern_html(torch.full((1, 1, 2, 2), 0.5), ['a', 'b'])\n"
        "assert 'matplotlib' not in sys.modules, 'pattern_html loaded matplotlib'\n"
        "print('light')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "light"


# ---------------------------------------------------------------------------------------------------------------
# HTML structure (pure Python)


def test_html_data_round_trips_rounded_weights() -> None:
    patterns = causal_patterns(3, 2, 6)
    html = viz.pattern_html(patterns, PLAIN[:6], layers=[2, 5, 9], title="demo")
    data = decode(html)
    assert data["layers"] == [2, 5, 9]
    assert (data["n_head"], data["q_pos"], data["k_pos"]) == (2, 6, 6)
    assert data["q_labels"] == data["k_labels"] == [viz.visible(t) for t in PLAIN[:6]]
    np.testing.assert_allclose(dense(data), patterns.numpy(), rtol=0, atol=0.5e-4 + 1e-9)
    # Stored as ints in units of 1e-4, i.e. rounded to 4 decimals.
    assert all(isinstance(v, int) for heads in data["patterns"] for rows in heads for row in rows for v in row)
    # The masked future of a causal pattern is not stored: row q holds at most q + 1 entries.
    row_lengths = [len(row) for row in data["patterns"][0][0]]
    assert all(length <= q + 1 for q, length in enumerate(row_lengths)), row_lengths


def test_html_queries_are_the_last_tokens_when_fewer_queries_than_keys() -> None:
    patterns = causal_patterns(1, 2, 5)[:, :, -2:, :]
    data = decode(viz.pattern_html(patterns, PLAIN[:5]))
    assert data["q_labels"] == ["␣on", "␣the"]
    assert data["k_labels"] == ["The", "␣cat", "␣sat", "␣on", "␣the"]
    np.testing.assert_allclose(dense(data), patterns.numpy(), atol=0.5e-4 + 1e-9)


def test_html_escapes_hostile_tokens_and_title() -> None:
    tokens = [*HOSTILE, "ok"]
    html = viz.pattern_html(causal_patterns(1, 1, len(tokens)), tokens, title="<script>alert('t')</script>")
    # Exactly the view's own two script elements (data, code): no token opened or closed one.
    assert html.count("<script") == 2
    assert html.count("</script>") == 2
    assert "<img" not in html
    assert "onerror=" not in html.split("<script", 1)[0]  # nothing hostile in the markup before the data block
    assert "&lt;script&gt;alert(&#x27;t&#x27;)&lt;/script&gt;" in html
    # The data block decodes back to the exact token strings.
    assert decode(html)["k_labels"] == [viz.visible(t) for t in tokens]
    data_block = html[html.index('type="application/json"') : html.index("</script>")]
    assert not set("<&") & set(data_block.split(">", 1)[1]), "raw < or & inside the JSON block"


# Every slot any view's template has: a user's string that names one is shown as given, never filled in.
PLACEHOLDERS = ["@ID@", "@DATA@", "@HEADING@", "@UNPACK@"]


@pytest.mark.parametrize("view", ["pattern_html", "overview_html", "text_html"])
@pytest.mark.parametrize("slot", PLACEHOLDERS)
def test_html_placeholders_in_user_strings_stay_text(view: str, slot: str) -> None:
    tokens = [slot, f"a{slot}b", "ok", slot * 2]
    title = f"{slot} and {slot}"
    kwargs: dict[str, Any] = {"title": title}
    if view == "overview_html":
        kwargs["scores"] = {slot: np.zeros((1, 2)), "plain": np.ones((1, 2))}
    html = getattr(viz, view)(causal_patterns(1, 2, len(tokens)), tokens, **kwargs)
    headings = re.findall(r'<div class="al-title">(.*?)</div>', html, re.S)
    assert [unescape(h) for h in headings] == [title]
    data = decode(html)
    assert data["labels" if view != "pattern_html" else "k_labels"] == [viz.visible(t) for t in tokens]
    if view == "text_html":
        assert data["texts"] == tokens
    if view == "overview_html":
        assert list(data["scores"]) == [slot, "plain"]
    # The template's own slots were all filled once: one data block, one script, the id where the template puts it.
    assert html.count('type="application/json"') == 1 and html.count("<script") == 2
    assert html.count(f'id="{data["id"]}"') == 1


def test_html_is_offline_ascii_and_fetches_nothing() -> None:
    html = viz.pattern_html(causal_patterns(2, 2, 4), [" é", "日本", "$x$", "\u2028"], title="Ünïcode")
    assert html.isascii()
    lowered = html.lower()
    for needle in ("http:", "https:", "//cdn", "src=", "href=", "@import", "url(", "fetch(", "xmlhttprequest"):
        assert needle not in lowered, needle
    assert decode(html)["k_labels"] == ["␣é", "日本", "$x$", "\u2028"]


def test_html_ids_are_unique_per_call() -> None:
    patterns = causal_patterns(1, 1, 3)
    first, second = viz.pattern_html(patterns, PLAIN[:3]), viz.pattern_html(patterns, PLAIN[:3])
    first_id, second_id = decode(first)["id"], decode(second)["id"]
    assert first_id != second_id
    for html, view_id in ((first, first_id), (second, second_id)):
        ids = re.findall(r'\bid="([^"]+)"', html)
        assert ids == [view_id, f"{view_id}-data"]
        assert html.count(f'getElementById("{view_id}")') == 1
        assert html.count(f"#{view_id} ") >= 5  # its style rules are scoped to it


def test_html_initial_view_and_nan() -> None:
    patterns = causal_patterns(2, 3, 4).numpy()
    patterns[1, 2, 3, 1] = np.nan
    data = decode(viz.pattern_html(patterns, None, layers=[4, 6], layer=6, head=2))
    assert data["initial"] == {"layer": 1, "head": 2}
    assert data["k_labels"] == ["0", "1", "2", "3"]
    assert data["patterns"][1][2][3][1] is None
    assert np.isnan(dense(data)[1, 2, 3, 1])


def test_html_accepts_grad_bfloat16_tensors() -> None:
    patterns = causal_patterns(1, 2, 4).to(torch.bfloat16).requires_grad_(True)
    data = decode(viz.pattern_html(patterns, PLAIN[:4]))
    np.testing.assert_allclose(dense(data), patterns.detach().double().numpy(), atol=0.5e-4 + 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patterns": np.zeros((2, 3, 3))}, ValueError, r"\[layer, head, q_pos, k_pos\]"),
        ({"patterns": np.zeros((1, 1, 1, 3, 3))}, ValueError, r"patterns\[0\]"),
        ({"tokens": ["a", "b"]}, ValueError, "2 tokens .* 3 key positions"),
        ({"tokens": "abc"}, TypeError, "one string"),
        ({"tokens": ["a", 1, "c"]}, TypeError, r"tokens\[1\] must be a str"),
        ({"layers": [0, 1]}, ValueError, "names 2 layers"),
        ({"layer": 3}, ValueError, "layer 3 is not among"),
        ({"head": 2}, ValueError, "head 2 is out of range"),
        ({"patterns": np.zeros((1, 2, 4, 3))}, ValueError, "more query positions"),
        ({"patterns": "weights"}, TypeError, "numeric array"),
    ],
)
def test_html_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"patterns": np.full((1, 2, 3, 3), 1 / 3), "tokens": ["a", "b", "c"]}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        viz.pattern_html(args.pop("patterns"), args.pop("tokens"), **args)


def test_save_html_wraps_fragments_only(tmp_path: Path) -> None:
    fragment = viz.pattern_html(causal_patterns(1, 1, 2), ["a", "b"])
    page = viz.save_html(fragment, tmp_path / "view.html", title="<b>x</b>").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page
    assert "<title>&lt;b&gt;x&lt;/b&gt;</title>" in page
    assert fragment in page
    document = "<!DOCTYPE html><html><body>mine</body></html>"
    assert viz.save_html(document, tmp_path / "doc.html").read_text(encoding="utf-8") == document


def test_html_from_a_real_model(gpt2_factory: Any) -> None:
    model = gpt2_factory(n_layer=2, n_head=4)
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert attentions is not None and len(attentions) == 2, "eager model returned no attentions"
    patterns = torch.stack(attentions, dim=1)[0]  # [layer, head, q_pos, k_pos]
    data = decode(viz.pattern_html(patterns, [f"t{i}" for i in ids[0].tolist()]))
    np.testing.assert_allclose(dense(data), patterns.numpy(), atol=0.5e-4 + 1e-9)
    np.testing.assert_allclose(dense(data).sum(-1), 1.0, atol=5 * 0.5e-4)


# ---------------------------------------------------------------------------------------------------------------
# matplotlib (Agg)


@pytest.fixture
def mpl() -> Any:
    matplotlib = optional("matplotlib", "pip install 'attnlens[viz]'")
    matplotlib.use("Agg")
    return matplotlib


def tick_texts(labels: Any) -> list[str]:
    return [label.get_text() for label in labels]


def test_plot_pattern_labels_and_colour_bar(mpl: Any) -> None:
    from matplotlib.figure import Figure

    tokens = ["The", " $5", "\n", " cat"]
    pattern = causal_patterns(1, 1, 4)[0, 0]
    fig = viz.plot_pattern(pattern, tokens, title="L0H0")
    assert isinstance(fig, Figure)
    heatmap, colour_bar = fig.axes
    assert tick_texts(heatmap.get_xticklabels()) == ["The", r"␣\$5", "⏎", "␣cat"]
    assert tick_texts(heatmap.get_yticklabels()) == ["The", r"␣\$5", "⏎", "␣cat"]
    assert (heatmap.get_xlabel(), heatmap.get_ylabel(), heatmap.get_title()) == ("key", "query", "L0H0")
    assert colour_bar.get_ylabel() == "attention weight"
    np.testing.assert_allclose(np.asarray(heatmap.images[0].get_array()), pattern.numpy(), rtol=1e-6)
    assert heatmap.images[0].get_clim() == (0.0, 1.0)


def test_plot_pattern_queries_are_last_tokens_and_ax_is_used(mpl: Any) -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    pattern = np.full((2, 5), 0.2)
    assert viz.plot_pattern(pattern, PLAIN[:5], ax=ax, vmax=None) is fig
    assert tick_texts(ax.get_yticklabels()) == ["␣on", "␣the"]
    assert ax.images[0].get_clim() == pytest.approx((0.0, 0.2))
    with pytest.raises(ValueError, match=r"one head: pattern must be \[q_pos, k_pos\]"):
        viz.plot_pattern(np.zeros((1, 2, 2)))


def test_plot_head_scores_annotates_values(mpl: Any) -> None:
    scores = torch.tensor([[0.1, 0.25, 0.9], [0.5, float("nan"), 0.05]])
    fig = viz.plot_head_scores(scores, title="induction", layers=[3, 7])
    ax = fig.axes[0]
    assert sorted(tick_texts(ax.texts)) == sorted(["0.10", "0.25", "0.90", "0.50", "0.05"])
    assert tick_texts(ax.get_yticklabels()) == ["3", "7"]
    assert tick_texts(ax.get_xticklabels()) == ["0", "1", "2"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("head", "layer", "induction")
    # Text colour follows the cell: light text on viridis' dark low end, dark text on its yellow top.
    colours = {text.get_text(): text.get_color() for text in ax.texts}
    assert (colours["0.05"], colours["0.90"]) == ("white", "black")
    assert not viz.plot_head_scores(scores, annotate=False).axes[0].texts


def test_save_figure_formats(mpl: Any, tmp_path: Path) -> None:
    fig = viz.plot_pattern(causal_patterns(1, 1, 6)[0, 0], PLAIN[:6])
    signatures = {".png": b"\x89PNG\r\n\x1a\n", ".svg": b"<?xml", ".pdf": b"%PDF"}
    for suffix, signature in signatures.items():
        path = viz.save_figure(fig, tmp_path / f"pattern{suffix}")
        content = path.read_bytes()
        assert content.startswith(signature), suffix
        assert len(content) > 1000, suffix
    with pytest.raises(ValueError, match="cannot tell the figure format"):
        viz.save_figure(fig, tmp_path / "pattern.jpeg")


def test_plotting_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'attnlens\[viz\]'"):
        viz.plot_head_scores(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Headless Chromium


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing("no chromium binary on PATH (Debian: apt-get install chromium)")
    return found


def run_chromium(tmp_path: Path, url: str, *action: str) -> str:
    command = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        # No name resolves: the page must work with no network at all.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *action,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def dump_dom(tmp_path: Path, url: str) -> str:
    dom = run_chromium(tmp_path, url, "--dump-dom")
    assert dom.rstrip().endswith("</html>"), dom[-200:]
    return dom


def view_attributes(dom: str) -> dict[str, str]:
    match = re.search(r'<div class="attnlens-view"([^>]*)>', dom)
    assert match is not None, "no view in the dumped DOM"
    return {name: unescape(value) for name, value in re.findall(r'([\w-]+)="([^"]*)"', match.group(1))}


def page_title(dom: str) -> str:
    match = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert match is not None
    return match.group(1)


@pytest.mark.browser
def test_browser_detects_injection_when_there_is_one(tmp_path: Path) -> None:
    # The harness itself: an unescaped hostile token does run and is seen, so the test below can fail.
    page = viz.save_html(f"<p>{HOSTILE[0]}</p><p>{HOSTILE[2]}</p>", tmp_path / "raw.html", title="raw")
    assert page_title(dump_dom(tmp_path, page.as_uri())) == "PWNED"


@pytest.mark.browser
def test_browser_hostile_tokens_render_as_text(tmp_path: Path) -> None:
    tokens = [*HOSTILE, "ok", " fine"]
    n_pos = len(tokens)
    html = viz.pattern_html(causal_patterns(2, 3, n_pos), tokens, layers=[4, 9], layer=9, head=1, title=HOSTILE[2])
    page = viz.save_html(html, tmp_path / "view.html", title="attnlens view")

    dom = dump_dom(tmp_path, page.as_uri())
    assert page_title(dom) == "attnlens view"
    assert "<img" not in dom
    attributes = view_attributes(dom)
    assert attributes["data-state"] == "drawn"
    assert (attributes["data-layer"], attributes["data-head"]) == ("9", "1")
    assert attributes["data-cells"] == str(n_pos * n_pos)
    # The select boxes were filled from the data.
    assert dom.count('<option value="') == 2 + 3

    # Pin a cell through the URL fragment (the same text a hover shows): hostile tokens appear as text only.
    dom = dump_dom(tmp_path, page.as_uri() + "#layer=4&head=2&q=1&k=0")
    assert page_title(dom) == "attnlens view"
    attributes = view_attributes(dom)
    assert (attributes["data-layer"], attributes["data-head"], attributes["data-cell"]) == ("4", "2", "1,0")
    status = re.search(r'data-role="status">(.*?)</div>', dom, re.S)
    assert status is not None
    assert status.group(1).startswith(
        "&lt;/script&gt;&lt;script&gt;document.title='PWNED'&lt;/script&gt; -&gt; "
        "&lt;img␣src=x␣onerror=\"document.title='PWNED'\"&gt;: 0."
    )
    assert "(layer 4, head 2, query 1, key 0)" in status.group(1)


@pytest.mark.browser
def test_browser_screenshot_shows_the_selected_head(tmp_path: Path) -> None:
    n_pos = 8
    patterns = causal_patterns(2, 3, n_pos)
    patterns[1, 2] = 0.0
    patterns[1, 2, :, 0] = 1.0  # every query on the first token: one yellow column, the rest dark purple
    page = viz.save_html(viz.pattern_html(patterns, PLAIN), tmp_path / "view.html")
    shot = tmp_path / "view.png"
    run_chromium(tmp_path, page.as_uri() + "#layer=1&head=2", f"--screenshot={shot}", "--window-size=700,500")
    content = shot.read_bytes()
    assert content.startswith(b"\x89PNG") and len(content) > 2000

    image_module = optional("matplotlib.image", "pip install 'attnlens[viz]'")
    pixels = np.rint(image_module.imread(shot)[..., :3] * 255).astype(int)

    def area(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels - np.array(rgb)).max(-1) <= 3).sum())

    yellow, purple = area((253, 231, 37)), area((68, 1, 84))
    # The view draws cells of 24 px: one column of 8 yellow cells and 7 columns of purple ones.
    assert yellow == pytest.approx(24 * 24 * n_pos, rel=0.1)
    assert purple == pytest.approx(7 * 24 * 24 * n_pos, rel=0.1)


@pytest.mark.browser
def test_browser_select_boxes_redraw_and_update_the_address(tmp_path: Path) -> None:
    patterns = causal_patterns(2, 3, 5)
    patterns[1, 2] = 0.0
    patterns[1, 2, :, 0] = 1.0  # the only head whose maximum is exactly 1
    driver = """<script>
(function () {
  var root = document.querySelector(".attnlens-view");
  var layer = root.querySelector("[data-role=layer]"), head = root.querySelector("[data-role=head]");
  root.setAttribute("data-test-before", root.dataset.layer + "," + root.dataset.head);
  layer.value = "1"; layer.dispatchEvent(new Event("change"));
  head.value = "2"; head.dispatchEvent(new Event("change"));
  root.setAttribute("data-test-hash", window.location.hash);
})();
</script>"""
    page = viz.save_html(viz.pattern_html(patterns, PLAIN[:5], layers=[6, 8]) + driver, tmp_path / "view.html")
    attributes = view_attributes(dump_dom(tmp_path, page.as_uri()))
    assert attributes["data-test-before"] == "6,0"
    assert (attributes["data-layer"], attributes["data-head"], attributes["data-max"]) == ("8", "2", "1.0000")
    assert attributes["data-test-hash"] == "#layer=8&head=2"


def test_plot_heads_pairs_side_by_side_with_one_colour_bar() -> None:
    optional("matplotlib")
    import attnlens
    from attnlens import metrics

    model, tok = attnlens.load("demo", attn_implementation="eager")
    text = "the cat sat on the mat . the cat sat on the mat . " * 3
    tr = attnlens.trace(model, text, tokenizer=tok)
    fig = viz.plot_heads(tr, [(1, 0), (0, 0), (1, 3)])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.images]
    assert [ax.get_title() for ax in panels] == ["L1H0", "L0H0", "L1H3"]
    assert len(fig.axes) == 4  # three panels and a single colour bar
    # Each panel shows the trace's own numbers (eager: the kernel's probabilities), on one 0..1 scale.
    assert np.array_equal(panels[0].images[0].get_array(), tr.pattern(1)[0, 0].numpy())
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in panels)
    n_pos = tr.input_ids.shape[1]
    shown = [t.get_text() for t in panels[0].get_xticklabels()]
    assert 0 < len(shown) < n_pos  # thinned: every label would overlap in a 3-inch panel
    top = metrics.head_scores(tr).top("induction", 2)  # (layer, head, score) rows go straight in
    assert len(viz.plot_heads(tr, top, cols=1).axes) == 3
    with pytest.raises(ValueError, match="not in the trace"):
        viz.plot_heads(attnlens.trace(model, text, tokenizer=tok, layers=[0]), [(1, 0)])


def test_overview_refuses_head_scores_of_other_layers_or_heads() -> None:
    # A HeadScores or ScanResult names its layers and heads; one of the same shape for others was drawn under the
    # patterns' labels (layer 1's scores beside layer 0's thumbnails).
    from conftest import make_gpt2

    import attnlens
    from attnlens import metrics

    model = make_gpt2(n_layer=2)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7]])
    forward, backward = attnlens.trace(model, ids, layers=[0, 1]), attnlens.trace(model, ids, layers=[1, 0])
    tokens = [str(i) for i in range(6)]
    with pytest.raises(
        ValueError, match=r"scores are of layers \[0, 1\] and heads \[0, 1, 2, 3\], the patterns show layers \[1, 0\]"
    ):
        viz.overview_html(backward, tokens, scores=metrics.head_scores(forward))
    some = attnlens.trace(model, ids, heads=[3, 1])
    with pytest.raises(ValueError, match=r"heads \[0, 1, 2, 3\], the patterns show layers \[0, 1\] and heads \[3, 1\]"):
        viz.overview_html(some, tokens, scores=metrics.head_scores(forward))
    own = decode(viz.overview_html(backward, tokens, scores=metrics.head_scores(backward)))["scores"]
    assert own == decode(viz.overview_html(backward, tokens))["scores"] and len(own["previous_token"]) == 2
