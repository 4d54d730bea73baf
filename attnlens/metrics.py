"""Per-head scores of attention patterns: previous-token, duplicate-token, induction, first-token and entropy.

Every score is a ``[layer, head]`` tensor over a trace's layers (in their order) and kept heads, a mean over query
rows pooled across the batch. Padding is respected throughout: only rows of real tokens count, keys that are padding
never qualify, and "first token" means each sequence's first real token (so left padding changes nothing).

Notation: ``P[b, h, i, j]`` is the attention of query ``i`` to key ``j`` in sequence ``b``; ``t[b, i]`` its token id;
``f_b`` the position of its first real token; ``R`` the set of qualifying rows ``(b, i)`` of a score, and ``|R|``
their number. A score is undefined (a ``ValueError``) when no row qualifies.

Options (all off by default, which gives the numbers above):

* ``exclude_bos``: leave out attention to each sequence's first real token ``f_b`` (the bos token when the text was
  traced with ``prepend_bos=True``); ``exclude_current_token``: leave out attention of each query to itself.
  Excluding keys drops them from the target and renormalises each row by the probability left on its other keys, so
  a row scores the *share of its non-excluded attention* that goes to the target; a row with no target left, or
  with no probability left (all of it on excluded keys, for that head), is left out; a head with no row left scores
  NaN. Taken by :func:`previous_token_scores`, :func:`duplicate_token_scores`, :func:`induction_scores` and
  :func:`pattern_scores`; :func:`first_token_scores` takes only ``exclude_current_token`` (its target *is* the
  first token) and :func:`entropy` neither.
* :func:`pattern_scores` scores any detection pattern (a tensor, or a function of the token ids) the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from einops import einsum
from torch import Tensor, nn

from attnlens._detection import (
    check_flag,
    check_options,
    detection_weights,
    duplicate_token_pattern,
    excluded_keys,
    first_positions,
    head_mask,
    induction_pattern,
    previous_token_pattern,
    real_pairs,
    score_keys,
    score_rows,
    token_keys,
)
from attnlens._display import HeadTables, top_heads
from attnlens.loading import resolve
from attnlens.models import Adapter, adapt
from attnlens.trace import AttentionTrace, trace

__all__ = [
    "HeadScores",
    "duplicate_token_pattern",
    "duplicate_token_scores",
    "entropy",
    "first_token_scores",
    "head_scores",
    "induction_pattern",
    "induction_scores",
    "pattern_scores",
    "previous_token_pattern",
    "previous_token_scores",
    "top_heads",
]


def _valid(tr: AttentionTrace) -> Tensor:
    """Real-token positions ``[batch, pos]`` (bool)."""
    return tr.attention_mask.to(torch.bool)


def _after_first(valid: Tensor) -> Tensor:
    """Real-token rows ``[batch, pos]`` that have at least one real token before them."""
    n_pos = valid.shape[-1]
    return valid & (torch.arange(n_pos, device=valid.device) > first_positions(valid)[:, None])


def _mean_over_rows(tr: AttentionTrace, rows: Tensor, per_row: Callable[[Tensor], Tensor], what: str) -> Tensor:
    """``[layer, head]`` mean of ``per_row(pattern) [batch, head, q_pos]`` over ``rows [batch, q_pos]``."""
    count = int(rows.sum())
    if count == 0:
        raise ValueError(f"{what} is undefined here: no query row qualifies (see the docstring for which rows do)")
    weights = rows.to(torch.float32)
    out = []
    for layer in tr.layers:
        values = per_row(tr.pattern(layer).to(torch.float32))
        out.append(einsum(values, weights, "batch head q_pos, batch q_pos -> head") / count)
    return torch.stack(out)


def previous_token_scores(
    tr: AttentionTrace, *, exclude_bos: bool = False, exclude_current_token: bool = False
) -> Tensor:
    r"""Mean attention of each token to the token just before it.

    ``score[l, h] = 1/|R| * sum_{(b, i) in R} P[b, h, i, i-1]`` with ``R`` the real-token rows whose previous
    position is also a real token (``i > f_b`` for left or right padding). A pure previous-token head scores 1.0; a
    uniform head scores the mean of ``1/(i - f_b + 1)``.

    Args:
        tr: the trace.
        exclude_bos: leave out attention to the first real token (then row ``f_b + 1``, whose previous token it is,
            no longer counts); rows are renormalised (see the module docstring).
        exclude_current_token: leave out attention of each query to itself; rows are renormalised.

    Returns:
        ``[layer, head]``.
    """
    exclude_bos, exclude_current_token = check_options(exclude_bos, exclude_current_token)
    valid = _valid(tr)
    if exclude_bos or exclude_current_token:
        keys = torch.zeros(tr.batch, tr.n_pos, tr.n_pos, dtype=torch.bool, device=valid.device)
        keys.diagonal(offset=-1, dim1=-2, dim2=-1).fill_(True)
        keys &= real_pairs(valid)
        excluded = excluded_keys(valid, exclude_bos, exclude_current_token)
        return score_keys(tr, keys, excluded, "the previous-token score")
    rows = torch.zeros_like(valid)
    rows[:, 1:] = valid[:, 1:] & valid[:, :-1]

    def per_row(p: Tensor) -> Tensor:
        sub = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1)  # P[b, h, i, i-1] for i >= 1
        return torch.nn.functional.pad(sub, (1, 0))

    return _mean_over_rows(tr, rows, per_row, "the previous-token score")


def first_token_scores(tr: AttentionTrace, *, exclude_bos: bool = False, exclude_current_token: bool = False) -> Tensor:
    r"""Mean attention to each sequence's first real token (the "attention sink").

    ``score[l, h] = 1/|R| * sum_{(b, i) in R} P[b, h, i, f_b]`` with ``R`` the real-token rows after the first
    (``i > f_b``; the first row can attend nowhere else). A uniform head scores the mean of ``1/(i - f_b + 1)``.

    Args:
        tr: the trace.
        exclude_bos: refused: the first token is this score's target.
        exclude_current_token: leave out attention of each query to itself; rows are renormalised (see the module
            docstring).

    Returns:
        ``[layer, head]``.

    Raises:
        ValueError: ``exclude_bos=True``, or no row qualifies.
    """
    exclude_bos, exclude_current_token = check_options(exclude_bos, exclude_current_token)
    if exclude_bos:
        raise ValueError(
            "first_token_scores does not take exclude_bos=True: the first token is what it measures, so nothing "
            "would be left to score"
        )
    valid = _valid(tr)
    rows = _after_first(valid)
    first = first_positions(valid)
    if exclude_current_token:
        keys = (torch.arange(tr.n_pos, device=valid.device)[None, :] == first[:, None])[:, None, :] & rows[:, :, None]
        excluded = excluded_keys(valid, False, True)
        return score_keys(tr, keys & real_pairs(valid), excluded, "the first-token score")

    def per_row(p: Tensor) -> Tensor:
        index = first.view(-1, 1, 1, 1).expand(-1, p.shape[1], p.shape[2], 1)
        return p.gather(-1, index).squeeze(-1)

    return _mean_over_rows(tr, rows, per_row, "the first-token score")


def entropy(tr: AttentionTrace) -> Tensor:
    r"""Mean entropy of the attention rows, in nats.

    ``score[l, h] = 1/|R| * sum_{(b, i) in R} -sum_j P[b, h, i, j] log P[b, h, i, j]`` (with ``0 log 0 = 0``) over
    the real-token rows after the first (``i > f_b``; the first row's entropy is always 0). A uniform head scores the
    mean of ``log(i - f_b + 1)``; a head that always attends to one token scores 0.

    Returns:
        ``[layer, head]``.
    """
    rows = _after_first(_valid(tr))

    def per_row(p: Tensor) -> Tensor:
        return -torch.special.xlogy(p, p).sum(dim=-1)

    return _mean_over_rows(tr, rows, per_row, "the entropy")


def _token_ids(tr: AttentionTrace, input_ids: Tensor | None) -> Tensor:
    ids = tr.input_ids if input_ids is None else torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if tuple(ids.shape) != (tr.batch, tr.n_pos):
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}; the trace is {(tr.batch, tr.n_pos)}")
    return ids.to(tr.attention_mask.device)


def duplicate_token_scores(
    tr: AttentionTrace,
    input_ids: Tensor | None = None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Tensor:
    r"""Mean attention of each token to earlier copies of itself.

    ``score[l, h] = 1/|R| * sum_{(b, i) in R} sum_{j < i, t[b, j] = t[b, i]} P[b, h, i, j]`` with ``R`` the real-token
    rows that have at least one earlier real copy of their token.

    Args:
        tr: the trace.
        input_ids: ``[batch, pos]`` token ids; default the trace's own.
        exclude_bos: leave out attention to (and copies at) the first real token; rows are renormalised (see the
            module docstring).
        exclude_current_token: leave out attention of each query to itself; rows are renormalised.

    Returns:
        ``[layer, head]``.
    """
    exclude_bos, exclude_current_token = check_options(exclude_bos, exclude_current_token)
    ids, valid = _token_ids(tr, input_ids), _valid(tr)
    keys, _ = token_keys(ids, valid)
    excluded = excluded_keys(valid, exclude_bos, exclude_current_token)
    return score_keys(tr, keys, excluded, "the duplicate-token score")


def _induction_on_trace(tr: AttentionTrace, input_ids: Tensor | None, excluded_opts: tuple[bool, bool]) -> Tensor:
    ids, valid = _token_ids(tr, input_ids), _valid(tr)
    _, keys = token_keys(ids, valid)
    return score_keys(tr, keys, excluded_keys(valid, *excluded_opts), "the induction score")


def _bos_token_id(adapter: Adapter) -> int:
    """The id that ``prepend_bos`` puts first: the config's bos token, else its eos token (GPT-2: 50256)."""
    for name, value in (("bos_token_id", adapter.bos_token_id), ("eos_token_id", adapter.eos_token_id)):
        if value is not None:
            if not 0 <= value < adapter.d_vocab:
                raise ValueError(f"the config's {name} {value} is outside the vocabulary (size {adapter.d_vocab})")
            return value
    raise ValueError(
        "prepend_bos=True needs a beginning-of-sequence token, but the model's config has no integer bos_token_id "
        "or eos_token_id; set model.config.bos_token_id"
    )


def _induction_on_repeats(
    adapter: Adapter, seq_len: int | None, batch: int, seed: int, prepend_bos: bool, excluded_opts: tuple[bool, bool]
) -> Tensor:
    n_ctx = adapter.n_ctx
    extra = int(prepend_bos)
    most = (n_ctx - extra) // 2
    # The target lies seq_len - 1 keys back: a sliding window of fewer keys blocks it, and the score is 0 by
    # construction, not for want of an induction head.
    windows = {layer: spec.window for layer, spec in enumerate(adapter.specs) if spec.window is not None}
    reach = min(windows.values(), default=most)
    seq_len = min(50, most, reach) if seq_len is None else int(seq_len)
    if seq_len < 2 or seq_len > most:
        fit = "twice it plus the bos token" if prepend_bos else "twice it"
        raise ValueError(f"seq_len must be in [2, {most}] ({fit} must fit n_ctx={n_ctx}), got {seq_len}")
    blind = {layer: window for layer, window in windows.items() if window < seq_len}
    if blind:
        raise ValueError(
            f"seq_len={seq_len}: each induction target lies {seq_len - 1} keys back, outside the sliding window of "
            f"layers {sorted(blind)} (windows {sorted(set(blind.values()))} keys, the query included), where every "
            f"head would score 0; use seq_len <= {min(blind.values())}"
        )
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    bos = _bos_token_id(adapter) if prepend_bos else None
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(0, adapter.d_vocab, (batch, seq_len), generator=generator)
    parts = [half, half] if bos is None else [torch.full((batch, 1), bos, dtype=half.dtype), half, half]
    ids = torch.cat(parts, dim=-1)
    # An explicit mask with the bos: GPT-2's bos id is also its pad id, and transformers would warn of padding.
    tr = trace(adapter, ids) if bos is None else trace(adapter, ids, torch.ones_like(ids))
    if any(excluded_opts):
        # The target as keys: query i = extra + L + r of the second half, key i - L + 1 = r + extra + 1.
        keys = torch.zeros(batch, tr.n_pos, tr.n_pos, dtype=torch.bool, device=tr.attention_mask.device)
        keys[:, extra + seq_len :].diagonal(offset=extra + 1, dim1=-2, dim2=-1).fill_(True)
        excluded = excluded_keys(tr.attention_mask.to(torch.bool), *excluded_opts)
        return score_keys(tr, keys, excluded, "the induction score")
    # Query i in the second half attends to i - L + 1: the token after the previous occurrence of token i.
    return torch.stack(
        [
            torch.diagonal(tr.pattern(layer).float(), offset=1 - seq_len, dim1=-2, dim2=-1)[..., -seq_len:].mean(
                dim=(0, 2)
            )
            for layer in tr.layers
        ]
    )


def induction_scores(
    source: AttentionTrace | nn.Module | Adapter | str | os.PathLike[str],
    input_ids: Tensor | None = None,
    *,
    seq_len: int | None = None,
    batch: int = 4,
    seed: int = 0,
    prepend_bos: bool = False,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Tensor:
    r"""Mean attention to the token that followed an earlier copy of the current token.

    On a trace (``induction_scores(trace)``):
    ``score[l, h] = 1/|R| * sum_{(b, i) in R} sum_{j + 1 < i, t[b, j] = t[b, i]} P[b, h, i, j+1]``
    with ``R`` the real-token rows that have such a ``j`` (among real tokens). The query's own position is never a
    target (``j + 1 < i``), even where the token just before it is a copy of it.

    On a model (``induction_scores(model, seq_len=L, batch=B, seed=s)``), the standard test: ``B`` random sequences
    of ``L`` token ids (uniform over the vocabulary, seeded), each repeated twice (``2L`` positions, no padding), and
    ``score[l, h] = 1/(B L) * sum_b sum_{i=L}^{2L-1} P[b, h, i, i-L+1]``. An ideal induction head scores 1.0. With
    ``prepend_bos=True`` each sequence starts with the bos id (``2L + 1`` positions, the same random tokens, the
    sum over ``i = L+1 .. 2L``), as GPT-2 is usually run: the first token soaks up attention (the "sink"), which
    changes the scores.

    Args:
        source: an :class:`~attnlens.AttentionTrace`, or a GPT-2 model to test on repeated random tokens,
            or a hub name / local folder / ``"demo"``, loaded for this call by :func:`attnlens.load`.
        input_ids: with a trace, ``[batch, pos]`` token ids (default the trace's own).
        seq_len: with a model, ``L`` (default ``min(50, n_ctx // 2)``; ``min(50, (n_ctx - 1) // 2)`` with bos; at
            most the smallest sliding window, which the target ``L - 1`` keys back must lie within).
        batch: with a model, ``B``.
        seed: with a model, the seed of the random tokens.
        prepend_bos: with a model, put the config's ``bos_token_id`` (else ``eos_token_id``; GPT-2's
            ``<|endoftext|>``, 50256) in front of every sequence. Default ``False``. A trace's tokens are its own.
        exclude_bos: leave out attention to each sequence's first real token; rows are renormalised (see the
            module docstring).
        exclude_current_token: leave out attention of each query to itself; rows are renormalised.

    Returns:
        ``[layer, head]`` (all layers and heads for a model).

    Raises:
        TypeError: ``source`` is a tensor, neither a trace nor a model; an option that is no bool.
        OSError: ``source`` is a name or path that could not be loaded.
        UnsupportedModelError: ``source`` is a model, but not a supported GPT-2 one.
        ValueError: a score undefined for the trace's tokens, a bad ``seq_len`` / ``batch`` (or one longer than a
            layer's sliding window), ``prepend_bos`` with
            a trace, or a model without a bos/eos id.
    """
    excluded_opts = check_options(exclude_bos, exclude_current_token)
    prepend_bos = check_flag(prepend_bos, "prepend_bos")
    if isinstance(source, AttentionTrace):
        if prepend_bos:
            raise ValueError(
                "prepend_bos applies to the test on a model; a trace's tokens are its own: trace the text with "
                "attnlens.trace(..., prepend_bos=True)"
            )
        return _induction_on_trace(source, input_ids, excluded_opts)
    if isinstance(source, Tensor):
        raise TypeError(
            "induction_scores takes a trace or a GPT-2 model, got a tensor: wrap patterns "
            "[layer, batch, head, q_pos, k_pos] with attnlens.AttentionTrace.from_patterns(patterns, input_ids=...)"
        )
    model, _ = resolve(source, None, "induction_scores")
    adapter = adapt(model)  # refuses anything but a supported model, naming the supported classes
    if input_ids is not None:
        raise ValueError("input_ids applies to a trace; on a model, the test draws its own tokens")
    return _induction_on_repeats(adapter, seq_len, batch, seed, prepend_bos, excluded_opts)


def pattern_scores(
    tr: AttentionTrace,
    detection_pattern: Tensor | Callable[[Tensor], Tensor],
    *,
    input_ids: Tensor | None = None,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
    average: str = "rows",
    heads: Sequence[int] | Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    r"""Mean attention on the keys of a detection pattern of your own, scored like the built-in scores.

    ``score[l, h] = 1/|R| * sum_{(b, i) in R} sum_j P[b, h, i, j] D[b, i, j]`` with ``D`` the detection pattern and
    ``R`` the real-token rows with some weight on real keys. With 0/1 weights a head scores the share of its
    attention on the pattern's keys (1.0 for a head that attends only there); ``previous_token_scores(tr)`` is
    ``pattern_scores(tr, D)`` with ``D[i, i-1] = 1``. Weight on padding rows or keys is dropped (padding never
    qualifies, as in every score). Positions are the trace's own, padding included: with left padding, a fixed
    ``[q_pos, k_pos]`` pattern is not shifted per sequence; give a ``[batch, q_pos, k_pos]`` tensor or a function.

    Args:
        tr: the trace.
        detection_pattern: weights ``>= 0`` on ``(query, key)`` pairs, lower triangular: a ``[q_pos, k_pos]``
            tensor (the same for every sequence), a ``[batch, q_pos, k_pos]`` tensor, or a function of the token
            ids ``[batch, pos]`` returning either.
        input_ids: ``[batch, pos]`` ids given to a function pattern; default the trace's own.
        exclude_bos: leave out attention to each sequence's first real token; rows are renormalised (see the
            module docstring).
        exclude_current_token: leave out attention of each query to itself; rows are renormalised.
        error_measure: ``"mul"`` (the score above) or ``"abs"`` (TransformerLens's: every real row scores
            ``1 - sum_j |P - D|`` over its real keys, excluded keys dropped without renormalising; unrounded).
        average: ``"rows"`` (pool every sequence's rows, the formula above) or ``"prompts"`` (TransformerLens's for a
            list of prompts: each sequence's mean, then the mean over the sequences that have a row).
        heads: score only these: head numbers (every layer) or ``(layer, head)`` pairs; the others are NaN.

    Returns:
        ``[layer, head]``.

    Raises:
        TypeError: a pattern that is neither a tensor nor a function (a head name, say), a function that returns no
            tensor, or an option that is no bool.
        ValueError: a shape that does not fit the trace, negative, NaN or infinite weights, weight on keys after
            their query, or no row with weight ("undefined").

    Example:
        >>> D = torch.zeros(tr.n_pos, tr.n_pos); D[:, 0] = 1  # attention to position 0
        >>> metrics.pattern_scores(tr, D)
        >>> metrics.pattern_scores(tr, metrics.induction_pattern, error_measure="abs", average="prompts")
    """
    exclude_bos, exclude_current_token = check_options(exclude_bos, exclude_current_token)
    weights = detection_weights(tr, detection_pattern, _token_ids(tr, input_ids))
    excluded = excluded_keys(_valid(tr), exclude_bos, exclude_current_token)
    if (error_measure, average, heads) == ("mul", "rows", None):
        return score_keys(tr, weights, excluded, "the pattern score")
    mask = head_mask(tr, heads)
    return score_rows(
        tr, weights, excluded, "the pattern score", error_measure=error_measure, average=average, heads=mask
    )


@dataclass(frozen=True, eq=False)
class HeadScores(HeadTables):
    """All per-head scores of one trace, each ``[layer, head]`` (``None`` where undefined for its tokens).

    Attributes:
        layers: the layer of each row, as traced.
        heads: the head of each column.
        previous_token: :func:`previous_token_scores`.
        first_token: :func:`first_token_scores`.
        entropy: :func:`entropy` (nats).
        duplicate_token: :func:`duplicate_token_scores`, or ``None`` if no token repeats.
        induction: :func:`induction_scores` on the trace, or ``None`` if no token repeats with a successor.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    previous_token: Tensor | None
    first_token: Tensor | None
    entropy: Tensor | None
    duplicate_token: Tensor | None
    induction: Tensor | None

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the scores this object holds (defined or not)."""
        return tuple(f.name for f in fields(self) if f.name not in ("layers", "heads"))

    def top(self, name: str, k: int = 5, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest (or lowest) score: ``[(layer, head, score)]``, best first, NaN last."""
        if name not in self.names:
            raise ValueError(f"unknown score {name!r}; known: {', '.join(self.names)}")
        scores = getattr(self, name)
        if scores is None:
            raise ValueError(f"the {name} score is undefined for this trace's tokens")
        return top_heads(scores, k, largest=largest, layers=self.layers, heads=self.heads)

    def __repr__(self) -> str:
        parts = []
        for name in self.names:
            value = getattr(self, name)
            parts.append(f"{name}=None" if value is None else f"{name}={list(value.shape)}")
        return f"HeadScores(layers={list(self.layers)}, {', '.join(parts)})"

    def _tables(self) -> dict[str, Tensor | None]:  # to_dict, to_json, to_pandas and the notebook view
        return {name: getattr(self, name) for name in self.names}


def head_scores(tr: AttentionTrace, input_ids: Tensor | None = None) -> HeadScores:
    """Every score of this module on one trace (token-based ones from ``input_ids``, default the trace's own)."""

    def maybe(fn: Callable[[], Tensor]) -> Tensor | None:
        try:
            return fn()
        except ValueError as error:
            if "undefined" in str(error):
                return None
            raise

    return HeadScores(
        layers=tuple(tr.layers),
        heads=tuple(tr.heads),
        previous_token=maybe(lambda: previous_token_scores(tr)),
        first_token=maybe(lambda: first_token_scores(tr)),
        entropy=maybe(lambda: entropy(tr)),
        duplicate_token=maybe(lambda: duplicate_token_scores(tr, input_ids)),
        induction=maybe(lambda: _induction_on_trace(tr, input_ids, (False, False))),
    )
