"""Prove that attnlens's numbers are the model's own: recompute attention from extracted weights and compare.

:func:`verify` runs a model on some tokens, captures what each attention module really computed (its input,
its q/k/v, the merged head outputs ``z`` entering its output projection, its output, and the attention
probabilities from the model's eager kernel), recomputes the same quantities with :mod:`attnlens.functional` from a
:class:`~attnlens.weights.ModelWeights`, rebuilds the whole forward pass from those weights alone, and reports the
largest error of every quantity per layer and head against a per-dtype tolerance.

The parts: :mod:`attnlens._verify_capture` (the model's own tensors), :mod:`attnlens._verify_recompute` (the
recomputation from the weights), :mod:`attnlens._verify_compare` (errors, magnitudes, how they are measured) and
:mod:`attnlens.report` (the report).

Caveats:

* Attention probabilities exist only in the eager kernel. A model running SDPA (or another kernel) is switched to
  eager for the one forward pass that returns them (up to the last compared layer), and switched back; its other
  quantities come from a pass in its own kernel.
* Padded query rows are never compared (what a model puts there is a convention, not a result), and neither are
  padded keys; every per-position comparison covers valid tokens only.
* Each per-layer recomputation starts from that layer's captured input, so an error is reported at the layer that
  makes it instead of propagating; the ``hidden`` and ``logits`` rows rebuild the whole forward from the weights.
* ``max_rel_error`` is the largest absolute error divided by the largest absolute reference value over the same
  entries, so tolerances do not depend on the scale of activations. Errors of float64 tensors are measured in
  float64, all others in float32 (:mod:`attnlens._verify_compare` says why that decides every row as float64 would,
  up to a slack of ``2^-23`` of the tolerance that only ever makes a row stricter).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens import functional
from attnlens._indices import index_list
from attnlens._progress import Bar
from attnlens._verify_capture import Capture, run
from attnlens._verify_compare import Scratch, max_norm, ratio, slack, value_output_extent
from attnlens._verify_compare import errors as _errors
from attnlens._verify_compare import magnitude as _magnitude
from attnlens._verify_recompute import hf_order_pattern, hf_order_scores, rebuild
from attnlens.capture import intervening, one_at_a_time, preserved
from attnlens.loading import resolve
from attnlens.models import Adapter, adapt, extract_weights
from attnlens.report import _PER_HEAD, VerificationReport, VerificationRow
from attnlens.tokens import text_inputs
from attnlens.tolerances import (
    _ACCUMULATOR,
    QUANTITIES,
    TOLERANCES,
    UNIT_ROUNDOFF,
    ErrorBound,
    _dtype_name,
    _overrides,
    bitwise_guaranteed,
    derived_tolerances,
    softmax_rounding,
)
from attnlens.weights import LayerWeights, ModelWeights

__all__ = [
    "QUANTITIES",
    "TOLERANCES",
    "UNIT_ROUNDOFF",
    "ErrorBound",
    "VerificationReport",
    "VerificationRow",
    "derived_tolerances",
    "verify",
]

Results = list[tuple[float, float]]


def _layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    """The layers to compare, sorted, repeats merged; negative numbers count from the end."""
    if layers is None:
        return tuple(range(n_layers))
    out = set()
    for layer in index_list(layers, "layers"):
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layers must be integers in [{-n_layers}, {n_layers}), got {layer!r}")
        out.add(layer % n_layers)
    if not out:
        raise ValueError("layers is empty: name at least one layer, or pass None for all")
    return tuple(sorted(out))


def _check_weights(weights: ModelWeights, reference: ModelWeights) -> None:
    """Refuse weights that cannot be those of the model: other shapes, dtype or device."""
    dims = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx")
    theirs = {d: getattr(weights, d) for d in dims}
    ours = {d: getattr(reference, d) for d in dims}
    if theirs != ours:
        raise ValueError(f"weights do not fit the model: weights have {theirs}, the model {ours}")
    if (weights.dtype, weights.device) != (reference.dtype, reference.device):
        raise ValueError(
            f"weights are {weights.dtype} on {weights.device}, the model {reference.dtype} on {reference.device}: "
            "convert them first"
        )


def _notes(adapter: Adapter) -> tuple[str, ...]:
    """Known departures of the model's own kernel from its config, to explain failures before anyone hunts for them."""
    notes = []
    if adapter.unknown_config_keys:
        notes.append(
            f"config key(s) of unknown effect: {', '.join(adapter.unknown_config_keys)}; attnlens does not know what "
            "they change, so this report is the evidence that its numbers are the model's on these inputs"
        )
    notes += adapter.notes()
    if adapter.kernel not in adapter.exact_kernels:
        notes.append(
            f"the {adapter.kernel!r} kernel is not one attnlens has been shown to reproduce "
            f"({', '.join(adapter.exact_kernels)}): z and attn_out compare what it computed with softmax attention, "
            "and fail where it computes something else"
        )
    return tuple(notes)


