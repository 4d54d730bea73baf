"""Remove attention heads while a GPT-2 model runs, and measure how much each head matters.

:func:`ablate` is a context manager: inside its block, the chosen heads' outputs ``z`` (the merged heads entering
each attention's output projection, the ``LayerSites.z`` site) are replaced before they are projected, by a forward
pre-hook on that projection. The model's own forward pass runs otherwise untouched, with whatever attention kernel it
uses (eager, sdpa, ...). :func:`head_importance` ablates every head alone and reports the change of a metric.

Modes (what an ablated head's ``z`` becomes, at every position):

* ``"zero"``: zeros. The head then adds nothing; the layer's output bias ``b_O`` belongs to no head and stays.
* ``"mean"``: the head's ``z`` averaged over every real (non-padding) token of a reference batch, one vector
  ``[d_head]`` per head, used at every position. One mean over batch and positions (not one per position) because
  it fits inputs of any length and padding, positions late in a sequence would otherwise be averaged over few
  tokens, and the per-position information is what resample ablation keeps.
* ``"resample"``: the head's ``z`` from another input, position by position: position ``i`` of row ``b`` gets the
  reference's position ``i`` of row ``b`` (or of its only row, if the reference has one row).

Caveats:

* The reference's ``z`` comes from one forward pass (:func:`attnlens.trace`, in eval mode, without gradients) run
  when the block is entered, of the model as the caller's thread sees it: inside an enclosing ``ablate`` block it is
  the already-ablated model's ``z``.
* The hooks act only on forward passes of the thread that entered the block (as all attnlens hooks do): a forward
  pass another thread runs meanwhile is not ablated. Inside the block, :func:`attnlens.trace`, :func:`attnlens.scan`
  and the metrics run the ablated model (they are forward passes of it, in this thread); :func:`attnlens.verify`
  refuses, as the model then computes something its weights do not describe.
* attnlens's per-model lock is held only while hooks are added and while the reference runs, not across the block,
  so that attnlens calls from other threads are not blocked by a block that may stay open for long.
* A compiled model (``torch.compile``) is refused: its compiled code need not run hooks added after compiling.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attnlens import capture
from attnlens._indices import as_index
from attnlens._progress import Bar
from attnlens.errors import UnsupportedModelError
from attnlens.loading import resolve
from attnlens.models import Adapter, adapt
from attnlens.models.wrappers import is_compiled
from attnlens.tokens import text_inputs
from attnlens.trace import trace

__all__ = ["MODES", "ablate", "head_importance"]

MODES = ("zero", "mean", "resample")
"""What an ablated head's ``z`` becomes: zeros, its mean over a reference batch, or a reference input's own ``z``."""

Metric = Callable[..., Any]


@dataclass(frozen=True)
class _Replacement:
    """What one layer's ablated heads get: ``value`` ``[batch or 1, pos or 1, (head d_head)]`` where ``columns``."""

    columns: Tensor  # bool [(head d_head)]: True for the entries of ablated heads
    value: Tensor
    per_position: bool  # resample: the run must have the reference's positions


