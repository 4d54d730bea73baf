"""The one pattern tap: each layer's attention pattern from a running model, handed to a sink as the layer runs.

A :class:`Tap` hooks, for each layer asked for, the layer's q/k/v site (and, for rotary architectures, the rotation
its attention module receives), and runs the model's base transformer with its own attention kernel. Each layer's
pattern is then either

* the kernel's own: an eager kernel hands out the pattern it has just computed (bitwise the model's), and it is read
  from the attention module's output; or
* recomputed from the layer's own q and k inside the q/k/v hook, in the arithmetic order of the installed release's
  eager kernel (:func:`masked_scores`, :func:`softmax_into`), which :func:`attnlens.verify` uses too.

The kernel's pattern is read for every layer but the last when nothing after the last layer's q/k/v is asked for:
the forward pass stops at that projection, and computing one pattern costs less than running the layer's kernel to
the end. The forward pass stops after the last layer needed. What the tap sees goes to a :class:`Sink`:
:func:`attnlens.trace` stores it, :func:`attnlens.scan` reduces it at once.

Query rows with no key to attend to (left padding) have an all-zero pattern, whatever the kernel left there.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens import _rows, capture, functional
from attnlens.errors import AttentionCaptureError
from attnlens.models import QKV, Adapter, AttentionSpec, Rotation

__all__ = ["Sink", "Tap", "Wants", "kernel_specs", "masked_scores", "qkv_hooks", "softmax_into"]

_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ the arithmetic ---


def masked_scores(q: Tensor, k: Tensor, spec: AttentionSpec, blocked: Tensor, *, contiguous_k: bool) -> Tensor:
    """A layer's scaled scores ``[batch, head, q_pos, k_pos]`` in the model's kernel arithmetic, ``-inf`` if blocked.

    ``contiguous_k`` matches a kernel that reads the keys back from its cache (contiguous), whose matmul rounds
    differently from one on a strided view.
    """
    k_c = k.contiguous() if contiguous_k else k
    scores = functional.attention_scores(q, k_c, spec.scale, upcast=spec.upcast, divisors=spec.divisors)
    # The same maths as functional.masked_softmax, but in place on the scores (which are ours).
    scores.masked_fill_(blocked, float("-inf"))
    return scores


def softmax_into(scores: Tensor, out: Tensor, dead: Tensor | None) -> None:
    """Soft-max masked ``scores`` straight into ``out`` (a stored pattern is allocated once, never copied).

    Half scores are soft-maxed in float32 and cast to ``out``'s dtype; rows in ``dead`` (no key to attend to) are 0.
    """
    if scores.dtype == out.dtype and scores.dtype not in _HALF:
        torch.softmax(scores, dim=-1, out=out)
    else:
        out.copy_(torch.softmax(scores.float(), dim=-1))
    if dead is not None:
        out.masked_fill_(dead, 0.0)


def kernel_specs(adapter: Adapter, *, caller: str, stacklevel: int) -> tuple[AttentionSpec, ...]:
    """Each layer's spec in the arithmetic of the kernel the model runs; warns when that is not what its modules say.

    ``stacklevel`` counts from the caller of this function, as :func:`warnings.warn`'s does.
    """
    if adapter.kernel_departure is not None:
        warnings.warn(
            f"{adapter.kernel_departure}, and so does this {caller}; load it with attn_implementation='eager' for the "
            "config's maths",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return adapter.kernel_specs


def _with_query_heads(qkv: QKV, n_heads: int, cached: bool = False) -> QKV:
    """Keys and values repeated to one per query head (grouped-query attention), as the kernels repeat them.

    In transformers' layout: ``repeat_kv`` (a stride-0 view for one key/value head, else a copy) of the keys as the
    kernel reads them (``cached``: contiguous, back from the cache), so that the scores' matmul rounds as the model's.
    """
    q, k, v = qkv
    if k.shape[1] == n_heads:
        return qkv
    groups = n_heads // k.shape[1]
    return QKV(q, functional.repeat_kv(k.contiguous() if cached else k, groups), functional.repeat_kv(v, groups))


# --------------------------------------------------------------------------------------- q/k/v hooks ---

Hook = Callable[..., Any]


def qkv_hooks(
    adapter: Adapter, layers: Sequence[int], on_qkv: Callable[[int, QKV], None]
) -> tuple[list[tuple[nn.Module, Hook]], list[tuple[nn.Module, Hook]]]:
    """Hooks that hand each layer's q, k, v, as its kernel receives them, to ``on_qkv(layer, qkv)``.

    The outputs of a layer's q/k/v modules (``LayerSites.qkv``: one fused projection, or several) are collected until
    the last of them has run, then split into heads by :meth:`~attnlens.models.Adapter.split_qkv`, with the rotation
    the layer's attention module received (rotary architectures only).

    Returns:
        ``(forward_hooks, pre_hooks_with_kwargs)``: register the first with :func:`attnlens.capture.forward_hooks`,
        the second with ``pre=True, with_kwargs=True`` (they catch the rotary rotation; empty without rotary).
    """
    sites = adapter.sites
    post: list[tuple[nn.Module, Hook]] = []
    pre: list[tuple[nn.Module, Hook]] = []
    rotations: dict[int, Rotation | None] = {}

    def collect(layer: int, index: int, outputs: dict[int, Tensor], n_modules: int) -> Hook:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            outputs[index] = output
            if index < n_modules - 1:
                return
            if len(outputs) != n_modules:
                raise AttentionCaptureError(f"layer {layer}: its last q/k/v module ran before the others")
            raw = tuple(outputs[i] for i in range(n_modules))
            outputs.clear()
            on_qkv(layer, adapter.split_qkv(layer, raw, rotations.pop(layer, None)))

        return hook

    def rotation(layer: int) -> Hook:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            rotations[layer] = adapter.rotation(layer, args, kwargs)

        return hook

    for layer in layers:
        site = sites.layers[layer]
        outputs: dict[int, Tensor] = {}
        post += [(module, collect(layer, i, outputs, len(site.qkv))) for i, module in enumerate(site.qkv)]
        if adapter.specs[layer].rotary_dim:
            pre.append((site.attn, rotation(layer)))
    return post, pre


# ------------------------------------------------------------------------------------------------ the tap ---


class Sink:
    """What a :class:`Tap` hands each layer's results to; override what you ask for (:class:`Wants`).

    Tensors handed over are views of the model's own where noted: copy what you keep.
    """

    def pattern_buffer(
        self, layer: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """Where to write a layer's pattern (allocated once, e.g. a slot of a stack), or None for a fresh tensor."""
        return None

    def pattern(self, layer: int, pattern: Tensor) -> None:
        """A layer's pattern ``[batch, head, q_pos, k_pos]`` (the buffer, a fresh tensor, or the kernel's own)."""

    def scores(self, layer: int, scores: Tensor) -> None:
        """A layer's masked scores ``[batch, head, q_pos, k_pos]`` (``-inf`` where blocked; the tap's own tensor)."""

    def qkv(self, layer: int, qkv: QKV) -> None:
        """A layer's q, k, v ``[batch, head, pos, d_head]``, k and v repeated per query head (grouped-query).

        Views of the model's tensors when every head is kept and none is repeated.
        """

    def z(self, layer: int, z: Tensor, W_O: Tensor) -> None:
        """A layer's z ``[batch, pos, head, d_head]`` and its ``W_O`` ``[head, d_head, d_model]`` (views)."""


