"""scan's statistics from q, k and each row's log-sum-exp (attnlens._rows.row_statistics) against the square's.

The reference is :func:`attnlens.scan.row_values` on the float64 pattern of the same q and k: each statistic is
pinned to its definition on the square within a bound derived from float32's unit roundoff and the sizes.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_gpt2, unit_roundoff
from test_scan import token_docs

import attnlens
from attnlens import _rows
from attnlens._detection import token_keys
from attnlens.models import AttentionSpec
from attnlens.scan_result import SCORE_NAMES

scan_module = sys.modules["attnlens.scan"]
U32 = unit_roundoff(torch.float32)


def windows(batch: int, n_pos: int, vocab: int, seed: int) -> torch.Tensor:
    """Token windows with many repeats (a small vocabulary), so every key set is populated."""
    return torch.randint(0, vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n_pos", "d_head", "spread"), [(16, 8, 1.0), (64, 16, 3.0), (200, 32, 0.5)])
def test_every_statistic_equals_the_squares_definition(n_pos: int, d_head: int, spread: float) -> None:
    generator = torch.Generator().manual_seed(n_pos)
    q = torch.randn(2, 3, n_pos, d_head, generator=generator) * spread
    k = torch.randn(2, 3, n_pos, d_head, generator=generator) * spread
    spec = AttentionSpec(scale=d_head**-0.5, n_heads=3, n_kv_heads=3)
    ids = windows(2, n_pos, 5, n_pos)
    duplicate, induction = token_keys(ids)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    scores = (q.double() @ k.double().transpose(-1, -2) * spec.scale).masked_fill(~causal, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    expected = scan_module.row_values(pattern.double(), duplicate, induction)
    got = _rows.row_statistics(q, k, spec, _rows.key_set(duplicate), _rows.key_set(induction), SCORE_NAMES)
    # Bound: every score is a float32 dot product of d_head terms, within gamma_(d_head+1) M of exact with M =
    # scale sum_d |q_d k_d| (the largest of the row, m); lse (the kernel's online sum of n_pos exps) is within
    # m' = 2 m + (n_pos + 4) u of exact, so each P_ij = exp(s - lse) within a relative (exp(2 m') - 1). Sums of P over
    # key sets and the positions add n_pos u relative. Entropy = lse - scale q.o cancels: its error is within
    # m' |lse| + (d_head + 2) u scale sum_d |q_d o_d| + m' max|s| (the P error carried through o).
    magnitude = (q.double().abs() @ k.double().abs().transpose(-1, -2) * spec.scale).masked_fill(~causal, 0)
    m = (d_head + 1) * U32 * magnitude.amax(dim=-1)  # [batch, head, q_pos]
    m_lse = 2 * m + (n_pos + 4) * U32
    relative = torch.expm1(2 * m_lse) + n_pos * U32
    lse = torch.logsumexp(scores, dim=-1)
    for name, (value, rows), (ref, ref_rows) in zip(SCORE_NAMES, got, expected, strict=True):
        assert torch.equal(rows, ref_rows), name
        assert value.dtype == torch.float32 and value.shape == ref.shape
        live = rows[:, None, :].expand_as(value)
        if name == "entropy":
            o = torch.einsum("bhij,bhjd->bhid", pattern, k.double())
            bound = m_lse * (lse.abs() + scores.masked_fill(~causal, 0).abs().amax(-1) + 1) + (d_head + 2) * U32 * (
                spec.scale * (q.double().abs() * o.abs()).sum(-1)
            )
        elif name == "distance":
            bound = (relative + 2 * U32) * torch.arange(n_pos, dtype=torch.float64)
        else:
            bound = relative * ref.abs() + U32
        diff = (value.double() - ref.double()).abs()
        excess = (diff - bound)[live]
        assert bool((excess <= 0).all()), f"{name}: above its bound by {float(excess.max()):.3g}"


@pytest.mark.parametrize(
    ("batch", "n_pos", "vocab"), [(3, 50, 4), (2, 64, 1), (2, 40, 1000), (1, 1, 3), (4, 7, 2), (2, 300, 30)]
)
def test_key_sets_from_the_tokens_are_the_masks_pairs_and_rows(batch: int, n_pos: int, vocab: int) -> None:
    # scan takes its key sets from the tokens (no [batch, q_pos, k_pos] mask): the same pairs, in the same order (the
    # order fixes how each row's terms are added), and the same rows, as the masks of the square's definitions.
    ids = windows(batch, n_pos, vocab, batch * n_pos + vocab)
    for got, mask in zip(_rows.token_key_sets(ids), token_keys(ids), strict=True):
        expected = _rows.key_set(mask)
        assert got.pairs.dtype == expected.pairs.dtype and torch.equal(got.pairs, expected.pairs)
        assert torch.equal(got.rows, expected.rows)
    if vocab == 1:  # every earlier token is a copy: n (n - 1) / 2 duplicate pairs per row
        assert _rows.token_key_sets(ids)[0].pairs.shape[0] == batch * n_pos * (n_pos - 1) // 2


def test_scan_of_an_sdpa_float32_model_takes_the_lse_and_equals_the_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_gpt2(n_positions=32, vocab_size=13, n_layer=3, attn_implementation="sdpa")
    docs = token_docs()
    calls: list[int] = []
    real = _rows.row_statistics

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_rows, "row_statistics", counted)
    from_lse = attnlens.scan(model, docs, seq_len=16, batch_size=3, progress=False)
    assert calls, "the statistics did not come from the lse"
    again = attnlens.scan(model, docs, seq_len=16, batch_size=3, progress=False)
    assert again.to_json() == from_lse.to_json()  # deterministic: what torchrun's bitwise equality rests on
    monkeypatch.setattr(scan_module, "_from_lse", lambda *args: False)
    from_pattern = attnlens.scan(model, docs, seq_len=16, batch_size=3, progress=False)
    for name in SCORE_NAMES:
        assert torch.equal(from_lse.count[name], from_pattern.count[name]), name
        # Means of float32 row values (|value| <= 15 for distance, <= log 16 for entropy): a few u32 of 15.
        torch.testing.assert_close(from_lse.mean[name], from_pattern.mean[name], rtol=0, atol=64 * U32 * 15, msg=name)


def test_the_pattern_path_stays_where_the_lse_cannot_serve() -> None:
    from attnlens.models import adapt

    eager = adapt(make_gpt2(attn_implementation="eager"))
    half = adapt(make_gpt2(attn_implementation="sdpa").to(torch.bfloat16))
    sdpa = adapt(make_gpt2(attn_implementation="sdpa"))
    assert not scan_module._from_lse(eager, [0, 1], eager.kernel_specs)  # the kernel hands out its pattern
    assert not scan_module._from_lse(half, [0, 1], half.kernel_specs)  # the definitions round P to bfloat16
    assert scan_module._from_lse(sdpa, [0, 1], sdpa.kernel_specs)
    windowed = [AttentionSpec(scale=0.5, n_heads=4, n_kv_heads=4, window=4)] * 2
    assert not scan_module._from_lse(sdpa, [0, 1], windowed)
