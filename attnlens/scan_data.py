"""The corpus side of :func:`attnlens.scan`: documents from files or iterables, tokenized and packed into windows.

Documents are read lazily, tokenized in small groups, and packed the way language-model evaluation packs text: one
stream of token ids in which every document is preceded by the end-of-text token, cut into consecutive windows of
``seq_len`` tokens. A window may hold the end of one document and the start of the next. The tokens after the last
full window (fewer than ``seq_len``) are dropped and counted. The order of windows, and so of batches, depends only
on the data, never on timing or on the number of processes.

Sources (see :func:`documents`; files are read as UTF-8 unless another ``encoding`` is named):

* a path to a ``.txt`` file: documents are separated by one or more blank lines (a document's own line breaks are
  kept); a file with one document per line and no blank lines is therefore one document;
* a path to a ``.jsonl`` file: one JSON object per non-empty line, its ``text_field`` the document;
* an iterable of texts, of token-id sequences (lists, tensors, numpy arrays), or of dict rows as a Hugging Face
  ``datasets`` Dataset / IterableDataset yields them (``row[text_field]``); ``datasets`` itself is never imported.
  A mapping (a dict of columns as ``dataset[:]`` gives, a DatasetDict of splits) is refused: its keys are no documents.

A document that tokenizes to nothing (an empty text) is skipped and counted; a malformed ``.jsonl`` line, a row
without the text field, bytes that are not the file's encoding, or a mix of kinds is an error naming the file and
line (or the item's index).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Packer", "documents"]

_TOKENIZE_GROUP = 64  # documents tokenized per tokenizer call: fast tokenizers batch, and memory stays small


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file; bytes that are not ``encoding`` are named by line and column."""
    try:
        with path.open(encoding=encoding) as file:
            yield from enumerate(file, 1)
    except UnicodeDecodeError as error:
        # The reader decodes ahead in blocks, so the error's position is not the line's: find the line in the bytes.
        where, detail = f"{path}", f"{error.reason} at byte {error.start} of a block"
        with path.open("rb") as raw:
            for number, line in enumerate(raw, 1):
                try:
                    line.decode(encoding)
                except UnicodeDecodeError as at:
                    where, detail = f"{path}:{number}", f"byte {line[at.start]:#04x} at column {at.start + 1}"
                    break
        raise ValueError(
            f"{where}: not {encoding} text ({detail}); pass the file's encoding with encoding=... (--encoding on the "
            "command line), e.g. encoding='latin-1', or convert the file to UTF-8"
        ) from None


def _txt_documents(path: Path, encoding: str) -> Iterator[tuple[str | list[int], str]]:
    lines: list[str] = []
    start = 1
    for number, line in _lines(path, encoding):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip("\n"))
        elif lines:
            yield "\n".join(lines), f"{path}:{start}"
            lines = []
    if lines:
        yield "\n".join(lines), f"{path}:{start}"


def _jsonl_documents(path: Path, text_field: str, encoding: str) -> Iterator[tuple[str | list[int], str]]:
    for number, line in _lines(path, encoding):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            fields = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where}: no text field {text_field!r} holding a string (found: {fields}); "
                "name the field with text_field=... (--text-field on the command line)"
            )
        yield row[text_field], where


def _item(item: Any, index: int, text_field: str) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        value = item.get(text_field)
        if not isinstance(value, str):
            raise ValueError(
                f"data item {index} is a row without a text field {text_field!r} holding a string (fields: "
                f"{', '.join(map(repr, item))}); name the field with text_field=..."
            )
        return value
    try:
        ids = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"data item {index} is a {type(item).__name__}; items must be texts, token-id sequences or dict rows"
        ) from None
    if ids.ndim == 1 and ids.numel() == 0:
        return []  # an empty sequence reads as float32; it is an empty document, skipped and counted
    if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(
            f"data item {index} must be a 1-D sequence of integer token ids, got shape {tuple(ids.shape)} and "
            f"dtype {ids.dtype}"
        )
    return [int(i) for i in ids.tolist()]


def _refuse_mapping(data: Mapping[Any, Any], text_field: str) -> None:
    """A mapping iterates over its keys, which would be read as the documents: say what to pass instead."""
    name = type(data).__name__
    keys = ", ".join(map(repr, list(data)[:5])) + (", ..." if len(data) > 5 else "")
    if not data:
        raise TypeError(f"data is a {name}, an empty mapping; pass an iterable of documents (texts, ids or dict rows)")
    if isinstance(data.get(text_field), str):
        raise TypeError(
            f"data is a {name} holding one row ({text_field!r} is a string); pass a list of rows or of texts, e.g. "
            "[data]"
        )
    if text_field in data:
        raise TypeError(
            f"data is a {name}, a dict of columns ({keys}) as dataset[:] gives, whose keys would be read as the "
            f"documents; pass the column: data[{text_field!r}]"
        )
    raise TypeError(
        f"data is a {name} with keys {keys} (a dict of splits, as datasets.load_dataset gives without split=), whose "
        f"keys would be read as the documents; pass one split, e.g. data[{next(iter(data))!r}], or the texts themselves"
    )


