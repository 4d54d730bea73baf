"""The overview, text and head views in real headless Chromium (playwright), and their Python side.

Browser tests drive the page by script (clicks, hovers, select changes) and read what it shows; they skip with a
reason when playwright or the chromium binary is absent.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import missing, optional

import attnlens
from attnlens import viz
from attnlens.cli import main

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Each sets window.__pwned if it ever runs as markup or script.
HOSTILE = [
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=1</script>",
    '<svg onload="window.__pwned=1">',
    " ok",
]


def causal_patterns(n_layer: int, n_head: int, n_pos: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layer, n_head, n_pos, n_pos, generator=generator) * 2
    future = ~torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def view_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="[\w-]+-data">(.*?)</script>', html, re.S)
    assert match is not None
    return json.loads(match.group(1))


def unpacked(data: dict[str, Any], n_layer: int, n_head: int) -> np.ndarray:
    """The stored weights as a dense [layer, head, pos, pos] array, decoded as the page decodes them."""
    n = data["n_pos"]
    codes = np.frombuffer(zlib.decompress(base64.b64decode(data["packed"]["blob"])), dtype=np.uint8)
    out = np.zeros((n_layer * n_head, n, n))
    values = np.where(codes == 255, np.nan, codes / data["packed"]["levels"])
    if data["packed"]["tri"]:
        rows, cols = np.tril_indices(n)
        out[:, rows, cols] = values.reshape(n_layer * n_head, -1)
    else:
        out = values.reshape(n_layer * n_head, n, n)
    return out.reshape(n_layer, n_head, n, n)


# ---------------------------------------------------------------------------------------------------------------
# Python side: storage, labels, errors


def test_packed_weights_are_within_half_a_step() -> None:
    patterns = causal_patterns(2, 3, 9).numpy()
    patterns[1, 2, 4, 1] = np.nan
    data = view_data(viz.overview_html(patterns, [str(i) for i in range(9)]))
    assert data["packed"]["tri"] is True
    decoded = unpacked(data, 2, 3)
    assert np.isnan(decoded[1, 2, 4, 1])
    finite = np.isfinite(patterns)
    np.testing.assert_allclose(decoded[finite], patterns[finite], rtol=0, atol=0.5 / 254 + 1e-12)
    # A pattern with weight above the diagonal is stored whole.
    full = np.full((1, 1, 3, 3), 1 / 3)
    data = view_data(viz.text_html(full, ["a", "b", "c"]))
    assert data["packed"]["tri"] is False
    np.testing.assert_allclose(unpacked(data, 1, 1), full, atol=0.5 / 254)


def test_views_reject_bad_input() -> None:
    ok = causal_patterns(1, 2, 3)
    with pytest.raises(ValueError, match=r"weights in \[0, 1\]"):
        viz.overview_html(ok * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="pass batch=ROW"):
        viz.overview_html(ok[:, None], ["a", "b", "c"])
    with pytest.raises(ValueError, match="batch row 2 is out of range"):
        viz.text_html(ok[:, None], ["a", "b", "c"], batch=2)
    with pytest.raises(ValueError, match=r"head \(0, 5\) is not in the data"):
        viz.text_html(ok, ["a", "b", "c"], heads=[(0, 5)])
    with pytest.raises(ValueError, match="direction must be"):
        viz.text_html(ok, ["a", "b", "c"], direction="sideways")
    with pytest.raises(ValueError, match=r"scores\['x'\] has shape \(3, 3\)"):
        viz.overview_html(ok, ["a", "b", "c"], scores={"x": np.zeros((3, 3))})


def test_batch_row_and_trace_padding() -> None:
    patterns = torch.stack([causal_patterns(2, 2, 4, seed=0), causal_patterns(2, 2, 4, seed=1)], dim=1)
    data = view_data(viz.text_html(patterns, list("abcd"), batch=1))
    np.testing.assert_allclose(unpacked(data, 2, 2), patterns[:, 1].numpy(), atol=0.5 / 254 + 1e-12)
    # A trace's row: its left padding is dropped and its head scores are shown.
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    trace = attnlens.AttentionTrace.from_patterns(patterns, attention_mask=mask, tokens=[list("abcd"), list("wxyz")])
    data = view_data(viz.overview_html(trace, batch=1))
    assert data["labels"] == ["y", "z"] and data["n_pos"] == 2
    np.testing.assert_allclose(unpacked(data, 2, 2), patterns[:, 1, :, 2:, 2:].numpy(), atol=0.5 / 254 + 1e-12)
    assert set(data["scores"]) >= {"previous_token", "first_token", "entropy"}


def test_token_labels_decode_each_id_and_show_bytes() -> None:
    _, tokenizer = attnlens.load_demo()
    ids = tokenizer("The cat\n\tsat 日", return_tensors="pt").input_ids[0]
    assert any(piece.startswith("Ġ") for piece in tokenizer.convert_ids_to_tokens(ids.tolist()))
    labels = viz.token_labels(tokenizer, ids)
    assert labels[:4] == ["The", "␣cat", "⏎", "⇥"]
    assert not any("Ġ" in label or "Ċ" in label for label in labels)
    # 日 is three bytes, split by this byte-level BPE into three tokens: each shows its byte.
    assert labels[-3:] == ["\\xe6", "\\x97", "\\xa5"]
    assert viz.token_texts(tokenizer, ids)[:4] == ["The", " cat", "\n", "\t"]
    assert viz.visible(" a\r\n") == "␣a␍⏎"
    assert viz.visible("") == "∅"
    with pytest.raises(ValueError, match="pick a batch row"):
        viz.token_labels(tokenizer, [[1, 2]])


def test_token_labels_keep_complete_characters_of_a_merged_token() -> None:
    import tokenizers
    import transformers

    # A byte-level BPE with one merge: the first two bytes of 日 (e6 97) become one token, the last (a5) stays.
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["æĹ"] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=[("æ", "Ĺ")])
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tokenizer("a日", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "æĹ", "¥"]
    assert viz.token_labels(tokenizer, ids) == ["a", "\\xe6\\x97", "\\xa5"]


def test_html_views_are_notebook_objects_and_pages(tmp_path: Path) -> None:
    view = viz.overview_html(causal_patterns(1, 1, 3), ["a", "b", "c"])
    assert isinstance(view, str) and view._repr_html_() == str(view)
    assert view.isascii()
    page = view.save(tmp_path / "o.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and str(view) in page
    for needle in ("http:", "https:", "src=", "href=", "@import", "url(", "fetch("):
        assert needle not in view.lower(), needle


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_inspect_writes_every_view(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for view in ("head", "overview", "text"):
        out = tmp_path / f"{view}.html"
        argv = ["inspect", "--view", view, "--out", str(out)] + (["--layer", "1"] if view == "head" else [])
        assert main(argv) == 0, capsys.readouterr().err
        html = out.read_text(encoding="utf-8")
        assert {"head": "attnlens-view", "overview": "attnlens-overview", "text": "attnlens-text"}[view] in html
        assert "Ġ" not in html
    data = view_data((tmp_path / "text.html").read_text(encoding="utf-8"))
    assert data["texts"][:2] == ["The", " cat"]
    assert main(["inspect", "--view", "text", "--out", str(tmp_path / "t.png")]) == 2
    assert "--view text writes a page" in capsys.readouterr().err
    assert main(["inspect", "--out", str(tmp_path / "h.html")]) == 2
    assert "--view head needs --layer" in capsys.readouterr().err


def test_inspect_overview_png(tmp_path: Path) -> None:
    optional("matplotlib", "pip install 'attnlens[viz]'")
    out = tmp_path / "overview.png"
    assert main(["inspect", "--view", "overview", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv", [["inspect", "--view", "overview", "--out", "o.png"], ["inspect", "--layer", "0", "--out", "h.svg"]]
)
def test_missing_matplotlib_is_one_line_naming_the_extra(argv: list[str], tmp_path: Path) -> None:
    code = f"import sys; sys.modules['matplotlib'] = None\nfrom attnlens.cli import main\nsys.exit(main({argv!r}))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("attnlens: ") and "pip install 'attnlens[viz]'" in lines[0]


def test_plot_head_scores_of_a_trace_and_a_scan_result() -> None:
    optional("matplotlib", "pip install 'attnlens[viz]'")
    model, tokenizer = attnlens.load_demo()
    tr = attnlens.trace(model, "a b a b a b", tokenizer=tokenizer)
    scores = attnlens.metrics.head_scores(tr)
    fig = viz.plot_head_scores(scores, "previous_token")
    ax = fig.axes[0]
    assert ax.get_title() == "previous_token"
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), scores.previous_token.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="name the score to draw"):
        viz.plot_head_scores(scores)
    with pytest.raises(ValueError, match="name= picks a score"):
        viz.plot_head_scores(np.zeros((2, 2)), "induction")


# ---------------------------------------------------------------------------------------------------------------
# Headless Chromium


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_api = optional("playwright.sync_api")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        missing("no chromium binary (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Any:
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    # Nothing may be fetched: every request other than the page itself fails the test.
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, errors
    assert all(url.startswith("file://") for url in requests), requests


def load(page: Any, html: str, tmp_path: Path, name: str) -> None:
    path = viz.save_html(html, tmp_path / f"{name}.html")
    page.goto(path.as_uri())
    page.wait_for_selector("[data-state=drawn]", timeout=20_000)


def distinct_colours(png: bytes) -> int:
    """The number of distinct RGB(A) colours of a PNG (8-bit RGB or RGBA, as Chromium writes), read with zlib."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos, chunks, header = 8, [], b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
    channels = 4 if colour_type == 6 else 3
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    rows = []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    pixels = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, channels)
    return len(np.unique(pixels, axis=0))


