r"""Readable token labels: the tokenizer's own decoding of each id, with spaces, newlines and tabs made visible.

Byte-level BPE vocabularies (GPT-2's) store a token as symbols that stand for bytes: ``Ġcat`` is `` cat`` and ``Ċ``
a newline. Those symbols are never shown; :func:`token_labels` decodes each id with the tokenizer, and
:func:`visible` marks what would otherwise be invisible: a space as ``␣``, a newline as ``⏎``, a tab as ``⇥``, a
carriage return as ``␍``. A token that holds only part of a UTF-8 character (a byte-level BPE splits ``日`` into
three tokens) decodes to the replacement character ``�``; its label shows the bytes in hex instead, e.g. ``\xe6\x97``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["token_labels", "token_texts", "visible"]

_MARKS = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """A token's text as a one-line label: spaces, newlines, tabs and carriage returns shown as ``␣ ⏎ ⇥ ␍``.

    Args:
        token: Decoded token text, e.g. ``" cat"``.

    Returns:
        The label, e.g. ``"␣cat"``; the empty string shows as ``∅``.
    """
    if token == "":
        return "∅"
    return "".join(_MARKS.get(char, char) for char in token)


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
        if "\ufffd" in text:
            fallback = _hex_fallback(tokenizer, token_id)
            text = fallback if fallback is not None else f"<id={token_id}>"
        texts.append(text)
    return texts


def token_labels(tokenizer: Any, ids: Any) -> list[str]:
    r"""Readable labels of token ids: :func:`token_texts` passed through :func:`visible`.

    Args:
        tokenizer: A Hugging Face tokenizer (anything with ``decode`` and ``convert_ids_to_tokens``).
        ids: ``[pos]`` token ids: a list of ints or a 1-D tensor or array.

    Returns:
        One label per id, e.g. ``["The", "␣cat", "⏎"]``; a token that is part of a UTF-8 character shows its bytes,
        e.g. ``"\xe6\x97"`` (or ``"<id=123>"`` when the vocabulary is not byte-level).

    Raises:
        ValueError: If ``ids`` is not one-dimensional.
    """
    return [visible(text) for text in token_texts(tokenizer, ids)]