def _nan_note(adapter: Adapter, dtype: torch.dtype, allowed: Tensor, rows: Sequence[VerificationRow]) -> str | None:
    """Why the model's own numbers are NaN, where transformers' eager kernel makes them so (else None).

    GPT-NeoX's and the Llama family's eager kernel adds a float mask holding the dtype's most negative value and
    soft-maxes in float32: in a float64 model that value becomes -inf, and a query row with no key to attend to (a
    left-padded position) is all -inf, whose softmax is NaN. The NaN reaches the real tokens through the next layer's
    keys and values (a zero probability times NaN is NaN). verify's patterns always come from that kernel.
    """
    name = _dtype_name(dtype)
    coarse = any(
        spec.softmax_dtype is not None and UNIT_ROUNDOFF[_dtype_name(spec.softmax_dtype)] > UNIT_ROUNDOFF[name]
        for spec in adapter.specs
    )
    if not coarse or bool(allowed.any(dim=-1).all()) or not any(math.isnan(row.max_rel_error) for row in rows):
        return None
    return (
        f"transformers' eager attention soft-maxes this {name} model's scores in float32, where its padding mask's "
        f"most negative {name} value becomes -inf: a padded position with no key to attend to (left padding) "
        "soft-maxes to NaN, which reaches the real tokens through the next layer's keys and values. The NaN are the "
        "model's own numbers, not attnlens's, and verify takes every pattern from that kernel (an SDPA model's outputs "
        "stay finite, its patterns do not): verify in float32, or without left padding (right padding, or one "
        "sequence per call)"
    )


def _versions() -> dict[str, str]:
    import transformers

    import attnlens

    return {"torch": torch.__version__, "transformers": transformers.__version__, "attnlens": attnlens.__version__}


@dataclass(frozen=True)
class _Keep:
    """Which entries count, in the layout of each compared tensor: valid query rows (and valid keys); None for all."""

    rows: Tensor | None  # [batch, 1, pos, 1]: q, k, v
    pattern: Tensor | None  # [batch, 1, q_pos, k_pos]
    z: Tensor | None  # [batch, pos, 1, 1]
    out: Tensor | None  # [batch, pos, 1]: attn_out, hidden, logits

    @classmethod
    def of(cls, valid: Tensor) -> _Keep:
        """From ``valid`` ``[batch, pos]``; without padding nothing needs masking."""
        if bool(valid.all()):
            return cls(None, None, None, None)
        return cls(
            rearrange(valid, "batch pos -> batch 1 pos 1"),
            rearrange(valid, "batch q_pos -> batch 1 q_pos 1") & rearrange(valid, "batch k_pos -> batch 1 1 k_pos"),
            rearrange(valid, "batch pos -> batch pos 1 1"),
            rearrange(valid, "batch pos -> batch pos 1"),
        )


