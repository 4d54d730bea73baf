"""Results in notebooks: short reprs, bounded HTML, to_dict / to_json / to_pandas for every result type."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import optional

import attnlens
from attnlens import metrics
from attnlens._display import MAX_ROWS
from attnlens.attribution import decompose
from attnlens.report import VerificationReport, VerificationRow
from attnlens.scan_result import SCORE_NAMES, ScanResult

TEXT = "the cat sat on the mat . the cat sat on the mat ."


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    return attnlens.load("demo")


def _scan_result(n_layers: int, n_heads: int) -> ScanResult:
    torch.manual_seed(0)
    tables = {name: torch.rand(n_layers, n_heads, dtype=torch.float64) for name in SCORE_NAMES}
    counts = {name: torch.full((n_layers, n_heads), 10, dtype=torch.int64) for name in SCORE_NAMES}
    return ScanResult(
        scores=SCORE_NAMES,
        layers=tuple(range(n_layers)),
        heads=tuple(range(n_heads)),
        mean=tables,
        stderr=tables,
        count=counts,
        n_tokens=1024,
        n_windows=4,
    )


def test_verification_report(demo: tuple[Any, Any]) -> None:
    model, tok = demo
    report = attnlens.verify(model, TEXT, tokenizer=tok)
    text = repr(report)
    assert text.startswith("<VerificationReport OK:") and len(text) < 400 and f"{len(report.rows)} checks" in text
    page = report._repr_html_()
    assert "rel tol" in page and "attnlens verification: OK" in page and page.count("<tr>") <= MAX_ROWS + 1
    assert json.loads(report.to_json())["ok"] is True
    pd = optional("pandas")
    frame = report.to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(report.rows)
    assert frame["max_rel_error"].tolist() == [row.max_rel_error for row in report.rows]


def test_verification_html_is_bounded_and_escaped() -> None:
    rows = tuple(VerificationRow(i, 0, "q", 1.0, float("nan"), 1e-6, False) for i in range(5000))
    report = VerificationReport(
        rows=rows,
        model="<script>alert(1)</script>",
        dtype="float32",
        device="cpu",
        attn_implementation="eager",
        pattern_implementation="eager",
        layers=(0,),
        batch=1,
        pos=2,
        n_valid=2,
        tolerances={"q": 1e-6},
    )
    page = report._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert len(page) < 20_000 and f"{5000 - MAX_ROWS} more rows" in page
    assert len(repr(report)) < 400 and "FAILED" in repr(report)
    assert json.loads(report.to_json())["rows"][0]["max_rel_error"] == "nan"


def test_head_scores(demo: tuple[Any, Any]) -> None:
    model, tok = demo
    scores = metrics.head_scores(attnlens.trace(model, TEXT, tokenizer=tok))
    page = scores._repr_html_()
    for name in scores.names:
        assert f"<caption>{name} (" in page  # one heatmap per score: 2 x 4 heads fit
    data = json.loads(scores.to_json())
    assert data["layers"] == [0, 1] and len(data["induction"]) == 2 and len(data["induction"][0]) == 4
    assert data["previous_token"] == scores.previous_token.to(torch.float64).tolist()  # type: ignore[union-attr]
    optional("pandas")
    frame = scores.to_pandas()
    assert list(frame.columns[:2]) == ["layer", "head"] and len(frame) == 8
    assert frame["induction"].tolist() == scores.induction.flatten().tolist()  # type: ignore[union-attr]


def test_scan_result_html_bounded_for_large_models() -> None:
    small = _scan_result(12, 12)  # GPT-2 small's heads
    page = small._repr_html_()
    assert len(page) < 45_000, len(page)
    assert page.count("<caption>") >= 5  # five heatmaps of 144 cells, the rest as top heads
    huge = _scan_result(48, 64)  # larger than any heatmap budget: the top heads only
    page = huge._repr_html_()
    assert len(page) < 10_000 and "the top heads" in page and '<td style="background' not in page
    assert len(repr(huge)) < 300
    optional("pandas")
    frame = small.to_pandas()
    assert {"induction", "induction_stderr", "induction_count"} <= set(frame.columns) and len(frame) == 144
    assert frame["induction_count"].tolist() == [10] * 144


def test_decomposition(demo: tuple[Any, Any]) -> None:
    model, tok = demo
    d = decompose(model, TEXT, tokenizer=tok)
    assert len(repr(d)) < 120
    page = d._repr_html_()
    assert "relative error" in page and "L1H0" in page and page.count("<tr>") == len(d.names) + 1
    data = json.loads(d.to_json())
    assert data["names"] == list(d.names) and "contributions" not in data
    # Norms over d_model of the model's own contributions, in float64: the same numbers as torch's norm.
    assert data["norms"] == d.contributions.to(torch.float64).norm(dim=-1).tolist()
    assert len(d.to_dict(vectors=True)["contributions"][0][0][0]) == d.contributions.shape[-1]
    optional("pandas")
    frame = d.to_pandas()
    assert len(frame) == len(d.names) and frame["component"].tolist() == list(d.names)
