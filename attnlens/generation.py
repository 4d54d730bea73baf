"""Attention across ``generate()``: every step's new attention row over the key/value cache, as the model ran it.

:func:`trace_generate` runs the model's own ``generate`` with hooks from the pattern tap's parts
(:func:`attnlens.patterns.qkv_hooks`, :meth:`~attnlens.models.Adapter.kernel_pattern`) and the Adapter's cache
access (:meth:`~attnlens.models.Adapter.cached_kv`). Step ``s`` is the forward pass that chose new token ``s``: its
query is the token at position ``prompt_len - 1 + s`` and its keys are the ``prompt_len + s`` cached ones. For each
step and traced layer it keeps that one query row. :func:`tracing_generation` runs the same code around the user's own
``model.generate`` calls. Per step:

* eager kernel: a copy of the kernel's own probabilities (the last row of the pattern it hands out);
* any other kernel (sdpa): recomputed from the step's query and the keys in the cache as the step left them, in the
  eager kernel's arithmetic order (:func:`attnlens.patterns.masked_scores`), padding keys blocked.

Rows are stored, not squares: ``O(new tokens x total length)`` per head. The cache's final keys and values of the
traced layers are kept too, so that :meth:`GenerationTrace.check` can compare both with one full-sequence trace.

Caveats:

* Greedy and sampled decoding (seed it yourself: the hooks draw no random numbers), ``num_return_sequences``, left
  padding, the dynamic and the static cache. Beam search, assisted decoding, contrastive search, a caller's own
  cache and ``use_cache=False`` are refused by name.
* Sliding-window attention (Mistral, Qwen2's ``use_sliding_window``, Qwen3's sliding ``layer_types``): traced exactly
  while the whole sequence fits in every traced layer's window; a call that could outgrow one is refused by name
  before it generates (the caches of transformers' sliding layers drop the keys that leave the window).
* Rows that have finished (chosen eos) keep running in ``generate`` on the pad token; their rows are stored as the
  model computed them, and :attr:`GenerationTrace.finished_at` says from which step on they are padding.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnlens import capture
from attnlens._indices import check_indices
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.generation_trace import GenerationTrace
from attnlens.models import QKV, Adapter, AttentionSpec, adapt
from attnlens.patterns import kernel_specs, masked_scores, qkv_hooks, softmax_into
from attnlens.tokens import text_inputs, token_texts

__all__ = ["GenerationRecorder", "GenerationTrace", "trace_generate", "tracing_generation"]

# Decoding strategies whose forward passes are not one row per sequence and step: refused by the keyword that asks.
_REFUSED = {
    "num_beams": "beam search",
    "num_beam_groups": "diverse beam search",
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "assisted decoding by prompt lookup",
    "assistant_early_exit": "assisted decoding by early exit (self-speculative)",
    "penalty_alpha": "contrastive search",
    "custom_generate": "a custom generation loop",
    "past_key_values": "a cache filled before the call",
}
_CACHES = (None, "dynamic", "static")


def _settings(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings in force: the model's generation config (or the one passed), updated by ``kwargs``."""
    base = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    settings = dict(base.to_dict()) if base is not None else {}
    settings.update({k: v for k, v in kwargs.items() if k != "generation_config"})
    settings["_given"] = tuple(kwargs)
    return settings


def _refuse(settings: dict[str, Any]) -> None:
    for key, what in _REFUSED.items():
        value = settings.get(key)
        if value is None or value is False or (key in ("num_beams", "num_beam_groups") and value == 1):
            continue
        raise UnsupportedModelError(
            f"trace_generate does not trace {what} ({key}={value!r}): its forward passes are not one row per "
            "sequence and step; use greedy or sampled decoding (num_beams=1, no assistant)"
        )
    if settings.get("disable_compile") is False and "disable_compile" in settings.get("_given", ()):
        raise UnsupportedModelError(
            "trace_generate runs generate uncompiled (its hooks need the Python forward); drop disable_compile=False"
        )
    if settings.get("use_cache") is False:
        raise UnsupportedModelError(
            "trace_generate needs the key/value cache (use_cache=False reruns the whole sequence at every step); "
            "drop use_cache=False, or trace the finished sequence with attnlens.trace"
        )
    if settings.get("cache_implementation") not in _CACHES:
        raise UnsupportedModelError(
            f"trace_generate reads the dynamic and the static cache, not cache_implementation="
            f"{settings['cache_implementation']!r}; drop it or use 'static'"
        )