def _check_heads(heads: Any, n_layer: int, n_head: int) -> tuple[tuple[int, int], ...]:
    """``heads`` as sorted ``(layer, head)`` pairs of ints, each in range (negatives count from the end), distinct."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise TypeError(f"heads must be a list of (layer, head) pairs, e.g. [(0, 1), (1, 3)], got {heads!r}")
    pairs = []
    for item in heads:
        if isinstance(item, (str, bytes)) or not isinstance(item, Iterable) or getattr(item, "ndim", 1) != 1:
            raise TypeError(
                f"heads must be a list of (layer, head) pairs, got the element {item!r}; for one head write [(l, h)]"
            )
        pair = list(item)
        if len(pair) != 2:
            raise ValueError(f"each head is a (layer, head) pair, got {item!r}")
        layer, head = as_index(pair[0], "layers"), as_index(pair[1], "heads")
        if not -n_layer <= layer < n_layer:
            raise ValueError(f"head {(layer, head)}: layer {layer} is out of range; the model has {n_layer} layers")
        if not -n_head <= head < n_head:
            raise ValueError(f"head {(layer, head)}: head {head} is out of range; each layer has {n_head} heads")
        pairs.append((layer % n_layer, head % n_head))
    repeated = sorted({p for p in pairs if pairs.count(p) > 1})
    if repeated:
        raise ValueError(f"heads {repeated} given more than once")
    return tuple(sorted(pairs))


def _check_mode(mode: Any, reference: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "zero" and reference is not None:
        raise ValueError("mode='zero' takes no reference; pass mode='mean' or 'resample' to use one")
    if mode != "zero" and reference is None:
        raise ValueError(f"mode={mode!r} needs a reference: input_ids, (input_ids, attention_mask) or a mapping")
    return str(mode)


def _reference_inputs(reference: Any) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of a reference: ids; a tuple ``(ids, mask)``; a mapping such as a tokenizer's.

    A tuple is a pair only when its first element is an array (has a ``shape``): a tuple of lists is token rows.
    """
    if isinstance(reference, Mapping):
        if "input_ids" not in reference:
            raise ValueError(
                f"a reference mapping needs 'input_ids' (and optionally 'attention_mask'), got keys {sorted(reference)}"
            )
        unknown = sorted(set(reference) - {"input_ids", "attention_mask"})
        if unknown:
            raise ValueError(f"a reference mapping may hold only 'input_ids' and 'attention_mask', also got {unknown}")
        return reference["input_ids"], reference.get("attention_mask")
    if isinstance(reference, tuple) and len(reference) == 2 and hasattr(reference[0], "shape"):
        return reference[0], reference[1]
    return reference, None


def _replacements(
    adapter: Adapter,
    heads: tuple[tuple[int, int], ...],
    mode: str,
    reference: Any,
) -> dict[int, _Replacement]:
    """Per ablated layer, which entries of ``z`` are replaced and by what (running the reference if the mode asks)."""
    n_head, d_head = adapter.n_heads, adapter.d_head
    dtype, device = adapter.dtype, adapter.device
    layers = sorted({layer for layer, _ in heads})
    z_ref: Tensor | None = None
    if mode != "zero":
        ids, mask = _reference_inputs(reference)
        ids, mask, _ = adapter.check_inputs(ids, mask)
        if mode == "resample" and mask is not None and not bool(mask.all()):
            raise ValueError(
                "a resample reference must have no padding: its z is copied position by position, and a padded "
                "position has no z that means anything; pass sequences of equal length"
            )
        tr = trace(adapter, ids, mask, layers=layers, store="z")
        z_ref = tr["z"]  # [layer, batch, pos, head, d_head], in the order of `layers`
        keep = tr.attention_mask.bool()
    out = {}
    for slot, layer in enumerate(layers):
        ablated = [head for lay, head in heads if lay == layer]
        columns = torch.zeros(n_head, d_head, dtype=torch.bool, device=device)
        columns[ablated] = True
        columns = columns.flatten()
        if z_ref is None:
            value = torch.zeros(1, 1, n_head * d_head, dtype=dtype, device=device)  # z's width, not always d_model
        elif mode == "mean":
            # float32 (or wider) sums over all real tokens, cast back: one vector per head.
            real = z_ref[slot][keep]  # [token, head, d_head]
            mean = real.to(torch.promote_types(real.dtype, torch.float32)).mean(dim=0).to(real.dtype)
            value = rearrange(mean, "head d_head -> 1 1 (head d_head)")
        else:
            value = rearrange(z_ref[slot], "batch pos head d_head -> batch pos (head d_head)")
        out[layer] = _Replacement(columns, value.detach().clone(), per_position=mode == "resample")
    return out


