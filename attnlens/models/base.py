"""The Adapter interface: what attnlens knows of one architecture, as one typed object, validated once, passed down.

:func:`attnlens.models.adapt` picks the adapter class registered for a model's ``config.model_type``, which checks the
model once (class, config policy, state, modules) and returns a frozen :class:`Adapter`: the dimensions, one
:class:`AttentionSpec` per layer, the modules that attnlens hooks (:class:`Sites`), the attention kernel, and the
operations that depend on the architecture's layouts. Every public entry point calls ``adapt`` once and passes the
Adapter down; nothing outside ``attnlens/models/`` reads a config field, names a Hugging Face module path or imports a
specific adapter. A new architecture is one subclass of :class:`Adapter` in its own module, plus a registry line.

The layouts an adapter hands out, whatever its checkpoint stores (Conv1D ``[in, out]``, ``nn.Linear`` ``[out, in]``,
fused or separate projections):

* q ``[batch, head, pos, d_head]``; k, v ``[batch, kv_head, pos, d_head]`` (``kv_head == head`` without grouped-query
  attention): what the attention kernel receives, after any rotary rotation (:meth:`Adapter.split_qkv`);
* z ``[batch, pos, (head d_head)]`` at the z site; W_O ``[head, d_head, d_model]`` (:meth:`Adapter.W_O`);
* patterns ``[batch, head, q_pos, k_pos]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.weights import LayerNormWeights, ModelWeights

__all__ = ["QKV", "Adapter", "AttentionSpec", "LayerSites", "Rotation", "Sites"]


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention arithmetic, as its attention module (or its kernel) runs it.

    Attributes:
        scale: the factor of the scores ``q . k`` (``1/sqrt(d_head)`` usually; GPT-2's flags change it).
        upcast: the scores are computed in float32 with the scale folded into the product, and soft-maxed there
            (GPT-2's ``reorder_and_upcast_attn``): see :func:`attnlens.functional.attention_scores`.
        divisors: when not ``None``, the kernel divides the scores by these, in this order, instead of multiplying
            by ``scale`` (transformers 4.x's GPT-2); ``scale`` is then the inverse of their product.
        n_heads: query heads.
        n_kv_heads: key/value heads; fewer than ``n_heads`` under grouped-query attention, where query head ``h``
            reads key/value head ``h // (n_heads // n_kv_heads)``.
        rotary_dim: how many leading features of each query and key head the rotary embedding rotates (0: none;
            GPT-NeoX rotates ``rotary_pct * d_head`` of them, Llama all ``d_head``). The pattern is computed from the
            rotated q and k; the rotation itself comes from the model (:meth:`Adapter.rotation`).
        window: a sliding window: a query attends to at most this many keys, itself included (``None``: every
            earlier key).
        softmax_dtype: the dtype the eager kernel soft-maxes in before casting back to the model's (``None``: the
            scores' own). GPT-NeoX and the Llama family soft-max in float32, so a float64 model's eager
            probabilities carry float32's rounding.
    """

    scale: float
    n_heads: int
    n_kv_heads: int
    upcast: bool = False
    divisors: tuple[float, ...] | None = None
    rotary_dim: int = 0
    window: int | None = None
    softmax_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding a layer's attention module received (``position_embeddings`` in Hugging Face).

    Attributes:
        cos: ``[batch, pos, rotary_dim]``.
        sin: ``[batch, pos, rotary_dim]``.
    """

    cos: Tensor
    sin: Tensor


class QKV(NamedTuple):
    """One layer's queries ``[batch, head, pos, d_head]``, keys and values ``[batch, kv_head, pos, d_head]``."""

    q: Tensor
    k: Tensor
    v: Tensor


