"""scan(): statistics equal trace + metrics on the same rows; results round-trip; checkpoints resume or are refused."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, optional

import attnlens
from attnlens import ScanResult, metrics
from attnlens.scan_result import SCORE_NAMES

scan_module = importlib.import_module("attnlens.scan")  # `attnlens.scan` is the function


def token_docs(seed: int = 0, n: int = 14, vocab: int = 12) -> list[list[int]]:
    """Documents of token ids 1..vocab-1 (a small vocabulary, so tokens repeat and induction rows exist)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]


def pack(docs: list[list[int]], seq_len: int, eot: int) -> tuple[torch.Tensor, int]:
    """Windows [window, seq_len] and the dropped remainder, written independently of attnlens.scan_data."""
    stream = [t for doc in docs if doc for t in [eot, *doc]]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len), len(stream) - n * seq_len


def reference_rows(pattern: torch.Tensor, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values [batch, head, q_pos] (float64) and rows [batch, q_pos], written with plain loops' clarity."""
    p = pattern.double()
    batch, _, n, _ = p.shape
    after_first = torch.arange(n).expand(batch, n) > 0
    i = torch.arange(n)
    if name == "distance":
        return (p * (i[:, None] - i[None, :]).clamp(min=0)).sum(-1), after_first
    if name == "self":
        return p[..., i, i], after_first
    raise AssertionError(name)


@pytest.fixture(scope="module")
def tiny():
    return make_gpt2(n_positions=32, vocab_size=13)


@pytest.mark.parametrize(
    ("attn", "dtype", "batch_size"),
    [
        ("eager", torch.float32, 1),
        ("eager", torch.float32, 3),
        ("eager", torch.float32, 64),
        ("sdpa", torch.float32, 3),
        ("eager", torch.bfloat16, 64),  # one batch: the trace's own forward pass, so the same half-precision bits
        ("sdpa", torch.float16, 64),
    ],
)
def test_scan_equals_trace_and_metrics_on_the_same_windows(attn, dtype, batch_size) -> None:
    tiny = make_gpt2(n_positions=32, vocab_size=13, attn_implementation=attn).to(dtype)
    docs = token_docs()
    windows, dropped = pack(docs, 16, eot=0)
    result = attnlens.scan(tiny, docs, seq_len=16, batch_size=batch_size, progress=False)
    assert result.n_windows == windows.shape[0] and result.n_tokens == windows.numel()
    assert result.provenance["dropped_tokens"] == dropped
    assert result.scores == SCORE_NAMES

    tr = attnlens.trace(tiny, windows, attention_mask=torch.ones_like(windows))
    expected = {
        "previous_token": metrics.previous_token_scores(tr),
        "duplicate_token": metrics.duplicate_token_scores(tr),
        "induction": metrics.induction_scores(tr),
        "first_token": metrics.first_token_scores(tr),
        "entropy": metrics.entropy(tr),
    }
    for name, value in expected.items():  # metrics sums in float32; scan in float64
        torch.testing.assert_close(result.mean[name], value.double(), rtol=1e-6, atol=1e-6, msg=name)
    # Counts: rows after the first for the positional scores, rows with an earlier copy for the token scores.
    n_rows = windows.shape[0] * 15
    same = (windows[:, :, None] == windows[:, None, :]) & torch.ones(16, 16, dtype=torch.bool).tril(-1)
    assert int(result.count["previous_token"][0, 0]) == n_rows
    assert int(result.count["duplicate_token"][1, 3]) == int(same.any(-1).sum())
    assert (result.count["entropy"] == n_rows).all()

    for name in ("distance", "self"):
        values, rows = [], []
        for layer in tr.layers:
            v, r = reference_rows(tr.pattern(layer), name, windows)
            values.append(v.permute(1, 0, 2)[:, r])  # [head, row]
            rows.append(r)
        ref = torch.stack(values)  # [layer, head, row]
        torch.testing.assert_close(result.mean[name], ref.mean(-1), rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(
            result.stderr[name], ref.std(-1) / math.sqrt(ref.shape[-1]), rtol=1e-5, atol=1e-7, msg=name
        )
    # A previous-token stderr from the trace's own rows, too.
    prev = torch.stack([torch.diagonal(tr.pattern(layer).double(), -1, -2, -1) for layer in tr.layers])
    prev = prev.permute(0, 2, 1, 3).flatten(2)  # [layer, head, row]
    torch.testing.assert_close(
        result.stderr["previous_token"], prev.std(-1) / math.sqrt(prev.shape[-1]), rtol=1e-5, atol=1e-7
    )


def test_batching_changes_nothing_but_rounding(tiny) -> None:
    docs = token_docs(1)
    one = attnlens.scan(tiny, docs, seq_len=8, batch_size=1, progress=False)
    many = attnlens.scan(tiny, docs, seq_len=8, batch_size=5, progress=False)
    for name in SCORE_NAMES:
        torch.testing.assert_close(one.mean[name], many.mean[name], rtol=1e-12, atol=1e-6)
        assert torch.equal(one.count[name], many.count[name])


def test_layers_heads_scores_and_max_tokens(tiny) -> None:
    docs = token_docs(2, n=30)
    full = attnlens.scan(tiny, docs, seq_len=8, batch_size=4, progress=False, max_tokens=8 * 9 + 5)
    assert full.n_windows == 9 and full.n_tokens == 72
    part = attnlens.scan(
        tiny, docs, seq_len=8, batch_size=4, progress=False, max_tokens=77, layers=[1], heads=[2, 0], scores=["self"]
    )
    assert part.scores == ("self",) and part.layers == (1,) and part.heads == (2, 0)
    assert part.mean["self"].shape == (1, 2)
    torch.testing.assert_close(part.mean["self"][0], full.mean["self"][1, [2, 0]], rtol=1e-12, atol=0)
    assert part.top("self", 1)[0][0] == 1


def test_result_round_trips_bit_for_bit(tiny, tmp_path) -> None:
    result = attnlens.scan(tiny, token_docs(), seq_len=16, batch_size=2, progress=False)
    path = tmp_path / "scan.json"
    result.save(path)
    loaded = ScanResult.load(path)
    for table in ("mean", "stderr", "count"):
        for name in result.scores:
            a, b = getattr(result, table)[name], getattr(loaded, table)[name]
            assert_bitwise(b, a, "copy", what=f"{table} {name}")  # NaN-safe: undefined scores are NaN
    assert loaded.provenance == result.provenance and loaded.n_tokens == result.n_tokens
    assert loaded.to_json() == result.to_json() == path.read_text()
    assert loaded.top("previous_token", 3) == result.top("previous_token", 3)
    assert "pickle" not in path.read_text()


def test_undefined_values_are_nan_and_written_as_null(tiny, tmp_path) -> None:
    # Every token distinct: no duplicate or induction row anywhere.
    docs = [list(range(1, 8))]
    result = attnlens.scan(tiny, docs, seq_len=8, batch_size=1, progress=False, scores=["induction", "self"])
    assert int(result.count["induction"][0, 0]) == 0 and result.mean["induction"].isnan().all()
    assert not result.mean["self"].isnan().any()
    data = json.loads(result.to_json())
    assert data["mean"]["induction"][0][0] is None
    assert ScanResult.from_dict(data).mean["induction"].isnan().all()


def test_load_refuses_other_files(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="not an attnlens scan result"):
        ScanResult.load(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        ScanResult.load(path)


def test_model_is_left_as_found(tiny) -> None:
    tiny.train()
    try:
        attnlens.scan(tiny, token_docs(), seq_len=16, progress=False)
        assert tiny.training and all(m.training for m in tiny.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.modules())
    finally:
        tiny.eval()
    with pytest.raises(ValueError, match="no full window"):
        attnlens.scan(tiny, [[1, 2]], seq_len=16, progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.modules())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"seq_len": 33}, "n_ctx"),
        ({"seq_len": 0}, "positive"),
        ({"batch_size": 0}, "positive"),
        ({"max_tokens": 3}, "less than one window"),
        ({"scores": ["nope"]}, "unknown"),
        ({"layers": [5]}, "layers"),
    ],
)
def test_bad_arguments_are_named(tiny, kwargs, words) -> None:
    with pytest.raises(ValueError, match=words):
        attnlens.scan(tiny, token_docs(), **{"seq_len": 8, **kwargs}, progress=False)


