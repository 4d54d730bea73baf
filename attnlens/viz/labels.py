r"""Readable token labels: the tokenizer's own decoding of each id, with spaces, newlines and tabs made visible.

Byte-level BPE vocabularies (GPT-2's) store a token as symbols that stand for bytes: ``Ġcat`` is `` cat`` and ``Ċ``
a newline. Those symbols are never shown; :func:`token_labels` decodes each id with the tokenizer
(:func:`attnlens.tokens.token_texts`), and :func:`visible` marks what would otherwise be invisible: a space as
``␣``, a newline as ``⏎``, a tab as ``⇥``, a carriage return as ``␍``. A token that holds only part of a UTF-8
character (a byte-level BPE splits ``日`` into three tokens) decodes to the replacement character ``�``; its label
shows the bytes in hex instead, e.g. ``\xe6\x97``.
"""

from __future__ import annotations

from typing import Any

from attnlens.tokens import token_texts

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
