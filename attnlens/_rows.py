"""Attention rows on demand: chosen query rows of a pattern from q, k and each row's log-sum-exp, no square formed.

A row of the pattern is ``P[i, j] = exp(s[i, j] - lse_i)`` with ``s`` the masked, scaled scores and
``lse_i = log sum_j exp(s[i, j])``. Both passes here walk the keys in chunks, so beyond the rows themselves
(``[batch, head, row, k_pos]``, what is asked for) the memory is ``O(batch x head x row x chunk)``: the
``[q_pos, k_pos]`` square of every row is never formed, nor is a mask of that size.

The scores are computed in the model's kernel arithmetic (:func:`attnlens.functional.attention_scores` with the
layer's spec), then soft-maxed in float32 and cast to the pattern's dtype, as the full recomputation does; only the
matmul's shape differs (rows against all queries), so a row equals the full pattern's within the rounding of one
dot product of ``d_head`` terms per score (see ``tests/test_rows.py`` for the derived bound).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from attnlens import functional
from attnlens.models import AttentionSpec

__all__ = [
    "CHUNK",
    "KeySet",
    "allowed_keys",
    "fused_lse_available",
    "gather_rows",
    "key_set",
    "pattern_rows",
    "query_positions",
    "row_lse",
    "row_statistics",
    "token_key_sets",
]

CHUNK = 1024
"""Keys per chunk in the passes over a row (scores of one chunk are the largest temporary)."""


def query_positions(queries: Any, attention_mask: Tensor) -> Tensor:
    """The query rows asked for, ``[batch, row]`` positions (int64), from what a user gives ``trace(queries=...)``.

    Args:
        queries: ``"last"`` (each sequence's last real token, so right padding is skipped), a position, a sequence or
            integer tensor of positions (negative numbers count from the end), or a ``slice`` of positions.
        attention_mask: ``[batch, pos]``, 1 for real tokens.

    Raises:
        ValueError: positions out of range, repeated, none at all, or a string other than ``"last"``.
        TypeError: something that is not positions.
    """
    batch, n_pos = attention_mask.shape
    device = attention_mask.device
    if isinstance(queries, str):
        if queries != "last":
            raise ValueError(f"queries must be 'last', positions or a slice, got the string {queries!r}")
        real = attention_mask.bool()
        if not bool(real.any(dim=-1).all()):
            raise ValueError("queries='last': a sequence has no real token (its attention_mask is all 0)")
        # Position of the last 1 in each row: right padding is passed over, left padding needs nothing.
        last = n_pos - 1 - real.flip(-1).to(torch.int8).argmax(dim=-1)
        return last.to(torch.int64).unsqueeze(1)
    if isinstance(queries, slice):
        positions = list(range(n_pos))[queries]
        if not positions:
            raise ValueError(f"queries={queries} selects no position of {n_pos}; give a non-empty slice")
    else:
        if isinstance(queries, Tensor):
            if queries.is_floating_point() or queries.is_complex() or queries.dtype == torch.bool:
                raise TypeError(f"queries must be integer positions, got a {queries.dtype} tensor")
            queries = queries.flatten().tolist()
        elif isinstance(queries, int) or hasattr(queries, "__index__"):
            queries = [queries]
        try:
            positions = [int(p.__index__()) for p in queries]
        except (TypeError, AttributeError):
            raise TypeError(f"queries must be 'last', integer positions or a slice, got {queries!r}") from None
        if not positions:
            raise ValueError("queries is empty; give at least one position (or None for every row)")
        wrong = [p for p in positions if not -n_pos <= p < n_pos]
        if wrong:
            raise ValueError(f"query positions {wrong} are out of range for {n_pos} positions")
        positions = [p % n_pos for p in positions]
        if len(set(positions)) != len(positions):
            raise ValueError(f"query positions repeat: {positions}; give each at most once")
    return torch.tensor(positions, dtype=torch.int64, device=device).expand(batch, -1).contiguous()


def allowed_keys(rows: Tensor, attention_mask: Tensor | None, n_pos: int, window: int | None) -> Tensor:
    """Keys each query row may attend to, ``[batch, 1, row, k_pos]`` (bool): causal, real, inside the window.

    The same rule as the full mask (:func:`attnlens.functional.padding_mask`, and the window's
    ``i - j < window``), built for the rows only.
    """
    keys = torch.arange(n_pos, device=rows.device)
    back = rows[:, :, None] - keys[None, None, :]  # [batch, row, k_pos]: i - j
    allowed = back >= 0
    if window is not None:
        allowed &= back < window
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    return allowed.unsqueeze(1)


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[b, h, rows[b, r], :]``: ``[batch, head, pos, d]`` -> ``[batch, head, row, d]`` (a copy)."""
    index = rows[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1])
    return x.gather(2, index)