@dataclass(frozen=True, eq=False)
class LayerSites:
    """The modules of one layer that attnlens hooks, named by role rather than by Hugging Face path.

    Attributes:
        attn_input: its output is the attention's input ``[batch, pos, d_model]`` (the block's first norm).
        qkv: the modules whose outputs, in this order and of one forward pass, hold q, k and v (GPT-2, GPT-NeoX:
            the one fused projection; Llama: ``q_proj``, ``k_proj``, ``v_proj``); :meth:`Adapter.split_qkv` turns
            them into heads. The last of them runs last.
        attn: the attention module. Its output (the first element when a tuple) is the attention output
            ``[batch, pos, d_model]``; :meth:`Adapter.kernel_pattern` reads a kernel's own pattern from it, and
            :meth:`Adapter.rotation` the rotary embedding from its forward's arguments.
        z: its input is the heads' outputs merged, ``[batch, pos, (head d_head)]`` (the output projection).
        mlp: its output is the MLP's contribution to the residual stream ``[batch, pos, d_model]``.
    """

    attn_input: nn.Module
    qkv: tuple[nn.Module, ...]
    attn: nn.Module
    z: nn.Module
    mlp: nn.Module


@dataclass(frozen=True, eq=False)
class Sites:
    """Where a model computes what attnlens reads.

    Attributes:
        base: the transformer without any task head; run it with :meth:`run`.
        layers: one :class:`LayerSites` per layer.
        embed: the token embedding (its ``weight`` is ``W_E``; its dtype and device are the model's).
        pos_embed: the learned position embedding, whose output is added to the token embedding's to start the
            residual stream; ``None`` for architectures without one (rotary).
        final_norm: its input is the final residual stream, its output the final hidden state ``[batch, pos,
            d_model]``.
        unembed: the language-model head (``hidden @ W_U``), or ``None`` for classes without one.
    """

    base: nn.Module
    layers: tuple[LayerSites, ...]
    embed: nn.Module
    pos_embed: nn.Module | None
    final_norm: nn.Module
    unembed: nn.Linear | None

    def run(self, **kwargs: Any) -> Any:
        """Run the transformer, uncompiled, on keyword arguments, every output switch explicit.

        ``input_ids``, ``attention_mask``, ``position_ids``, ``use_cache`` as Hugging Face takes them;
        ``output_attentions``, ``output_hidden_states`` default to False and ``return_dict`` to True whatever the
        config says, so that the config neither changes what runs nor makes transformers 5.x install its recording
        hooks on the model (it does, for good, the first time it is asked for attentions).
        """
        kwargs = {"output_attentions": False, "output_hidden_states": False, "return_dict": True, **kwargs}
        # Module.compile() in place routes __call__ to compiled code; _call_impl is the plain path (hooks, forward),
        # so a transformer compiled this way is seen through exactly as torch.compile's wrapper is.
        compiled = getattr(self.base, "_compiled_call_impl", None) is not None
        return (self.base._call_impl if compiled else self.base)(**kwargs)


