"""scan_data: every kind of source gives the same documents; packing and bad data are as documented."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_bitwise

import attnlens
from attnlens.scan_data import Packer, documents

TEXTS = [
    "The cat sat on the mat. The cat sat on the mat.",
    "Alice saw Bob near the river, and Bob saw Alice.",
    "",  # tokenizes to nothing: skipped and counted
    "A dog ran.\nThen the dog slept.",
    "Every teacher helped a student; every student thanked a teacher.",
]


@pytest.fixture(scope="module")
def demo():
    return attnlens.load_demo()


class Rows:
    """Iterates like a Hugging Face datasets Dataset: dict rows (datasets itself is never imported)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __iter__(self):
        return iter({"text": t, "id": i} for i, t in enumerate(self.texts))


def test_txt_jsonl_rows_and_texts_give_the_same_result(demo, tmp_path) -> None:
    model, tok = demo
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(t for t in TEXTS if t) + "\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n\n")
    kwargs = {"tokenizer": tok, "seq_len": 12, "batch_size": 2, "progress": False}
    from_texts = attnlens.scan(model, TEXTS, **kwargs)
    assert from_texts.provenance["empty_documents"] == 1 and from_texts.provenance["documents"] == 5
    from_rows = attnlens.scan(model, Rows(TEXTS), **kwargs)
    from_jsonl = attnlens.scan(model, jsonl, text_field="body", **kwargs)
    from_txt = attnlens.scan(model, str(txt), **kwargs)  # the empty text is no document in a .txt file
    ids = [tok(t)["input_ids"] for t in TEXTS]
    from_ids = attnlens.scan(model, ids, **kwargs)
    for other in (from_rows, from_jsonl, from_txt, from_ids):
        assert other.provenance["data_sha256"] == from_texts.provenance["data_sha256"]
        for name in other.scores:
            assert_bitwise(other.mean[name], from_texts.mean[name], "same call")  # the same windows


def test_txt_documents_are_blank_line_separated(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n\n\nthree\n  \nfour")
    assert [doc for doc, _ in documents(path)] == ["one\ntwo", "three", "four"]
    assert [where for _, where in documents(path)] == [f"{path}:1", f"{path}:5", f"{path}:7"]


def test_packing_puts_end_of_text_before_each_document_and_drops_the_rest() -> None:
    packer = Packer(seq_len=4, batch_size=2, eot_id=0)
    batches = list(packer.batches([[1, 2, 3], [], [4, 5], [6, 7, 8, 9]]))
    # stream: 0 1 2 3 | 0 4 5 0 | 6 7 8 9 -> three windows, nothing left
    assert [b.tolist() for b in batches] == [[[0, 1, 2, 3], [0, 4, 5, 0]], [[6, 7, 8, 9]]]
    assert (packer.n_documents, packer.n_empty, packer.dropped_tokens) == (4, 1, 0)
    packer = Packer(seq_len=4, batch_size=8, eot_id=99, max_windows=None)
    assert [b.tolist() for b in packer.batches([torch.tensor([1, 2, 3, 4, 5])])] == [[[99, 1, 2, 3]]]
    assert packer.dropped_tokens == 2


def test_bad_jsonl_lines_are_named_by_file_and_line(demo, tmp_path) -> None:
    model, tok = demo
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON object"):
        attnlens.scan(model, path, tokenizer=tok, seq_len=8, progress=False)
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: no text field 'text'.*'body'"):
        attnlens.scan(model, path, tokenizer=tok, seq_len=8, progress=False)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ("no/such/file.txt", FileNotFoundError, "not a file"),
        ([{"title": "x"}], ValueError, "data item 0 is a row without a text field"),
        (["text", [1, 2]], ValueError, "mixes texts and token ids"),
        ([[1.5, 2.0]], ValueError, "integer token ids"),
        ([object()], TypeError, "data item 0"),
        (42, TypeError, "iterable"),
    ],
)
def test_bad_data_is_named(demo, data, error, words) -> None:
    model, tok = demo
    with pytest.raises(error, match=words):
        attnlens.scan(model, data, tokenizer=tok, seq_len=8, progress=False)


def test_other_file_kinds_are_refused(tmp_path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("a,b")
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        list(documents(path))


class Splits(dict):
    """A dict of splits, as ``datasets.load_dataset`` returns without ``split=`` (a DatasetDict is a dict)."""


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"text": TEXTS, "id": list(range(5))}, r"a dict of columns \('text', 'id'\).*pass the column: data\['text'\]"),
        (Splits(train=Rows(TEXTS), test=Rows(TEXTS)), r"keys 'train', 'test'.*pass one split, e\.g\. data\['train'\]"),
        ({"text": TEXTS[0]}, r"one row.*pass a list of rows or of texts"),
        ({}, r"an empty mapping"),
    ],
)
def test_a_mapping_is_refused_by_name(demo, data, words) -> None:
    model, tok = demo
    with pytest.raises(TypeError, match=rf"data is a {type(data).__name__}.*{words}"):
        attnlens.scan(model, data, tokenizer=tok, seq_len=2, progress=False)
    with pytest.raises(TypeError, match=words):
        list(documents(data))


def test_a_file_that_is_not_utf8_is_named_by_file_and_line(demo, tmp_path) -> None:
    model, tok = demo
    path = tmp_path / "latin.txt"
    text = "The cat sat.\n\nA second document,\nwith a café in its third line.\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}:4: not utf-8 text \(byte 0xe9 at column 11\).*encoding="):
        attnlens.scan(model, path, tokenizer=tok, seq_len=4, progress=False)
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{jsonl}:2: not utf-8 text \(byte 0xe9 at column 14\)"):
        list(documents(jsonl))
    # With its encoding named, the file reads as the same documents as its UTF-8 twin.
    twin = tmp_path / "utf8.txt"
    twin.write_text(text, encoding="utf-8")
    assert [d for d, _ in documents(path, encoding="latin-1")] == [d for d, _ in documents(twin)]
    expected = attnlens.scan(model, twin, tokenizer=tok, seq_len=4, progress=False)
    got = attnlens.scan(model, path, tokenizer=tok, seq_len=4, progress=False, encoding="latin-1")
    assert got.n_windows == expected.n_windows > 0
    for name in expected.scores:  # the same windows through the same kernels: the same bits (NaN where undefined)
        assert_bitwise(got.mean[name], expected.mean[name], "same call")
    with pytest.raises(ValueError, match=r"unknown encoding 'no-such-codec'"):
        list(documents(path, encoding="no-such-codec"))


def test_the_command_names_the_line_and_takes_an_encoding(tmp_path, capsys) -> None:
    from attnlens.cli import main

    path, out = tmp_path / "latin.txt", tmp_path / "out.json"
    path.write_bytes(("The café sat on the mat. " * 8 + "\n").encode("latin-1"))
    assert main(["scan", "--data", str(path), "--seq-len", "4", "--out", str(out), "--quiet"]) == 2
    assert f"{path}:1: not utf-8 text (byte 0xe9 at column 8)" in capsys.readouterr().err
    assert main(["scan", "--data", str(path), "--encoding", "latin-1", "--seq-len", "4", "--out", str(out)]) == 0
    assert attnlens.ScanResult.load(out).n_windows > 0