def _scores(q_rows: Tensor, k: Tensor, spec: AttentionSpec, allowed: Tensor) -> Tensor:
    """Masked scores of some rows against some keys in the kernel's arithmetic, float32, ``-inf`` where blocked."""
    scores = functional.attention_scores(q_rows, k, spec.scale, upcast=spec.upcast, divisors=spec.divisors)
    return scores.float().masked_fill_(~allowed, float("-inf"))


def row_lse(q_rows: Tensor, k: Tensor, spec: AttentionSpec, allowed: Tensor, chunk: int | None = None) -> Tensor:
    """Each row's log-sum-exp of its masked scores, ``[batch, head, row]`` float32 (``-inf``: no key allowed).

    An online pass over chunks of keys (running maximum and rescaled sum), so memory is ``O(row x chunk)``.

    Args:
        q_rows: ``[batch, head, row, d_head]``.
        k: ``[batch, head, k_pos, d_head]``.
        spec: the layer's spec in the kernel's arithmetic.
        allowed: ``[batch, 1, row, k_pos]`` from :func:`allowed_keys`.
        chunk: keys per chunk (default :data:`CHUNK`).
    """
    chunk = CHUNK if chunk is None else chunk
    n_keys = k.shape[-2]
    shape = q_rows.shape[:-1]
    top = torch.full(shape, float("-inf"), dtype=torch.float32, device=q_rows.device)
    total = torch.zeros(shape, dtype=torch.float32, device=q_rows.device)
    for start in range(0, n_keys, chunk):
        scores = _scores(q_rows, k[..., start : start + chunk, :], spec, allowed[..., start : start + chunk])
        new_top = torch.maximum(top, scores.amax(dim=-1))
        # A row with no key yet keeps -inf as its maximum; shift by 0 there so that no -inf - -inf makes a NaN.
        shift = torch.where(torch.isinf(new_top), 0.0, new_top)
        total = total * torch.exp(top - shift) + torch.exp(scores - shift.unsqueeze(-1)).sum(dim=-1)
        top = new_top
    return torch.where(total > 0, top + torch.log(total), float("-inf"))


def pattern_rows(
    q_rows: Tensor, k: Tensor, spec: AttentionSpec, allowed: Tensor, out: Tensor, chunk: int | None = None
) -> Tensor:
    """The pattern's rows ``exp(s - lse)`` written into ``out`` ``[batch, head, row, k_pos]``, chunk by chunk.

    Rows with no key to attend to (left padding) are all 0, as in the full pattern. Arguments as :func:`row_lse`.
    """
    chunk = CHUNK if chunk is None else chunk
    lse = row_lse(q_rows, k, spec, allowed, chunk).unsqueeze(-1)
    for start in range(0, k.shape[-2], chunk):
        part = allowed[..., start : start + chunk]
        scores = _scores(q_rows, k[..., start : start + chunk, :], spec, part)
        out[..., start : start + chunk].copy_(torch.exp(scores - lse).masked_fill_(~part, 0.0))
    return out


