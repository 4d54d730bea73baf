"""Scoring a head against a detection pattern, with keys left out: the maths behind :mod:`attnlens.metrics`.

A detection pattern ``D[b, i, j] >= 0`` weights the keys ``j`` that a query ``i`` of sequence ``b`` is expected to
attend to (1 on the target keys, 0 elsewhere, for the built-in scores). Only real, causal pairs count: weight on a
padding row or a padding key is dropped, and a user's pattern with weight on a later key is refused. The
qualifying rows ``R`` are those with some weight left.

Without exclusions a head scores ``1/|R| sum_{(b, i) in R} sum_j P[b, h, i, j] D[b, i, j]``. Excluding keys ``X``
(each sequence's first real token, and/or the query itself) drops them from the target and from the row, and
renormalises the row by the probability left on the other keys: ``m = sum_{j not in X} P[b, h, i, j]``, and a row
scores ``sum_{j not in X} P D / m``. A row whose ``m`` is exactly 0 (all its attention on excluded keys) has no
share to give and is left out for that head; a head with no row left scores NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import einsum
from torch import Tensor

from attnlens._indices import as_index
from attnlens.attention_trace import AttentionTrace

__all__ = [
    "check_flag",
    "check_options",
    "detection_weights",
    "duplicate_token_pattern",
    "excluded_keys",
    "first_positions",
    "head_mask",
    "induction_pattern",
    "previous_token_pattern",
    "real_pairs",
    "score_keys",
    "score_rows",
    "token_keys",
]


def check_flag(value: Any, name: str) -> bool:
    """A yes/no option, refused unless it is a bool (``exclude_bos="no"`` would otherwise mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_options(exclude_bos: Any, exclude_current_token: Any) -> tuple[bool, bool]:
    """``exclude_bos`` and ``exclude_current_token``, checked."""
    return check_flag(exclude_bos, "exclude_bos"), check_flag(exclude_current_token, "exclude_current_token")


def first_positions(valid: Tensor) -> Tensor:
    """Position of each sequence's first real token, ``[batch]``."""
    return valid.to(torch.int8).argmax(dim=-1)


def excluded_keys(valid: Tensor, exclude_bos: bool, exclude_current_token: bool) -> Tensor | None:
    """The keys left out of each row, ``[batch, q_pos, k_pos]`` (bool), or ``None`` when none are."""
    if not (exclude_bos or exclude_current_token):
        return None
    batch, n_pos = valid.shape
    positions = torch.arange(n_pos, device=valid.device)
    out = torch.zeros(batch, n_pos, n_pos, dtype=torch.bool, device=valid.device)
    if exclude_bos:
        out |= (positions[None, :] == first_positions(valid)[:, None])[:, None, :]
    if exclude_current_token:
        out |= torch.eye(n_pos, dtype=torch.bool, device=valid.device)
    return out


def token_keys(ids: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Key sets ``[batch, q_pos, k_pos]`` (bool) of the duplicate-token and induction scores.

    ``duplicate[b, i, j]``: ``j < i`` and ``t[b, j] == t[b, i]``; ``induction[b, i, j + 1]``: ``j + 1 < i`` and
    ``t[b, j] == t[b, i]`` (``j + 1`` is what followed an earlier copy of token ``i``). With ``valid [batch, pos]``,
    only real tokens take part (as queries, as copies, and as keys).
    """
    same = ids[:, :, None] == ids[:, None, :]
    if valid is not None:
        same &= valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones_like(same[0]).tril(-1)
    induction = torch.zeros_like(same)
    induction[:, :, 1:] = same[:, :, :-1]
    induction &= earlier
    if valid is not None:
        induction &= valid[:, None, :]
    return same & earlier, induction


def real_pairs(valid: Tensor) -> Tensor:
    """Query/key pairs ``[batch, q_pos, k_pos]`` that attention can reach: both real tokens, key not after query."""
    causal = torch.ones(valid.shape[-1], valid.shape[-1], dtype=torch.bool, device=valid.device).tril()
    return valid[:, :, None] & valid[:, None, :] & causal


def score_keys(tr: AttentionTrace, weights: Tensor, excluded: Tensor | None, what: str) -> Tensor:
    """``[layer, head]`` scores of ``weights [batch, q_pos, k_pos]`` (already zero off real causal pairs).

    Raises:
        ValueError: no row has weight left ("undefined"), naming ``what``.
    """
    if excluded is not None:
        weights = weights.masked_fill(excluded, 0.0)
    rows = (weights != 0).any(dim=-1)
    count = int(rows.sum())
    if count == 0:
        raise ValueError(f"{what} is undefined here: no query row qualifies (see the docstring for which rows do)")
    on_target = weights.to(torch.float32).unsqueeze(1)  # broadcast over heads
    out = []
    if excluded is None:
        row_weights = rows.to(torch.float32)
        for layer in tr.layers:
            values = (tr.pattern(layer).to(torch.float32) * on_target).sum(dim=-1)
            out.append(einsum(values, row_weights, "batch head q_pos, batch q_pos -> head") / count)
        return torch.stack(out)
    valid = tr.attention_mask.to(torch.bool)
    kept = (real_pairs(valid) & ~excluded).to(torch.float32).unsqueeze(1)
    for layer in tr.layers:
        pattern = tr.pattern(layer).to(torch.float32)
        left = (pattern * kept).sum(dim=-1)  # [batch, head, q_pos]: the row's probability on keys not excluded
        counted = rows[:, None, :] & (left > 0)
        share = torch.where(counted, (pattern * on_target).sum(dim=-1) / left.where(counted, 1.0), 0.0)
        n = counted.sum(dim=(0, 2))
        out.append(torch.where(n > 0, share.sum(dim=(0, 2)) / n.clamp_min(1), float("nan")))
    return torch.stack(out)


def detection_weights(tr: AttentionTrace, detection_pattern: Tensor | Callable[[Tensor], Any], ids: Tensor) -> Tensor:
    """A user's detection pattern as ``[batch, q_pos, k_pos]`` float32 weights on the trace's real causal pairs.

    Raises:
        TypeError: neither a tensor nor a function, or a function that returns no tensor.
        ValueError: a wrong shape, a non-real or non-finite or negative weight, or weight on later keys.
    """
    source = "detection_pattern"
    if isinstance(detection_pattern, str):
        raise TypeError(
            f"detection_pattern must be a tensor or a function of the token ids, got the name {detection_pattern!r}; "
            "pass a constructor instead (metrics.previous_token_pattern, duplicate_token_pattern, "
            "induction_pattern), or use the built-in scores (previous_token_scores, duplicate_token_scores, "
            "induction_scores, first_token_scores)"
        )
    if isinstance(detection_pattern, Tensor):
        given = detection_pattern
    elif callable(detection_pattern):
        source = "detection_pattern(input_ids)"
        given = detection_pattern(ids)
        if not isinstance(given, Tensor):
            raise TypeError(f"{source} must return a tensor [batch, q_pos, k_pos] or [q_pos, k_pos], got {given!r}")
    else:
        raise TypeError(
            "detection_pattern must be a tensor [q_pos, k_pos] or [batch, q_pos, k_pos], or a function of the token "
            f"ids [batch, pos] returning one, got {type(detection_pattern).__name__}"
        )
    batch, n_pos = tr.batch, tr.n_pos
    if (
        given.ndim not in (2, 3)
        or tuple(given.shape[-2:]) != (n_pos, n_pos)
        or (given.ndim == 3 and given.shape[0] != batch)
    ):
        raise ValueError(
            f"{source} has shape {tuple(given.shape)}; the trace needs [q_pos, k_pos] = {[n_pos, n_pos]} or "
            f"[batch, q_pos, k_pos] = {[batch, n_pos, n_pos]}"
        )
    if given.is_complex():
        raise ValueError(f"{source} must hold real weights (float, int or bool), got dtype {given.dtype}")
    weights = given.to(device=tr.attention_mask.device, dtype=torch.float32)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{source} holds NaN or infinite weights; weights must be finite numbers >= 0")
    if bool((weights < 0).any()):
        raise ValueError(f"{source} holds negative weights; weights must be >= 0 (1 on the keys expected, 0 elsewhere)")
    if bool(weights.triu(1).any()):
        raise ValueError(
            f"{source} puts weight on keys after their query (k_pos > q_pos), which causal attention never reaches: "
            "it must be lower triangular"
        )
    weights = weights.expand(batch, n_pos, n_pos)
    # Padding rows and keys never qualify, as in every score: their weight is dropped.
    return weights * real_pairs(tr.attention_mask.to(torch.bool))


# ------------------------------------------------------------------------ public patterns and TL's options ---

ERROR_MEASURES = ("mul", "abs")
AVERAGES = ("rows", "prompts")


def _as_ids(input_ids: Any) -> tuple[Tensor, bool]:
    ids = torch.as_tensor(input_ids)
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.ndim not in (1, 2):
        raise ValueError(
            f"input_ids must be integer token ids [pos] or [batch, pos], got {ids.dtype} {tuple(ids.shape)}"
        )
    return (ids[None] if ids.ndim == 1 else ids), ids.ndim == 1


def previous_token_pattern(input_ids: Any) -> Tensor:
    """The previous-token detection pattern: ``D[b, i, i-1] = 1``.

    Float32 ``[batch, q_pos, k_pos]`` (``[q_pos, k_pos]`` for ``[pos]`` ids). Like the other constructors, a function
    of the ids: give it to :func:`attnlens.metrics.pattern_scores` as it is, or edit what it returns.
    """
    ids, single = _as_ids(input_ids)
    n_pos = ids.shape[-1]
    out = torch.ones(n_pos, n_pos, device=ids.device).tril(-1).triu(-1).expand(ids.shape[0], n_pos, n_pos).clone()
    return out[0] if single else out


def duplicate_token_pattern(input_ids: Any) -> Tensor:
    """The duplicate-token detection pattern: ``D[b, i, j] = 1`` for ``j < i`` with ``t[b, j] == t[b, i]``.

    Float32 ``[batch, q_pos, k_pos]`` (``[q_pos, k_pos]`` for ``[pos]`` ids), as TransformerLens's
    ``get_duplicate_token_head_detection_pattern``.
    """
    ids, single = _as_ids(input_ids)
    out = token_keys(ids)[0].to(torch.float32)
    return out[0] if single else out


def induction_pattern(input_ids: Any) -> Tensor:
    """The induction detection pattern: ``D[b, i, j + 1] = 1`` for ``j + 1 < i`` with ``t[b, j] == t[b, i]``.

    Float32 ``[batch, q_pos, k_pos]`` (``[q_pos, k_pos]`` for ``[pos]`` ids). Unlike TransformerLens's
    ``get_induction_head_detection_pattern``, the query itself is never a target (its ``tril`` keeps ``j + 1 = i``
    where a token repeats the one before it): what :func:`attnlens.metrics.induction_scores` scores.
    """
    ids, single = _as_ids(input_ids)
    out = token_keys(ids)[1].to(torch.float32)
    return out[0] if single else out


def head_mask(tr: AttentionTrace, heads: Any) -> Tensor | None:
    """``[layer, head]`` bool over the trace's layers and kept heads: the heads to score (``None``: all).

    ``heads``: head numbers (in every layer) or ``(layer, head)`` pairs, all in the trace.
    """
    if heads is None:
        return None
    items = [heads] if isinstance(heads, int) or getattr(heads, "ndim", None) == 0 else list(heads)
    if not items:
        raise ValueError("heads is empty; pass None to score every head")
    mask = torch.zeros(len(tr.layers), len(tr.heads), dtype=torch.bool)
    for item in items:
        pair = isinstance(item, (tuple, list)) or getattr(item, "ndim", 0) == 1
        layer, head = (
            (as_index(item[0], "heads"), as_index(item[1], "heads")) if pair else (None, as_index(item, "heads"))
        )
        if head not in tr.heads or (layer is not None and layer not in tr.layers):
            raise ValueError(
                f"head {item!r} is not in the trace (layers {list(tr.layers)}, heads {list(tr.heads)}); give head "
                "numbers or (layer, head) pairs among them"
            )
        column = tr.heads.index(head)
        if layer is None:
            mask[:, column] = True
        else:
            mask[tr.layers.index(layer), column] = True
    return mask


def score_rows(
    tr: AttentionTrace,
    weights: Tensor,
    excluded: Tensor | None,
    what: str,
    *,
    error_measure: str,
    average: str,
    heads: Tensor | None,
) -> Tensor:
    """:func:`score_keys` with TransformerLens's options: ``error_measure``, ``average`` and a subset of heads.

    ``"mul"`` rows as :func:`score_keys`. ``"abs"``: every real row counts, and scores ``1 - sum_j |P - D|`` over its
    real, earlier keys not excluded (no renormalisation; TransformerLens's ``1 - mean(|P - D|) * pos``, unrounded).
    ``average="rows"`` pools the rows of all sequences; ``"prompts"`` means each sequence's rows, then the sequences
    (those with a row counted for that head). Heads outside ``heads`` are NaN.
    """
    if error_measure not in ERROR_MEASURES:
        raise ValueError(f"error_measure must be one of {ERROR_MEASURES} (TransformerLens's), got {error_measure!r}")
    if average not in AVERAGES:
        raise ValueError(f"average must be 'rows' (pooled over every sequence's rows) or 'prompts', got {average!r}")
    valid = tr.attention_mask.to(torch.bool)
    if excluded is not None:
        weights = weights.masked_fill(excluded, 0.0)
    target = weights.to(torch.float32).unsqueeze(1)  # broadcast over heads
    kept = real_pairs(valid) if excluded is None else real_pairs(valid) & ~excluded
    kept_f = kept.to(torch.float32).unsqueeze(1)
    rows = (weights != 0).any(dim=-1) if error_measure == "mul" else valid
    if not bool(rows.any()):
        raise ValueError(f"{what} is undefined here: no query row qualifies (see the docstring for which rows do)")
    out = []
    for layer in tr.layers:
        pattern = tr.pattern(layer).to(torch.float32)
        if error_measure == "abs":
            value = 1.0 - ((pattern - target).abs() * kept_f).sum(dim=-1)
            counted = rows[:, None, :].expand_as(value)
        elif excluded is None:
            value, counted = (pattern * target).sum(dim=-1), rows[:, None, :].expand(-1, pattern.shape[1], -1)
        else:
            left = (pattern * kept_f).sum(dim=-1)
            counted = rows[:, None, :] & (left > 0)
            value = torch.where(counted, (pattern * target).sum(dim=-1) / left.where(counted, 1.0), 0.0)
        value = value.where(counted, 0.0)
        if average == "rows":
            n = counted.sum(dim=(0, 2))
            out.append(torch.where(n > 0, value.sum(dim=(0, 2)) / n.clamp_min(1), float("nan")))
        else:
            n = counted.sum(dim=2)  # [batch, head]
            per_prompt = torch.where(n > 0, value.sum(dim=2) / n.clamp_min(1), 0.0)
            prompts = (n > 0).sum(dim=0)
            out.append(torch.where(prompts > 0, per_prompt.sum(dim=0) / prompts.clamp_min(1), float("nan")))
    scores = torch.stack(out)
    return scores if heads is None else scores.masked_fill(~heads.to(scores.device), float("nan"))