def _check_fits(replacement: _Replacement, batch: int, n_pos: int, layer: int) -> None:
    if not replacement.per_position:
        return
    ref_batch, ref_pos = replacement.value.shape[:2]
    if ref_pos != n_pos or ref_batch not in (1, batch):
        raise ValueError(
            f"resample ablation of layer {layer}: the reference has [batch, pos] = {[ref_batch, ref_pos]}, this "
            f"forward pass {[batch, n_pos]}; the positions must match (resampling is position by position, so it "
            "cannot follow a generation step by step) and the batch must match or the reference have one row"
        )


def _hook(layer: int, replacement: _Replacement) -> Callable[..., Any]:
    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        z = args[0]  # [batch, pos, (head d_head)]
        _check_fits(replacement, z.shape[0], z.shape[1], layer)
        value = replacement.value.to(dtype=z.dtype, device=z.device)
        # torch.where, not in place: the model's own tensor stays as it was, and gradients reach the other heads.
        return (torch.where(replacement.columns.to(z.device), value, z), *args[1:])

    return hook


def _check_uncompiled(adapter: Adapter) -> None:
    if is_compiled(adapter.model):
        raise UnsupportedModelError(
            "ablate hooks the model's modules, and compiled code need not run hooks added after compiling: ablate the "
            "uncompiled model (torch.compile(model) returns a wrapper that holds it as ._orig_mod; a model or module "
            "compiled in place with .compile() stays compiled: load it again without compiling)"
        )


@contextlib.contextmanager
def ablate(
    model: nn.Module | Adapter, heads: Iterable[Any], mode: str = "zero", reference: Any = None
) -> Iterator[None]:
    """Run the model with some attention heads removed, for the duration of a ``with`` block.

    Every forward pass of the model that this thread runs inside the block (``model(...)``, ``model.generate``,
    :func:`attnlens.trace`, ...) computes with the ablated heads' ``z`` replaced before the output projection (see the
    module docstring for the modes); the hooks are removed when the block ends, also when it raises. The model's
    training flags, ``requires_grad`` and attention implementation are never touched; gradients flow as usual.

    Args:
        model: a Hugging Face GPT-2 model of any supported class (not compiled).
        heads: ``(layer, head)`` pairs (negative numbers count from the end), each at most once; empty ablates
            nothing (and adds no hook).
        mode: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference: for ``"mean"`` and ``"resample"``: token ids ``[batch, pos]``; or ``(input_ids,
            attention_mask)`` with arrays or tensors; or a mapping with ``"input_ids"`` and optionally
            ``"attention_mask"`` (what a tokenizer returns). ``"mean"`` averages over its real tokens;
            ``"resample"`` needs it without padding, with the positions of every ablated forward pass and its batch
            or one row. Must be ``None`` for ``"zero"``.

    Raises:
        TypeError, ValueError: ``heads`` that are not distinct in-range ``(layer, head)`` pairs, an unknown mode, a
            reference missing or given for ``"zero"``, a bad reference; inside the block, a resampled forward pass
            whose shape does not fit the reference.
        UnsupportedModelError: not a supported GPT-2 model, or a compiled one.

    Example:
        >>> with attnlens.ablate(model, [(0, 0)]):
        ...     logits = model(input_ids).logits
    """
    adapter = adapt(model)
    sites = adapter.sites
    _check_uncompiled(adapter)
    chosen = _check_heads(heads, adapter.n_layers, adapter.n_heads)
    mode = _check_mode(mode, reference)
    with capture.model_lock(adapter):
        replacements = _replacements(adapter, chosen, mode, reference) if chosen else {}
        hooks = [(sites.layers[layer].z, _hook(layer, r)) for layer, r in replacements.items()]
        # Added under the lock, so that no attnlens call running on the model sees a hook appear mid-run.
        stack = contextlib.ExitStack()
        stack.enter_context(capture.forward_hooks(hooks, pre=True, intervening=True))
    with stack:
        yield


