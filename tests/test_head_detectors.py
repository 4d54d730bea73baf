"""Head detectors with TransformerLens's options: public patterns, error_measure="abs", per-prompt averages, heads=."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, random_ids
from torch.testing import assert_close

import attnlens
from attnlens import AttentionTrace, metrics

U32 = torch.finfo(torch.float32).eps / 2


def test_constructors_by_hand() -> None:
    ids = torch.tensor([5, 7, 5, 7, 5])
    previous = torch.zeros(5, 5)
    previous[[1, 2, 3, 4], [0, 1, 2, 3]] = 1
    duplicate = torch.zeros(5, 5)
    duplicate[[2, 3, 4, 4], [0, 1, 0, 2]] = 1
    induction = torch.zeros(5, 5)  # the token after an earlier copy: row 2 -> 1, row 3 -> 2, row 4 -> 1 and 3
    induction[[2, 3, 4, 4], [1, 2, 1, 3]] = 1
    # 0/1 entries written by comparisons: exact.
    assert_bitwise(metrics.previous_token_pattern(ids), previous, "exact")
    assert_bitwise(metrics.duplicate_token_pattern(ids), duplicate, "exact")
    assert_bitwise(metrics.induction_pattern(ids), induction, "exact")
    batched = metrics.induction_pattern(torch.stack([ids, ids.flip(0)]))
    assert batched.shape == (2, 5, 5)
    assert_bitwise(batched[0], induction, "exact")
    with pytest.raises(ValueError, match="integer token ids"):
        metrics.duplicate_token_pattern(torch.ones(3))


def trace_of(rows: list[list[list[float]]], mask: list[list[int]] | None = None) -> AttentionTrace:
    """One layer, patterns ``[head][q_pos][k_pos]`` per sequence given as ``rows[batch][head]``."""
    patterns = torch.tensor(rows, dtype=torch.float32)[None]  # [layer, batch, head, q_pos, k_pos]
    return AttentionTrace.from_patterns(patterns, attention_mask=None if mask is None else torch.tensor(mask))


PREVIOUS = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
SELF = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
HALF = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]]


def test_abs_error_measure_by_hand_and_as_transformer_lens_computes_it() -> None:
    tr = trace_of([[PREVIOUS, SELF, HALF]])
    scores = metrics.pattern_scores(tr, metrics.previous_token_pattern, error_measure="abs")
    # Row 0 has no target: |P - D| = 1 there. PREVIOUS: 1 - 1/4; SELF: rows 1-3 miss by 2 each, 1 - 7/4; HALF: rows 1-3
    # miss by 1 each, 1 - 4/4. Sums of halves and ones over four rows: exact in float32.
    assert_bitwise(scores, torch.tensor([[0.75, -0.75, 0.0]]), "exact")
    for exclude_bos, exclude_current_token in ((True, False), (False, True), (True, True)):
        got = metrics.pattern_scores(
            tr,
            metrics.previous_token_pattern,
            error_measure="abs",
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        )
        # TransformerLens's compute_head_attention_similarity_score, unrounded.
        want = []
        for head in range(3):
            diff = (tr.pattern(0)[0, head] - metrics.previous_token_pattern(torch.zeros(4, dtype=torch.long))).abs()
            if exclude_bos:
                diff[:, 0] = 0
            if exclude_current_token:
                diff.fill_diagonal_(0)
            want.append(1 - diff.mean() * 4)
        # Sums of at most 16 terms in two orders: 2 * 16 * u each (Higham's gamma_n), on values of at most 2.
        assert_close(got, torch.stack(want)[None], rtol=0, atol=2 * 16 * U32 * 2)


def test_rows_pooled_or_prompts_averaged() -> None:
    # Sequence 0: a previous-token head (3 rows score 1). Sequence 1 (2 real tokens): its one row attends to itself.
    tr = trace_of([[PREVIOUS], [SELF]], mask=[[1, 1, 1, 1], [1, 1, 0, 0]])
    rows = metrics.pattern_scores(tr, metrics.previous_token_pattern, average="rows", heads=[0])
    prompts = metrics.pattern_scores(tr, metrics.previous_token_pattern, average="prompts")
    assert_bitwise(rows, torch.tensor([[0.75]]), "exact")  # 3 of 4 rows: a power-of-two fraction
    assert_bitwise(prompts, torch.tensor([[0.5]]), "exact")  # the mean of 1 and 0
    assert_bitwise(metrics.pattern_scores(tr, metrics.previous_token_pattern), rows, "exact")  # today's default
    # A sequence with no qualifying row is left out of the prompts' mean (here: the second has one real token).
    short = trace_of([[PREVIOUS], [SELF]], mask=[[1, 1, 1, 1], [1, 0, 0, 0]])
    assert_bitwise(
        metrics.pattern_scores(short, metrics.previous_token_pattern, average="prompts"), rows.new_ones(1, 1), "exact"
    )


def test_heads_subset_and_refusals() -> None:
    tr = trace_of([[PREVIOUS, SELF, HALF]])
    full = metrics.pattern_scores(tr, metrics.previous_token_pattern)
    some = metrics.pattern_scores(tr, metrics.previous_token_pattern, heads=[2])
    assert bool(some[0, :2].isnan().all())
    assert_close(some[0, 2], full[0, 2], rtol=0, atol=2 * 4 * U32)  # two orders of a 4-row mean of values <= 1
    pair = metrics.pattern_scores(tr, metrics.previous_token_pattern, heads=[(0, 1)], error_measure="abs")
    assert pair[0, 1] == -0.75 and bool(pair[0, [0, 2]].isnan().all())
    with pytest.raises(ValueError, match="not in the trace"):
        metrics.pattern_scores(tr, metrics.previous_token_pattern, heads=[3])
    with pytest.raises(ValueError, match="not in the trace"):
        metrics.pattern_scores(tr, metrics.previous_token_pattern, heads=[(1, 0)])
    with pytest.raises(ValueError, match="error_measure"):
        metrics.pattern_scores(tr, metrics.previous_token_pattern, error_measure="l1")
    with pytest.raises(ValueError, match="average"):
        metrics.pattern_scores(tr, metrics.previous_token_pattern, average="batch")
    with pytest.raises(TypeError, match="induction_pattern"):  # TransformerLens's names point to the constructors
        metrics.pattern_scores(tr, "induction_head", error_measure="abs")  # type: ignore[arg-type]


def test_options_agree_with_the_default_on_a_model() -> None:
    model = make_gpt2()
    ids = random_ids(model, batch=3, pos=12).clone()
    ids[:, 6:] = ids[:, :6]  # repeated halves: induction and duplicate rows exist in every sequence
    tr = attnlens.trace(model, ids)
    for pattern, builtin in (
        (metrics.previous_token_pattern, metrics.previous_token_scores(tr)),
        (metrics.duplicate_token_pattern, metrics.duplicate_token_scores(tr)),
        (metrics.induction_pattern, metrics.induction_scores(tr)),
    ):
        default = metrics.pattern_scores(tr, pattern)
        every = metrics.pattern_scores(tr, pattern, heads=range(tr.n_heads))
        # The same float32 row values, summed in other orders over at most 36 rows: 2 * 36 * u (values <= 1).
        assert_close(default, builtin, rtol=0, atol=2 * 36 * U32)
        assert_close(every, default, rtol=0, atol=2 * 36 * U32)
    # No padding: every sequence has 11 previous-token rows, so the mean of the prompts' means is the rows' mean.
    prompts = metrics.pattern_scores(tr, metrics.previous_token_pattern, average="prompts")
    assert_close(prompts, metrics.previous_token_scores(tr), rtol=0, atol=4 * 36 * U32)
