"""The residual stream at every layer, not only its end: the logit lens, and decompositions at any layer.

TransformerLens users reach for ``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack`` and
``logit_attrs``; here they stand on the footing of :func:`attnlens.attribution.decompose` (one forward pass with
hooks, the model left as found), whose maths and hooks they reuse:

* :func:`accumulated_resid` records the model's own residual stream entering every layer (the input of each block's
  first norm) and entering the final norm, at chosen positions, with the final decomposition of the same pass. Each
  entry is a copy of the model's own tensor, not a sum rebuilt here.
* :meth:`ResidualStack.at` (and :func:`decompose_resid`) split the residual entering layer ``l`` into what was written
  before it: ``embed``, ``pos_embed`` and, per earlier layer, each head, ``b_O`` and the MLP. It is a
  :class:`~attnlens.attribution.Decomposition`: its ``check()`` measures that the parts sum to the model's residual
  there, with the tolerance of :func:`attnlens.tolerances.check_tolerance` for ``l`` layers.
* :func:`apply_ln_to_stack` sends a stack of components through the final norm with the scale ``sigma`` frozen at the
  value of the real residual they sum to (the standard linearisation), so that ``sum_c + beta`` is the norm's output;
  :func:`logit_attrs` continues through the unembedding columns of the requested tokens.
* :meth:`ResidualStack.logit_lens`: the logit of a token read at each layer, ``final_norm(x_l) . W_U[:, t] + b_U[t]``
  with ``x_l`` the residual entering layer ``l`` and the norm's own statistics of ``x_l`` (exact, not linearised);
  the last entry is the model's logit.

TransformerLens's ``accumulated_resid(apply_ln=True)`` divides every layer's residual by the *final* residual's
scale instead (a linear attribution that adds up to the final logit); that is
``apply_ln_to_stack(stack.resid, stack.decomposition)``, and ``logit_attrs(stack.resid, stack.decomposition, t)``.

Caveats: only the final norm is applied (each block's own norms are not offered); a residual between a block's
attention and its MLP (TransformerLens's ``resid_mid``) is not recorded, since a parallel-residual model (GPT-NeoX)
never forms it. Under a parallel residual, layer ``l``'s MLP reads the residual entering layer ``l``, as its heads do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlens import capture
from attnlens._indices import as_index
from attnlens._linearise import component_names, frozen_norm, linearised_logits
from attnlens.attribution import Decomposition, _decompose, _versions
from attnlens.errors import StaleWeightsError
from attnlens.models import Adapter, adapt

__all__ = ["ResidualStack", "accumulated_resid", "apply_ln_to_stack", "decompose_resid", "logit_attrs"]


@dataclass(frozen=True, repr=False)
class ResidualStack:
    """The model's residual stream entering each layer and its final norm, at chosen positions.

    Attributes:
        names: ``"L0.resid_pre"``, ..., ``"L{n-1}.resid_pre"``, ``"final"`` (TransformerLens: ``"0_pre"``, ...,
            ``"final_post"``); fewer when ``accumulated_resid`` was given ``layer``.
        resid: ``[layer, batch, pos, d_model]`` in the model's dtype: entry ``l`` is the model's own residual entering
            layer ``l`` (the last, for ``"final"``, the one entering the final norm).
        decomposition: the final residual's :class:`~attnlens.attribution.Decomposition`, from the same forward pass.
    """

    names: tuple[str, ...]
    resid: Tensor
    decomposition: Decomposition

    def __repr__(self) -> str:
        n_entries, batch, n_pos, d_model = self.resid.shape
        return f"ResidualStack({n_entries} layers, batch={batch}, pos={n_pos}, d_model={d_model})"

    @property
    def positions(self) -> Tensor:
        """``[batch, pos]`` int64: the input column of each entry (see :class:`Decomposition`)."""
        return self.decomposition.positions

    @property
    def valid(self) -> Tensor:
        """``[batch, pos]`` bool: the entry is a real token."""
        return self.decomposition.valid

    def at(self, layer: int) -> Decomposition:
        """The residual entering ``layer`` split into the components written before it.

        ``layer`` counts boundaries: ``0`` (the embeddings alone) to ``n_layers`` (the final residual, which is
        :attr:`decomposition`); negative counts from the end (``-1``: the final residual). The components are the first
        ``2 + layer * (n_heads + 2)`` of the final decomposition (the same tensors: what a layer writes does not depend
        on where one stops reading), and the residual is :attr:`resid` at that layer.

        Raises:
            ValueError: ``layer`` out of range for this stack.
        """
        index = _boundary(layer, len(self.names) - 1, len(self.names))
        d = self.decomposition
        if index == d.n_layers:
            return d
        n_heads = (len(d.names) - 2) // d.n_layers - 2
        names = component_names(index, n_heads)
        assert d.names[: len(names)] == names  # the final decomposition lists components layer by layer
        return dataclasses.replace(
            d, names=names, contributions=d.contributions[: len(names)], residual=self.resid[index], n_layers=index
        )

    def check(self) -> tuple[float, ...]:
        """For every entry, the largest relative error of its decomposition's sum (:meth:`Decomposition.check`).

        Raises:
            DecompositionError: some layer's components do not sum to the model's residual there within rounding.
        """
        return tuple(self.at(layer).check() for layer in range(len(self.names)))

    def logit_lens(self, tokens: Any) -> Tensor:
        """The logit of ``tokens`` read at every layer (the logit lens), ``[layer, batch, pos]``.

        Each residual goes through the final norm with its own statistics (the logit lens proper, exact up to
        rounding); the last entry is the model's logit. ``tokens`` as :meth:`Decomposition.logit_attribution` (an int,
        ``[batch]``, ``[batch, pos]``, or a pair ``(a, b)`` for the logit difference). Float32 (float64 for a float64
        model). For TransformerLens's variant with the final scale, use :func:`logit_attrs` on :attr:`resid`.
        """
        rows = []
        for layer in range(len(self.names)):
            d = self.at(layer)
            rows.append(logit_attrs(self.resid[layer : layer + 1], d, tokens)[0] + d.logit_bias(tokens))
        return torch.stack(rows)


def _boundary(layer: Any, last: int, count: int) -> int:
    index = as_index(layer, "layer")
    resolved = index + count if index < 0 else index
    if not 0 <= resolved <= last:
        raise ValueError(
            f"layer {index} is out of range: the residual is recorded entering layers 0..{last} ({last} is the final "
            f"norm's input), or -{count}..-1 from the end"
        )
    return resolved


def _check_stack(stack: Tensor, reference: Decomposition) -> Tensor:
    if not isinstance(stack, Tensor):
        raise TypeError(f"stack must be a tensor [component, batch, pos, d_model], got {type(stack).__name__}")
    shape = tuple(reference.residual.shape)
    if stack.ndim < 3 or tuple(stack.shape[-3:]) != shape:
        raise ValueError(
            f"stack has shape {tuple(stack.shape)}; it must end in the reference's [batch, pos, d_model] = "
            f"{list(shape)} (the same positions), e.g. [component, batch, pos, d_model]"
        )
    if _versions(reference._norm, reference._unembed) != reference._versions:
        raise StaleWeightsError(
            "the final norm or the unembedding was modified in place after the reference was computed; run it again"
        )
    return stack.reshape(-1, *shape)


def apply_ln_to_stack(stack: Tensor, reference: Decomposition) -> Tensor:
    """A stack of residual components through the final norm, its scale frozen at the reference residual's.

    ``gamma * (c - mean_d(c)) / sigma(x)`` for each component ``c``, with ``x = reference.residual`` and
    ``sigma(x) = sqrt(var(x) + eps)`` as the real forward computes it: for components that sum to ``x``, the results
    plus ``beta`` sum to the final norm's output on ``x`` (up to rounding). The norm's bias ``beta`` belongs to no
    component and is left out, as in :meth:`Decomposition.logit_attribution`. Under an RMSNorm (the Llama family)
    nothing is centred and ``sigma(x) = sqrt(mean_d(x^2) + eps)``; there is no ``beta``.

    Args:
        stack: ``[..., batch, pos, d_model]`` at the reference's positions: its ``contributions``, sums of them
            (per layer, per kind), or the :attr:`ResidualStack.resid` of the same pass.
        reference: the :class:`Decomposition` whose residual sets the scale (``decompose``, ``decompose_resid``,
            :meth:`ResidualStack.at`, or :attr:`ResidualStack.decomposition` for the final one).

    Returns:
        The stack's shape, float32 (float64 for a float64 model).

    Raises:
        ValueError: a stack not at the reference's positions; StaleWeightsError: the final norm changed since.
    """
    flat = _check_stack(stack, reference)
    gamma, _, _ = reference._norm
    dtype = torch.float64 if reference.residual.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        out = frozen_norm(flat.to(dtype), reference._sigma(dtype), gamma, centre=not reference._rms)
    return out.reshape(stack.shape)


def logit_attrs(stack: Tensor, reference: Decomposition, tokens: Any) -> Tensor:
    """Each stacked component's direct effect on the logit of ``tokens`` (or a logit difference), ``[..., batch, pos]``.

    The linearisation of :meth:`Decomposition.logit_attribution` (the final norm's scale frozen at the reference
    residual's) applied to any stack at the reference's positions: ``logit_attrs(d.contributions, d, t)`` is
    ``d.logit_attribution(t)``; a stack of partial sums (per layer, say) gives their attributions, which add up as
    the parts do.

    Args:
        stack: ``[..., batch, pos, d_model]``, as for :func:`apply_ln_to_stack`.
        reference: as for :func:`apply_ln_to_stack`; needs a model with a language-model head.
        tokens: as :meth:`Decomposition.logit_attribution`.

    Returns:
        ``stack.shape[:-1]``, float32 (float64 for a float64 model).
    """
    flat = _check_stack(stack, reference)
    with torch.no_grad():
        direction, _, _ = reference._direction(tokens)
        out = linearised_logits(flat, reference._sigma(direction.dtype), direction, centre=not reference._rms)
    return out.reshape(stack.shape[:-1])


@capture.one_at_a_time
def accumulated_resid(
    model: nn.Module | Adapter,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    layer: int | None = None,
    positions: Any = -1,
    position_ids: Any = None,
) -> ResidualStack:
    """The residual stream entering each layer (and the final norm), at chosen positions: the logit lens's input.

    One forward pass with hooks, as :func:`attnlens.attribution.decompose` (which it also computes, for the final
    residual); the model is left as found.

    Args:
        model: a supported model (logits need a language-model head), or its Adapter.
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids.
        attention_mask: ``[batch, pos]`` of 1 (token) and 0 (padding).
        layer: keep the residuals entering layers ``0..layer`` (``None``, ``-1`` or ``n_layers``: every layer and the
            final norm's input).
        positions: as :func:`attnlens.attribution.decompose` (default: each row's last real token; ``None``: all).
        position_ids: ``[batch, pos]`` position ids, passed to the model as they are.

    Returns:
        A :class:`ResidualStack`; ``.resid[l]`` is the model's own residual entering layer ``l``.

    Example:
        >>> stack = attnlens.residual.accumulated_resid(model, ids)
        >>> stack.logit_lens(target)  # [layer, batch, pos]: the target's logit read after each layer
    """
    adapter = adapt(model)
    boundaries: dict[int, Tensor] = {}
    d = _decompose(adapter, input_ids, attention_mask, positions, position_ids, boundaries)
    n_layers = adapter.n_layers
    last = n_layers if layer is None else _boundary(layer, n_layers, n_layers + 1)
    if sorted(boundaries) != list(range(n_layers)):  # pragma: no cover - decompose refuses a pass that skipped a layer
        raise AssertionError("a layer's residual was not recorded")
    resid = torch.stack([boundaries[i] for i in range(n_layers)] + [d.residual])[: last + 1]
    names = (*(f"L{i}.resid_pre" for i in range(n_layers)), "final")
    return ResidualStack(names=names[: last + 1], resid=resid, decomposition=d)


@capture.one_at_a_time
def decompose_resid(
    model: nn.Module | Adapter,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    layer: int | None = None,
    positions: Any = -1,
    position_ids: Any = None,
) -> Decomposition:
    """The residual stream entering ``layer``, split into the components written before it.

    ``decompose_resid(model, ids, layer=None)`` is :func:`attnlens.attribution.decompose`; ``layer=l`` keeps the
    components of ``embed``, ``pos_embed`` and layers ``0..l-1``, whose sum is the model's own residual entering layer
    ``l`` (``check()`` measures it). Its ``logit_attribution`` freezes the final norm's scale at that residual's:
    direct logit attribution through the logit lens at layer ``l``.

    Args:
        model: a supported model, or its Adapter.
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids.
        attention_mask: ``[batch, pos]`` of 1 (token) and 0 (padding).
        layer: ``0..n_layers`` (``None`` or ``-1``: the final residual).
        positions: as :func:`attnlens.attribution.decompose`.
        position_ids: ``[batch, pos]`` position ids, passed to the model as they are.

    Returns:
        A :class:`~attnlens.attribution.Decomposition` with ``n_layers == layer``.
    """
    stack = accumulated_resid(
        model, input_ids, attention_mask, layer=layer, positions=positions, position_ids=position_ids
    )
    return stack.at(-1) if layer is not None else stack.decomposition