@pytest.mark.browser
def test_overview_renders_and_a_click_opens_the_head(page: Any, tmp_path: Path) -> None:
    patterns = causal_patterns(3, 4, 12)
    scores = {"induction": torch.arange(12.0).reshape(3, 4) / 12}
    load(
        page, viz.overview_html(patterns, [f"t{i}" for i in range(12)], layers=[2, 5, 7], scores=scores), tmp_path, "o"
    )
    root = page.locator(".attnlens-overview")
    assert root.get_attribute("data-heads") == "12"
    assert page.locator(".al-card canvas").count() == 12
    card = page.locator(".al-card[data-layer='5'][data-head='3']")
    assert "induct 0.58" in card.inner_text()  # 7 / 12, beside the thumbnail
    assert page.locator("[data-role=detail]").is_hidden()
    card.click()
    assert root.get_attribute("data-open") == "5,3"
    assert page.locator("[data-role=detail]").is_visible()
    box = page.locator("[data-role=big]").bounding_box()
    assert box["width"] > 200 and box["height"] > 200
    # Hover the cell (query 4, key 2) of the large view and read its value.
    cell = 20  # min(20, 640 // 12)
    page.mouse.move(box["x"] + box["width"] - (12 - 2 - 0.5) * cell, box["y"] + box["height"] - (12 - 4 - 0.5) * cell)
    assert root.get_attribute("data-cell") == "4,2"
    stored = round(float(patterns[1, 3, 4, 2]) * 254) / 254  # the page shows the stored (quantised) weight
    assert page.locator("[data-role=status]").inner_text().startswith(f"t4 -> t2: {stored:.3f}")
    shot = tmp_path / "overview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert distinct_colours(shot.read_bytes()) > 200