def _default_metric(ids: Tensor, mask: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Mean next-token cross-entropy over the pairs of consecutive real tokens (float32 or wider)."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    pairs = keep[:, :-1] & keep[:, 1:]
    if not bool(pairs.any()):
        raise ValueError("the default metric (next-token loss) needs at least two consecutive real tokens in a row")
    targets = ids[:, 1:][pairs]

    def loss(logits: Tensor) -> Tensor:
        predicted = logits[:, :-1][pairs]  # [token, d_vocab]
        return F.cross_entropy(predicted.to(torch.promote_types(predicted.dtype, torch.float32)), targets)

    return loss


def _metric(metric: Metric | None, ids: Tensor, mask: Tensor | None) -> Callable[[Tensor], float]:
    """``metric`` as a function of the logits returning a float; with two parameters it also gets the mask."""
    if metric is None:
        default = _default_metric(ids, mask)
        return lambda logits: float(default(logits))
    if not callable(metric):
        raise TypeError(f"metric must be a callable on logits [batch, pos, d_vocab], got {metric!r}")
    full_mask = torch.ones_like(ids) if mask is None else mask
    try:
        inspect.signature(metric).bind(None, None)
        two = True
    except (TypeError, ValueError):
        two = False

    def call(logits: Tensor) -> float:
        value = metric(logits, full_mask) if two else metric(logits)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"metric must return a number or a one-element tensor, got {type(value).__name__}")
        return float(value)

    return call