@dataclass(frozen=True, eq=False)
class Adapter(ABC):
    """One model, as attnlens sees it: built once by :func:`attnlens.models.adapt`, then passed down.

    Attributes:
        model: the model as given (wrappers such as ``torch.compile`` or PEFT included).
        module: the model inside the wrappers attnlens sees through.
        n_layers: layers.
        n_heads: query heads per layer.
        n_kv_heads: key/value heads per layer (``n_heads`` without grouped-query attention).
        d_model: the residual stream's width.
        d_head: features per head.
        n_ctx: positions the model has (input lengths and position ids are checked against it).
        d_vocab: the vocabulary's size.
        specs: each layer's :class:`AttentionSpec` as its attention module computes it (what the extracted weights
            carry, and what the eager kernel runs).
        kernel: the attention kernel the model ran when adapted (``"eager"``, ``"sdpa"``, ...).
        kernel_specs: each layer's spec as ``kernel`` computes it: ``specs``, unless ``kernel_departure`` says why not.
        kernel_departure: why the kernel computes other attention than the modules ask for (one sentence), or None.
        kernel_returns_pattern: whether the kernel hands its pattern out in each attention module's output
            (:meth:`kernel_pattern`): true for the eager kernel.
        kernel_refusal: why the kernel cannot run a plain forward (a paged kernel), or None; :attr:`sites` raises it.
        use_cache: the model's own ``use_cache`` default, which decides the key layout its kernel gets back.
        bos_token_id: the config's beginning-of-sequence id, or None.
        eos_token_id: the config's end-of-sequence id, or None.
        name: the checkpoint's name or path, or ``""``.
        unknown_config_keys: config keys of unknown effect (see the adapter's config policy), sorted.
        parallel_residual: attention and MLP read the same residual stream (GPT-NeoX), instead of the MLP reading
            the residual after the attention's output is added (GPT-2).
        config_sha256: the sha256 of the config's JSON, without bookkeeping entries (see :func:`._hf.config_sha256`).
        own_sites: the :class:`Sites`, whatever the kernel; read them through :attr:`sites`, which refuses a kernel
            that cannot run a plain forward (weights can still be extracted from such a model).

    A subclass sets the class attributes, builds every field in :meth:`from_model` (after its checks), and implements
    the abstract operations; it is registered in :data:`attnlens.models.REGISTRY` under its ``model_type``.
    """

    model_type: ClassVar[str]
    """The ``config.model_type`` this adapter is registered for."""
    supported_classes: ClassVar[tuple[str, ...]]
    """The Hugging Face classes it supports, by name."""
    exact_kernels: ClassVar[tuple[str, ...]]
    """The attention kernels under which its patterns have been shown to be the model's own."""

    model: nn.Module
    module: nn.Module
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    specs: tuple[AttentionSpec, ...]
    kernel: str
    kernel_specs: tuple[AttentionSpec, ...]
    kernel_departure: str | None
    kernel_returns_pattern: bool
    kernel_refusal: str | None
    use_cache: bool
    bos_token_id: int | None
    eos_token_id: int | None
    name: str
    unknown_config_keys: tuple[str, ...]
    parallel_residual: bool
    config_sha256: str
    own_sites: Sites

    # ------------------------------------------------------------------------- per architecture (subclasses) ---

    @classmethod
    @abstractmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` (wrappers seen through) is of a class this adapter supports; checks nothing else."""

    @classmethod
    @abstractmethod
    def from_model(cls, model: nn.Module) -> Adapter:
        """Check the model (class, config policy, state, modules) and build its adapter.

        Raises:
            UnsupportedModelError: naming what attnlens does not reproduce.
        """

    @classmethod
    @abstractmethod
    def lock_key(cls, model: nn.Module) -> nn.Module:
        """The module whose per-model lock calls on ``model`` share (the base transformer inside any task head)."""

    @classmethod
    @abstractmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """Load a checkpoint of this architecture from the hub or a local folder, in eval mode."""

    @abstractmethod
    def split_qkv(self, layer: int, outputs: Sequence[Tensor], rotation: Rotation | None = None) -> QKV:
        """q, k, v of one layer from the outputs of its ``LayerSites.qkv`` modules, as its kernel receives them.

        Args:
            layer: the layer.
            outputs: one output per module of ``sites.layers[layer].qkv``, in that order.
            rotation: what :meth:`rotation` returned for this layer's forward (rotary architectures only).

        Returns:
            Views of ``outputs`` where the layout allows (rotated q and k are new tensors).
        """

    @abstractmethod
    def W_O(self, layer: int) -> Tensor:
        """The layer's output projection ``[head, d_head, d_model]``, a view of the model's parameter."""

    @abstractmethod
    def b_O(self, layer: int) -> Tensor | None:
        """The layer's output projection bias ``[d_model]`` (the model's parameter), or None if it has none."""

    @abstractmethod
    def final_norm(self) -> LayerNormWeights:
        """The final norm's parameters (the model's own tensors), as it normalises the final residual stream."""

    @abstractmethod
    def extract(self) -> ModelWeights:
        """Every weight, split per head, as views of the model's parameters (see :func:`attnlens.extract_weights`)."""

    @abstractmethod
    def describe(self) -> list[str]:
        """Lines that say what the model is: its class, kernel, dtype and the config's sizes (for the CLI)."""

    @abstractmethod
    def layout_lines(self, weights: ModelWeights, layer: int) -> list[str]:
        """How one layer's per-head weights are cut from the checkpoint's own parameters, as lines of text."""

    def kernel_pattern(self, output: object) -> Tensor | None:
        """The pattern ``[batch, head, q_pos, k_pos]`` in an attention module's output, or None where it has none.

        It is the model's tensor: copy what you keep. Default: None (the kernel keeps its pattern to itself).
        """
        return None

    def rotation(self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Rotation | None:
        """The rotary embedding that ``sites.layers[layer].attn`` was called with (its forward-pre hook's arguments).

        Default: transformers' convention for every rotary model, its ``position_embeddings`` keyword (see
        :func:`attnlens.models._hf.rotation`); None for a model without rotary layers.
        """
        from attnlens.models import _hf  # imported here: _hf builds on this module's types

        return _hf.rotation(layer, kwargs) if self.rotary else None

    def notes(self) -> tuple[str, ...]:
        """Known departures of the model's kernel from its config (for verify's report). Default: none."""
        return ()

    def step_cache(self, kwargs: dict[str, Any]) -> Any:
        """The key/value cache that a forward of ``sites.base`` was called with (its forward-pre hook's kwargs).

        Default: Hugging Face's ``past_key_values`` keyword, or None when the forward runs without a cache.
        """
        return kwargs.get("past_key_values")

    def cached_kv(self, cache: Any, layer: int) -> tuple[Tensor, Tensor]:
        """A layer's cached keys and values ``[batch, kv_head, pos, d_head]``, as its kernel reads them (post-rotary).

        The cache's own tensors (copy what you keep). A static cache holds all its slots, written or not. Default: a
        Hugging Face ``Cache`` (4.57 and 5.x), one entry per layer with ``.keys`` and ``.values``.

        Raises:
            AttentionCaptureError: the cache holds no keys for the layer (not a cache this default knows).
        """
        entries = getattr(cache, "layers", None)
        entry = entries[layer] if entries is not None and layer < len(entries) else None
        keys, values = getattr(entry, "keys", None), getattr(entry, "values", None)
        if not isinstance(keys, Tensor) or not isinstance(values, Tensor) or keys.ndim != 4:
            raise AttentionCaptureError(
                f"the {type(cache).__name__} holds no keys for layer {layer} that attnlens can read; use the default "
                "dynamic cache"
            )
        return keys, values

    # --------------------------------------------------------------------------------------- for everyone ---

    @property
    def sites(self) -> Sites:
        """The :class:`Sites` to hook and run.

        Raises:
            UnsupportedModelError: the model runs a kernel that cannot run a plain forward (``kernel_refusal``).
        """
        if self.kernel_refusal is not None:
            raise UnsupportedModelError(self.kernel_refusal)
        return self.own_sites

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's token embedding (the model's)."""
        return self._embed_weight().dtype

    @property
    def device(self) -> torch.device:
        """The device of the model's token embedding (the model's)."""
        return self._embed_weight().device

    def _embed_weight(self) -> Tensor:
        weight = self.own_sites.embed.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def model_class(self) -> str:
        """The model's class name (inside any wrapper)."""
        return type(self.module).__name__

    @property
    def lm_classes(self) -> tuple[str, ...]:
        """The supported classes with a language-model head (logits over the vocabulary), by name."""
        return tuple(c for c in self.supported_classes if any(k in c for k in ("LMHead", "DoubleHeads", "CausalLM")))

    @property
    def rotary(self) -> bool:
        """Whether any layer rotates its queries and keys (the tap then needs :meth:`rotation`)."""
        return any(spec.rotary_dim for spec in self.specs)

    def attn_implementation(self) -> str:
        """The attention kernel the model runs now (``kernel`` is the one it ran when adapted)."""
        module: Any = self.module  # a Hugging Face model: its config and kernel switch are untyped
        return str(module.config._attn_implementation)

    def set_attn_implementation(self, name: str) -> None:
        """Switch the model's attention kernel in place (callers restore it)."""
        if self.attn_implementation() != name:
            module: Any = self.module
            module.set_attn_implementation(name)

    def check_kernel(self) -> None:
        """Refuse a model whose attention kernel attnlens has not been shown to reproduce (see ``exact_kernels``).

        Raises:
            UnsupportedModelError: naming the kernel and the ones that are supported (or, for a kernel that cannot
                run a plain forward, ``kernel_refusal``).
        """
        if self.kernel_refusal is not None:
            raise UnsupportedModelError(self.kernel_refusal)
        if self.kernel not in self.exact_kernels:
            raise UnsupportedModelError(
                f"this model runs the attention kernel {self.kernel!r}, which attnlens has not been shown to "
                f"reproduce (it recomputes {', '.join(map(repr, self.exact_kernels))} exactly); load the model with "
                f"attn_implementation={' or '.join(map(repr, self.exact_kernels))}, or call "
                f"model.set_attn_implementation({self.exact_kernels[-1]!r}) first"
            )

    def provenance(self) -> dict[str, str]:
        """Where a result comes from: model, class, config hash, kernel, dtype, device, library versions."""
        import transformers

        from attnlens import __version__

        param = self._embed_weight()
        return {
            "model": self.name,
            "model_class": type(self.model).__name__,
            "config_sha256": self.config_sha256,
            "attn_implementation": self.attn_implementation(),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attnlens": __version__,
            # Config keys of unknown effect (comma-separated, "" if none): the numbers are only as good as a verify.
            "unknown_config_keys": ",".join(self.unknown_config_keys),
        }

    def check_inputs(
        self,
        input_ids: Tensor | Any,
        attention_mask: Tensor | Any | None = None,
        position_ids: Tensor | Any | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Validate and normalise inputs: ``[batch, pos]`` integer tensors on the model's device.

        Token ids and positions may come in any integer dtype (``int8`` to ``int64``, ``uint8``), as tensors, numpy
        arrays or nested lists; they are returned as ``int64``. ``attention_mask`` may also be ``bool``.

        Raises:
            ValueError: naming the problem: an empty input, a wrong dtype (floats, and bool token ids) or rank, ids
                outside the vocabulary, more positions than the model has, an ``attention_mask`` or ``position_ids``
                of the wrong shape or values, a row of padding only.
            TypeError: something that is not token ids at all (text, ``None``, a list mixing numbers and strings,
                rows of different lengths).
        """
        device = self.device

        def has_text(x: Any) -> bool:
            return isinstance(x, str) or (isinstance(x, (list, tuple)) and any(has_text(item) for item in x))

        def as_2d(x: Any, name: str, *, allow_bool: bool = False) -> Tensor:
            if has_text(x):
                raise TypeError(
                    f"{name} holds strings, but token ids are needed: text needs a tokenizer, e.g. "
                    "tokenizer(texts, return_tensors='pt', padding=True), or attnlens.trace(..., tokenizer=tokenizer)"
                )
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(
                    f"{name} must be integer token ids ([batch, pos] or [pos]: a tensor, a numpy array or a list of "
                    f"equally long lists of ints), got {type(x).__name__} that torch cannot read as one ({error})"
                ) from None
            if x.numel() == 0:
                raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one token")
            if x.dtype == torch.bool and not allow_bool:
                raise ValueError(f"{name} is a bool tensor; it must hold integer token ids (e.g. x.long())")
            if x.dtype.is_floating_point or x.dtype.is_complex:
                raise ValueError(f"{name} must hold integers, got dtype {x.dtype}; convert with .long() if exact")
            if x.ndim == 1:
                x = x.unsqueeze(0)
            if x.ndim != 2:
                raise ValueError(f"{name} must be [batch, pos] (or [pos]), got shape {tuple(x.shape)}")
            # The embedding takes int32/int64 only; narrower and unsigned ids are widened (exactly) here.
            return x.to(device=device, dtype=torch.bool if x.dtype == torch.bool else torch.long)

        ids = as_2d(input_ids, "input_ids")
        batch, n_pos = ids.shape
        if n_pos > self.n_ctx:
            raise ValueError(f"input_ids has {n_pos} positions; this model has n_ctx={self.n_ctx}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.d_vocab:
            raise ValueError(f"input_ids must lie in [0, {self.d_vocab}) (d_vocab), got values from {low} to {high}")
        mask = None
        if attention_mask is not None:
            mask = as_2d(attention_mask, "attention_mask", allow_bool=True)
            if tuple(mask.shape) != (batch, n_pos):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, input_ids {(batch, n_pos)}: they must match"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            empty = (mask == 0).all(dim=-1)
            if bool(empty.any()):
                raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} are all padding")
            mask = mask.long()
        pos = None
        if position_ids is not None:
            pos = as_2d(position_ids, "position_ids")
            if pos.shape[-1] != n_pos or pos.shape[0] not in (1, batch):
                raise ValueError(f"position_ids has shape {tuple(pos.shape)}, input_ids {(batch, n_pos)}")
            if int(pos.min()) < 0 or int(pos.max()) >= self.n_ctx:
                raise ValueError(f"position_ids must lie in [0, {self.n_ctx}), got {int(pos.min())}..{int(pos.max())}")
        return ids, mask, pos
