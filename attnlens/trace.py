"""Attention patterns (and on request scores, q, k, v, z and per-head results) from a GPT-2 model as it runs.

:func:`trace` hooks the fused q/k/v projection of each traced layer while the model runs with its own attention
kernel (an SDPA model stays SDPA), and recomputes each layer's pattern from that layer's q and k inside the hook, in
the arithmetic order of the installed transformers release's eager kernel. An eager kernel hands out the pattern it
has just computed, so there it is copied from the attention module's output instead (except for the last traced
layer when the forward pass stops at its projection: recomputing one pattern costs less than running the layer on).
So the patterns are the model's own: bitwise for an eager-run model (both ways, tests/test_trace.py), within float
rounding of the kernel for an SDPA-run one (whose hidden states differ from eager's by that rounding).

Caveats:

* Only the base ``GPT2Model`` runs, never a task head, and the forward pass stops right after the last traced
  layer: a trace of layer 0 costs a fraction of a full forward pass.
* Query rows of left padding have no key they may attend to: their pattern is all zeros (Hugging Face returns
  something else there, depending on the release and the kernel). Only rows of real tokens mean anything.
* Half-precision scores are soft-maxed in float32 and the pattern is cast back to the model's dtype.
* Per-head results exclude the output bias ``b_O`` (it belongs to no head): ``result.sum(head) + b_O`` is the
  attention output.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from attnlens import capture, functional
from attnlens._indices import check_indices
from attnlens.attention_trace import STORE_NAMES, AttentionTrace
from attnlens.errors import AttentionCaptureError
from attnlens.models import Adapter, AttentionSpec, adapt

__all__ = ["STORE_NAMES", "AttentionTrace", "trace"]

_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ tracing ---


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


def _bos_id(tokenizer: Any) -> int:
    """The tokenizer's beginning-of-sequence id: its bos token, else its eos token (GPT-2's ``<|endoftext|>``)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "prepend_bos=True needs a beginning-of-sequence token, but the tokenizer has neither a bos nor an eos token; "
        "set tokenizer.bos_token, or put the id in front of the token ids yourself"
    )