def _refuse_moving_windows(
    specs: Sequence[AttentionSpec], layers: tuple[int, ...], prompt_len: int, settings: dict[str, Any]
) -> None:
    """Refuse, before generating, a traced layer whose sliding window the sequence could outgrow.

    Once a sequence is longer than a layer's window, transformers' sliding-window cache layers (4.57 and 5.x) keep
    only the last ``window - 1`` keys (``DynamicSlidingWindowLayer``) or ``window`` rolled slots
    (``StaticSlidingWindowLayer``): the keys that earlier steps saw are gone. A sequence that fits in every traced
    window never meets either, and its rows are exact.
    """
    new = settings.get("max_new_tokens")
    # generate's own rule: max_new_tokens, when set, wins over max_length (whose default is 20).
    total = prompt_len + int(new) if new is not None else max(int(settings.get("max_length") or 20), prompt_len + 1)
    windows = [(layer, specs[layer].window) for layer in layers]
    bitten = [(layer, window) for layer, window in windows if window is not None and total > window]
    if not bitten:
        return
    smallest = min(window for _, window in bitten)
    names = ", ".join(str(layer) for layer, _ in bitten)
    fits = (
        f"generate no further than the window (max_new_tokens={smallest - prompt_len} or fewer)"
        if smallest > prompt_len
        else f"shorten the prompt below {smallest} tokens"
    )
    others = [layer for layer in layers if layer not in dict(bitten)]
    hint = f"trace only the other layers (layers={others})" if others else "trace the layers without a window"
    raise UnsupportedModelError(
        f"trace_generate does not follow sliding-window attention past the window: layer(s) {names} attend to at most "
        f"{smallest} keys, and this call may run {total} tokens (prompt {prompt_len} + up to {total - prompt_len} "
        "new), so their cache would drop keys the trace needs. To trace it, "
        f"{fits}, {hint}, or trace the finished sequence with attnlens.trace (windows applied exactly)"
    )


@contextlib.contextmanager
def _attributes_kept(*objects: object) -> Iterator[None]:
    """Undo what ``generate`` sets on the model object itself (a static cache's remembered length, say)."""
    saved = [(obj, dict(vars(obj))) for obj in dict.fromkeys(objects)]
    try:
        yield
    finally:
        for obj, before in saved:
            now = vars(obj)
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, object()) is not value:
                    now[key] = value