@dataclass(frozen=True)
class _Context:
    """What every layer's comparison shares: the model, the weights under test, masks, the dims-only tolerances.

    ``base`` (:func:`~attnlens.tolerances.derived_tolerances`) and ``bitwise`` (whether ``pattern_hf_order`` must match
    bit for bit) depend on no layer: computed once per call, as :func:`~attnlens.tolerances.bitwise_guaranteed` walks
    every module of the model. ``model_weights`` are the model's own (extracted from it), for the magnitudes that
    tolerances are measured on; ``softmax_terms`` collects, per layer, the ``attn_out`` tolerance owed to a kernel
    that soft-maxes in a coarser dtype than the model's (``_layer_rows`` adds it; the end-to-end rows read it).
    """

    adapter: Adapter
    weights: ModelWeights
    model_weights: ModelWeights
    allowed: Tensor
    valid: Tensor
    keep: _Keep
    scratch: Scratch
    base: dict[str, float]
    bitwise: bool
    softmax_terms: dict[int, float]


def _same_input(own: Capture, eager: Capture, index: int) -> bool:
    """Whether the eager pass gave layer ``index`` bitwise the input (and rotation) of the model's own pass.

    Then the pattern recomputed from the own pass's input is the eager pass's too (the same function on the same
    bits): true of one pass, and of the first layer of two (nothing before it depends on the kernel).
    """
    if eager is own:
        return True
    if not torch.equal(own.attn_in[index], eager.attn_in[index]):
        return False
    mine, theirs = own.rotation(index), eager.rotation(index)
    if mine is None or theirs is None:
        return mine is theirs
    return all(torch.equal(a, b) for a, b in zip(mine, theirs))