def _tokenize(texts: list[str], tokenizer: Any, prepend_bos: bool = False) -> tuple[Tensor, Tensor]:
    """Token ids and mask of texts, padded on the tokenizer's side with its pad (else end-of-text, else 0) id.

    With ``prepend_bos``, every text starts with the tokenizer's bos id (else its eos id), in front of the text and
    behind any left padding: the bos is each sequence's first real token.
    """
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    if prepend_bos and getattr(tokenizer, "add_bos_token", False) is True:
        raise ValueError(
            "prepend_bos=True, but the tokenizer already puts a bos token in front of every text (add_bos_token=True):"
            " the text would start with two; drop prepend_bos"
        )
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    if any(not row for row in rows):
        raise ValueError("a text tokenizes to no tokens at all")
    if prepend_bos:
        bos = _bos_id(tokenizer)
        rows = [[bos, *row] for row in rows]
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    pad = 0 if pad is None else int(pad)
    width = max(len(row) for row in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if left else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _masked_scores(
    q: Tensor,
    k: Tensor,
    spec: AttentionSpec,
    blocked: Tensor,
    *,
    contiguous_k: bool,
) -> Tensor:
    """A layer's scaled scores ``[batch, head, q_pos, k_pos]`` in the model's kernel arithmetic, ``-inf`` if blocked.

    ``contiguous_k`` matches a kernel that reads the keys back from its cache (contiguous), whose matmul rounds
    differently from one on a strided view.
    """
    k_c = k.contiguous() if contiguous_k else k
    scores = functional.attention_scores(q, k_c, spec.scale, upcast=spec.upcast, divisors=spec.divisors)
    # The same maths as functional.masked_softmax, but in place on the scores (which are ours).
    scores.masked_fill_(blocked, float("-inf"))
    return scores


def _softmax_into(scores: Tensor, out: Tensor, dead: Tensor | None) -> None:
    """Soft-max masked ``scores`` straight into ``out`` (a layer's pattern is allocated once, never copied).

    Half scores are soft-maxed in float32 and cast to ``out``'s dtype; rows in ``dead`` (no key to attend to) are 0.
    """
    if scores.dtype == out.dtype and scores.dtype not in _HALF:
        torch.softmax(scores, dim=-1, out=out)
    else:
        out.copy_(torch.softmax(scores.float(), dim=-1))
    if dead is not None:
        out.masked_fill_(dead, 0.0)


def _kernel_specs(adapter: Adapter, *, stacklevel: int, caller: str) -> tuple[AttentionSpec, ...]:
    """Each layer's spec in the arithmetic of the kernel the model runs; warns when that is not what its modules say."""
    if adapter.kernel_departure is not None:
        warnings.warn(
            f"{adapter.kernel_departure}, and so does this {caller}; load it with attn_implementation='eager' for the "
            "config's maths",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return adapter.kernel_specs


@capture.one_at_a_time
def trace(
    model: nn.Module | Adapter,
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    store: str | Iterable[str] = ("pattern",),
    tokenizer: Any = None,
    position_ids: Tensor | Any | None = None,
    prepend_bos: bool = False,
) -> AttentionTrace:
    """Run a GPT-2 model on some inputs and keep the attention of the layers asked for.

    The model keeps its own attention kernel; each traced layer's pattern is recomputed from its own q and k (the
    fused q/k/v projection) inside a hook, or under the eager kernel taken from the kernel itself, so an eager-run
    model's patterns are bitwise its ``output_attentions`` (but for rows with no key to attend to: 0 here).
    Only the base ``GPT2Model`` runs, in eval mode and without gradients, and only up to the last traced layer. The
    model is left exactly as it was found, also on error. Calls on one model from several threads run one at a time,
    each giving its single-threaded result; attnlens's hooks never act on a forward pass the user runs meanwhile.

    Args:
        model: a Hugging Face GPT-2 model of any supported class (or its :class:`~attnlens.models.Adapter`).
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids; or, with ``tokenizer``, a text or a list of texts
            (padded on the tokenizer's ``padding_side`` to the longest).
        attention_mask: ``[batch, pos]``, 1 for tokens and 0 for padding; only with token ids.
        layers: the layers to trace (negative numbers count from the end), in the order the stacks will follow;
            default all. Any integers: Python, numpy, or an integer array or tensor.
        heads: the heads to keep in every per-head tensor; default all.
        store: what to keep per layer, any of ``"pattern"``, ``"scores"``, ``"q"``, ``"k"``, ``"v"``, ``"z"``,
            ``"result"`` (see :class:`AttentionTrace`).
        tokenizer: turns texts into ids, and gives the token strings kept for display.
        position_ids: ``[batch, pos]`` positions, passed to the model as given.
        prepend_bos: with text, put the tokenizer's bos token (else its eos token; GPT-2's ``<|endoftext|>``) in
            front of every text, as GPT-2 is usually run; it is then each sequence's first real token (behind any
            left padding). Default ``False``: the text's own tokens only. Token ids are used as given, so with ids
            it is refused: put the id in front yourself.

    Returns:
        The :class:`AttentionTrace`.

    Raises:
        ValueError: bad ``layers`` / ``heads`` (not integers, out of range, repeated), unknown ``store`` names, text
            without a tokenizer, ``prepend_bos`` with token ids or with a tokenizer that has no bos/eos token (or
            adds one itself), or inputs that :meth:`attnlens.models.Adapter.check_inputs` refuses.
        TypeError: ``model`` is a name or path (load it first), ``store`` is not names, ``input_ids`` is not
            token ids at all, or ``prepend_bos`` is not a bool.
        UnsupportedModelError: not a supported GPT-2 model, an attention kernel outside
            the adapter's ``exact_kernels``, or attention modules that disagree with the config.
        AttentionCaptureError: a traced layer never ran.

    Example:
        >>> tr = attnlens.trace(model, "The cat sat on the mat", tokenizer=tok, layers=[0, 5])
        >>> tr.pattern(5).shape  # [batch, head, q_pos, k_pos]
    """
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"trace needs a loaded model, got the name or path {os.fspath(model)!r}: load it first, e.g. "
            "attnlens.models.load(path) or transformers' from_pretrained (verify and extract_weights also take a path)"
        )
    adapter = adapt(model)
    sites = adapter.sites
    adapter.check_kernel()
    names = _check_store(store)
    layer_list = check_indices(layers, adapter.n_layers, "layers")
    head_list = check_indices(heads, adapter.n_heads, "heads")

    is_text = isinstance(input_ids, str) or (
        isinstance(input_ids, (list, tuple)) and bool(input_ids) and all(isinstance(t, str) for t in input_ids)
    )
    if is_text:
        if tokenizer is None:
            raise ValueError("input_ids is text; pass tokenizer=... to turn it into token ids (or pass token ids)")
        if attention_mask is not None:
            raise ValueError("attention_mask comes from the tokenizer when input_ids is text; do not pass one")
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        input_ids, attention_mask = _tokenize(texts, tokenizer, prepend_bos)
    elif prepend_bos is not False:
        raise ValueError(
            "prepend_bos applies to text; token ids are used as given: put the bos id in front of them yourself "
            "(and a 1 in front of each attention_mask row)"
        )
    ids, mask, pos = adapter.check_inputs(input_ids, attention_mask, position_ids)
    tokens = None
    if tokenizer is not None:
        from attnlens.viz.labels import token_texts  # each id decoded alone; a partial UTF-8 character as its bytes

        tokens = [token_texts(tokenizer, row) for row in ids.tolist()]

    n_pos = ids.shape[1]
    n_head = adapter.n_heads
    specs = _kernel_specs(adapter, stacklevel=3, caller="trace")  # past one_at_a_time's wrapper, to the caller
    # The model runs with its own use_cache default. With the cache on, its kernel gets the keys back from the cache,
    # contiguous, and the matmul rounds differently on a strided view: match it to reproduce its numbers bit for bit.
    contiguous_k = adapter.use_cache
    slots = {layer: slot for slot, layer in enumerate(layer_list)}
    head_index = None if len(head_list) == n_head and head_list == tuple(range(n_head)) else torch.tensor(head_list)
    if head_index is not None:
        head_index = head_index.to(ids.device)
    want_qkv = any(n in names for n in ("pattern", "scores", "q", "k", "v"))
    want_z = "z" in names or "result" in names
    last = max(layer_list)

    # The masks are built once for all layers, and broadcast over heads.
    if mask is not None and not bool(mask.all()):
        allowed = functional.padding_mask(mask)
    else:
        allowed = functional.causal_mask(n_pos, device=ids.device)
    blocked = ~allowed
    # Query rows with no key to attend to (left padding) are NaN after softmax and set to zero, as masked_softmax does.
    no_key = ~allowed.any(dim=-1, keepdim=True)
    dead = no_key if bool(no_key.any()) else None

    stacks: dict[str, Tensor] = {}
    done: dict[str, set[int]] = {"qkv": set(), "z": set(), "pattern": set()}
    # An eager kernel hands out the pattern it has just computed (bitwise the model's own): take it there instead of
    # computing it again. Not for the last traced layer when nothing after its q/k/v is asked for: the forward stops
    # at its projection, and computing one pattern costs less than running that layer's kernel to the end.
    from_kernel = (
        {layer for layer in layer_list if adapter.kernel_returns_pattern and (layer != last or want_z)}
        if "pattern" in names
        else set()
    )
    fused: dict[int, Tensor] = {}  # a kernel layer's q/k/v projection, should its kernel not hand out the pattern

    def put(name: str, slot: int, x: Tensor) -> None:
        if name not in stacks:
            stacks[name] = torch.empty((len(layer_list), *x.shape), dtype=x.dtype, device=x.device)
        stacks[name][slot].copy_(x)

    def pattern_out(slot: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        """A layer's slot in the pattern stack (allocated once, in ``dtype``: v's, as the kernel's pattern is)."""
        if "pattern" not in stacks:
            shape = (len(layer_list), like.shape[0], len(head_list), n_pos, n_pos)
            stacks["pattern"] = torch.empty(shape, dtype=dtype, device=like.device)
        return stacks["pattern"][slot]

    def recompute_pattern(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, slot: int) -> None:
        scores = _masked_scores(q, k, spec, blocked, contiguous_k=contiguous_k)
        _softmax_into(scores, pattern_out(slot, scores, v.dtype), dead)

    def on_qkv(layer: int) -> Callable[[nn.Module, Any, Tensor], None]:
        spec, slot = specs[layer], slots[layer]
        recompute = "pattern" in names and layer not in from_kernel

        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            q, k, v = adapter.split_qkv(layer, (output,))
            if head_index is not None:
                q, k, v = (x.index_select(1, head_index) for x in (q, k, v))
            if "scores" in names:
                scores = _masked_scores(q, k, spec, blocked, contiguous_k=contiguous_k)
                put("scores", slot, scores)
                if recompute:
                    _softmax_into(scores, pattern_out(slot, scores, v.dtype), dead)
                del scores
            elif recompute:
                recompute_pattern(q, k, v, spec, slot)
            if layer in from_kernel:
                fused[layer] = output  # a reference only: the model holds it until its kernel has run
            for name, x in (("q", q), ("k", k), ("v", v)):
                if name in names:
                    put(name, slot, x)
            done["qkv"].add(layer)
            if layer == last and not want_z:
                raise capture.StopForward

        return hook

    def on_attn(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        spec, slot = specs[layer], slots[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            projection = fused.pop(layer)
            weights = adapter.kernel_pattern(output)
            if weights is not None and tuple(weights.shape) != (ids.shape[0], n_head, n_pos, n_pos):
                weights = None  # not the pattern of these inputs: never copy what is not known to be it
            if weights is None:  # the kernel kept it to itself after all: compute it as for any other kernel
                q, k, v = adapter.split_qkv(layer, (projection,))
                if head_index is not None:
                    q, k = (x.index_select(1, head_index) for x in (q, k))
                recompute_pattern(q, k, v, spec, slot)
            else:
                out = pattern_out(slot, weights, weights.dtype)
                if head_index is None:
                    out.copy_(weights)
                else:
                    torch.index_select(weights, 1, head_index, out=out)
                if dead is not None:  # the kernel leaves an additive mask's leftovers there; trace's rows are 0
                    out.masked_fill_(dead, 0.0)
            done["pattern"].add(layer)
            if layer == last:
                raise capture.StopForward

        return hook

    def on_z(layer: int) -> Callable[[nn.Module, Any], None]:
        slot = slots[layer]

        def hook(module: Any, args: Any) -> None:
            z = rearrange(args[0], "batch pos (head d_head) -> batch pos head d_head", head=n_head)
            W_O = adapter.W_O(layer)
            if head_index is not None:
                z, W_O = z.index_select(2, head_index), W_O.index_select(0, head_index)
            if "z" in names:
                put("z", slot, z)
            if "result" in names:
                result = einsum(z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
                put("result", slot, result)
            done["z"].add(layer)
            if layer == last and last not in from_kernel:  # else its kernel's pattern is still to come
                raise capture.StopForward

        return hook

    # One fused q/k/v module per layer here (the tap of the next step takes any).
    post = [(sites.layers[i].qkv[0], on_qkv(i)) for i in layer_list] if want_qkv else []
    post += [(sites.layers[i].attn, on_attn(i)) for i in sorted(from_kernel)]
    pre = [(sites.layers[i].z, on_z(i)) for i in layer_list] if want_z else []

    def forward() -> None:
        sites.run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=contiguous_k)

    with capture.preserved(adapter), torch.no_grad(), capture.forward_hooks(post), capture.forward_hooks(pre, pre=True):
        capture.run_until(forward)

    missing = sorted(set(layer_list) - done["qkv"]) if want_qkv else []
    missing += sorted(set(layer_list) - done["z"]) if want_z else []
    missing += sorted(from_kernel - done["pattern"])
    if missing:
        raise AttentionCaptureError(f"layers {sorted(set(missing))} never ran their attention; nothing was captured")
    return AttentionTrace(
        layers=layer_list,
        heads=head_list,
        n_heads=n_head,
        stored=names,
        input_ids=ids.clone(),
        attention_mask=(torch.ones_like(ids) if mask is None else mask.clone()),
        tokens=tokens,
        provenance=adapter.provenance(),
        _stacks=stacks,
    )