@pytest.mark.browser
def test_text_view_hover_click_direction_and_heads_change_the_colours(page: Any, tmp_path: Path) -> None:
    patterns = causal_patterns(2, 2, 6)
    tokens = ["The", " cat", " sat", "\n", " on", " mat"]
    load(page, viz.text_html(patterns, tokens, heads=[(0, 0)]), tmp_path, "t")
    root = page.locator(".attnlens-text")
    spans = page.locator(".al-tok")
    assert spans.count() == 6 and spans.nth(3).inner_text() == "⏎\n"

    def weights() -> list[float]:
        return [float(spans.nth(i).get_attribute("data-w")) for i in range(6)]

    def backgrounds() -> list[str]:
        return [spans.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(6)]

    assert root.get_attribute("data-selected") is None
    spans.nth(4).hover()
    assert root.get_attribute("data-selected") == "4"
    np.testing.assert_allclose(weights(), patterns[0, 0, 4].numpy(), atol=0.5 / 254 + 1e-4)
    hovered = backgrounds()
    assert len(set(hovered)) >= 4
    spans.nth(5).click()  # pin position 5
    np.testing.assert_allclose(weights(), patterns[0, 0, 5].numpy(), atol=0.5 / 254 + 1e-4)
    assert backgrounds() != hovered
    spans.nth(1).hover()  # pinned: hovering another token changes nothing
    assert root.get_attribute("data-selected") == "5"
    page.check("[data-role=to]")
    assert root.get_attribute("data-direction") == "to"
    np.testing.assert_allclose(weights(), patterns[0, 0, :, 5].numpy(), atol=0.5 / 254 + 1e-4)
    page.check("[data-role=from]")
    page.select_option("[data-role=heads]", ["1", "3"])  # L0H1 and L1H1: their mean
    assert root.get_attribute("data-heads") == "L0H1,L1H1"
    mean = (patterns[0, 1, 5] + patterns[1, 1, 5]) / 2
    np.testing.assert_allclose(weights(), mean.numpy(), atol=0.5 / 254 + 1e-4)
    shot = tmp_path / "text.png"
    page.screenshot(path=str(shot))
    assert distinct_colours(shot.read_bytes()) > 20