def _layer_rows(
    context: _Context, index: int, own: Capture, eager: Capture
) -> Iterator[tuple[str, Results, Tensor | float]]:
    """One layer's rows: ``(quantity, [(max_abs_error, max_rel_error)] per head or one, tolerance per head or one)``.

    The recomputation from the layer's captured input (:func:`attnlens.functional.attention`), its pattern once more
    from the eager pass's input where that pass is another, and the HF-order pattern from the eager pass's own q and
    k; each reference's magnitude is measured once, whatever is compared with it. The captured tensors of the layer
    are let go afterwards.
    """
    adapter, weights, allowed, valid, keep = (
        context.adapter,
        context.weights,
        context.allowed,
        context.valid,
        context.keep,
    )
    layer: LayerWeights = weights.layers[index]
    n_heads, base = weights.n_heads, context.base
    name = _dtype_name(weights.dtype)
    u, u_acc = UNIT_ROUNDOFF[name], UNIT_ROUNDOFF[_ACCUMULATOR[name]]
    errors, magnitude = partial(_errors, scratch=context.scratch), partial(_magnitude, scratch=context.scratch)

    mine = functional.attention(own.attn_in[index], layer, allowed, rotation=own.rotation(index))
    q, k, v = own.qkv[index]
    model_z = rearrange(own.z[index], "batch pos (head d_head) -> batch pos head d_head", head=n_heads)
    model_pattern = eager.pattern(index)
    pattern = (
        mine.pattern
        if _same_input(own, eager, index)
        else functional.attention_pattern(eager.attn_in[index], layer, allowed, rotation=eager.rotation(index))
    )
    # Derived per-head bounds (docs/verify.md): a score moves by about S * (relative error of q and k), with
    # S = scale * max|q| * max|k| / sqrt(d_head) from the model's own q and k; softmax passes at most that
    # to a probability; z inherits pattern and v errors times max|v| / max|z|.
    q_eager, k_eager, _ = eager.qkv[index]
    group = n_heads // k_eager.shape[1]  # per query head: each reads its key/value head's bound
    k_norm = max_norm(k_eager, valid).repeat_interleave(group)
    score_bound = abs(layer.scale) * max_norm(q_eager, valid) * k_norm / math.sqrt(weights.d_head)
    q_tol, k_tol, qk_rel = base["q"], base["k"], base["q"] + base["k"]
    if layer.rotary_dim:
        # Both sides rotate with the same cos/sin: an entry a c - b s of a feature pair (a, b) moves by at most
        # |(da, db)| <= sqrt2 max|d| plus two roundings of |a c| + |b s| per side, and a rotated entry's
        # largest is at least the largest pair norm / sqrt2: relative to it, 2 tol + 8u. The scores see the
        # rotation normwise (orthogonal per pair): q and k each gain only its roundings, 6u.
        q_tol, k_tol, qk_rel = 2 * q_tol + 8 * u, 2 * k_tol + 8 * u, qk_rel + 12 * u
    # The eager kernel's probabilities (model_pattern) are rounded where it soft-maxes: in float32 for a float64
    # GPT-NeoX or Llama-family model, which rounds each score (S u) and the softmax (4 u) at float32's u.
    softmax_dtype = adapter.specs[index].softmax_dtype
    u_soft = max(u, UNIT_ROUNDOFF[_dtype_name(softmax_dtype)]) if softmax_dtype is not None else u
    pattern_tol = 4 * u_soft + score_bound * (qk_rel + u_soft)
    hf_order_tol = (
        score_bound * 0.0 if context.bitwise else 4 * u_soft + score_bound * (u_acc * weights.d_head + u_soft)
    )
    v_max, z_max = magnitude(v, keep.rows, 1), magnitude(model_z, keep.z, 2)
    attn_out = own.attn_out[index]
    out_max = magnitude(attn_out, keep.out, None)
    v_over_z = ratio(v_max.repeat_interleave(group), z_max)
    z_tol = base["z"] + v_over_z * (2 * score_bound * (qk_rel + u) + base["v"] + 2 * u)
    out_tol = base["attn_out"]
    if u_soft > u:
        # The eager kernel's probabilities are p_j F_j / D with |F_j - 1| <= e, |D - 1| <= c
        # (tolerances.softmax_rounding, from the largest |score| M it soft-maxed): relative to max p, e + c, on top of
        # the model's own dtype's pattern bound (4u + S u alone misses the rounding of the float32 sum of the row,
        # which grows as sqrt(k_pos): ratio 0.999 on a sharp Llama-3.2-1B-shaped layer at 2048 tokens).
        scores = hf_order_scores(eager.qkv[index], layer, adapter.n_kv_heads, allowed)
        extent = magnitude(scores.masked_fill(scores.isneginf(), 0.0), keep.pattern, 1)
        per_entry, row_common = softmax_rounding(u_soft, extent, allowed.shape[-1])
        pattern_tol = 4 * u + score_bound * (qk_rel + u) + per_entry + row_common
        # The model's own pass applies such probabilities to v only where it runs eager (float64 SDPA soft-maxes in
        # float64).
        if adapter.kernel == "eager":
            # z_i = sum_j p_j F_j / D v_j: |dz_i| <= e sum_j p_j |v_j| + c |z_i|, i.e. e max|v| / max|z| + c relative
            # to max|z|.
            z_tol = z_tol + v_over_z * per_entry + row_common
            # attn_out: that bound through W_O, summed over heads (|d out| <= sum_h (e_h + c_h) max_j |v_j W_O[h]|),
            # is rigorous but sums every head's worst case: on a sharp Llama-3.2-1B-shaped layer it allowed 3.5e-4
            # for a measured 6e-7, missing a 1e-4 corruption. The model's own softmax rounding carried through W_O is
            # known exactly instead: (its pattern - the float64 softmax of its scores) v W_O, all the model's own. By
            # the triangle inequality the float64 tolerance plus its size bounds the difference. The end-to-end rows
            # take the rigorous per-layer bound (they have no exact counterpart).
            W_O = context.model_weights.layers[index].W_O
            drift = (model_pattern - torch.softmax(scores, dim=-1)) @ functional.repeat_kv(v, group)
            del scores
            merged = rearrange(drift, "batch head pos d_head -> batch pos (head d_head)")
            W_O_merged = rearrange(W_O, "head d_head d_model -> (head d_head) d_model")
            out_drift = magnitude(merged @ W_O_merged, keep.out, None)
            del drift, merged
            out_tol = out_tol + (float(out_drift / out_max) if out_max > 0 else 0.0)
            bound = ((per_entry + row_common) * value_output_extent(v, W_O, keep.out, context.scratch)).sum()
            context.softmax_terms[index] = float(bound / out_max) if out_max > 0 else 0.0
        else:
            del scores
    yield "q", errors(q, mine.q, keep.rows, 1, magnitude(q, keep.rows, 1)), q_tol
    yield "k", errors(k, mine.k, keep.rows, 1, magnitude(k, keep.rows, 1)), k_tol
    yield "v", errors(v, mine.v, keep.rows, 1, v_max), base["v"]
    hf_order = hf_order_pattern(eager.qkv[index], layer, adapter.n_kv_heads, allowed, softmax_dtype)
    pattern_max = magnitude(model_pattern, keep.pattern, 1)
    yield "pattern_hf_order", errors(model_pattern, hf_order, keep.pattern, 1, pattern_max), hf_order_tol
    del hf_order
    yield "pattern", errors(model_pattern, pattern, keep.pattern, 1, pattern_max), pattern_tol
    yield "z", errors(model_z, mine.z, keep.z, 2, z_max), z_tol
    yield "attn_out", errors(attn_out, mine.output, keep.out, None, out_max), out_tol
    for store in {id(own): own, id(eager): eager}.values():
        for table in (store.attn_in, store.qkv, store.z, store.weights):
            table.pop(index, None)