def documents(data: Any, text_field: str = "text", encoding: str = "utf-8") -> Iterator[tuple[str | list[int], str]]:
    """``(document, where)`` pairs from any source :func:`attnlens.scan` takes; ``where`` names it in errors.

    A document is a text or a list of token ids. Files are read as ``encoding`` text.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file of another kind than ``.txt`` / ``.jsonl``, bytes that are not ``encoding`` (named by
            file, line and column), an unknown encoding, a bad ``.jsonl`` line, a row without the text field, an
            item that is not a 1-D integer sequence.
        TypeError: ``data`` is not iterable, is a mapping (a dict of columns or of splits: its keys are no
            documents), or an item is none of the accepted kinds.
    """
    if isinstance(data, (str, os.PathLike)):
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}; name a Python codec, e.g. 'utf-8' or 'latin-1'") from None
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(
                f"data {os.fspath(data)!r} is not a file; pass a path to a .txt or .jsonl file, or a list of texts "
                "(a single string is always taken as a path)"
            )
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field, encoding)
        elif path.suffix == ".txt":
            yield from _txt_documents(path, encoding)
        else:
            raise ValueError(f"data file {path} must end in .txt (blank-line-separated documents) or .jsonl")
        return
    if isinstance(data, Mapping):
        _refuse_mapping(data, text_field)
    if isinstance(data, Tensor) and data.ndim == 2:
        data = list(data)  # [document, pos]: one document per row
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a path or an iterable of documents, got {type(data).__name__}")
    for index, item in enumerate(data):
        yield _item(item, index, text_field), f"data item {index}"


@dataclass
class Packer:
    """Tokenizes documents and packs them into ``[batch, seq_len]`` batches of windows (see the module docstring).

    Attributes:
        seq_len: tokens per window.
        batch_size: windows per batch (the last batch may hold fewer).
        eot_id: the end-of-text token id put before every document.
        tokenizer: turns texts into ids (needed only when the data holds texts).
        max_windows: stop after this many windows (``None``: the whole data).
        n_documents: documents read so far.
        n_empty: documents skipped because they hold no tokens.
        dropped_tokens: tokens after the last full window (known once the data is exhausted).
    """

    seq_len: int
    batch_size: int
    eot_id: int
    tokenizer: Any = None
    max_windows: int | None = None
    n_documents: int = 0
    n_empty: int = 0
    dropped_tokens: int = 0

    def _token_lists(self, docs: Iterable[tuple[str | list[int], str]]) -> Iterator[list[int]]:
        group: list[str] = []
        kind: type | None = None

        def flush() -> Iterator[list[int]]:
            rows = self.tokenizer(group, verbose=False)["input_ids"] if group else []
            group.clear()
            yield from (list(row) for row in rows)

        for doc, where in docs:
            if kind is not None and type(doc) is not kind:
                raise ValueError(f"{where}: data mixes texts and token ids; give one kind only")
            kind = type(doc)
            if isinstance(doc, str):
                if self.tokenizer is None:
                    raise ValueError(f"{where} is text; pass tokenizer=... to tokenize it (or pass token ids)")
                group.append(doc)
                if len(group) == _TOKENIZE_GROUP:
                    yield from flush()
            else:
                yield doc
        yield from flush()

    def batches(self, data: Any, text_field: str = "text", encoding: str = "utf-8") -> Iterator[Tensor]:
        """``[batch, seq_len]`` int64 batches, in order; the last may hold fewer windows."""
        buffer: list[int] = []
        windows: list[list[int]] = []
        n_windows = 0
        for ids in self._token_lists(documents(data, text_field, encoding)):
            self.n_documents += 1
            if not ids:
                self.n_empty += 1
                continue
            buffer.append(self.eot_id)
            buffer.extend(ids)
            while len(buffer) >= self.seq_len:
                windows.append(buffer[: self.seq_len])
                del buffer[: self.seq_len]
                n_windows += 1
                if len(windows) == self.batch_size or n_windows == self.max_windows:
                    yield torch.tensor(windows, dtype=torch.long)
                    windows = []
                if n_windows == self.max_windows:
                    self.dropped_tokens = 0  # stopped by max_tokens: the rest of the data is not read at all
                    return
        if windows:
            yield torch.tensor(windows, dtype=torch.long)
        self.dropped_tokens = len(buffer)
