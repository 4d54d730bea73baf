"""Prove that attnlens's numbers are the model's own: recompute attention from extracted weights and compare.

:func:`verify` runs a model on some tokens, captures what each attention module really computed (its input,
its q/k/v, the merged head outputs ``z`` entering its output projection, its output, and the attention
probabilities from the model's eager kernel), recomputes the same quantities with :mod:`attnlens.functional` from a
:class:`~attnlens.weights.ModelWeights`, rebuilds the whole forward pass from those weights alone, and reports the
largest error of every quantity per layer and head against a per-dtype tolerance.

Caveats:

* Attention probabilities exist only in the eager kernel. A model running SDPA (or another kernel) is switched to
  eager for the one forward pass that returns them, and switched back; its other quantities come from a pass in
  its own kernel.
* Padded query rows are never compared (what a model puts there is a convention, not a result), and neither are
  padded keys; every per-position comparison covers valid tokens only.
* Each per-layer recomputation starts from that layer's captured input, so an error is reported at the layer that
  makes it instead of propagating; the ``hidden`` and ``logits`` rows rebuild the whole forward from the weights.
* Errors are measured in float64. ``max_rel_error`` is the largest absolute error divided by the largest absolute
  reference value over the same entries, so tolerances do not depend on the scale of activations.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attnlens import functional
from attnlens._indices import index_list
from attnlens._progress import Bar
from attnlens.capture import forward_hooks, intervening, one_at_a_time, preserved
from attnlens.errors import AttentionCaptureError
from attnlens.loading import resolve
from attnlens.models import QKV, Adapter, AttentionSpec, Sites, adapt, extract_weights
from attnlens.patterns import masked_scores, qkv_hooks
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
)
from attnlens.weights import LayerNormWeights, LayerWeights, ModelWeights

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


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 1 where the denominator is 0 (an all-zero reference fails on its own)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(torch.float64).tiny), 1.0)


def _amax(x: Tensor, keep: Tensor, head_dim: int | None) -> Tensor:
    """Largest ``|x|`` over the entries where ``keep`` (float64), per index of ``head_dim`` (or overall)."""
    magnitude = x.double().abs().masked_fill(~keep, 0.0)
    if head_dim is None:
        return magnitude.amax()
    return magnitude.amax(dim=[d for d in range(x.ndim) if d != head_dim])


def _max_norm(x: Tensor, valid: Tensor) -> Tensor:
    """Largest vector norm over valid positions of ``x`` ``[batch, head, pos, d_head]``, per head (float64)."""
    norms = x.double().norm(dim=-1).masked_fill(~rearrange(valid, "batch pos -> batch 1 pos"), 0.0)
    return norms.amax(dim=(0, 2))


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


@dataclass
class _Capture:
    """What one forward pass of the model computed (tensors keyed by layer)."""

    attn_in: dict[int, Tensor] = field(default_factory=dict)
    qkv: dict[int, QKV] = field(default_factory=dict)
    z: dict[int, Tensor] = field(default_factory=dict)
    attn_out: dict[int, Tensor] = field(default_factory=dict)
    weights: dict[int, Tensor] = field(default_factory=dict)
    rotations: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    hidden: Tensor | None = None
    patterns: dict[int, Tensor] | None = None

    def final(self) -> Tensor:
        """The final hidden state ``[batch, pos, d_model]``."""
        if self.hidden is None:
            raise AttentionCaptureError("the forward pass did not reach the final layer norm")
        return self.hidden

    def rotation(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The ``(cos, sin)`` a rotary layer's attention module received in this pass (None for other layers)."""
        return self.rotations.get(layer)

    def pattern(self, layer: int) -> Tensor:
        """The model's attention probabilities of one layer ``[batch, head, q_pos, k_pos]``."""
        if self.patterns is None:
            raise AttentionCaptureError("no attention probabilities were captured in this pass")
        return self.patterns[layer]


