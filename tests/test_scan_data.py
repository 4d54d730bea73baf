"""scan_data: every kind of source gives the same documents; packing and bad data are as documented."""

from __future__ import annotations

import json

import pytest
import torch

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
            assert torch.equal(other.mean[name], from_texts.mean[name])


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