class _Steps:
    """What the hooks keep from each forward pass of ``generate``: one query row per step and traced layer."""

    def __init__(self, adapter: Adapter, layers: tuple[int, ...], heads: tuple[int, ...], prompt_mask: Tensor):
        self.adapter, self.layers, self.heads = adapter, layers, heads
        self.specs = kernel_specs(adapter, caller="trace_generate", stacklevel=4)
        self.all_heads = heads == tuple(range(adapter.n_heads))
        self.head_index = torch.tensor(heads, device=prompt_mask.device)
        self.prompt_mask = prompt_mask  # [batch, prompt] (expanded for num_return_sequences once seen)
        self.prompt_len = prompt_mask.shape[1]
        self.step = -1
        self.cache: Any = None
        self.queries: dict[int, Tensor] = {}
        self.rows: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        self.positions: list[Tensor] = []
        self.final_kv: dict[int, tuple[Tensor, Tensor]] = {}

    def n_keys(self) -> int:
        return self.prompt_len + self.step

    def _heads(self, x: Tensor) -> Tensor:
        return x if self.all_heads else x.index_select(1, self.head_index)

    def expanded_mask(self, batch: int) -> Tensor:
        """The prompt mask for ``batch`` rows: ``num_return_sequences`` repeats each prompt row in place."""
        if self.prompt_mask.shape[0] != batch:
            self.prompt_mask = self.prompt_mask.repeat_interleave(batch // self.prompt_mask.shape[0], dim=0)
        return self.prompt_mask

    def _blocked(self, batch: int) -> Tensor:
        """Keys this step's query may not see, ``[batch, 1, 1, k_pos]``: the prompt's padding.

        Generated tokens are all real, and no traced sliding window bites (:func:`_refuse_moving_windows`).
        """
        mask = self.expanded_mask(batch)
        keys = torch.ones(batch, self.n_keys(), dtype=torch.bool, device=mask.device)
        keys[:, : self.prompt_len] = mask.bool()
        return ~keys[:, None, None, :]

    # -------------------------------------------------------------------------------------------- hooks ---

    def on_base(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.step += 1
        self.cache = self.adapter.step_cache(kwargs)
        if self.adapter.sites.pos_embed is None:
            # No position embedding to watch (rotary): keep the positions generate asked the base model for, so that
            # check() names an offset exactly; whether the rotation used them shows in the post-rotary cached keys.
            position_ids = kwargs.get("position_ids")
            if isinstance(position_ids, Tensor) and position_ids.ndim == 2:
                self.positions.append(position_ids[:, -1].clone())
        if self.cache is None:
            raise AttentionCaptureError(f"step {self.step} ran without a key/value cache; nothing can be traced")

    def on_positions(self, module: nn.Module, args: Any) -> None:
        self.positions.append(args[0][:, -1].clone())

    def on_qkv(self, layer: int, qkv: QKV) -> None:
        self.queries[layer] = self._heads(qkv.q[:, :, -1:])  # the step's query: the last position it runs

    def on_attn(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            n_keys, q = self.n_keys(), self.queries.pop(layer, None)
            pattern = self.adapter.kernel_pattern(output)
            if pattern is not None and pattern.shape[-1] >= n_keys:
                if bool(pattern[:, :, -1, n_keys:].any()):
                    raise AttentionCaptureError(
                        f"step {self.step}, layer {layer}: the kernel attends to cache slots not yet written"
                    )
                row = pattern[:, :, -1, :n_keys]
                row = row.clone() if self.all_heads else self._heads(row)  # never the kernel's own tensor
            elif q is not None:
                k = self.adapter.cached_kv(self.cache, layer)[0][:, :, :n_keys]
                if k.shape[2] != n_keys:
                    raise AttentionCaptureError(
                        f"step {self.step}, layer {layer}: the cache holds {k.shape[2]} keys, the step needs {n_keys}"
                    )
                k = self._heads(k.repeat_interleave(self.adapter.n_heads // k.shape[1], dim=1))
                scores = masked_scores(q, k, self.specs[layer], self._blocked(q.shape[0]), contiguous_k=True)
                out = torch.empty(scores.shape, dtype=q.dtype, device=q.device)
                softmax_into(scores, out, None)
                row = out[:, :, 0]
            else:
                raise AttentionCaptureError(f"step {self.step}, layer {layer}: its q/k/v projection never ran")
            self.rows[layer].append(row)

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """The hooks for the ``with`` block (removed after, also on error)."""
        sites = self.adapter.sites
        post, pre_kwargs = qkv_hooks(self.adapter, self.layers, self.on_qkv)
        post += [(sites.layers[layer].attn, self.on_attn(layer)) for layer in self.layers]
        pre = [] if sites.pos_embed is None else [(sites.pos_embed, self.on_positions)]
        with (
            capture.forward_hooks([(sites.base, self.on_base), *pre_kwargs], pre=True, with_kwargs=True),
            capture.forward_hooks(pre, pre=True),
            capture.forward_hooks(post),
        ):
            yield

    def keep_cache(self) -> None:
        for layer in self.layers:
            k, v = self.adapter.cached_kv(self.cache, layer)
            n = self.n_keys()
            self.final_kv[layer] = (k[:, :, :n].clone(), v[:, :, :n].clone())


def _finished_at(sequences: Tensor, prompt_len: int, eos: set[int]) -> Tensor:
    """``[batch]``: the step whose token was the row's first eos, or the number of steps if none was chosen."""
    new = sequences[:, prompt_len:]
    n_steps = new.shape[1]
    if not eos or n_steps == 0:
        return torch.full((sequences.shape[0],), n_steps, dtype=torch.long)
    is_eos = torch.isin(new.cpu(), torch.tensor(sorted(eos)))
    index = torch.arange(n_steps).expand_as(is_eos)
    return torch.where(is_eos, index, n_steps).min(dim=1).values


def _eos_ids(settings: dict[str, Any]) -> set[int]:
    eos = settings.get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def trace_generate(
    model: nn.Module | Adapter,
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> GenerationTrace:
    """Run ``model.generate`` and keep, for every step and traced layer, the new token's attention over all keys.

    Args:
        model: a Hugging Face model with a language-model head (or its :class:`~attnlens.models.Adapter`).
        input_ids: ``[batch, prompt]`` (or ``[prompt]``) token ids, padded on the left (as ``generate`` needs); or,
            with ``tokenizer``, a text or a list of texts (set ``tokenizer.padding_side = "left"`` for several).
        attention_mask: ``[batch, prompt]``, 1 for tokens and 0 for (left) padding.
        layers: the layers to trace (negative numbers count from the end); default all.
        heads: the heads to keep; default all.
        tokenizer: turns text into ids, and gives the token strings of the sequences (:attr:`GenerationTrace.tokens`).
        **generate_kwargs: passed to ``generate`` (``max_new_tokens``, ``do_sample``, ``num_return_sequences``,
            ``cache_implementation="static"``, ``eos_token_id``, ``pad_token_id``, ...).

    Returns:
        The :class:`GenerationTrace`; ``.row(step, layer)`` is ``[batch, head, k_pos]`` over the step's
        ``prompt_len + step`` keys.

    Raises:
        UnsupportedModelError: a model without ``generate``, a kernel outside the adapter's ``exact_kernels``, or a
            decoding strategy whose passes are not one row per sequence and step (beam search, assisted decoding,
            ``use_cache=False``, a cache other than dynamic or static), named; a traced sliding-window layer whose
            window the prompt plus ``max_new_tokens`` could outgrow, named with what to do.
        ValueError: bad ``layers`` / ``heads``, inputs that :meth:`~attnlens.models.Adapter.check_inputs` refuses,
            or right padding.
        AttentionCaptureError: a step or layer that was not seen as expected.

    Example:
        >>> g = attnlens.trace_generate(model, ids, max_new_tokens=8, tokenizer=tok)
        >>> g.row(0, 3).shape  # [batch, head, prompt_len]
        >>> g.check()
    """
    return _traced_generate(model, input_ids, attention_mask, layers, heads, tokenizer, generate_kwargs)[0]


@capture.one_at_a_time
def _traced_generate(
    model: nn.Module | Adapter,
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None,
    layers: int | Iterable[int] | None,
    heads: int | Iterable[int] | None,
    tokenizer: Any,
    generate_kwargs: dict[str, Any],
    own_generate: Any = None,
) -> tuple[GenerationTrace, Any]:
    """:func:`trace_generate`'s work, under the model's lock: the trace, and what ``generate`` returns to this call.

    ``generate`` itself always runs with ``return_dict_in_generate=True``; the call's own setting (or the generation
    config's) decides whether its caller gets that output object or the sequences alone.

    ``own_generate``: the model's ``generate`` to run (:func:`tracing_generation` passes the one it stood in for).
    """
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"trace_generate needs a loaded model, got the name or path {os.fspath(model)!r}")
    adapter = adapt(model)
    adapter.check_kernel()
    generate: Any = own_generate or getattr(adapter.model, "generate", None)
    can_generate = getattr(adapter.model, "can_generate", None)
    if generate is None or (callable(can_generate) and not can_generate()):
        raise UnsupportedModelError(
            f"{adapter.model_class} cannot generate (no language-model head); load it with a head, e.g. "
            "AutoModelForCausalLM"
        )
    settings = _settings(adapter.model, generate_kwargs)
    _refuse(settings)
    layer_list = check_indices(layers, adapter.n_layers, "layers")
    head_list = check_indices(heads, adapter.n_heads, "heads")
    input_ids, attention_mask = text_inputs(input_ids, attention_mask, tokenizer, False)
    ids, mask, _ = adapter.check_inputs(input_ids, attention_mask)
    prompt_mask = torch.ones_like(ids) if mask is None else mask
    if bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError(
            "attention_mask has padding at the end of a row: generate appends new tokens after it; pad on the left "
            "(tokenizer.padding_side = 'left')"
        )
    steps = _Steps(adapter, layer_list, head_list, prompt_mask)
    _refuse_moving_windows(steps.specs, layer_list, steps.prompt_len, settings)
    generation_config: Any = getattr(adapter.model, "generation_config", None)
    saved_config: Any = copy.deepcopy(generation_config)
    # The hooks need the eager Python forward: generate would compile it for a static cache on an accelerator.
    kwargs = {**generate_kwargs, "return_dict_in_generate": True, "disable_compile": True}
    try:
        with (
            capture.preserved(adapter),
            _attributes_kept(adapter.model, adapter.module),
            torch.no_grad(),
            steps.hooks(),
        ):
            out = generate(input_ids=ids, attention_mask=mask, **kwargs)
            steps.keep_cache()
    finally:
        if generation_config is not None and generation_config.to_dict() != saved_config.to_dict():
            generation_config.__dict__.update(saved_config.__dict__)  # pragma: no cover - generate copies it
    sequences = out.sequences if hasattr(out, "sequences") else out
    n_steps = sequences.shape[1] - steps.prompt_len
    if steps.step + 1 != n_steps:
        raise AttentionCaptureError(f"generate chose {n_steps} tokens in {steps.step + 1} forward passes")
    trace = GenerationTrace.from_steps(
        adapter=adapter,
        layers=layer_list,
        heads=head_list,
        sequences=sequences.clone(),
        prompt_mask=steps.expanded_mask(sequences.shape[0]).clone(),
        rows=steps.rows,
        final_kv=steps.final_kv,
        # Every step's, or none (a base model that derives positions itself is given no position_ids).
        positions=torch.stack(steps.positions, dim=1) if len(steps.positions) == n_steps else None,
        finished_at=_finished_at(sequences, steps.prompt_len, _eos_ids(settings)),
        tokens=None if tokenizer is None else [token_texts(tokenizer, row) for row in sequences.tolist()],
        provenance={
            **adapter.provenance(),
            # What check() derives its tolerances from, kept for a trace loaded from a file.
            "n_layers": str(adapter.n_layers),
            "scales": ",".join(repr(steps.specs[layer].scale) for layer in layer_list),
        },
    )
    return trace, out if settings.get("return_dict_in_generate") else sequences


class GenerationRecorder:
    """What :func:`tracing_generation` recorded: one :class:`GenerationTrace` per ``generate`` call in its block."""

    def __init__(self) -> None:
        self.traces: list[GenerationTrace] = []

    @property
    def trace(self) -> GenerationTrace:
        """The last call's trace.

        Raises:
            ValueError: no ``generate`` call has finished in the block yet.
        """
        if not self.traces:
            raise ValueError("no generate() call has finished inside tracing_generation yet: call model.generate first")
        return self.traces[-1]

    def __repr__(self) -> str:
        return f"GenerationRecorder({len(self.traces)} traces)"


@contextlib.contextmanager
def tracing_generation(
    model: nn.Module,
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    tokenizer: Any = None,
) -> Iterator[GenerationRecorder]:
    """Trace the model's own ``model.generate(...)`` calls inside the block, as :func:`trace_generate` would.

    For the block, ``model.generate`` stands in for the model's own: each call runs :func:`trace_generate`'s code
    with the call's arguments (the same hooks, refusals and lock), records the trace, and returns what ``generate``
    returns (the sequences, or the output object with ``return_dict_in_generate=True``). On leaving the block
    ``model.generate`` is the model's own again, also on error.

    Args:
        model: a Hugging Face model with a language-model head; the object whose ``generate`` you call.
        layers: the layers to trace (default all).
        heads: the heads to keep (default all).
        tokenizer: gives the token strings of the sequences.

    Yields:
        A :class:`GenerationRecorder`: ``.trace`` (the last call's), ``.traces`` (every call's, in order).

    Raises:
        ValueError: the model's ``generate`` is already traced by an enclosing block.

    Example:
        >>> with attnlens.tracing_generation(model) as gen:
        ...     out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
        >>> gen.trace.row(0, 3).shape  # [batch, head, prompt_len]
    """
    adapter = adapt(model)
    check_indices(layers, adapter.n_layers, "layers")
    check_indices(heads, adapter.n_heads, "heads")
    target: Any = adapter.model
    own = target.generate
    if getattr(own, "_attnlens_tracing", False):
        raise ValueError("this model's generate is already traced by an enclosing tracing_generation block")
    recorder = GenerationRecorder()

    def generate(inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(
                "inside tracing_generation, pass generate's options by keyword (only the inputs by position)"
            )
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        mask = kwargs.pop("attention_mask", None)
        trace, out = _traced_generate(target, input_ids, mask, layers, heads, tokenizer, kwargs, own)
        recorder.traces.append(trace)
        return out

    generate._attnlens_tracing = True  # type: ignore[attr-defined]
    had, before = "generate" in vars(target), vars(target).get("generate")
    target.generate = generate
    try:
        yield recorder
    finally:
        if had:
            target.generate = before
        else:
            del target.generate
