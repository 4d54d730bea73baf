"""Attention patterns (and on request scores, q, k, v, z and per-head results) from a model as it runs.

:func:`trace` stores what the pattern tap (:mod:`attnlens.patterns`) hands it, layer by layer, while the model runs
with its own attention kernel (an SDPA model stays SDPA): each layer's pattern recomputed from that layer's q and k
in the arithmetic order of the installed transformers release's eager kernel, or, where an eager kernel hands out
the pattern it has just computed, copied from the attention module's output.
So the patterns are the model's own: bitwise for an eager-run model (both ways, tests/test_trace.py), within float
rounding of the kernel for an SDPA-run one (whose hidden states differ from eager's by that rounding).

Caveats:

* Only the base transformer runs, never a task head, and the forward pass stops right after the last traced
  layer: a trace of layer 0 costs a fraction of a full forward pass.
* Query rows of left padding have no key they may attend to: their pattern is all zeros (Hugging Face returns
  something else there, depending on the release and the kernel). Only rows of real tokens mean anything.
* Half-precision scores are soft-maxed in float32 and the pattern is cast back to the model's dtype.
* Per-head results exclude the output bias ``b_O`` (it belongs to no head): ``result.sum(head) + b_O`` is the
  attention output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from einops import einsum
from torch import Tensor, nn

from attnlens import capture
from attnlens._indices import layers_and_heads
from attnlens._rows import query_positions
from attnlens.attention_trace import STORE_NAMES, AttentionTrace
from attnlens.loading import resolve
from attnlens.models import QKV, Adapter, adapt
from attnlens.patterns import Sink, Tap, Wants, kernel_specs
from attnlens.tokens import text_inputs, token_texts

__all__ = ["STORE_NAMES", "AttentionTrace", "trace"]


def _check_store(store: str | Iterable[str]) -> tuple[str, ...]:
    if not isinstance(store, Iterable):
        raise TypeError(f"store must be a name or a list of names from {', '.join(STORE_NAMES)}, got {store!r}")
    names = (store,) if isinstance(store, str) else tuple(store)
    unknown = [n for n in names if n not in STORE_NAMES]
    if unknown:
        raise ValueError(f"unknown store name(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    if not names:
        raise ValueError(f"store is empty; name at least one of {', '.join(STORE_NAMES)}")
    return tuple(n for n in STORE_NAMES if n in names)


class _Stacks(Sink):
    """Keeps what a trace stores: one stack per name, ``[layer, ...]``, allocated at a layer's first tensor."""

    def __init__(self, layers: tuple[int, ...], names: tuple[str, ...]) -> None:
        self.slots = {layer: slot for slot, layer in enumerate(layers)}
        self.names = names
        self.stacks: dict[str, Tensor] = {}

    def put(self, name: str, layer: int, x: Tensor) -> None:
        if name not in self.stacks:
            self.stacks[name] = torch.empty((len(self.slots), *x.shape), dtype=x.dtype, device=x.device)
        self.stacks[name][self.slots[layer]].copy_(x)

    def pattern_buffer(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        # The pattern is soft-maxed (or copied) straight into its slot: allocated once, in the first layer's dtype.
        if "pattern" not in self.stacks:
            self.stacks["pattern"] = torch.empty((len(self.slots), *shape), dtype=dtype, device=device)
        return self.stacks["pattern"][self.slots[layer]]

    def scores(self, layer: int, scores: Tensor) -> None:
        self.put("scores", layer, scores)

    def qkv(self, layer: int, qkv: QKV) -> None:
        # The tap hands them out head-major, as the kernels read them; the trace keeps [batch, pos, head, d_head],
        # the order of z and of the fused projection itself (so the copy reads its source nearly in order).
        for name, x in zip(("q", "k", "v"), qkv, strict=True):
            if name in self.names:
                self.put(name, layer, x.transpose(1, 2))

    def z(self, layer: int, z: Tensor, W_O: Tensor) -> None:
        if "z" in self.names:
            self.put("z", layer, z)
        if "result" in self.names:
            result = einsum(z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            self.put("result", layer, result)


@capture.one_at_a_time
def trace(
    model: nn.Module | Adapter | str | os.PathLike[str],
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | Iterable[tuple[int, int]] | None = None,
    store: str | Iterable[str] = ("pattern",),
    tokenizer: Any = None,
    position_ids: Tensor | Any | None = None,
    prepend_bos: bool = False,
    queries: Any = None,
) -> AttentionTrace:
    """Run a GPT-2 model on some inputs and keep the attention of the layers asked for.

    The model keeps its own attention kernel; each traced layer's pattern is recomputed from its own q and k (the
    fused q/k/v projection) inside a hook, or under the eager kernel taken from the kernel itself, so an eager-run
    model's patterns are bitwise its ``output_attentions`` (but for rows with no key to attend to: 0 here).
    Only the base transformer runs, in eval mode and without gradients, and only up to the last traced layer. The
    model is left exactly as it was found, also on error. Calls on one model from several threads run one at a time,
    each giving its single-threaded result; attnlens's hooks never act on a forward pass the user runs meanwhile.

    Args:
        model: a Hugging Face GPT-2 model of any supported class (or its :class:`~attnlens.models.Adapter`), or a
            hub name / local folder / ``"demo"``, loaded for this call by :func:`attnlens.load` (with its tokenizer).
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids; or, with ``tokenizer``, a text or a list of texts
            (padded on the tokenizer's ``padding_side`` to the longest).
        attention_mask: ``[batch, pos]``, 1 for tokens and 0 for padding; only with token ids.
        layers: the layers to trace (negative numbers count from the end), in the order the stacks will follow;
            default all. Any integers: Python, numpy, or an integer array or tensor.
        heads: the heads to keep in every per-head tensor: head numbers (the same in every layer), or
            ``(layer, head)`` pairs such as ``[(5, 1), (6, 9)]``, which name the layers too (leave ``layers`` None):
            the trace keeps the pairs' layers and, in each, the union of their heads (here layers 5, 6 and heads
            1, 9), in order of first appearance; the ``(layer, head, score)`` rows of ``HeadScores.top`` or
            ``ScanResult.top`` count as pairs. Default all.
        store: what to keep per layer, any of ``"pattern"``, ``"scores"``, ``"q"``, ``"k"``, ``"v"``, ``"z"``,
            ``"result"`` (see :class:`AttentionTrace`).
        tokenizer: turns texts into ids, and gives the token strings kept for display.
        position_ids: ``[batch, pos]`` positions, passed to the model as given.
        prepend_bos: with text, put the tokenizer's bos token (else its eos token; GPT-2's ``<|endoftext|>``) in
            front of every text, as GPT-2 is usually run; it is then each sequence's first real token (behind any
            left padding). Default ``False``: the text's own tokens only. Token ids are used as given, so with ids
            it is refused: put the id in front yourself.
        queries: only these query rows of ``pattern`` and ``scores``: ``"last"`` (each sequence's last real
            token), positions (negative from the end), or a ``slice``; default ``None``, every row. Each row is
            ``exp(s_i - lse_i)`` from the layer's q, k and the row's log-sum-exp, over chunks of keys: the
            ``[q_pos, k_pos]`` square is never formed (an eager kernel forms it anyway; its own rows are copied).
            The trace then holds ``[batch, head, row, k_pos]``; read it with :meth:`AttentionTrace.rows`.

    Returns:
        The :class:`AttentionTrace`.

    Raises:
        ValueError: bad ``layers`` / ``heads`` / ``queries`` (out of range, repeated), unknown ``store`` names, text
            without a tokenizer, ``prepend_bos`` with token ids or with a tokenizer that has no bos/eos token (or
            adds one itself), or inputs that :meth:`attnlens.models.Adapter.check_inputs` refuses.
        OSError: ``model`` is a name or path that could not be loaded.
        TypeError: ``store`` is not names, ``input_ids`` is not
            token ids at all, or ``prepend_bos`` is not a bool.
        UnsupportedModelError: not a supported GPT-2 model, an attention kernel outside
            the adapter's ``exact_kernels``, or attention modules that disagree with the config.
        AttentionCaptureError: a traced layer never ran.

    Example:
        >>> tr = attnlens.trace(model, "The cat sat on the mat", tokenizer=tok, layers=[0, 5])
        >>> tr.pattern(5).shape  # [batch, head, q_pos, k_pos]
    """
    model, tokenizer = resolve(model, tokenizer, "trace")
    adapter = adapt(model)
    adapter.check_kernel()
    names = _check_store(store)
    layer_list, head_list, _ = layers_and_heads(layers, heads, adapter.n_layers, adapter.n_heads)
    input_ids, attention_mask = text_inputs(input_ids, attention_mask, tokenizer, prepend_bos)
    ids, mask, pos = adapter.check_inputs(input_ids, attention_mask, position_ids)
    rows = None if queries is None else query_positions(queries, torch.ones_like(ids) if mask is None else mask)
    # Each id decoded alone; a partial UTF-8 character as its bytes.
    tokens = None if tokenizer is None else [token_texts(tokenizer, row) for row in ids.tolist()]
    specs = kernel_specs(adapter, caller="trace", stacklevel=3)  # past one_at_a_time's wrapper, to the caller

    sink = _Stacks(layer_list, names)
    wants = Wants(
        pattern="pattern" in names,
        scores="scores" in names,
        qkv=any(n in names for n in ("q", "k", "v")),
        z="z" in names or "result" in names,
    )
    tap = Tap(adapter, layer_list, head_list, sink, wants, specs)
    with capture.preserved(adapter), torch.no_grad(), tap.hooked():
        tap.run(ids, mask, pos, rows)
    return AttentionTrace(
        layers=layer_list,
        heads=head_list,
        n_heads=adapter.n_heads,
        stored=names,
        input_ids=ids.clone(),
        attention_mask=(torch.ones_like(ids) if mask is None else mask.clone()),
        tokens=tokens,
        provenance=adapter.provenance(),
        _stacks=sink.stacks,
        queries=rows,
    )
