"""Direct attribution: the final residual stream split into what each component wrote, and each one's direct logit.

:func:`decompose` runs the base transformer once, with hooks, and splits the residual stream that enters the final
layer norm, at chosen positions, into its components: the token embedding, the position embedding, every head's result
``z_h @ W_O[h]``, every layer's attention output bias ``b_O`` and every MLP's output. Their sum is the model's own
residual (:meth:`Decomposition.check` measures by how much it is not, and refuses more than rounding).

:meth:`Decomposition.logit_attribution` sends each component through the final layer norm with its scale frozen at
the value the real residual gives it (the standard linearisation), then through the unembedding columns of the
requested tokens only: for a component ``c``, with ``x`` the real residual at that position,

    attribution_c = ((c - mean(c)) / sigma(x)) . (gamma * W_U[:, t]),   sigma(x) = sqrt(var(x) + eps),

and ``sum_c attribution_c + beta . W_U[:, t] + b_U[t]`` is the model's logit of token ``t`` (``b_U`` only where the
head has a bias; GPT-2's has none): :meth:`Decomposition.logit_bias` gives that last term.

An RMSNorm (``LayerNormWeights.rms``: Llama, Mistral, Qwen) is not linear either, and is linearised the same way:
its scale ``rms(x) = sqrt(mean(x^2) + eps)`` is frozen at the real residual's, and nothing is centred (it does not
remove the mean) and there is no ``beta``: ``attribution_c = (c / rms(x)) . (gamma * W_U[:, t])``.

Caveats:

* The linearisation is exact for the sum, not a causal statement about each part: the final norm's scale
  ``sigma`` depends on all components together; removing one would change it, and so every other component's share.
* The norm subtracts the mean over ``d_model``; each component's own mean is subtracted from it here (its share of
  the centring), so a component that only shifts the residual uniformly gets an attribution of 0.
* Contributions are in the model's dtype, computed as the model computes them, except that the model adds all
  heads' results in one matrix product (plus ``b_O``) and rounds the attention output once, where each head's result
  is rounded here on its own: the float64 sum of the parts then differs from the model's residual by rounding alone
  (see :func:`check_tolerance`). Logit attributions are computed in float32 (float64 for a float64 model).
* Under a parallel residual (:attr:`attnlens.models.Adapter.parallel_residual`: ``x + attn(ln_1(x)) + mlp(ln_2(x))``)
  a block's MLP reads the residual stream *before* that block's attention output is added, so layer ``l``'s heads
  are read from layer ``l + 1`` on, never by layer ``l``'s MLP. The decomposition of the final residual is the same
  sum either way; only what each MLP saw differs. Models without a learned position embedding (rotary) have a zero
  ``pos_embed`` component: their positions enter as a rotation of q and k, never as a residual term.
* Only the base transformer runs, and the forward pass stops at the final layer norm: the cost is one forward pass
  without the unembedding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from attnlens import capture
from attnlens._display import DecompositionTables
from attnlens._indices import as_index
from attnlens._linearise import component_names, frozen_sigma, linearised_logits, residual_error
from attnlens.errors import AttentionCaptureError, StaleWeightsError, UnsupportedModelError
from attnlens.loading import resolve
from attnlens.models import Adapter, adapt
from attnlens.tokens import text_inputs
from attnlens.tolerances import check_tolerance, logit_tolerance

__all__ = [
    "Decomposition",
    "DecompositionError",
    "check_tolerance",
    "component_names",
    "decompose",
    "linearised_logits",
    "logit_tolerance",
    "residual_error",
]

_ACCUMULATOR = {torch.float64: torch.float64}  # every other dtype accumulates (and attributes logits) in float32


class DecompositionError(ArithmeticError):
    """The components of a :class:`Decomposition` do not sum to the model's residual within rounding."""


# -------------------------------------------------------------------------------------------- the result ---