@capture.one_at_a_time
def head_importance(
    model: nn.Module | Adapter | str | os.PathLike[str],
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    *,
    metric: Metric | None = None,
    mode: str = "zero",
    reference: Any = None,
    heads_per_pass: int | None = None,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> Tensor:
    """How much a metric changes when each head alone is ablated: ``metric(ablated) - metric(clean)``.

    Several heads are ablated in one forward pass: the batch is repeated once per head along the batch axis, each
    copy with its own head ablated, and the metric is taken on each copy's logits. The result equals ablating each
    head in its own :func:`ablate` block to float rounding, not bit for bit: a matrix product over more rows may
    round differently (tests/test_ablation.py checks 2e-6 absolute on float32 losses near 4.6, a few ulps). The model
    runs in eval mode without gradients and is left as found.

    Args:
        model: a GPT-2 model with a language-model head (``GPT2LMHeadModel``, ``GPT2DoubleHeadsModel``); other
            classes are refused, as their outputs are no logits over the vocabulary. Or a hub name / local folder /
            ``"demo"``, loaded for this call by :func:`attnlens.load`.
        input_ids: ``[batch, pos]`` token ids; or, with a tokenizer, a text or a list of texts.
        attention_mask: ``[batch, pos]``, 1 for tokens and 0 for padding; only with token ids.
        metric: a function of the logits ``[batch, pos, d_vocab]`` (and, if it takes a second parameter, of the
            ``[batch, pos]`` attention mask) returning a number or a one-element tensor. Default: the mean
            next-token cross-entropy over the pairs of consecutive real tokens (so the result is the loss increase).
        mode: ``"zero"``, ``"mean"`` or ``"resample"`` (see :func:`ablate`).
        reference: as for :func:`ablate`; ``"mean"`` defaults to the inputs themselves, ``"resample"`` needs one.
        heads_per_pass: how many heads to ablate per forward pass (memory grows with it); default as many as keep a
            pass within 4096 tokens (at least 1).
        tokenizer: turns text into ids (default: a named checkpoint's own).
        progress: a progress bar on stderr (tqdm): ``None`` (default) where interactive (a terminal, a notebook)
            and only after 2 s; ``True`` always; ``False`` never.

    Returns:
        ``[layer, head]`` float64 on the CPU.

    Raises:
        UnsupportedModelError: not a supported GPT-2 model, or one without a language-model head.
        ValueError, TypeError: bad inputs, mode, reference, ``heads_per_pass`` or metric result.
    """
    model, tokenizer = resolve(model, tokenizer, "head_importance")
    input_ids, attention_mask = text_inputs(input_ids, attention_mask, tokenizer, False)
    adapter = adapt(model)
    sites = adapter.sites
    unembed = sites.unembed
    if unembed is None:
        raise UnsupportedModelError(
            f"head_importance needs logits over the vocabulary, and {adapter.model_class} has no language-model "
            f"head; load the checkpoint with one ({', '.join(adapter.lm_classes)})"
        )
    ids, mask, _ = adapter.check_inputs(input_ids, attention_mask)
    if mode == "mean" and reference is None:
        reference = (ids, mask)
    mode = _check_mode(mode, reference)
    n_layer, n_head, d_head = adapter.n_layers, adapter.n_heads, adapter.d_head
    all_heads = tuple((layer, head) for layer in range(n_layer) for head in range(n_head))
    batch, n_pos = ids.shape
    if heads_per_pass is None:
        heads_per_pass = max(1, 4096 // (batch * n_pos))
    elif isinstance(heads_per_pass, bool) or not isinstance(heads_per_pass, int) or heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be a positive int, got {heads_per_pass!r}")
    measure = _metric(metric, ids, mask)
    replacements = _replacements(adapter, all_heads, mode, reference)
    for layer in range(n_layer):
        _check_fits(replacements[layer], batch, n_pos, layer)
    use_cache = adapter.use_cache  # what the user's own model(...) runs with

    def logits_of(copies: int) -> Iterator[Tensor]:
        run_ids = ids.repeat(copies, 1)
        run_mask = None if mask is None else mask.repeat(copies, 1)
        hidden = sites.run(input_ids=run_ids, attention_mask=run_mask, use_cache=use_cache).last_hidden_state
        for copy in range(copies):  # one copy's logits at a time: [batch, pos, d_vocab] is the large tensor
            yield unembed(hidden[copy * batch : (copy + 1) * batch])

    out = torch.full((n_layer, n_head), math.nan, dtype=torch.float64)
    with capture.preserved(adapter), torch.no_grad(), Bar(len(all_heads), "head_importance", progress, "head") as bar:
        clean = measure(next(logits_of(1)))
        for start in range(0, len(all_heads), heads_per_pass):
            chunk = all_heads[start : start + heads_per_pass]
            hooks = [
                (sites.layers[layer].z, _copies_hook(layer, chunk, replacements[layer], batch, d_head))
                for layer in sorted({layer for layer, _ in chunk})
            ]
            with capture.forward_hooks(hooks, pre=True, intervening=True):
                for (layer, head), logits in zip(chunk, logits_of(len(chunk)), strict=True):
                    out[layer, head] = measure(logits) - clean
            bar.update(len(chunk))
    return out


def _copies_hook(
    layer: int, chunk: tuple[tuple[int, int], ...], replacement: _Replacement, batch: int, d_head: int
) -> Callable[..., Any]:
    """A hook that ablates, in copy ``c`` of the repeated batch, head ``chunk[c]`` if it lies in ``layer``."""
    per_copy = torch.zeros(len(chunk), replacement.columns.numel(), dtype=torch.bool)
    for copy, (lay, head) in enumerate(chunk):
        if lay == layer:
            per_copy[copy, head * d_head : (head + 1) * d_head] = True
    per_copy = rearrange(per_copy, "copy columns -> copy 1 1 columns").to(replacement.columns.device)
    value = rearrange(replacement.value, "batch pos columns -> 1 batch pos columns")

    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        z = args[0]  # [(copy batch), pos, (head d_head)]
        copies = rearrange(z, "(copy batch) pos columns -> copy batch pos columns", batch=batch)
        ablated = torch.where(per_copy.to(z.device), value.to(dtype=z.dtype, device=z.device), copies)
        return (rearrange(ablated, "copy batch pos columns -> (copy batch) pos columns"), *args[1:])

    return hook
