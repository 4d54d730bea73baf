"""Progress bars on long calls: shown when asked or interactive, silent otherwise, closed also on error."""

from __future__ import annotations

from typing import Any

import pytest

import attnlens
from attnlens import _progress
from attnlens.circuits import composition_baseline

TEXT = "the cat sat on the mat . the cat sat on the mat ."


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    return attnlens.load("demo")


def _calls(model: Any, tok: Any, progress: bool | None) -> None:
    attnlens.verify(model, TEXT, tokenizer=tok, progress=progress)
    attnlens.head_importance(model, TEXT, tokenizer=tok, progress=progress, heads_per_pass=3)
    composition_baseline(attnlens.extract_weights(model), "K", n_samples=4, progress=progress)


def test_bars_when_asked(demo: tuple[Any, Any], capfd: pytest.CaptureFixture[str]) -> None:
    model, tok = demo
    _calls(model, tok, True)
    err = capfd.readouterr().err
    for name, total in (("verify", 5), ("head_importance", 8), ("composition_baseline", 4)):
        assert f"attnlens {name}" in err and f"/{total} " in err, (name, err)


def test_silent_when_not_interactive_or_asked(
    demo: tuple[Any, Any], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = demo
    monkeypatch.setattr(_progress, "interactive", lambda: False)
    _calls(model, tok, None)
    monkeypatch.setattr(_progress, "interactive", lambda: True)
    _calls(model, tok, False)
    assert capfd.readouterr().err == ""


def test_interactive_default_shows_after_the_delay(
    demo: tuple[Any, Any], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = demo
    monkeypatch.setattr(_progress, "interactive", lambda: True)
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    attnlens.verify(model, TEXT, tokenizer=tok)
    assert "attnlens verify" in capfd.readouterr().err


def test_progress_must_be_a_bool_or_none(demo: tuple[Any, Any]) -> None:
    model, tok = demo
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        attnlens.verify(model, TEXT, tokenizer=tok, progress="yes")  # type: ignore[arg-type]


def test_cli_prints_no_loading_bar(capfd: pytest.CaptureFixture[str]) -> None:
    from attnlens.cli import main

    assert main(["verify"]) == 0
    out, err = capfd.readouterr()
    assert "attnlens verification: OK" in out and "Loading weights" not in err


def test_plain_bar_without_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    # tqdm.auto in a kernel without ipywidgets warns "IProgress not found" into every cell: the text bar instead.
    import importlib.util

    import tqdm.auto
    import tqdm.std

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "ipywidgets" else find_spec(name))
    assert _progress.tqdm_class() is tqdm.std.tqdm
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "ipywidgets" else find_spec(name))
    assert _progress.tqdm_class() is tqdm.auto.tqdm
