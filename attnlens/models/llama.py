"""Everything attnlens knows about Hugging Face Llama, Mistral, Qwen2 and Qwen3 (and SmolLM, TinyLlama, fine-tunes).

:class:`LlamaAdapter` serves the four families (``model_type`` ``llama``, ``mistral``, ``qwen2``, ``qwen3``), one
small subclass each for registration; what they differ in comes from :func:`attnlens.models.llama_config.settings`:

* Module paths: ``model.embed_tokens``, ``model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
  (self_attn.q_norm, self_attn.k_norm), post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``,
  ``lm_head`` (tied to ``embed_tokens`` or not: read from the head itself).
* ``nn.Linear`` layout (``[out, in]``), head-major features: ``q_proj`` ``[(head d_head), d_model]``, ``k_proj`` and
  ``v_proj`` ``[(kv_head d_head), d_model]`` (grouped-query attention: query head ``h`` reads key/value head
  ``h // (n_heads // n_kv_heads)``), ``o_proj`` takes ``[(head d_head)]``. ``head_dim`` may differ from
  ``hidden_size / n_heads``.
* RMSNorm before attention and MLP (``LayerNormWeights.rms``); Qwen3's per-head ``q_norm`` / ``k_norm`` on ``d_head``
  before the rotation; a gated MLP ``down(act(gate(x)) * up(x))`` (``MLPWeights.W_gate``); Qwen2's q/k/v biases,
  Llama's and Qwen3's ``attention_bias``, Llama's ``mlp_bias``.
* Rotary embedding on every feature of each q and k head, with the ``position_embeddings`` ``(cos, sin)`` the attention
  module receives (every followed rope variant's scaling is folded into them), applied by
  :func:`attnlens.functional.apply_rotary`, bitwise transformers' ``apply_rotary_pos_emb``.
* Sliding windows (Mistral's ``sliding_window``, Qwen2/Qwen3 per ``layer_types``) reach eager and sdpa through the
  mask only; attnlens states each layer's window in :class:`~attnlens.models.AttentionSpec` and applies it itself.
* Attention: ``softmax(q_rot k_rot^T * head_dim**-0.5 + mask)`` in float32, cast back (eager).

transformers is imported lazily, inside functions, so that ``import attnlens`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens import functional
from attnlens._live import zeros_beside
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models import _hf
from attnlens.models.base import QKV, Adapter, AttentionSpec, LayerSites, Rotation, Sites
from attnlens.models.llama_config import FAMILIES, LlamaLikeSettings, check_config, settings
from attnlens.models.wrappers import check_exact, check_state, plain, unwrap
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

__all__ = ["EXACT_KERNELS", "LlamaAdapter", "MistralAdapter", "Qwen2Adapter", "Qwen3Adapter"]

EXACT_KERNELS: tuple[str, ...] = ("eager", "sdpa")
"""Kernels shown to give the model's own patterns (tests/test_hub_configs_llama.py, both transformers majors): eager
bitwise against ``output_attentions`` of an eager twin, sdpa recomputed from the rotated q and k within a derived
tolerance."""

_PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def _classes(names: Sequence[str]) -> tuple[type, ...]:
    import transformers

    return tuple(cls for cls in (getattr(transformers, name, None) for name in names) if isinstance(cls, type))


def _rms(norm: nn.Module) -> LayerNormWeights:
    weight, eps = norm.weight, norm.variance_epsilon
    assert isinstance(weight, Tensor) and isinstance(eps, float)
    return LayerNormWeights(w=weight, b=zeros_beside(weight, *weight.shape), eps=eps, rms=True)


def _bias(module: nn.Module) -> Tensor | None:
    bias = module.bias
    return bias if isinstance(bias, Tensor) else None


@dataclass(frozen=True, eq=False)
class LlamaAdapter(Adapter):
    """Hugging Face Llama-shaped models as attnlens sees them (see the module docstring).

    Sites: ``input_layernorm`` (attention input), ``(q_proj, k_proj, v_proj)`` or Qwen3's ``(q_norm, k_norm, v_proj)``
    (``v_proj`` runs last), ``self_attn`` (its eager kernel hands out the pattern; its ``position_embeddings`` argument
    is the rotation), ``o_proj`` (z, indexed by query head, enters it), ``mlp``; ``embed_tokens``, no position
    embedding, ``norm`` and the LM head.
    """

    model_type: ClassVar[str] = "llama"
    supported_classes: ClassVar[tuple[str, ...]] = ("LlamaModel", "LlamaForCausalLM")
    exact_kernels: ClassVar[tuple[str, ...]] = EXACT_KERNELS
    base_class: ClassVar[str] = "LlamaModel"

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` (wrappers seen through) is of one of this family's supported classes."""
        inner = unwrap(model)
        return isinstance(inner, nn.Module) and isinstance(inner, _classes(cls.supported_classes))

    @classmethod
    def _base(cls, inner: Any) -> Any:
        return unwrap(inner if isinstance(inner, _classes((cls.base_class,))) else inner.model)

    @classmethod
    def _check(cls, model: nn.Module) -> tuple[Any, Any, tuple[str, ...], LlamaLikeSettings]:
        inner: Any = unwrap(model)
        if not cls.owns(inner):
            raise UnsupportedModelError(
                f"attnlens needs a Hugging Face {FAMILIES[cls.model_type]} model, got {type(model).__module__}."
                f"{type(model).__qualname__}; supported: {', '.join(cls.supported_classes)}"
            )
        unknown = check_config(inner.config)
        found = settings(inner.config)
        base = cls._base(inner)
        check_state(inner, base)
        at = "" if base is inner else "model."
        named = [
            (f"layer {i}'s {a}.{b} ({at}layers.{i}.{a}.{b})", layer._modules[a]._modules.get(b))
            for i, layer in enumerate(base.layers)
            for a, b in _PROJECTIONS
        ]
        head = inner.get_output_embeddings() if base is not inner else None
        if head is not None:
            named.append(("the LM head (get_output_embeddings())", head))
        check_exact(named, nn.Linear, "torch's nn.Linear")
        return inner, base, unknown, found

    @classmethod
    def _specs(cls, found: LlamaLikeSettings, d_model: int, attns: list[Any]) -> tuple[AttentionSpec, ...]:
        n_heads, n_kv, d_head = found.n_heads, found.n_kv_heads, found.d_head
        specs = []
        for i, attn in enumerate(attns):
            shapes = [tuple(getattr(attn, p).weight.shape) for p in ("q_proj", "k_proj", "o_proj")]
            expected = [(n_heads * d_head, d_model), (n_kv * d_head, d_model), (d_model, n_heads * d_head)]
            window = getattr(attn, "sliding_window", found.windows[i])
            if int(attn.head_dim) != d_head or shapes != expected or window != found.windows[i]:
                raise UnsupportedModelError(
                    f"layer {i}'s attention has head_dim={attn.head_dim}, q/k/o_proj {shapes} and sliding window "
                    f"{window}, but the config says {n_heads} query and {n_kv} key/value heads of {d_head} features "
                    f"({expected}) and window {found.windows[i]}: the config was edited after the model was built; "
                    "reload it"
                )
            # The eager kernel: softmax(scores, dtype=torch.float32).to(query.dtype), in 4.57 and 5.x alike.
            specs.append(
                AttentionSpec(
                    float(attn.scaling),
                    n_heads,
                    n_kv,
                    rotary_dim=d_head,
                    window=found.windows[i],
                    softmax_dtype=torch.float32,
                )
            )
        return tuple(specs)

    @classmethod
    def from_model(cls, model: nn.Module) -> LlamaAdapter:
        """Check a model once (class, config policy, state, module classes and shapes) and adapt it.

        Raises:
            UnsupportedModelError: another class, a config the policy refuses (a ``dynamic`` rope, say), a state
                attnlens cannot see through, or attention modules that disagree with the config.
        """
        inner, base, unknown, found = cls._check(model)
        config = inner.config
        layers_: list[Any] = list(base.layers)
        d_model = int(config.hidden_size)
        specs = cls._specs(found, d_model, [layer.self_attn for layer in layers_])
        kernel = str(config._attn_implementation)
        refusal = None
        if kernel not in EXACT_KERNELS:
            refusal = (
                f"attn_implementation={kernel!r}: attnlens has checked only {', '.join(EXACT_KERNELS)} on "
                f"{found.family} models (a sliding window reaches other kernels through other paths). Switch the "
                "model with model.set_attn_implementation('sdpa') to trace it"
            )
        head = plain(inner.get_output_embeddings()) if base is not inner else None
        sites = Sites(
            base=base,
            layers=tuple(
                LayerSites(
                    attn_input=plain(layer.input_layernorm),
                    qkv=(layer.self_attn.q_norm, layer.self_attn.k_norm, plain(layer.self_attn.v_proj))
                    if found.qk_norm
                    else tuple(plain(getattr(layer.self_attn, p)) for p in ("q_proj", "k_proj", "v_proj")),
                    attn=layer.self_attn,
                    z=plain(layer.self_attn.o_proj),
                    mlp=layer.mlp,
                )
                for layer in layers_
            ),
            embed=plain(base.embed_tokens),
            pos_embed=None,
            final_norm=plain(base.norm),
            unembed=head if isinstance(head, nn.Linear) else None,
        )
        return cls(
            model=model,
            module=inner,
            n_layers=len(layers_),
            n_heads=found.n_heads,
            n_kv_heads=found.n_kv_heads,
            d_model=d_model,
            d_head=found.d_head,
            n_ctx=int(config.max_position_embeddings),
            d_vocab=int(config.vocab_size),
            specs=specs,
            kernel=kernel,
            kernel_specs=specs,
            kernel_departure=None,
            kernel_returns_pattern=kernel == "eager",
            kernel_refusal=refusal,
            unknown_config_keys=unknown,
            parallel_residual=False,
            own_sites=sites,
            **_hf.config_fields(config),
        )

    @classmethod
    def lock_key(cls, model: nn.Module) -> nn.Module:
        """The base model every supported class wraps: a causal-LM model and its ``model`` share a lock."""
        return _hf.base_of(model, _classes((cls.base_class,)), "model")

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """Load a checkpoint of this family in eval mode: its own class (``architectures``), else ``...ForCausalLM``.

        Without ``dtype`` the weights keep their stored dtype (``dtype="auto"``); never remote code.
        """

        def check(config: Any) -> None:
            check_config(config)
            settings(config)

        return _hf.load(
            name_or_path,
            model_type=cls.model_type,
            family=FAMILIES[cls.model_type],
            check=check,
            classes=cls.supported_classes,
            default=cls.supported_classes[-1],
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
        )

    def split_qkv(self, layer: int, outputs: Sequence[Tensor], rotation: Rotation | None = None) -> QKV:
        """Queries ``[batch, head, pos, d_head]``, keys and values ``[batch, kv_head, pos, d_head]``, rotated.

        ``outputs`` are ``q_proj``'s, ``k_proj``'s and ``v_proj``'s (Qwen3: ``q_norm``'s and ``k_norm``'s, already
        ``[batch, pos, head, d_head]``). v is a view; the rotated q and k are new tensors laid out as the model's:
        rotated as ``[batch, pos, head, d_head]`` and transposed, so that a matmul on them runs as the eager kernel's
        does on its own (MKL's conservative path rounds a contiguous copy's product differently).
        """
        d_head = self.d_head
        q, k, v = (out.view(*out.shape[:2], -1, d_head) for out in outputs)
        if rotation is None:
            raise AttentionCaptureError(f"layer {layer} rotates its queries and keys, but no rotation was captured")

        def rotate(x: Tensor) -> Tensor:
            return functional.apply_rotary(x, rotation.cos, rotation.sin).transpose(1, 2)

        return QKV(rotate(q), rotate(k), v.transpose(1, 2))

    def W_O(self, layer: int) -> Tensor:
        """``o_proj.weight`` ``[d_model, (head d_head)]`` as ``[head, d_head, d_model]`` (a view)."""
        weight = self.own_sites.layers[layer].z.weight
        assert isinstance(weight, Tensor)
        return rearrange(weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads)

    def b_O(self, layer: int) -> Tensor | None:
        """``o_proj.bias`` ``[d_model]``, or None (Mistral, Qwen2, and Llama/Qwen3 without ``attention_bias``)."""
        return _bias(self.own_sites.layers[layer].z)

    def kernel_pattern(self, output: object) -> Tensor | None:
        """The eager kernel's probabilities, the second element of the attention module's output (None under sdpa)."""
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return weights if isinstance(weights, Tensor) and weights.ndim == 4 else None

    def final_norm(self) -> LayerNormWeights:
        """``norm``'s weight and eps (RMSNorm: ``rms=True``, a zero shift)."""
        return _rms(self.own_sites.final_norm)

    def extract(self) -> ModelWeights:
        """Per-head views of the ``nn.Linear`` parameters; key/value weights per key/value head.

        ``W_Q`` ``[head, d_model, d_head]`` is ``q_proj.weight.view(head, d_head, d_model).mT``; ``W_K`` and ``W_V``
        are ``[kv_head, d_model, d_head]`` the same way (``LayerWeights.grouped`` gives the zero-copy per-query-head
        view). W_Q and W_K are the projections before the rotation (and before Qwen3's q/k norms). Absent biases are
        zeros.
        """
        n_heads, n_kv, d_head, d_model = self.n_heads, self.n_kv_heads, self.d_head, self.d_model
        module: Any = self.module
        act = str(module.config.hidden_act)
        blocks: Any = self.own_sites.base.layers
        layers = []
        for i in range(self.n_layers):
            attn: Any = blocks[i].self_attn
            q_proj, k_proj, v_proj = (plain(getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj"))

            def heads(proj: Any, n: int) -> tuple[Tensor, Tensor]:
                W = proj.weight.view(n, d_head, d_model).transpose(-1, -2)
                b = _bias(proj)
                return W, b.view(n, d_head) if b is not None else zeros_beside(W, n, d_head)

            (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = heads(q_proj, n_heads), heads(k_proj, n_kv), heads(v_proj, n_kv)
            b_O = self.b_O(i)
            mlp: Any = blocks[i].mlp
            gate, up, down = plain(mlp.gate_proj), plain(mlp.up_proj), plain(mlp.down_proj)
            b_in, b_out = _bias(up), _bias(down)
            layers.append(
                LayerWeights(
                    layer=i,
                    W_Q=W_Q,
                    W_K=W_K,
                    W_V=W_V,
                    b_Q=b_Q,
                    b_K=b_K,
                    b_V=b_V,
                    W_O=self.W_O(i),
                    b_O=b_O if b_O is not None else zeros_beside(self.W_O(i), d_model),
                    ln_1=_rms(plain(blocks[i].input_layernorm)),
                    ln_2=_rms(plain(blocks[i].post_attention_layernorm)),
                    mlp=MLPWeights(
                        W_in=up.weight.T,
                        b_in=b_in if b_in is not None else zeros_beside(up.weight, up.weight.shape[0]),
                        W_out=down.weight.T,
                        b_out=b_out if b_out is not None else zeros_beside(down.weight, d_model),
                        act=act,
                        W_gate=gate.weight.T,
                        b_gate=_bias(gate),
                    ),
                    scale=self.specs[i].scale,
                    rotary_dim=self.specs[i].rotary_dim,
                    q_norm=_rms(attn.q_norm) if hasattr(attn, "q_norm") else None,
                    k_norm=_rms(attn.k_norm) if hasattr(attn, "k_norm") else None,
                    window=self.specs[i].window,
                )
            )
        unembed = self.own_sites.unembed
        W_E = self.own_sites.embed.weight
        assert isinstance(W_E, Tensor)
        return ModelWeights(
            n_layers=self.n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_head=d_head,
            d_mlp=int(plain(blocks[0].mlp.up_proj).weight.shape[0]) if self.n_layers else 0,
            d_vocab=W_E.shape[0],
            n_ctx=self.n_ctx,
            W_E=W_E,
            W_pos=None,
            W_U=unembed.weight.T if unembed is not None else None,
            ln_f=self.final_norm(),
            layers=tuple(layers),
            name=self.name,
            n_kv_heads=n_kv,
        )

    def describe(self) -> list[str]:
        """The config's sizes, grouping, rope, windows and switches, two lines."""
        c: Any = self.module.config
        s = settings(c)
        windows = sorted({w for w in s.windows if w is not None})
        return [
            f"config: {s.family} num_hidden_layers={c.num_hidden_layers} num_attention_heads={s.n_heads} "
            f"num_key_value_heads={s.n_kv_heads} head_dim={s.d_head} hidden_size={c.hidden_size} "
            f"max_position_embeddings={c.max_position_embeddings} vocab_size={c.vocab_size} activation={c.hidden_act}",
            f"rotary: rope_type={s.rope_type} base {s.rope_theta:g}; sliding windows: {windows or 'none'}; "
            f"q/k norm: {s.qk_norm}; biases q/k/v {s.qkv_bias}, o {s.o_bias}, mlp {s.mlp_bias}; tied: {s.tied}",
        ]

    def layout_lines(self, weights: ModelWeights, layer: int) -> list[str]:
        """How one layer's per-head weights are cut from ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``."""
        d, n, n_kv, dh = weights.d_model, weights.n_heads, self.n_kv_heads, weights.d_head
        per_head = weights.layers[layer]
        return [
            f"layer {layer} q_proj.weight [{n * dh}, {d}], k_proj/v_proj.weight [{n_kv * dh}, {d}]  (nn.Linear "
            "stores [out, in]: x @ W.T; rows head-major)",
            f"  W_Q = q_proj.weight.view({n}, {dh}, {d}).mT -> {list(per_head.W_Q.shape)} (before q_norm/rotary)",
            f"  W_K = k_proj.weight.view({n_kv}, {dh}, {d}).mT -> {list(per_head.W_K.shape)} per key/value head",
            f"  W_V = v_proj.weight.view({n_kv}, {dh}, {d}).mT -> {list(per_head.W_V.shape)} per key/value head",
            f"  query head h reads key/value head h // {n // n_kv} (grouped('W_K') is the zero-copy per-query view)",
            f"  W_O = o_proj.weight [{d}, {n * dh}] as (head d_head) d_model -> {list(per_head.W_O.shape)}",
        ]

    def notes(self) -> tuple[str, ...]:
        """What verify's report should say about rotary maths, grouping, RMSNorm and windows."""
        notes = [
            "rotary: q and k are compared after the rotation, taken from the position_embeddings the attention "
            "modules received and applied by attnlens.functional.apply_rotary",
            "RMSNorm and a gated MLP in the rebuild (attnlens.functional.rms_norm, gated MLP from MLPWeights.W_gate)",
        ]
        if self.n_kv_heads < self.n_heads:
            notes.append(f"grouped-query attention: {self.n_heads} query heads share {self.n_kv_heads} key/value heads")
        if any(spec.window is not None for spec in self.specs):
            notes.append("sliding window: recomputed patterns block keys outside each layer's window")
        return tuple(notes)


@dataclass(frozen=True, eq=False)
class MistralAdapter(LlamaAdapter):
    """Mistral: the Llama adapter with one sliding window for every layer (``sliding_window``)."""

    model_type: ClassVar[str] = "mistral"
    supported_classes: ClassVar[tuple[str, ...]] = ("MistralModel", "MistralForCausalLM")
    base_class: ClassVar[str] = "MistralModel"


@dataclass(frozen=True, eq=False)
class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5: the Llama adapter with q/k/v biases and per-layer windows (``layer_types``)."""

    model_type: ClassVar[str] = "qwen2"
    supported_classes: ClassVar[tuple[str, ...]] = ("Qwen2Model", "Qwen2ForCausalLM")
    base_class: ClassVar[str] = "Qwen2Model"


@dataclass(frozen=True, eq=False)
class Qwen3Adapter(LlamaAdapter):
    """Qwen3: the Llama adapter with per-head ``q_norm`` / ``k_norm`` before the rotation."""

    model_type: ClassVar[str] = "qwen3"
    supported_classes: ClassVar[tuple[str, ...]] = ("Qwen3Model", "Qwen3ForCausalLM")
    base_class: ClassVar[str] = "Qwen3Model"