def _hooks(sites: Sites, layers: tuple[int, ...], store: _Capture) -> Iterator[Any]:
    """Forward hooks that save each traced layer's attention input and output, and the final hidden state.

    The attention output hook also keeps the probabilities the module returns beside its output (what
    ``output_attentions`` collects), when its kernel returns them.
    """

    def save_input(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store.attn_in[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def save_attn(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store.attn_out[layer] = output[0].detach()
            if isinstance(output[1], Tensor):
                store.weights[layer] = output[1].detach()

        return hook

    def save_final(module: nn.Module, args: Any, output: Tensor) -> None:
        store.hidden = output.detach()

    for layer in layers:
        site = sites.layers[layer]
        yield site.attn_input, save_input(layer)
        yield site.attn, save_attn(layer)
    yield sites.final_norm, save_final


def _rotation_hooks(adapter: Adapter, store: _Capture) -> Iterator[Any]:
    """Forward-pre hooks (with kwargs) that save the rotation each rotary layer's attention module receives.

    Every rotary layer's, not only the traced ones': the whole-forward rebuild (:func:`_rebuild`) rotates them all.
    """

    def save(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            rotation = adapter.rotation(layer, args, kwargs)
            if rotation is not None:
                store.rotations[layer] = (rotation.cos.detach(), rotation.sin.detach())

        return hook

    for layer, spec in enumerate(adapter.specs):
        if spec.rotary_dim:
            yield adapter.sites.layers[layer].attn, save(layer)


def _z_hooks(sites: Sites, layers: tuple[int, ...], store: _Capture) -> Iterator[Any]:
    """Forward-pre hooks that save the input of each traced output projection: the heads' outputs, merged."""

    def save(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            store.z[layer] = args[0].detach()

        return hook

    for layer in layers:
        yield sites.layers[layer].z, save(layer)


def _run(
    adapter: Adapter,
    ids: Tensor,
    mask: Tensor | None,
    pos: Tensor | None,
    layers: tuple[int, ...],
    *,
    patterns: bool,
) -> _Capture:
    """One forward pass of the model's transformer, capturing what ``layers`` compute (and, on request, patterns).

    The attention probabilities come from the attention modules' own second output, which is where
    ``output_attentions`` collects them; asking for them that way instead would make transformers 5.x install
    recording hooks on the model for good (:meth:`~attnlens.models.Sites.run` makes every output switch explicit).
    """
    sites = adapter.sites
    store = _Capture()

    def save_qkv(layer: int, qkv: QKV) -> None:
        store.qkv[layer] = QKV(*(x.detach() for x in qkv))

    on_qkv, rotations = qkv_hooks(adapter, layers, save_qkv)
    with (
        forward_hooks([*rotations, *_rotation_hooks(adapter, store)], pre=True, with_kwargs=True),
        forward_hooks([*_hooks(sites, layers, store), *on_qkv]),
        forward_hooks(_z_hooks(sites, layers, store), pre=True),
    ):
        sites.run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    missing = [
        f"{name} of layer {layer}"
        for name, table in (("input", store.attn_in), ("q/k/v projection output", store.qkv), ("z", store.z))
        for layer in layers
        if layer not in table
    ] + [f"output of layer {layer}" for layer in layers if layer not in store.attn_out]
    missing += [
        f"the rotation of layer {layer}"
        for layer, spec in enumerate(adapter.specs)
        if spec.rotary_dim and layer not in store.rotations
    ]
    if store.hidden is None:
        missing.append("the final layer norm's output")
    if missing:
        raise AttentionCaptureError(f"the forward pass did not reach every traced module: missing {', '.join(missing)}")
    if patterns:
        store.patterns = _check_attentions(store.weights, adapter, ids.shape, layers)
    return store


def _check_attentions(
    attentions: dict[int, Tensor], adapter: Adapter, shape: torch.Size, layers: tuple[int, ...]
) -> dict[int, Tensor]:
    """The model's attention probabilities per layer, after checking that they are there and of the right shape."""
    missing = [layer for layer in layers if layer not in attentions]
    if missing:
        raise AttentionCaptureError(
            f"the attention modules of layers {missing} returned no attention probabilities under "
            f"attn_implementation={adapter.attn_implementation()!r}"
        )
    expected = (shape[0], adapter.n_heads, shape[1], shape[1])
    for layer in layers:
        pattern = attentions[layer]
        if tuple(pattern.shape) != expected:
            raise AttentionCaptureError(
                f"layer {layer}: attention probabilities of shape {tuple(pattern.shape)}, expected {expected}"
            )
    return attentions


def _layer_norm(x: Tensor, ln: LayerNormWeights) -> Tensor:
    if ln.rms:
        return functional.rms_norm(x, ln.w, ln.eps)
    return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)


def _mlp(x: Tensor, layer: LayerWeights) -> Tensor:
    mlp = layer.mlp
    act = functional.ACTIVATIONS[mlp.act]
    if mlp.W_gate is None:
        return act(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
    gate = x @ mlp.W_gate if mlp.b_gate is None else x @ mlp.W_gate + mlp.b_gate
    return (act(gate) * (x @ mlp.W_in + mlp.b_in)) @ mlp.W_out + mlp.b_out


def _rebuild(
    weights: ModelWeights,
    ids: Tensor,
    pos: Tensor,
    allowed: Tensor,
    *,
    parallel_residual: bool = False,
    rotations: Mapping[int, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The whole forward pass from the weights alone: final hidden state ``[batch, pos, d_model]`` and logits.

    With ``parallel_residual`` (see :attr:`attnlens.models.Adapter.parallel_residual`) each block's attention and
    MLP read the same residual stream, and both outputs are added to it. A model without a position embedding
    (``W_pos`` None) takes its positions from ``rotations``: each rotary layer's ``(cos, sin)`` as the model's
    attention module received it (a function of the positions alone, captured rather than recomputed so that the
    rebuild rotates exactly as the model did).
    """
    residual = weights.W_E[ids] if weights.W_pos is None else weights.W_E[ids] + weights.W_pos[pos]
    rotations = rotations or {}
    for layer in weights.layers:
        rotation = rotations.get(layer.layer) if layer.rotary_dim else None
        attn_out = functional.attention(_layer_norm(residual, layer.ln_1), layer, allowed, rotation=rotation).output
        if parallel_residual:
            residual = residual + attn_out + _mlp(_layer_norm(residual, layer.ln_2), layer)
        else:
            residual = residual + attn_out
            residual = residual + _mlp(_layer_norm(residual, layer.ln_2), layer)
    hidden = _layer_norm(residual, weights.ln_f)
    if weights.W_U is None:
        return hidden, None
    logits = hidden @ weights.W_U
    return hidden, logits if weights.b_U is None else logits + weights.b_U


def _hf_order_pattern(qkv: QKV, layer: LayerWeights, n_kv_heads: int, allowed: Tensor) -> Tensor:
    """The pattern from the model's own q and k, in the arithmetic order of the installed transformers' eager kernel.

    The scores are the pattern tap's (:func:`attnlens.patterns.masked_scores`), with the layer's spec as the weights
    carry it: HF eager scales the scores in its own order (``layer.score_divisors`` / ``layer.upcast``) and masks
    with the dtype's most negative value, where ``-inf`` is used here: that gives the same row maximum and sums, so the
    allowed entries match bit for bit. They are soft-maxed in their own dtype (half scores stay half, unlike
    :func:`attnlens.functional.masked_softmax` and the tap).
    """
    q, k, v = qkv
    spec = AttentionSpec(
        layer.scale, q.shape[1], n_kv_heads, upcast=layer.upcast, divisors=layer.score_divisors, window=layer.window
    )
    blocked = ~allowed
    if layer.window is not None:
        n_pos = q.shape[-2]
        blocked = blocked | ~functional.sliding_window_mask(n_pos, window=layer.window, device=q.device)
    # Eager repeats each key/value head per query head (a copy, as transformers' repeat_kv) before its matmul.
    k = functional.repeat_kv(k, q.shape[1] // n_kv_heads)
    scores = masked_scores(q, k, spec, blocked, contiguous_k=False)
    return torch.softmax(scores, dim=-1).to(v.dtype)


def _compare(reference: Tensor, recomputed: Tensor, keep: Tensor, head_dim: int | None) -> list[tuple[float, float]]:
    """``(max_abs_error, max_rel_error)`` over the entries where ``keep``, per index of ``head_dim`` (or overall)."""
    if reference.shape != recomputed.shape:
        raise AttentionCaptureError(
            f"captured tensor of shape {tuple(reference.shape)}, recomputed {tuple(recomputed.shape)}"
        )
    errors = _amax(recomputed.double() - reference.double(), keep, head_dim).reshape(-1)
    magnitudes = _amax(reference, keep, head_dim).reshape(-1)
    out = []
    for err, mag in zip(errors.tolist(), magnitudes.tolist()):
        rel = err / mag if mag > 0 else (0.0 if err == 0 else math.inf)
        out.append((err, rel if not math.isnan(mag) else math.nan))
    return out


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


def _versions() -> dict[str, str]:
    import transformers

    import attnlens

    return {"torch": torch.__version__, "transformers": transformers.__version__, "attnlens": attnlens.__version__}


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
        own = _run(adapter, ids, mask, pos, traced, patterns=implementation == "eager")
        bar.update()
        if own.patterns is None:
            with preserved(adapter, attn_implementation="eager"):
                eager = _run(adapter, ids, mask, pos, traced, patterns=True)
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
        # Which entries count, in the layout of each compared tensor: valid query rows (and valid keys).
        rows_keep = rearrange(valid, "batch pos -> batch 1 pos 1")
        pattern_keep = rearrange(valid, "batch q_pos -> batch 1 q_pos 1") & rearrange(
            valid, "batch k_pos -> batch 1 1 k_pos"
        )
        z_keep = rearrange(valid, "batch pos -> batch pos 1 1")
        out_keep = rearrange(valid, "batch pos -> batch pos 1")

        rows: list[VerificationRow] = []
        applied: dict[str, float] = {}

        def add(quantity: str, layer: int | None, results: list[tuple[float, float]], bounds: Tensor | float) -> None:
            per_head = quantity in _PER_HEAD
            derived = bounds.tolist() if isinstance(bounds, Tensor) else [bounds] * len(results)
            for head, ((abs_err, rel_err), bound) in enumerate(zip(results, derived)):
                tol = fixed.get(quantity, bound)
                # A zero tolerance means bit for bit; an infinite relative error (all-zero reference) never passes.
                ok = rel_err <= tol and math.isfinite(rel_err) and (tol > 0 or abs_err == 0.0)
                rows.append(VerificationRow(layer, head if per_head else None, quantity, abs_err, rel_err, tol, ok))
                applied[quantity] = max(applied.get(quantity, 0.0), tol)

        name = _dtype_name(weights.dtype)
        u, u_acc = UNIT_ROUNDOFF[name], UNIT_ROUNDOFF[_ACCUMULATOR[name]]
        base = derived_tolerances(weights.dtype, weights.d_model, weights.d_head, weights.n_layers, n_pos)
        bitwise = bitwise_guaranteed(adapter.model, weights.dtype, weights.device)
        n_heads = weights.n_heads
        for index in traced:
            bar.update()
            layer = weights.layers[index]
            mine = functional.attention(own.attn_in[index], layer, allowed, rotation=own.rotation(index))
            q, k, v = own.qkv[index]
            model_z = rearrange(own.z[index], "batch pos (head d_head) -> batch pos head d_head", head=n_heads)
            model_pattern = eager.pattern(index)
            hf_order = _hf_order_pattern(eager.qkv[index], layer, adapter.n_kv_heads, allowed)
            pattern = (
                mine.pattern
                if eager is own
                else functional.attention(eager.attn_in[index], layer, allowed, rotation=eager.rotation(index)).pattern
            )
            # Derived per-head bounds (docs/verify.md): a score moves by about S * (relative error of q and k), with
            # S = scale * max|q| * max|k| / sqrt(d_head) from the model's own q and k; softmax passes at most that
            # to a probability; z inherits pattern and v errors times max|v| / max|z|.
            q_eager, k_eager, _ = eager.qkv[index]
            group = n_heads // k_eager.shape[1]  # per query head: each reads its key/value head's bound
            k_norm = _max_norm(k_eager, valid).repeat_interleave(group)
            score_bound = abs(layer.scale) * _max_norm(q_eager, valid) * k_norm / math.sqrt(weights.d_head)
            q_tol, k_tol, qk_rel = base["q"], base["k"], base["q"] + base["k"]
            if layer.rotary_dim:
                # Both sides rotate with the same cos/sin: an entry a c - b s of a feature pair (a, b) moves by at most
                # |(da, db)| <= sqrt2 max|d| plus two roundings of |a c| + |b s| per side, and a rotated entry's
                # largest is at least the largest pair norm / sqrt2: relative to it, 2 tol + 8u. The scores see the
                # rotation normwise (orthogonal per pair): q and k each gain only its roundings, 6u.
                q_tol, k_tol, qk_rel = 2 * q_tol + 8 * u, 2 * k_tol + 8 * u, qk_rel + 12 * u
            pattern_tol = 4 * u + score_bound * (qk_rel + u)
            hf_order_tol = score_bound * 0.0 if bitwise else 4 * u + score_bound * (u_acc * weights.d_head + u)
            z_max = _amax(model_z, z_keep, 2)
            v_over_z = _ratio(_amax(v, rows_keep, 1).repeat_interleave(group), z_max)
            z_tol = base["z"] + v_over_z * (2 * (pattern_tol - 4 * u) + base["v"] + 2 * u)
            add("q", index, _compare(q, mine.q, rows_keep, 1), q_tol)
            add("k", index, _compare(k, mine.k, rows_keep, 1), k_tol)
            add("v", index, _compare(v, mine.v, rows_keep, 1), base["v"])
            add("pattern_hf_order", index, _compare(model_pattern, hf_order, pattern_keep, 1), hf_order_tol)
            add("pattern", index, _compare(model_pattern, pattern, pattern_keep, 1), pattern_tol)
            add("z", index, _compare(model_z, mine.z, z_keep, 2), z_tol)
            add("attn_out", index, _compare(own.attn_out[index], mine.output, out_keep, None), base["attn_out"])

        positions = torch.arange(n_pos, device=ids.device).unsqueeze(0) if pos is None else pos
        hidden, logits = _rebuild(
            weights, ids, positions, allowed, parallel_residual=adapter.parallel_residual, rotations=own.rotations
        )
        bar.update()
        add("hidden", None, _compare(own.final(), hidden, out_keep, None), base["hidden"])
        if own_logits is not None and logits is not None:
            add("logits", None, _compare(own_logits, logits, out_keep, None), base["logits"])

    name = adapter.name
    return VerificationReport(
        notes=_notes(adapter),
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
