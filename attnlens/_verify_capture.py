"""verify's capture: what the model itself computed in one forward pass, taken by hooks.

:func:`run` runs the model's transformer once and keeps, per compared layer, the attention module's input, its q, k
and v as the kernel received them, the merged head outputs ``z`` entering the output projection, the module's output
and (from an eager kernel) the attention probabilities it returned; and the rotation each rotary layer received, and
the final hidden state. A reference pass for the probabilities alone (``full=False``) keeps only what the pattern
rows need and stops after the last compared layer's attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnlens import capture
from attnlens.capture import forward_hooks
from attnlens.errors import AttentionCaptureError
from attnlens.models import QKV, Adapter, Sites
from attnlens.patterns import qkv_hooks

__all__ = ["Capture", "run"]


@dataclass
class Capture:
    """What one forward pass of the model computed (tensors keyed by layer)."""

    attn_in: dict[int, Tensor] = field(default_factory=dict)
    qkv: dict[int, QKV] = field(default_factory=dict)
    z: dict[int, Tensor] = field(default_factory=dict)
    attn_out: dict[int, Tensor] = field(default_factory=dict)
    weights: dict[int, Tensor] = field(default_factory=dict)  # the probabilities the attention modules returned
    rotations: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    hidden: Tensor | None = None
    checked: bool = False  # weights holds every compared layer's probabilities, of the right shape

    @property
    def patterns(self) -> dict[int, Tensor] | None:
        """The model's attention probabilities by layer, once checked (``run(..., patterns=True)``); else None.

        ``weights`` itself, so that what lets go of a layer's probabilities lets go of its pattern.
        """
        return self.weights if self.checked else None

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


def _hooks(sites: Sites, layers: tuple[int, ...], store: Capture, *, full: bool) -> Iterator[Any]:
    """Forward hooks that save each compared layer's attention input and output, and the final hidden state.

    The attention output hook also keeps the probabilities the module returns beside its output (what
    ``output_attentions`` collects), when its kernel returns them. Without ``full`` the pass stops once the last
    compared layer's attention has returned them: nothing after it is needed.
    """
    last = max(layers)

    def save_input(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store.attn_in[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def save_attn(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store.attn_out[layer] = output[0].detach()
            if isinstance(output[1], Tensor):
                store.weights[layer] = output[1].detach()
            if not full and layer == last:
                raise capture.StopForward

        return hook

    def save_final(module: nn.Module, args: Any, output: Tensor) -> None:
        store.hidden = output.detach()

    for layer in layers:
        site = sites.layers[layer]
        yield site.attn_input, save_input(layer)
        yield site.attn, save_attn(layer)
    if full:
        yield sites.final_norm, save_final


def _rotation_hooks(adapter: Adapter, layers: range | tuple[int, ...], store: Capture) -> Iterator[Any]:
    """Forward-pre hooks (with kwargs) that save the rotation each rotary layer of ``layers`` receives.

    A full pass saves every rotary layer's, not only the compared ones': the whole-forward rebuild rotates them all.
    """

    def save(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            rotation = adapter.rotation(layer, args, kwargs)
            if rotation is not None:
                store.rotations[layer] = (rotation.cos.detach(), rotation.sin.detach())

        return hook

    for layer in layers:
        if adapter.specs[layer].rotary_dim:
            yield adapter.sites.layers[layer].attn, save(layer)


def _z_hooks(sites: Sites, layers: tuple[int, ...], store: Capture) -> Iterator[Any]:
    """Forward-pre hooks that save the input of each compared output projection: the heads' outputs, merged."""

    def save(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            store.z[layer] = args[0].detach()

        return hook

    for layer in layers:
        yield sites.layers[layer].z, save(layer)


def run(
    adapter: Adapter,
    ids: Tensor,
    mask: Tensor | None,
    pos: Tensor | None,
    layers: tuple[int, ...],
    *,
    patterns: bool,
    full: bool = True,
) -> Capture:
    """One forward pass of the model's transformer, capturing what ``layers`` compute (and, on request, patterns).

    The attention probabilities come from the attention modules' own second output, which is where
    ``output_attentions`` collects them; asking for them that way instead would make transformers 5.x install
    recording hooks on the model for good (:meth:`~attnlens.models.Sites.run` makes every output switch explicit).

    Args:
        adapter: the model's adapter.
        ids: ``[batch, pos]`` checked token ids.
        mask: ``[batch, pos]`` attention mask as the model takes it, or None.
        pos: ``[batch, pos]`` position ids as the model takes them, or None.
        layers: the compared layers, sorted.
        patterns: keep (and check) the probabilities the attention modules return.
        full: also ``z``, every rotary layer's rotation and the final hidden state; else (a reference pass for the
            probabilities) only the inputs, q/k/v, probabilities and rotations of ``layers``, stopping after the last.

    Raises:
        AttentionCaptureError: a compared module never ran, or the probabilities are missing or misshapen.
    """
    sites = adapter.sites
    store = Capture()

    def save_qkv(layer: int, qkv: QKV) -> None:
        store.qkv[layer] = QKV(*(x.detach() for x in qkv))

    rotated = range(adapter.n_layers) if full else layers
    on_qkv, rotations = qkv_hooks(adapter, layers, save_qkv)
    with (
        forward_hooks([*rotations, *_rotation_hooks(adapter, rotated, store)], pre=True, with_kwargs=True),
        forward_hooks([*_hooks(sites, layers, store, full=full), *on_qkv]),
        forward_hooks(_z_hooks(sites, layers, store) if full else [], pre=True),
    ):
        capture.run_until(lambda: sites.run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False))
    missing = [
        f"{name} of layer {layer}"
        for name, table in (("input", store.attn_in), ("q/k/v projection output", store.qkv))
        for layer in layers
        if layer not in table
    ]
    if full:
        missing += [f"z of layer {layer}" for layer in layers if layer not in store.z]
    missing += [f"output of layer {layer}" for layer in layers if layer not in store.attn_out]
    missing += [
        f"the rotation of layer {layer}"
        for layer in rotated
        if adapter.specs[layer].rotary_dim and layer not in store.rotations
    ]
    if full and store.hidden is None:
        missing.append("the final layer norm's output")
    if missing:
        raise AttentionCaptureError(f"the forward pass did not reach every traced module: missing {', '.join(missing)}")
    if patterns:
        _check_attentions(store.weights, adapter, ids.shape, layers)
        store.checked = True
    return store


def _check_attentions(
    attentions: dict[int, Tensor], adapter: Adapter, shape: torch.Size, layers: tuple[int, ...]
) -> None:
    """Check that the model's attention probabilities are there for every layer, and of the right shape."""
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