@dataclass(frozen=True)
class Wants:
    """What a sink asks the tap for: each layer's pattern, masked scores, q/k/v, z (with its ``W_O``)."""

    pattern: bool = True
    scores: bool = False
    qkv: bool = False
    z: bool = False


class Tap:
    """Per-layer patterns (and what else a sink wants) from forward passes of a model, to a sink.

    Hooks are added by :meth:`hooked` and removed when its block ends; :meth:`run` then runs one forward pass.

    Args:
        adapter: the model's adapter.
        layers: the layers to tap (in range, distinct).
        heads: the heads to keep, or None for all.
        sink: where the results go.
        wants: what the sink asks for.
        specs: each layer's spec as the kernel computes it (see :func:`kernel_specs`).
    """

    def __init__(
        self,
        adapter: Adapter,
        layers: Sequence[int],
        heads: Sequence[int] | None,
        sink: Sink,
        wants: Wants,
        specs: Sequence[AttentionSpec],
    ) -> None:
        self.adapter, self.layers, self.sink, self.wants, self.specs = adapter, tuple(layers), sink, wants, specs
        self.sites = adapter.sites
        n_heads = adapter.n_heads
        self.all_heads = heads is None or tuple(heads) == tuple(range(n_heads))
        self.heads = tuple(range(n_heads)) if heads is None else tuple(heads)
        self.head_index: Tensor | None = None
        self.last = max(self.layers)
        # The model runs with its own use_cache default. With the cache on, its kernel gets the keys back from the
        # cache, contiguous, and the matmul rounds differently on a strided view: match it, bit for bit.
        self.contiguous_k = adapter.use_cache
        # Grouped keys are made contiguous before they are repeated (_with_query_heads), as the kernel's are.
        self.contiguous_scores_k = adapter.use_cache and adapter.n_kv_heads == n_heads
        self.want_qkv = wants.pattern or wants.scores or wants.qkv
        self.from_kernel = (
            {layer for layer in self.layers if adapter.kernel_returns_pattern and (layer != self.last or wants.z)}
            if wants.pattern
            else set()
        )
        self.done: dict[str, set[int]] = {"qkv": set(), "z": set(), "pattern": set()}
        self.fused: dict[int, QKV] = {}  # a kernel layer's q/k/v, should its kernel not hand out the pattern
        self.blocked = torch.empty(0, dtype=torch.bool)
        self.dead: Tensor | None = None
        self.windows: dict[int, Tensor] = {}
        self.shape: tuple[int, ...] = ()
        # Query rows asked for ([batch, row] positions), or None for all: then no [q_pos, k_pos] mask is built.
        self.rows: Tensor | None = None
        self.mask: Tensor | None = None

    # The masks of one forward pass, broadcast over heads: computed once for all layers.
    def _masks(self, ids: Tensor, mask: Tensor | None) -> None:
        n_pos = ids.shape[1]
        self.shape = (ids.shape[0], self.adapter.n_heads, n_pos, n_pos)
        self.windows = {}
        self.mask = mask
        if not (self.wants.pattern or self.wants.scores):  # q/k/v or z only: no mask needed, none of pos^2 built
            self.dead = None
            return
        if self.rows is not None:
            # Each layer's rows mask is built from the positions (_blocked): never a square.
            no_key = ~_rows.allowed_keys(self.rows, mask, n_pos, None).any(dim=-1, keepdim=True)
            self.dead = no_key if bool(no_key.any()) else None
            return
        if mask is not None and not bool(mask.all()):
            allowed = functional.padding_mask(mask)
        else:
            allowed = functional.causal_mask(n_pos, device=ids.device)
        self.blocked = ~allowed
        # Query rows with no key to attend to (left padding) are NaN after softmax and set to zero.
        no_key = ~allowed.any(dim=-1, keepdim=True)
        self.dead = no_key if bool(no_key.any()) else None

    def _blocked(self, layer: int) -> Tensor:
        window = self.specs[layer].window
        if self.rows is not None:
            key = -1 if window is None else window
            if key not in self.windows:
                self.windows[key] = ~_rows.allowed_keys(self.rows, self.mask, self.shape[-1], window)
            return self.windows[key]
        if window is None:
            return self.blocked
        if window not in self.windows:
            n_pos = self.blocked.shape[-1]
            index = torch.arange(n_pos, device=self.blocked.device)
            self.windows[window] = self.blocked | (index[:, None] - index[None, :] >= window)
        return self.windows[window]

    def _select(self, x: Tensor) -> Tensor:
        return x if self.head_index is None else x.index_select(1, self.head_index)

    def _recompute(self, layer: int, q: Tensor, k: Tensor, dtype: torch.dtype, scores: Tensor | None = None) -> None:
        if self.rows is not None and scores is None:
            q_rows = _rows.gather_rows(q, self.rows)
            shape = (*q_rows.shape[:-1], k.shape[-2])
            out = self.sink.pattern_buffer(layer, shape, dtype, q.device)
            if out is None:
                out = torch.empty(shape, dtype=dtype, device=q.device)
            _rows.pattern_rows(q_rows, k, self.specs[layer], ~self._blocked(layer), out)
            self.sink.pattern(layer, out)
            return
        if scores is None:
            scores = masked_scores(q, k, self.specs[layer], self._blocked(layer), contiguous_k=self.contiguous_scores_k)
        out = self.sink.pattern_buffer(layer, tuple(scores.shape), dtype, scores.device)
        if out is None:
            out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
        softmax_into(scores, out, self.dead)
        self.sink.pattern(layer, out)

    def _on_qkv(self, layer: int, qkv: QKV) -> None:
        q, k, v = (self._select(x) for x in _with_query_heads(qkv, self.adapter.n_heads, self.contiguous_k))
        recompute = self.wants.pattern and layer not in self.from_kernel
        if self.wants.scores:
            q_scored = q if self.rows is None else _rows.gather_rows(q, self.rows)
            scores = masked_scores(
                q_scored, k, self.specs[layer], self._blocked(layer), contiguous_k=self.contiguous_scores_k
            )
            self.sink.scores(layer, scores)
            if recompute:
                self._recompute(layer, q, k, v.dtype, scores)
            del scores
        elif recompute:
            self._recompute(layer, q, k, v.dtype)
        if layer in self.from_kernel:
            self.fused[layer] = qkv  # references only: the model holds them until its kernel has run
        if self.wants.qkv:
            self.sink.qkv(layer, QKV(q, k, v))
        self.done["qkv"].add(layer)
        if layer == self.last and not self.wants.z:
            raise capture.StopForward

    def _on_attn(self, layer: int) -> Hook:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            qkv = self.fused.pop(layer)
            pattern = self.adapter.kernel_pattern(output)
            if pattern is not None and tuple(pattern.shape) != self.shape:
                pattern = None  # not the pattern of these inputs: never use what is not known to be it
            if pattern is None:  # the kernel kept it to itself after all: compute it as for any other kernel
                q, k, v = (self._select(x) for x in _with_query_heads(qkv, self.adapter.n_heads, self.contiguous_k))
                self._recompute(layer, q, k, v.dtype)
            else:
                if self.rows is not None:  # the kernel formed the square anyway: its own rows, copied
                    pattern = _rows.gather_rows(pattern, self.rows)
                shape = (self.shape[0], len(self.heads), *pattern.shape[2:])
                out = self.sink.pattern_buffer(layer, shape, pattern.dtype, pattern.device)
                dead = self.dead
                if out is None:  # the kernel's own tensor (or its heads), never changed in place
                    out = self._select(pattern)
                    if dead is not None:
                        out = out.masked_fill(dead, 0.0)
                else:
                    if self.head_index is None:
                        out.copy_(pattern)
                    else:
                        torch.index_select(pattern, 1, self.head_index, out=out)
                    if dead is not None:  # the kernel leaves an additive mask's leftovers there; ours are 0
                        out.masked_fill_(dead, 0.0)
                self.sink.pattern(layer, out)
            self.done["pattern"].add(layer)
            if layer == self.last:
                raise capture.StopForward

        return hook

    def _on_z(self, layer: int) -> Hook:
        def hook(module: nn.Module, args: Any) -> None:
            z = rearrange(args[0], "batch pos (head d_head) -> batch pos head d_head", head=self.adapter.n_heads)
            W_O = self.adapter.W_O(layer)
            if self.head_index is not None:
                z, W_O = z.index_select(2, self.head_index), W_O.index_select(0, self.head_index)
            self.sink.z(layer, z, W_O)
            self.done["z"].add(layer)
            if layer == self.last and layer not in self.from_kernel:  # else its kernel's pattern is still to come
                raise capture.StopForward

        return hook

    @contextlib.contextmanager
    def hooked(self) -> Iterator[Tap]:
        """Add the tap's hooks for the ``with`` block (removed after, also on error)."""
        post, pre_kwargs = qkv_hooks(self.adapter, self.layers, self._on_qkv) if self.want_qkv else ([], [])
        post += [(self.sites.layers[layer].attn, self._on_attn(layer)) for layer in sorted(self.from_kernel)]
        pre = [(self.sites.layers[layer].z, self._on_z(layer)) for layer in self.layers] if self.wants.z else []
        with (
            capture.forward_hooks(pre_kwargs, pre=True, with_kwargs=True),
            capture.forward_hooks(post),
            capture.forward_hooks(pre, pre=True),
        ):
            yield self

    def run(
        self, ids: Tensor, mask: Tensor | None = None, pos: Tensor | None = None, rows: Tensor | None = None
    ) -> None:
        """One forward pass on checked inputs (inside :meth:`hooked`), stopped after the last layer needed.

        With ``rows`` (``[batch, row]`` query positions, from :func:`attnlens._rows.query_positions`) patterns and
        scores hold those query rows only, ``[batch, head, row, k_pos]``, computed without the square.

        Raises:
            AttentionCaptureError: a tapped layer never ran.
        """
        if not self.all_heads and (self.head_index is None or self.head_index.device != ids.device):
            self.head_index = torch.tensor(self.heads, device=ids.device)
        self.rows = rows
        self._masks(ids, mask)
        for seen in self.done.values():
            seen.clear()
        self.fused.clear()
        capture.run_until(
            lambda: self.sites.run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=self.contiguous_k)
        )
        wanted = set(self.layers)
        missing = wanted - self.done["qkv"] if self.want_qkv else set()
        missing |= wanted - self.done["z"] if self.wants.z else set()
        missing |= self.from_kernel - self.done["pattern"]
        if missing:
            raise AttentionCaptureError(f"layers {sorted(missing)} never ran their attention; nothing was captured")
