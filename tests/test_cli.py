"""The `attnlens` command, on the demo checkpoint and on a tiny checkpoint saved to a folder."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import make_gpt2, optional

from attnlens import extract_weights
from attnlens.cli import main


@pytest.fixture
def tiny_path(tmp_path):
    make_gpt2().save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_weights_on_demo(capsys) -> None:
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert "the embedded demo checkpoint" in out and "W_Q = c_attn[:, 0:128]" in out


@pytest.mark.slow  # builds GPT-2 small (124M parameters): about 7 s
def test_weights_gpt2_small_walkthrough(capsys) -> None:
    assert main(["weights", "--gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "[50257, 768]  = 38,597,376 parameters" in out
    assert "per head [12, 768, 64]" in out and "d_head = 768 / 12 = 64" in out


def test_verify_on_demo_passes(capsys) -> None:
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "attnlens verification: OK" in out and "pattern_hf_order" in out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_on_demo_passes_in_half_precision(dtype, capsys) -> None:
    assert main(["verify", "--dtype", dtype]) == 0
    assert "attnlens verification: OK" in capsys.readouterr().out


def test_verify_json_on_a_folder_with_ids(tiny_path, capsys) -> None:
    assert main(["verify", tiny_path, "--ids", "1", "2", "3", "4", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["batch"] == 1 and report["pos"] == 5


def test_verify_exits_nonzero_on_failure(tiny_path, capsys, monkeypatch) -> None:
    # The command checks the weights it is given: corrupt one head's W_K by 1e-3 on the way in, as a damaged
    # conversion would, and the command must fail, name the row, and exit 1.
    verify_module = importlib.import_module("attnlens.verify")
    real_verify = verify_module.verify

    def verify_corrupted(model, input_ids, **kwargs):
        w = extract_weights(model)
        W_K = w.layers[1].W_K.detach().clone()
        W_K[2] *= 1 + 1e-3
        layers = (w.layers[0], replace(w.layers[1], W_K=W_K))
        return real_verify(model, input_ids, weights=replace(w, layers=layers), **kwargs)

    monkeypatch.setattr(verify_module, "verify", verify_corrupted)
    assert main(["verify", tiny_path, "--ids", *[str(i) for i in range(1, 30)]]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "failing rows:" in out and "    1  k" in out


def test_verify_tolerance_flag(tiny_path, capsys) -> None:
    assert main(["verify", tiny_path, "--ids", "1", "2", "--tolerance", "pattern=1e-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tolerances"]["pattern"] == 1e-3
    for bad in ("q", "pattern=abc"):
        assert main(["verify", tiny_path, "--ids", "1", "--tolerance", bad]) == 2
        assert "QUANTITY=NUMBER" in capsys.readouterr().err
    assert main(["verify", tiny_path, "--ids", "1", "--tolerance", "nonsense=1"]) == 2
    assert "unknown quantity 'nonsense'" in capsys.readouterr().err


def test_errors_are_one_line_with_status_2(tiny_path, capsys) -> None:
    assert main(["verify", tiny_path, "--ids", "1", "500"]) == 2
    assert "must lie in [0, 97)" in capsys.readouterr().err
    assert main(["verify", "/no/such/checkpoint", "--ids", "1"]) == 2
    assert "could not read a config" in capsys.readouterr().err
    assert main(["verify", tiny_path, "--text", "hello"]) == 2
    assert "no tokenizer; pass token ids with --ids" in capsys.readouterr().err
    assert main(["inspect", "--layer", "99", "--out", "x.html"]) == 2
    assert "--layer must lie in" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    """The command's stderr, less transformers' progress bars: exactly one line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "Loading weights" not in line and line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("attnlens: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["verify", "--ids", "5", "-3"], "must lie in [0, 1024)"),
        (["weights", "--layer", "5"], "--layer must lie in [0, 2), got 5"),
        (["inspect", "--layer", "5", "--out", "x.html"], "--layer must lie in [0, 2), got 5"),
        (["inspect", "--layer", "0", "--head", "9", "--out", "x.html"], "--head must lie in [0, 4), got 9"),
        (["verify", "--tolerance", "pattern=abc"], "--tolerance takes QUANTITY=NUMBER, got 'pattern=abc'"),
        (["verify", "--device", "nodevice"], "--device 'nodevice' is not a device torch knows"),
        (["heads", "--seq-len", "1"], "seq_len must be in"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, words, capsys) -> None:
    assert main(argv) == 2
    assert words in one_line_error(capsys)


def test_unavailable_cuda_is_a_usage_error(capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["verify", "--device", "cuda"]) == 2
    assert "CUDA is not available on this machine" in one_line_error(capsys)


def test_png_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "x.png"
    assert main(["inspect", "--layer", "0", "--out", str(out)]) == 2
    assert "pip install 'attnlens[viz]'" in one_line_error(capsys)
    assert not out.exists()


def test_heads_on_demo(capsys) -> None:
    assert main(["heads", "--json", "--top", "2"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert "induction on repeated random tokens" in table
    assert all(len(rows) == 2 for rows in table.values())
    assert main(["heads"]) == 0
    assert "previous_token (highest)" in capsys.readouterr().out


def test_heads_prepend_bos(capsys) -> None:
    from attnlens import load_demo, metrics

    assert main(["heads", "--json", "--top", "16", "--seq-len", "20", "--prepend-bos"]) == 0
    with_bos = json.loads(capsys.readouterr().out)
    model, _ = load_demo()
    expected = metrics.induction_scores(model, seq_len=20, batch=8, seed=0, prepend_bos=True)
    assert with_bos["induction on repeated random tokens"] == [list(row) for row in metrics.top_heads(expected, 16)]
    assert main(["heads", "--ids", "1", "2", "--prepend-bos"]) == 2
    assert "--prepend-bos applies to --text" in capsys.readouterr().err


def test_inspect_writes_html_and_png(tmp_path, capsys) -> None:
    html = tmp_path / "view.html"
    assert main(["inspect", "--layer", "0", "--out", str(html)]) == 0
    text = html.read_text()
    assert "<canvas" in text and "http" not in text.lower().replace("http-equiv", "")
    optional("matplotlib", "pip install 'attnlens[viz]'")
    png = tmp_path / "head.png"
    assert main(["inspect", "--layer", "1", "--head", "0", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "attnlens.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("weights", "verify", "heads", "inspect"):
        assert command in out


# ---------------------------------------------------------------------------------------------------- scan ---

SCAN = ["scan", "--seq-len", "32", "--max-tokens", "128", "--quiet"]


def test_scan_layers_and_heads_restrict_the_result(tmp_path) -> None:
    from attnlens.scan_result import ScanResult

    full, part, last = (tmp_path / f"{name}.json" for name in ("full", "part", "last"))
    assert main([*SCAN, "--out", str(full)]) == 0
    assert main([*SCAN, "--out", str(part), "--layers", "1", "--heads", "3,0"]) == 0
    assert main([*SCAN, "--out", str(last), "--layers", "-1", "0", "--heads", "2"]) == 0
    everything, some, ordered = (ScanResult.load(path) for path in (full, part, last))
    assert everything.layers == (0, 1) and everything.heads == (0, 1, 2, 3)
    assert some.layers == (1,) and some.heads == (3, 0)
    assert ordered.layers == (1, 0) and ordered.heads == (2,)
    # Fewer heads change only the rounding of the float32 row sums (a contraction blocks by the number of heads).
    for name, mean in everything.mean.items():
        assert some.mean[name].shape == (1, 2)
        torch.testing.assert_close(some.mean[name], mean[[1]][:, [3, 0]], rtol=1e-6, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(ordered.mean[name], mean[[1, 0]][:, [2]], rtol=1e-6, atol=1e-9, equal_nan=True)
    assert some.n_tokens == everything.n_tokens


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--layers", "x"], "--layers takes integers (e.g. --layers 0 3 or --layers 0,3), got 'x'"),
        (["--heads", "1,,2"], "--heads takes integers (e.g. --heads 0 3 or --heads 0,3), got ''"),
        (["--layers", "2"], "--layers 2 is out of range: the model has 2 (0..1)"),
        (["--heads", "0", "-5"], "--heads -5 is out of range: the model has 4 (0..3)"),
        (["--heads", "1", "1"], "--heads [1] given more than once"),
    ],
)
def test_scan_bad_layers_or_heads_exit_2_with_one_line(options, words, tmp_path, capsys) -> None:
    out = tmp_path / "scan.json"
    assert main([*SCAN, "--out", str(out), *options]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()