@one_at_a_time
def verify(
    model: nn.Module | Adapter | str | os.PathLike[str],
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    position_ids: Tensor | Any | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    tolerances: Mapping[Any, Any] | None = None,
    weights: ModelWeights | None = None,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> VerificationReport:
    """Recompute every attention quantity of a GPT-2 model from its weights and compare with what the model computes.

    Per traced layer: q, k, v, the pattern and z per head, and the attention output, each recomputed by
    :mod:`attnlens.functional` from the layer's captured input; the pattern once more from the model's own q and k in
    the model's own arithmetic order (``pattern_hf_order``, bit for bit in float32/float64); and the final hidden
    state and logits rebuilt from the weights alone. The model is left exactly as found, also when this raises.
    Calls on one model from several threads run one at a time; attnlens's hooks never act on a forward pass the user
    runs meanwhile (which sees eager attention while a non-eager model's patterns are taken, though).

    Args:
        model: a Hugging Face GPT-2 model (any supported class, or its Adapter), or a hub name / local folder /
            ``"demo"``, loaded for this call by :func:`attnlens.load` (with its tokenizer).
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids; or, with a tokenizer, a text or a list of texts.
        attention_mask: ``[batch, pos]``, 1 for tokens and 0 for padding (left or right); only with token ids.
        position_ids: ``[batch, pos]`` positions, passed to the model as given (default ``0..pos-1``).
        layers: the layers to compare per layer and head (default all); the final rows always use every layer.
        tolerances: overrides of :data:`TOLERANCES`, as ``{quantity: tol}`` for the model's dtype or
            ``{dtype: {quantity: tol}}``.
        weights: the weights to check against the model (default: extracted from it), e.g. a modified copy.
        tokenizer: turns text into ids (padded on its ``padding_side``).
        progress: a progress bar on stderr (tqdm): ``None`` (default) where interactive (a terminal, a notebook)
            and only after 2 s; ``True`` always; ``False`` never.

    Returns:
        A :class:`VerificationReport`; ``report.ok`` says whether every row is within tolerance.

    Raises:
        UnsupportedModelError: ``model`` is not a supported GPT-2 model.
        ValueError: bad inputs (ids out of range, too many positions, a mask of the wrong shape), unknown layers or
            tolerances, or weights that do not fit the model.
        AttentionCaptureError: the model did not return its attention probabilities, or returned them incomplete.
        RuntimeError: called inside an :func:`attnlens.ablate` block in the same thread.
    """
    model, tokenizer = resolve(model, tokenizer, "verify")
    input_ids, attention_mask = text_inputs(input_ids, attention_mask, tokenizer, False)
    adapter = adapt(model)  # refuses anything but a supported model, before touching it
    if intervening(adapter.model):
        raise RuntimeError(
            "verify was called inside an attnlens.ablate block: the model then computes something its weights do not "
            "describe, and every ablated head would fail; call verify outside the block"
        )
    ids, mask, pos = adapter.check_inputs(input_ids, attention_mask, position_ids)
    reference = extract_weights(adapter)
    if weights is None:
        weights = reference
    else:
        _check_weights(weights, reference)
    traced = _layers(layers, weights.n_layers)
    fixed = _overrides(weights.dtype, tolerances)
    implementation = adapter.kernel

    # Steps: the model's own pass, its eager pass, each layer's recomputation, the rebuild from the weights.
    with preserved(adapter), torch.no_grad(), Bar(len(traced) + 3, "verify", progress, unit="step") as bar:
        own = run(adapter, ids, mask, pos, traced, patterns=implementation == "eager")
        bar.update()
        if own.patterns is None:
            with preserved(adapter, attn_implementation="eager"):
                eager = run(adapter, ids, mask, pos, traced, patterns=True, full=False)
        else:
            eager = own
        bar.update()
        unembed = adapter.sites.unembed
        own_logits = unembed(own.final()) if unembed is not None and weights.W_U is not None else None

        batch, n_pos = ids.shape
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        allowed = (
            functional.padding_mask(valid) if mask is not None else functional.causal_mask(n_pos, device=ids.device)
        )
        keep = _Keep.of(valid)
        rows: list[VerificationRow] = []
        applied: dict[str, float] = {}
        measured = slack(weights.dtype)

        def add(quantity: str, layer: int | None, results: Results, bounds: Tensor | float) -> None:
            per_head = quantity in _PER_HEAD
            derived = bounds.tolist() if isinstance(bounds, Tensor) else [bounds] * len(results)
            for head, ((abs_err, rel_err), bound) in enumerate(zip(results, derived)):
                tol = fixed.get(quantity, bound)
                # A zero tolerance means bit for bit; an infinite relative error (all-zero reference) never passes;
                # an error measured in float32 passes with its rounding counted against it (_verify_compare).
                ok = rel_err * (1 + measured) <= tol and math.isfinite(rel_err) and (tol > 0 or abs_err == 0.0)
                rows.append(VerificationRow(layer, head if per_head else None, quantity, abs_err, rel_err, tol, ok))
                applied[quantity] = max(applied.get(quantity, 0.0), tol)

        base = derived_tolerances(weights.dtype, weights.d_model, weights.d_head, weights.n_layers, n_pos)
        bitwise = bitwise_guaranteed(adapter.model, weights.dtype, weights.device)
        context = _Context(adapter, weights, reference, allowed, valid, keep, Scratch(), base, bitwise, {})
        for index in traced:
            bar.update()
            for quantity, results, bounds in _layer_rows(context, index, own, eager):
                add(quantity, index, results, bounds)

        positions = torch.arange(n_pos, device=ids.device).unsqueeze(0) if pos is None else pos
        hidden, logits = rebuild(
            weights, ids, positions, allowed, parallel_residual=adapter.parallel_residual, rotations=own.rotations
        )
        bar.update()
        errors = partial(_errors, scratch=context.scratch)
        magnitude = partial(_magnitude, scratch=context.scratch)
        final = own.final()
        # Each layer's attention output carries its softmax term into the residual: propagated as the end-to-end rows
        # propagate attn_out's rounding (twice per layer, over every layer), from the worst layer compared.
        soft = 2 * weights.n_layers * max(context.softmax_terms.values(), default=0.0)
        hidden_tol, logits_tol = base["hidden"] + soft, base["logits"] + soft
        add("hidden", None, errors(final, hidden, keep.out, None, magnitude(final, keep.out, None)), hidden_tol)
        if own_logits is not None and logits is not None:
            scale = magnitude(own_logits, keep.out, None)
            add("logits", None, errors(own_logits, logits, keep.out, None, scale), logits_tol)

    nan_note = _nan_note(adapter, weights.dtype, allowed, rows)
    name = adapter.name
    return VerificationReport(
        notes=tuple(note for note in [nan_note] if note is not None) + _notes(adapter),  # the failure's cause first
        rows=tuple(rows),
        model=type(adapter.model).__name__ + (f" ({name})" if name else ""),
        dtype=_dtype_name(weights.dtype),
        device=str(weights.device),
        attn_implementation=implementation,
        pattern_implementation="eager",
        layers=traced,
        batch=batch,
        pos=n_pos,
        n_valid=int(valid.sum()),
        tolerances={quantity: applied[quantity] for quantity in QUANTITIES if quantity in applied},
        versions=_versions(),
    )
