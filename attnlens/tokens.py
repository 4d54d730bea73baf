r"""Token ids and readable strings: texts tokenized for a model, and each id decoded alone for display.

Below :mod:`attnlens.trace` and :mod:`attnlens.viz` alike, so that neither imports the other for it. Byte-level BPE
vocabularies (GPT-2's) store a token as symbols that stand for bytes (``Ġcat`` is `` cat``). A token that holds only
part of a UTF-8 character (a byte-level BPE splits ``日`` into three tokens) decodes to the replacement character
``�``; :func:`token_texts` shows its bytes in hex instead, e.g. ``\xe6\x97``, as it does SentencePiece's byte pieces
(``<0xE6>``). SentencePiece vocabularies (Llama 2, Mistral) mark a word's leading space with ``▁``, which their decoder
drops from a token decoded alone: :func:`token_texts` keeps it (``▁cat`` is `` cat``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["bos_id", "text_inputs", "token_texts", "tokenize"]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-symbol table (GPT-2's ``bytes_to_unicode``)."""
    # Printable Latin-1 bytes stand for themselves; the others are shifted past 255, in byte order.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = list(kept)
    shift = 0
    for byte in range(256):
        if byte not in kept:
            kept.append(byte)
            symbols.append(256 + shift)
            shift += 1
    return {chr(symbol): byte for byte, symbol in zip(kept, symbols)}


def _hex_fallback(tokenizer: Any, token_id: int) -> str | None:
    r"""The raw bytes of a byte-level BPE token as ``\xNN`` escapes, or None if the vocabulary is not byte-level."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    table = _byte_decoder()
    if not piece or any(char not in table for char in piece):
        return None
    raw = bytes(table[char] for char in piece)
    # Complete characters at either end stay readable; only the undecodable bytes are escaped.
    return raw.decode("utf-8", errors="backslashreplace")


_METASPACE = "\u2581"
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_texts(tokenizer: Any, ids: Any) -> list[str]:
    r"""The text of each token id, decoded alone by the tokenizer (partial UTF-8 characters as ``\xNN`` bytes).

    Args:
        tokenizer: A Hugging Face tokenizer (anything with ``decode`` and ``convert_ids_to_tokens``).
        ids: ``[pos]`` token ids: a list of ints or a 1-D tensor or array.

    Returns:
        One string per id, e.g. ``["The", " cat", "\n"]``, spaces and newlines as they are.

    Raises:
        ValueError: If ``ids`` is not one-dimensional.
    """
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    id_list: Sequence[Any] = list(ids)
    if any(isinstance(i, (list, tuple)) for i in id_list):
        raise ValueError("token ids must be one sequence [pos]; pick a batch row first, e.g. ids[0]")
    texts = []
    for token_id in (int(i) for i in id_list):
        text = tokenizer.decode([token_id])
        piece = tokenizer.convert_ids_to_tokens(token_id)
        byte = _SP_BYTE.fullmatch(piece) if isinstance(piece, str) else None
        if byte is not None:  # SentencePiece's byte fallback, <0xE6>: one byte of a character it has no piece for
            text = bytes([int(byte.group(1), 16)]).decode("utf-8", errors="backslashreplace")
        elif "\ufffd" in text:
            fallback = _hex_fallback(tokenizer, token_id)
            text = fallback if fallback is not None else f"<id={token_id}>"
        elif isinstance(piece, str) and piece.startswith(_METASPACE):
            # SentencePiece (Llama 2, Mistral) marks a word's leading space with U+2581, and its decoder strips the
            # first space of what it decodes: a token decoded alone loses it (" cat" would read "cat").
            lost = (len(piece) - len(piece.lstrip(_METASPACE))) - (len(text) - len(text.lstrip(" ")))
            text = " " * max(lost, 0) + text
        texts.append(text)
    return texts


def bos_id(tokenizer: Any) -> int:
    """The tokenizer's beginning-of-sequence id: its bos token, else its eos token (GPT-2's ``<|endoftext|>``)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "prepend_bos=True needs a beginning-of-sequence token, but the tokenizer has neither a bos nor an eos token; "
        "set tokenizer.bos_token, or put the id in front of the token ids yourself"
    )


def tokenize(texts: list[str], tokenizer: Any, prepend_bos: bool = False) -> tuple[Tensor, Tensor]:
    """Token ids and mask of texts, padded on the tokenizer's side with its pad (else end-of-text, else 0) id.

    With ``prepend_bos``, every text starts with the tokenizer's bos id (else its eos id), in front of the text and
    behind any left padding: the bos is each sequence's first real token.
    """
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    if prepend_bos and getattr(tokenizer, "add_bos_token", False) is True:
        raise ValueError(
            "prepend_bos=True, but the tokenizer already puts a bos token in front of every text (add_bos_token=True):"
            " the text would start with two; drop prepend_bos"
        )
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    if any(not row for row in rows):
        raise ValueError("a text tokenizes to no tokens at all")
    if prepend_bos:
        bos = bos_id(tokenizer)
        # A post-processor template (Llama 3's tokenizer) puts the bos in front without any add_bos_token flag.
        doubled = [index for index, row in enumerate(rows) if row[0] == bos]
        if doubled:
            raise ValueError(
                f"prepend_bos=True, but text {doubled[0]} already starts with the bos token (id {bos}; the tokenizer "
                "puts it in front itself): the text would start with two; drop prepend_bos"
            )
        rows = [[bos, *row] for row in rows]
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    pad = 0 if pad is None else int(pad)
    width = max(len(row) for row in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if left else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def text_inputs(
    input_ids: Any, attention_mask: Any, tokenizer: Any, prepend_bos: bool
) -> tuple[Tensor | Any, Tensor | Any | None]:
    """``(input_ids, attention_mask)`` as given, or from text (a string or a list of strings) through ``tokenizer``.

    Raises:
        ValueError: text without a tokenizer, text with an ``attention_mask``, ``prepend_bos`` with token ids.
    """
    is_text = isinstance(input_ids, str) or (
        isinstance(input_ids, (list, tuple)) and bool(input_ids) and all(isinstance(t, str) for t in input_ids)
    )
    if is_text:
        if tokenizer is None:
            raise ValueError("input_ids is text; pass tokenizer=... to turn it into token ids (or pass token ids)")
        if attention_mask is not None:
            raise ValueError("attention_mask comes from the tokenizer when input_ids is text; do not pass one")
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        return tokenize(texts, tokenizer, prepend_bos)
    if prepend_bos is not False:
        raise ValueError(
            "prepend_bos applies to text; token ids are used as given: put the bos id in front of them yourself "
            "(and a 1 in front of each attention_mask row)"
        )
    return input_ids, attention_mask