# --------------------------------------------------------------------------- scan's statistics from the lse ---

_PAIRS = 8192
"""Query/key pairs per step of the duplicate-token and induction sums (each step holds pairs x head x d_head)."""


def fused_lse_available(q: Tensor, spec: AttentionSpec) -> bool:
    """Whether :func:`row_statistics` can run on these q/k: torch's CPU flash kernel, which hands out the lse."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and spec.window is None
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _scale(spec: AttentionSpec) -> float:
    if spec.divisors is not None:
        return 1.0 / float(torch.tensor(spec.divisors, dtype=torch.float64).prod())
    return spec.scale


class KeySet(NamedTuple):
    """A key set as its pairs: ``pairs [pair, 3]`` (b, i, j) in row-major order, ``rows [batch, q_pos]`` with a key."""

    pairs: Tensor
    rows: Tensor


def key_set(keys: Tensor) -> KeySet:
    """The :class:`KeySet` of ``keys [batch, q_pos, k_pos]`` (bool): the definition :func:`token_key_sets` meets."""
    return KeySet(keys.nonzero(), keys.any(dim=-1))


def token_key_sets(ids: Tensor) -> tuple[KeySet, KeySet]:
    """The duplicate-token and induction :class:`KeySet` of ``ids [batch, pos]``, from the tokens, no square formed.

    The same pairs in the same row-major order, and the same rows, as :func:`key_set` of
    :func:`attnlens._detection.token_keys`'s ``[batch, q_pos, k_pos]`` masks, which take ``pos^2`` bytes each (256 MiB
    at 16384 tokens): here memory is ``O(batch x pos + pairs)``. Duplicate pairs are ``(b, i, j)`` with ``j < i`` and
    ``t[b, j] == t[b, i]``; induction pairs are ``(b, i, j + 1)`` of those with ``j + 1 < i``.
    """
    batch, n_pos = ids.shape
    device = ids.device
    sorted_ids, order = torch.sort(ids, dim=-1, stable=True)  # equal tokens in runs, their positions increasing
    flat = sorted_ids.flatten()
    row = torch.arange(batch, device=device).repeat_interleave(n_pos)
    index = torch.arange(batch * n_pos, device=device)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
    run_start = torch.cummax(torch.where(starts, index, 0), dim=0).values
    copies = index - run_start  # earlier copies of each token in its row: its pairs
    query = torch.repeat_interleave(index, copies)
    first = torch.repeat_interleave(run_start, copies)
    within = torch.arange(query.shape[0], device=device) - torch.repeat_interleave(copies.cumsum(0) - copies, copies)
    positions = order.flatten()
    b, i, j = row[query], positions[query], positions[first + within]
    pairs = torch.stack([b, i, j], dim=-1)[((b * n_pos + i) * n_pos + j).argsort()]  # row-major, as nonzero() lists

    def of(pairs: Tensor) -> KeySet:
        rows = torch.zeros(batch, n_pos, dtype=torch.bool, device=device)
        rows[pairs[:, 0], pairs[:, 1]] = True
        return KeySet(pairs, rows)

    shifted = pairs[pairs[:, 2] + 1 < pairs[:, 1]] + torch.tensor([0, 0, 1], device=device)
    return of(pairs), of(shifted)


def _pair_sums(q: Tensor, k: Tensor, lse: Tensor, scale: float, pairs: Tensor) -> Tensor:
    """``sum_{(b, i, j) in pairs} exp(scale q_i.k_j - lse_i)`` per row, ``[batch, head, q_pos]``, from the pairs alone.

    The pairs come in row-major order, so every row's terms are added in one fixed order (deterministic).
    """
    batch, n_heads, n_pos, _ = q.shape
    out = torch.zeros(batch * n_pos, n_heads, dtype=q.dtype, device=q.device)
    q_rows = q.permute(0, 2, 1, 3)  # [batch, q_pos, head, d_head]
    k_rows = k.permute(0, 2, 1, 3)
    lse_rows = lse.permute(0, 2, 1)  # [batch, q_pos, head]
    for start in range(0, pairs.shape[0], _PAIRS):
        b, i, j = pairs[start : start + _PAIRS].unbind(-1)
        dots = (q_rows[b, i] * k_rows[b, j]).sum(dim=-1)  # [pair, head]
        out.index_add_(0, b * n_pos + i, torch.exp(dots * scale - lse_rows[b, i]))
    return out.view(batch, n_pos, n_heads).permute(0, 2, 1)


def row_statistics(
    q: Tensor, k: Tensor, spec: AttentionSpec, duplicate: KeySet, induction: KeySet, names: tuple[str, ...]
) -> list[tuple[Tensor, Tensor]]:
    r""":func:`attnlens.scan.row_values` of full causal windows from q and k, without the square.

    One fused attention call (torch's CPU flash kernel) hands out each row's ``lse_i`` and, with the keys and the
    positions as values (q and k padded with a zero feature, which leaves ``q.k`` unchanged), ``sum_j P_ij k_j`` and
    ``sum_j P_ij j``. Then, with ``P_ij = exp(scale q_i.k_j - lse_i)``:

    * previous-token, first-token, self: ``P`` at ``j = i - 1``, ``0``, ``i`` from gathered dot products;
    * duplicate-token and induction: ``P`` summed over each row's key set, pair by pair;
    * entropy: ``-sum_j P_ij log P_ij = lse_i - scale q_i . sum_j P_ij k_j``;
    * distance: ``sum_j P_ij (i - j) = i - sum_j P_ij j``.

    All in float32 (float64 for a float64 model): equal to the square's definitions within that rounding.

    Args:
        q: ``[batch, head, pos, d_head]``.
        k: ``[batch, head, pos, d_head]`` (repeated per query head).
        spec: the layer's spec (its scale; no window: see :func:`fused_lse_available`).
        duplicate: the duplicate-token key set (:func:`token_key_sets`' first).
        induction: the induction key set (its second).
        names: the scores wanted, from :data:`attnlens.scan_result.SCORE_NAMES`.

    Returns:
        ``(values [batch, head, q_pos], rows [batch, q_pos])`` per score, in the order of ``names``.
    """
    batch, n_heads, n_pos, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(dtype), k.to(dtype)
    scale = _scale(spec)
    zero = q.new_zeros(batch, n_heads, n_pos, 1)
    positions = torch.arange(n_pos, dtype=dtype, device=q.device)
    values = torch.cat([k, positions.expand(batch, n_heads, n_pos)[..., None]], dim=-1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        torch.cat([q, zero], dim=-1), torch.cat([k, zero], dim=-1), values, 0.0, True, scale=scale
    )
    lse = lse.to(dtype)
    after_first = torch.ones(batch, n_pos, dtype=torch.bool, device=q.device)
    after_first[:, 0] = False

    def on(dots: Tensor, rows: slice) -> Tensor:
        return torch.exp(dots * scale - lse[..., rows])

    compute = {
        "previous_token": lambda: torch.nn.functional.pad(
            on((q[..., 1:, :] * k[..., :-1, :]).sum(-1), slice(1, None)), (1, 0)
        ),
        "first_token": lambda: on((q * k[..., :1, :]).sum(-1), slice(None)),
        "self": lambda: on((q * k).sum(-1), slice(None)),
        "entropy": lambda: lse - scale * (q * out[..., :-1]).sum(-1),
        "distance": lambda: positions - out[..., -1],
    }
    result = []
    for name in names:
        if name in ("duplicate_token", "induction"):
            keys = duplicate if name == "duplicate_token" else induction
            result.append((_pair_sums(q, k, lse, scale, keys.pairs).to(torch.float32), keys.rows))
        else:
            result.append((compute[name]().to(torch.float32), after_first))
    return result