@pytest.mark.browser
def test_head_view_renders_with_readable_labels(page: Any, tmp_path: Path) -> None:
    load(page, viz.pattern_html(causal_patterns(1, 2, 4), ["The", " cat", "\n", " sat"]), tmp_path, "h")
    page.select_option("[data-role=head]", "1")
    assert page.locator(".attnlens-view").get_attribute("data-head") == "1"
    box = page.locator("[data-role=canvas]").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 36, box["y"] + box["height"] - 12)  # query 3, key 2 (24 px cells)
    assert page.locator("[data-role=status]").inner_text().startswith("␣sat -> ⏎: ")
    shot = tmp_path / "head.png"
    page.screenshot(path=str(shot))
    assert distinct_colours(shot.read_bytes()) > 50


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["overview", "text", "head", "lines"])
def test_hostile_tokens_stay_inert(page: Any, tmp_path: Path, kind: str) -> None:
    patterns = causal_patterns(1, 2, len(HOSTILE))
    make = {
        "overview": viz.overview_html,
        "text": viz.text_html,
        "head": viz.pattern_html,
        "lines": lambda *args, **kwargs: viz.lines_html(*args, queries=[1, 2, 3], min_weight=1e-4, **kwargs),
    }[kind]
    load(page, make(patterns, HOSTILE, title="<script>window.__pwned=1</script>"), tmp_path, kind)
    if kind == "overview":
        page.locator(".al-card").first.click()
    elif kind in ("text", "lines"):
        page.locator(".al-tok").nth(1).click()
        assert page.locator(".al-tok").nth(1).inner_text() == HOSTILE[1]
    assert page.evaluate("window.__pwned") is None
    # The lines view draws its arcs in one svg of its own; a token's markup never becomes an element.
    assert page.locator("img").count() == 0 and page.locator("svg").count() == (1 if kind == "lines" else 0)
    assert page.locator("[onerror], [onload]").count() == 0