def test_empty_data_and_texts_without_a_tokenizer(tiny) -> None:
    with pytest.raises(ValueError, match="no full window"):
        attnlens.scan(tiny, [], seq_len=8, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        attnlens.scan(tiny, ["some text"], seq_len=8, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        attnlens.scan(tiny, [[50] * 20], seq_len=8, progress=False)


def test_checkpoint_resumes_to_the_same_result(tiny, tmp_path, monkeypatch) -> None:
    docs = token_docs(3, n=40)
    plain = attnlens.scan(tiny, docs, seq_len=8, batch_size=2, progress=False)
    path = tmp_path / "ck.json"
    monkeypatch.setattr(scan_module, "_CHECKPOINT_BATCHES", 1)
    # A scan stopped part way: a data iterable that fails after some documents.

    def broken():
        yield from docs[:20]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        attnlens.scan(tiny, broken(), seq_len=8, batch_size=2, progress=False, checkpoint=path)
    saved = json.loads(path.read_text())
    assert 0 < saved["position"] < math.ceil(plain.n_windows / 2)  # stopped part way
    resumed = attnlens.scan(tiny, docs, seq_len=8, batch_size=2, progress=False, checkpoint=path)
    assert resumed.to_json() == plain.to_json()
    # A finished checkpoint: the same result again, without running the model.
    again = attnlens.scan(tiny, docs, seq_len=8, batch_size=2, progress=False, checkpoint=path)
    assert again.to_json() == plain.to_json()


def test_checkpoint_of_other_arguments_model_or_data_is_refused(tiny, tmp_path) -> None:
    docs = token_docs(4)
    path = tmp_path / "ck.json"
    attnlens.scan(tiny, docs, seq_len=8, batch_size=2, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match="other scan arguments"):
        attnlens.scan(tiny, docs, seq_len=8, batch_size=3, progress=False, checkpoint=path)
    other = make_gpt2(n_positions=32, vocab_size=13, seed=1)
    with pytest.raises(ValueError, match="another model"):
        attnlens.scan(other, docs, seq_len=8, batch_size=2, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match="other data"):
        attnlens.scan(tiny, token_docs(5), seq_len=8, batch_size=2, progress=False, checkpoint=path)
    for junk in (b"{}", b"\xff\xfe\x00 not text"):
        path.write_bytes(junk)
        with pytest.raises(ValueError, match="not an attnlens scan checkpoint"):
            attnlens.scan(tiny, docs, seq_len=8, batch_size=2, progress=False, checkpoint=path)


def _without(saved: dict, key: str) -> dict:
    return {k: v for k, v in saved.items() if k != key}


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda s: _without(s, "fingerprint"), "it lacks 'fingerprint'"),
        (lambda s: _without(s, "sums"), "it lacks 'sums'"),
        (lambda s: _without(s, "count"), "it lacks 'count'"),
        (lambda s: _without(s, "position"), "it lacks 'position'"),
        (lambda s: _without(s, "data"), "it lacks 'data'"),
        (lambda s: {**s, "fingerprint": "x"}, "'fingerprint' must be an object with 'arguments' and 'model'"),
        (lambda s: {**s, "fingerprint": {"model": s["fingerprint"]["model"]}}, "'fingerprint' must be an object"),
        (lambda s: {**s, "position": -1}, "'position' must be an integer >= 0, got -1"),
        (lambda s: {**s, "position": True}, "'position' must be an integer >= 0, got True"),
        (lambda s: {**s, "data": 7}, "'data' must be a SHA-256 hex digest"),
        (lambda s: {**s, "sums": s["sums"][:-1]}, r"'sums' must be a list of \d+ numbers"),
        (lambda s: {**s, "sums": [*s["sums"][:-1], "1.0"]}, r"'sums' must be a list of \d+ numbers"),
        (lambda s: {**s, "count": [*s["count"], 3]}, r"'count' must be a list of \d+ integers >= 0"),
        (lambda s: {**s, "count": [-1.5] * len(s["count"])}, r"'count' must be a list of \d+ integers >= 0"),
        (lambda s: {**s, "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name(tiny, tmp_path, damage, words) -> None:
    docs, path = token_docs(6), tmp_path / "ck.json"
    kwargs = {"seq_len": 8, "batch_size": 2, "progress": False, "checkpoint": path}
    attnlens.scan(tiny, docs, **kwargs)
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=rf"checkpoint {path} is damaged: {words}.*delete it to start the scan over"):
        attnlens.scan(tiny, docs, **kwargs)
    path.unlink()  # as the message says: the scan starts over
    assert attnlens.scan(tiny, docs, **kwargs).n_windows > 0


def test_progress_lines_and_the_command(tmp_path, capsys) -> None:
    from attnlens.cli import main

    out = tmp_path / "demo.json"
    assert main(["scan", "--seq-len", "64", "--max-tokens", "1280", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err  # stderr is no terminal here: plain lines, no tqdm
    assert "induction" in captured.out and f"wrote {out}" in captured.out
    result = ScanResult.load(out)
    assert result.n_windows == 20 and result.top("induction", 1)[0][:2] == (1, 0)  # the demo's induction head

    data = tmp_path / "c.jsonl"
    data.write_text('{"text": "The cat sat on the mat."}\n{"text": broken\n')
    assert main(["scan", "--data", str(data), "--seq-len", "4", "--out", str(out), "--quiet"]) == 2
    assert f"{data}:2: not a JSON object" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--out", str(out)]) == 2
    assert "--data is needed" in capsys.readouterr().err


def test_plot_draws_a_layer_by_head_heatmap(tiny) -> None:
    matplotlib = optional("matplotlib", "pip install 'attnlens[viz]'")
    matplotlib.use("Agg")
    result = attnlens.scan(tiny, token_docs(), seq_len=16, progress=False, layers=[1])
    fig = result.plot("entropy")
    ax = fig.axes[0]
    assert ax.get_title().startswith("entropy, mean over") and [t.get_text() for t in ax.get_yticklabels()] == ["1"]
    image = ax.get_images()[0].get_array()
    assert image.shape == (1, 4) and float(image[0, 2]) == pytest.approx(float(result.mean["entropy"][0, 2]))
    partial = attnlens.scan(tiny, token_docs(), seq_len=16, progress=False, heads=[3, 1])
    with pytest.raises(ValueError, match="kept heads"):
        partial.plot("entropy")


def test_progress_on_a_terminal_is_a_tqdm_bar(tiny, monkeypatch) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    attnlens.scan(tiny, token_docs(), seq_len=16, batch_size=2)
    text = terminal.getvalue()
    assert "scan:" in text and "tok/s" in text  # the bar, with its rate
    assert text.index("tok/s") < text.index("attnlens scan: done:")  # the bar closed before the summary


@pytest.mark.parametrize("heads", [None, [2, 0]])
def test_eager_models_are_scanned_from_the_kernels_patterns(monkeypatch, heads) -> None:
    # Every layer but the last reads the eager kernel's pattern; computing it instead gives the same bits.
    from attnlens.models import gpt2

    model = make_gpt2(n_layer=3, n_positions=32, vocab_size=13, attn_implementation="eager")
    docs = token_docs()
    handed = []
    original = gpt2.kernel_pattern

    def counting(output):
        pattern = original(output)
        handed.append(pattern is not None)
        return pattern

    monkeypatch.setattr(gpt2, "kernel_pattern", counting)
    from_kernel = attnlens.scan(model, docs, seq_len=16, batch_size=3, heads=heads, progress=False)
    assert handed and all(handed)
    assert len(handed) == 2 * math.ceil(from_kernel.n_windows / 3)  # layers 0 and 1, every batch

    monkeypatch.setattr(gpt2, "kernel_pattern", lambda output: None)  # a kernel that keeps its pattern to itself
    computed = attnlens.scan(model, docs, seq_len=16, batch_size=3, heads=heads, progress=False)
    assert from_kernel.to_json() == computed.to_json()


def test_default_window_is_n_ctx_up_to_2048() -> None:
    # A long-context model (Llama 3.x: n_ctx 131072) would otherwise need that many tokens for a single window.
    long = make_gpt2(n_positions=4096, vocab_size=13, n_layer=1, n_head=2, n_embd=8)
    data = [list(range(1, 13)) * 400]  # 4,801 tokens with the separator: two windows of 2048
    result = attnlens.scan(long, data, scores=["previous_token"], progress=False)
    assert result.provenance["scan"]["seq_len"] == 2048 and result.n_windows == 2
    short = make_gpt2(n_positions=32, vocab_size=13, n_layer=1, n_head=2, n_embd=8)
    assert attnlens.scan(short, data, scores=["previous_token"], progress=False).provenance["scan"]["seq_len"] == 32