@dataclass(frozen=True, repr=False)
class Decomposition(DecompositionTables):
    """The final residual stream at chosen positions, split into the components that wrote it.

    Attributes:
        names: one name per component (see :func:`component_names`).
        contributions: ``[component, batch, pos, d_model]`` in the model's dtype; ``pos`` indexes the chosen
            positions, not the input's.
        residual: ``[batch, pos, d_model]``, the model's own residual entering the final layer norm there (for
            :func:`attnlens.residual.decompose_resid`, the residual entering layer ``n_layers``).
        positions: ``[batch, pos]`` int64, the input position of each entry (its column in ``input_ids``).
        valid: ``[batch, pos]`` bool: the entry is a real token (False only for padding with ``positions=None``).
        n_layers: how many layers wrote the residual: the model's number of layers (fewer for
            :func:`attnlens.residual.decompose_resid` at an earlier layer).
    """

    names: tuple[str, ...]
    contributions: Tensor
    residual: Tensor
    positions: Tensor
    valid: Tensor
    n_layers: int = field(repr=False)
    _norm: tuple[Tensor, Tensor | None, float] = field(repr=False)
    _unembed: tuple[Tensor, Tensor | None] | None = field(repr=False)
    _versions: tuple[int, ...] = field(repr=False)
    _model_class: str = field(repr=False)
    _rms: bool = field(repr=False)
    _d_attn: int = field(repr=False)  # the output projection's input width, n_heads * d_head
    _lm_classes: tuple[str, ...] = field(repr=False)

    def __repr__(self) -> str:
        batch, n_pos, d_model = self.residual.shape
        return (
            f"Decomposition({len(self.names)} components, batch={batch}, pos={n_pos}, d_model={d_model}, "
            f"{str(self.residual.dtype).removeprefix('torch.')})"
        )

    def index(self, name: str) -> int:
        """The position of a component on the ``component`` axis, by name (``"L1H3"``, ``"L0.mlp"``, ...)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no component {name!r}; components are {self.names[0]}, ..., {self.names[-1]}") from None

    def errors(self) -> tuple[float, float]:
        """``(error, tolerance)``: the largest relative error of the sum (see :func:`residual_error`) and its bound."""
        error, cancellation = residual_error(self.contributions, self.residual, self.valid)
        d_model = self.residual.shape[-1]
        return error, check_tolerance(self.residual.dtype, self.n_layers, d_model, cancellation, d_attn=self._d_attn)

    def logit_bound(self, tokens: Any) -> Tensor:
        """The largest gap from the model's own logit that rounding explains, ``[batch, pos]``.

        That is, between ``logit_attribution(t).sum(0) + logit_bias(t)`` and the model's logit (or logit difference):
        ``logit_tolerance * S`` (see :func:`logit_tolerance`). Arguments and errors as :meth:`logit_attribution`.
        """
        with torch.no_grad():
            _, _, scale = self._direction(tokens)
        _, cancellation = residual_error(self.contributions, self.residual, self.valid)
        d_model = self.residual.shape[-1]
        return logit_tolerance(self.residual.dtype, self.n_layers, d_model, cancellation, d_attn=self._d_attn) * scale

    def check(self) -> float:
        """The largest relative error of the sum of the components against the model's residual; raises above tolerance.

        Per entry (batch, position), the error is ``max_d |sum_c c - x| / max_d |x|``, summed in float64; the
        largest over the real tokens is returned. In float32 it stays within a few ``1e-7`` on small models; the
        bound is :func:`check_tolerance`.

        Raises:
            DecompositionError: the error is above the tolerance, or not finite.
        """
        error, tolerance = self.errors()
        if not error <= tolerance:
            raise DecompositionError(
                f"the {len(self.names)} components sum to the model's residual only within a relative error of "
                f"{error:.3g}, more than rounding explains ({tolerance:.3g} for {self.residual.dtype}); were the "
                "contributions or the residual modified?"
            )
        return error

    def logit_attribution(self, tokens: Any) -> Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (or to a logit difference).

        The final layer norm's scale is frozen at the value of the real residual (module docstring):
        ``logit_attribution(t).sum(0) + logit_bias(t)`` is the model's logit, up to rounding. Only the requested
        tokens' columns of ``W_U`` are read.

        Args:
            tokens: target token ids: an int, ``[batch]`` (one per row) or ``[batch, pos]`` (one per entry), as
                ints, lists, arrays or integer tensors; or a tuple ``(a, b)`` of two such for the logit difference
                ``a - b`` (a tuple is always a pair: give per-row ids as a list or a tensor).

        Returns:
            ``[component, batch, pos]``, float32 (float64 for a float64 model).

        Raises:
            UnsupportedModelError: the model has no language-model head.
            ValueError: ids out of the vocabulary, of the wrong shape, or not integers.
            StaleWeightsError: the final norm or the unembedding was modified in place since :func:`decompose`.
        """
        with torch.no_grad():  # an attribution, not a graph: nothing here is meant for gradients
            direction, _, _ = self._direction(tokens)
            sigma = self._sigma(direction.dtype)
            return linearised_logits(self.contributions, sigma, direction, centre=not self._rms)

    def logit_bias(self, tokens: Any) -> Tensor:
        """``beta . W_U[:, t] + b_U[t]``: the part of the logit that no component writes, ``[batch, pos]``.

        For a pair ``(a, b)``, the same difference. Arguments, dtype and errors as :meth:`logit_attribution`.
        """
        with torch.no_grad():
            _, bias, _ = self._direction(tokens)
        return bias

    def _sigma(self, dtype: torch.dtype) -> Tensor:
        return frozen_sigma(self.residual, self._norm[2], dtype, rms=self._rms)

    def _direction(self, tokens: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``gamma * W_U[:, t]`` ``[batch, pos, d_model]``, ``beta . W_U[:, t] + b_U[t]`` and ``S`` ``[batch, pos]``."""
        if self._unembed is None:
            raise UnsupportedModelError(
                f"{self._model_class} has no language-model head (no W_U), so there are no logits to attribute; "
                "the residual decomposition stands. Load the checkpoint with one for logits "
                f"({', '.join(self._lm_classes)})"
            )
        if _versions(self._norm, self._unembed) != self._versions:
            raise StaleWeightsError(
                "the final layer norm or the unembedding was modified in place after decompose(); decompose again"
            )
        dtype = _ACCUMULATOR.get(self.residual.dtype, torch.float32)
        if isinstance(tokens, tuple):
            if len(tokens) != 2:
                raise ValueError(f"a tuple of tokens is a pair (a, b) for the logit difference; got {len(tokens)}")
            direction_a, bias_a, scale_a = self._direction_one(tokens[0], dtype)
            direction_b, bias_b, scale_b = self._direction_one(tokens[1], dtype)
            return direction_a - direction_b, bias_a - bias_b, scale_a + scale_b
        return self._direction_one(tokens, dtype)

    def _direction_one(self, tokens: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        assert self._unembed is not None
        weight, b_U = self._unembed  # weight: [d_vocab, d_model], row t is W_U[:, t]
        gamma, beta, _ = self._norm
        batch, n_pos = self.positions.shape
        ids = _target_ids(tokens, batch, n_pos, weight.shape[0]).to(weight.device)
        columns = weight.index_select(0, ids.reshape(-1)).to(dtype).reshape(batch, n_pos, -1)
        direction = columns * gamma.to(dtype)
        stretch = self.residual.to(dtype).abs().amax(dim=-1) / self._sigma(dtype)
        scale = stretch * direction.abs().sum(dim=-1)
        bias = torch.zeros((batch, n_pos), dtype=dtype, device=weight.device)
        if beta is not None:
            bias = bias + einsum(columns, beta.to(dtype), "batch pos d_model, d_model -> batch pos")
            scale = scale + (columns * beta.to(dtype)).abs().sum(dim=-1)
        if b_U is not None:
            b_t = b_U.index_select(0, ids.reshape(-1)).to(dtype).reshape(batch, n_pos)
            bias, scale = bias + b_t, scale + b_t.abs()
        return direction, bias, scale


def _versions(
    norm: tuple[Tensor, Tensor | None, float], unembed: tuple[Tensor, Tensor | None] | None
) -> tuple[int, ...]:
    tensors = [norm[0], norm[1], *(unembed or ())]
    return tuple(-1 if t is None else int(t._version) for t in tensors)


def _target_ids(tokens: Any, batch: int, n_pos: int, d_vocab: int) -> Tensor:
    """Target ids as ``[batch, pos]`` int64, from an int, ``[batch]`` or ``[batch, pos]``."""
    if isinstance(tokens, bool) or (isinstance(tokens, Tensor) and tokens.dtype == torch.bool):
        raise ValueError(f"tokens must be integer token ids, got the bool {tokens!r}")
    if isinstance(tokens, (int,)) or (getattr(tokens, "ndim", None) == 0):
        ids = torch.tensor(as_index(tokens, "tokens")).expand(batch, n_pos)
    else:
        try:
            ids = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"tokens must be token ids (an int, [batch] or [batch, pos]), got {tokens!r}") from None
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"tokens must be integer token ids, got dtype {ids.dtype}")
        if tuple(ids.shape) == (batch,):
            ids = ids[:, None].expand(batch, n_pos)
        elif tuple(ids.shape) != (batch, n_pos):
            raise ValueError(
                f"tokens has shape {tuple(ids.shape)}; give an int, [batch] = [{batch}] or [batch, pos] = "
                f"[{batch}, {n_pos}] (pos: the decomposition's positions)"
            )
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= d_vocab:
        raise ValueError(f"tokens must lie in [0, {d_vocab}) (d_vocab), got values from {low} to {high}")
    return ids


# ---------------------------------------------------------------------------------------------- positions ---


def _select_positions(positions: Any, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Input columns ``[batch, pos]`` of the chosen positions and which of them are real tokens.

    ``positions`` count among each row's real tokens (``0`` its first, ``-1`` its last); ``None`` takes every
    column of the input, padding included.
    """
    batch, n_pos = mask.shape
    real = mask.bool()
    if positions is None:
        columns = torch.arange(n_pos, device=mask.device).expand(batch, n_pos)
        return columns, real
    if isinstance(positions, bool):
        raise ValueError(f"positions must be integers, got the bool {positions!r}")
    if isinstance(positions, (str, bytes, float)):
        raise ValueError(f"positions must be integers (or None for every position), got {positions!r}")
    given = positions
    if isinstance(given, Tensor) and (given.dtype == torch.bool or given.dtype.is_floating_point):
        raise ValueError(f"positions must be integers, got a {given.dtype} tensor")
    if hasattr(given, "tolist"):  # tensors and numpy arrays; their elements are then checked one by one
        given = given.tolist()
    if isinstance(given, Sequence) and given and all(isinstance(row, (Sequence, Tensor)) for row in given):
        rows = [[as_index(i, "positions") for i in row] for row in given]  # [batch, pos]: one list per row
        if len(rows) != batch or len({len(row) for row in rows}) != 1:
            raise ValueError(f"positions given per row must be [batch, pos] = [{batch}, n], got rows of {rows}")
    else:
        flat = [as_index(i, "positions") for i in (given if isinstance(given, Sequence) else [given])]
        rows = [flat] * batch
    if not rows[0]:
        raise ValueError("positions is empty; give at least one position, or None for all")
    lengths = real.sum(dim=-1).tolist()
    order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)  # each row's real columns first, in order
    index = []
    for row, (wanted, length) in enumerate(zip(rows, lengths, strict=True)):
        bad = [i for i in wanted if not -length <= i < length]
        if bad:
            raise ValueError(
                f"positions {bad} are out of range for row {row}, which has {length} real tokens (count among the "
                f"row's real tokens: 0..{length - 1}, or -{length}..-1 from its last)"
            )
        index.append([i % length for i in wanted])
    columns = order.gather(1, torch.tensor(index, device=mask.device))
    return columns, torch.ones_like(columns, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ running ---


@capture.one_at_a_time
def decompose(
    model: nn.Module | Adapter | str | os.PathLike[str],
    input_ids: Any,
    attention_mask: Any = None,
    *,
    positions: Any = -1,
    position_ids: Any = None,
    tokenizer: Any = None,
) -> Decomposition:
    """Split the model's final residual stream (entering its final layer norm) into its components.

    One forward pass of the base transformer with hooks, stopped at the final layer norm; the model is left as it
    was found (hooks removed, also on error; eval mode for the pass only; one attnlens call per model at a time).
    Each head's result ``z_h @ W_O[h]`` is computed at the chosen positions only.

    Args:
        model: a supported GPT-2 model (any class; logits need one with a language-model head), or its Adapter;
            or a hub name / local folder / ``"demo"``, loaded for this call by :func:`attnlens.load` (with its
            tokenizer).
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids; or, with a tokenizer, a text or a list of texts.
        attention_mask: ``[batch, pos]`` of 1 (token) and 0 (padding), left or right padding; only with token ids.
        positions: which positions to decompose, counted among each row's real tokens under the mask: an int
            (default ``-1``: each row's last real token), a list of ints (the same in every row), ``[batch, n]``
            ints (per row); negative ints count from the row's last real token. ``None``: every column of the
            input, padding included (see :attr:`Decomposition.valid`).
        position_ids: ``[batch, pos]`` position ids, passed to the model as they are (the model's default is
            ``0..pos-1`` whatever the padding).
        tokenizer: turns text into ids (padded on its ``padding_side``).

    Returns:
        A :class:`Decomposition`; its ``.check()`` measures that the parts sum to the residual.

    Raises:
        UnsupportedModelError: not a supported GPT-2 model, or one that attnlens refuses (see
            :func:`attnlens.models.adapt`).
        ValueError: bad inputs (see :meth:`attnlens.models.Adapter.check_inputs`) or positions out of a row's range.
        AttentionCaptureError: a layer or the final norm never ran.

    Example:
        >>> d = attnlens.attribution.decompose(model, ids)  # each row's last token
        >>> d.check()  # largest relative error of the sum
        >>> d.logit_attribution(target)  # [component, batch, pos]
    """
    model, tokenizer = resolve(model, tokenizer, "decompose")
    input_ids, attention_mask = text_inputs(input_ids, attention_mask, tokenizer, False)
    return _decompose(model, input_ids, attention_mask, positions, position_ids)


def _decompose(
    model: nn.Module | Adapter,
    input_ids: Any,
    attention_mask: Any,
    positions: Any,
    position_ids: Any,
    boundaries: dict[int, Tensor] | None = None,
) -> Decomposition:
    """:func:`decompose`; with ``boundaries``, also the residual entering each layer, stored there by layer index."""
    adapter = adapt(model)
    sites = adapter.sites
    ids, mask, pos_ids = adapter.check_inputs(input_ids, attention_mask, position_ids)
    columns, valid = _select_positions(positions, torch.ones_like(ids) if mask is None else mask)
    n_layers, n_heads, d_model = adapter.n_layers, adapter.n_heads, adapter.d_model
    names = component_names(n_layers, n_heads)
    batch, n_sel = columns.shape
    contributions = torch.empty((len(names), batch, n_sel, d_model), dtype=adapter.dtype, device=adapter.device)
    captured: dict[str, Tensor] = {}
    seen: set[str] = set()

    def at_positions(x: Tensor) -> Tensor:
        # The position embedding comes as [1, pos, d_model]; z is [batch, pos, (head d_head)], which is not d_model
        # wide where head_dim is a setting of its own (Qwen3-4B, Mistral-Nemo).
        return x.expand(batch, -1, -1).gather(1, columns[:, :, None].expand(batch, n_sel, x.shape[-1]))

    def put(slot: int, key: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            contributions[slot].copy_(at_positions(output[0] if isinstance(output, tuple) else output))
            seen.add(key)

        return hook

    def heads(layer: int) -> Callable[[nn.Module, Any], None]:
        first = names.index(f"L{layer}H0")

        def hook(module: nn.Module, args: Any) -> None:
            z = rearrange(at_positions(args[0]), "batch pos (head d_head) -> batch pos head d_head", head=n_heads)
            result = einsum(
                z, adapter.W_O(layer), "batch pos head d_head, head d_head d_model -> head batch pos d_model"
            )
            contributions[first : first + n_heads].copy_(result)
            b_O = adapter.b_O(layer)
            if b_O is None:
                contributions[first + n_heads].zero_()
            else:
                contributions[first + n_heads].copy_(b_O.expand(batch, n_sel, d_model))
            seen.add(f"L{layer}.z")

        return hook

    def boundary(layer: int) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            assert boundaries is not None
            boundaries[layer] = at_positions(args[0])  # the block's first norm reads the residual entering the layer

        return hook

    def final(module: nn.Module, args: Any) -> None:
        captured["residual"] = at_positions(args[0])
        raise capture.StopForward

    post = [(sites.embed, put(0, "embed"))]
    if sites.pos_embed is not None:
        post.append((sites.pos_embed, put(1, "pos_embed")))
    else:  # rotary architectures add no position term to the residual stream
        contributions[1].zero_()
        seen.add("pos_embed")
    post += [(s.mlp, put(names.index(f"L{i}.mlp"), f"L{i}.mlp")) for i, s in enumerate(sites.layers)]
    pre = [(s.z, heads(i)) for i, s in enumerate(sites.layers)] + [(sites.final_norm, final)]
    if boundaries is not None:
        pre += [(s.attn_input, boundary(i)) for i, s in enumerate(sites.layers)]

    def forward() -> None:
        sites.run(input_ids=ids, attention_mask=mask, position_ids=pos_ids)

    with capture.preserved(adapter), torch.no_grad(), capture.forward_hooks(post), capture.forward_hooks(pre, pre=True):
        capture.run_until(forward)

    expected = {"embed", "pos_embed", *(f"L{i}.{k}" for i in range(n_layers) for k in ("z", "mlp"))}
    missing = sorted(expected - seen) + ([] if "residual" in captured else ["final norm"])
    if missing:
        raise AttentionCaptureError(f"the forward pass never ran {', '.join(missing)}; nothing to decompose")
    norm = adapter.final_norm()
    norm_params = (norm.w, None if norm.rms else norm.b, norm.eps)
    unembed = None if sites.unembed is None else (sites.unembed.weight, sites.unembed.bias)
    return Decomposition(
        names=names,
        contributions=contributions,
        residual=captured["residual"],
        positions=columns.clone(),
        valid=valid.clone(),
        n_layers=n_layers,
        _norm=norm_params,
        _unembed=unembed,
        _versions=_versions(norm_params, unembed),
        _model_class=adapter.model_class,
        _rms=norm.rms,
        _d_attn=adapter.n_heads * adapter.d_head,
        _lm_classes=adapter.lm_classes,
    )