@pytest.mark.browser
def test_lines_view_draws_arcs_of_the_chosen_queries_and_one_on_hover(page: Any, tmp_path: Path) -> None:
    n = 300
    patterns = causal_patterns(2, 2, n, seed=3)
    tokens = [(" " if i else "") + ["the", "cat", "sat", "on", "a", "mat\n"][i % 6] for i in range(n)]
    queries = [n - 1, 150, 20]
    load(page, viz.lines_html(patterns, tokens, layer=1, head=0, queries=queries, min_weight=0.02), tmp_path, "l")
    root = page.locator(".attnlens-lines")
    assert root.get_attribute("data-queries") == "299,150,20"
    expected = {q: np.flatnonzero(patterns[1, 0, q].numpy() >= 0.02) for q in queries}
    arcs = sum(int((keys != q).sum()) for q, keys in expected.items())  # a query's weight on itself tints, no arc
    assert arcs > 10 and root.get_attribute("data-lines") == str(arcs)
    paths = page.locator("svg path")
    assert paths.count() == arcs
    first = paths.first
    q, k = int(first.get_attribute("data-q")), int(first.get_attribute("data-k"))
    assert float(first.get_attribute("data-w")) == pytest.approx(float(patterns[1, 0, q, k]), abs=0.5e-4 + 1e-6)
    assert first.get_attribute("d").startswith("M")
    # Hovering a query shows only its arcs; its strongest key is named.
    spans = page.locator(".al-tok")
    spans.nth(150).hover()
    assert root.get_attribute("data-lines") == str(int((expected[150] != 150).sum()))
    assert {p.get_attribute("data-q") for p in paths.all()} == {"150"}
    assert page.locator("[data-role=status]").inner_text().startswith("query 150 ")
    tinted = [i for i in range(n) if spans.nth(i).get_attribute("data-w") is not None]
    assert tinted == expected[150].tolist()
    spans.nth(150).click()  # pinned: leaving it keeps its arcs
    page.mouse.move(0, 0)
    assert {p.get_attribute("data-q") for p in paths.all()} == {"150"}
    spans.nth(150).click()  # released
    page.mouse.move(0, 0)
    assert root.get_attribute("data-lines") == str(arcs)
    shot = tmp_path / "lines.png"
    page.screenshot(path=str(shot))
    assert distinct_colours(shot.read_bytes()) > 30


@pytest.mark.browser
def test_long_views_draw_block_maxima_and_say_what_they_hold(page: Any, tmp_path: Path) -> None:
    n = 400
    patterns = causal_patterns(2, 2, n)
    tokens = [f" w{i}" for i in range(n)]
    load(page, viz.overview_html(patterns, tokens, max_bytes=60_000), tmp_path, "ov")
    root = page.locator(".attnlens-overview")
    block = int(root.get_attribute("data-block"))
    assert block > 1 and root.get_attribute("data-heads") == "4"
    assert f"block of {block} x {block} tokens" in page.locator("[data-role=note]").inner_text()
    page.locator(".al-card").nth(3).click()
    big = page.locator("[data-role=big]")
    big.scroll_into_view_if_needed()
    box = big.bounding_box()
    cells = -(-n // block)
    cell = box["width"] / cells
    page.mouse.move(box["x"] + 99.5 * cell, box["y"] + 100.5 * cell)  # queries of block 100, keys of block 99
    rows, cols = slice(100 * block, 101 * block), slice(99 * block, 100 * block)
    maximum = round(float(patterns[1, 1, rows, cols].max()) * 254) / 254
    status = page.locator("[data-role=status]").inner_text()
    assert status == (
        f"queries {100 * block}-{101 * block - 1} -> keys {99 * block}-{100 * block - 1}: max {maximum:.3f}"
    )
    assert maximum > 0  # a block that holds weight: the status is not trivially 0

    load(page, viz.pattern_html(patterns, tokens, max_bytes=60_000), tmp_path, "hv")
    view = page.locator(".attnlens-view")
    assert int(view.get_attribute("data-block")) > 1
    assert int(view.get_attribute("data-cells")) == (-(-n // int(view.get_attribute("data-block")))) ** 2
    assert "long input (400 tokens)" in page.locator("[data-role=note]").inner_text()

    load(page, viz.text_html(patterns, tokens, heads=[(1, 1)], max_bytes=100_000), tmp_path, "tv")
    text = page.locator(".attnlens-text")
    stored = int(text.get_attribute("data-stored"))
    assert 1 <= stored < 4 and page.locator("[data-role=heads] option").count() == stored
    assert text.get_attribute("data-heads") == "L1H1"
    assert f"holds {stored} of 4 heads" in page.locator("[data-role=stored]").inner_text()


@pytest.mark.browser
def test_the_harness_sees_an_injection(page: Any, tmp_path: Path) -> None:
    # An unescaped token does run, so the inertness test above can fail.
    path = viz.save_html(f"<p>{HOSTILE[0]}</p><div data-state=drawn></div>", tmp_path / "raw.html")
    page.goto(path.as_uri())
    page.wait_for_function("window.__pwned === 1", timeout=10_000)
